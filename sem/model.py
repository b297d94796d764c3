"""The Signal-Entropic Model (SEM): a complex-valued byte-level language model in pure PyTorch.

Layout of the state: the residual stream psi in C^D is carried as a REAL tensor [B, T, 2D] of
interleaved (Re, Im) pairs, i.e. torch.view_as_real(psi).flatten(-2). Every nn.Parameter is a real float32 tensor, so AdamW, clipping, DDP and precision
plugins never see complex parameters. Complex64 values are built only inside autocast-disabled regions
(the recurrence and the Cayley propagator), from float32 parts; real matmuls follow autocast.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

# ||psi_t||^2 / D of the residual state entering norm_f is clamped to [1/ENERGY_CLAMP, ENERGY_CLAMP]
# before the log, so the per-token penalty log(e)^2 is bounded by log(ENERGY_CLAMP)^2 ~= 84.8 and its
# gradient vanishes beyond the clamp.
ENERGY_CLAMP = 1e4
# Chunk length of the two-level scan: intra-chunk [C, C] and inter-chunk [T/C, T/C] decay matrices.
SCAN_CHUNK = 16
MIN_DECAY = 1e-6


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V] float32
    loss: torch.Tensor | None  # ce_loss + unitary_lambda * unitary_divergence
    ce_loss: torch.Tensor | None  # mean nats/token over targets != -100
    unitary_divergence: torch.Tensor  # scalar float32: mean log(||psi_t||^2 / D)^2 entering norm_f


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean nats/token over targets != -100. logits [B, T, V] float32, targets [B, T] long."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def check_input_length(input_ids: torch.Tensor, max_seq_len: int) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > max_seq_len:
        raise ValueError(f"input length T={input_ids.shape[1]} exceeds max_seq_len={max_seq_len}")


def real_linear_of(w: torch.Tensor) -> torch.Tensor:
    """Real matrix [2P, 2Q] of a complex [P, Q] map on interleaved (Re, Im) features: F.linear(x, it)."""
    return torch.stack([torch.stack([w.real, -w.imag], -1), torch.stack([w.imag, w.real], -1)], 1).flatten(2).flatten(0, 1)


def recurrence_fft(x: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
    """h_t = sum_{s<=t} lambda^(t-s) u_s by FFT convolution. x [B, T, D, 2] float32 (interleaved Re/Im).

    O(T log T) but leaks round-off across time (~1e-4 relative at fp32).
    """
    u = torch.view_as_complex(x.contiguous())  # [B, T, D] complex64
    T = u.shape[1]
    n = 1 << (2 * T - 1).bit_length()  # >= 2T-1: linear, not circular, convolution
    k = torch.arange(T, device=u.device, dtype=torch.float32)
    kernel = torch.exp(k[:, None] * log_lam[None, :])  # [T, D] lambda^k
    h = torch.fft.ifft(torch.fft.fft(u, n=n, dim=1) * torch.fft.fft(kernel, n=n, dim=0), n=n, dim=1)
    return torch.view_as_real(h[:, :T])


def _decay_matrix(n: int, log_lam: torch.Tensor, stride: int, shift: int) -> torch.Tensor:
    """M[d, i, j] = lambda_d^(stride * (i - j - shift)) where i - j - shift >= 0, else 0. [D, n, n] complex."""
    idx = torch.arange(n, device=log_lam.device)
    diff = idx[:, None] - idx[None, :] - shift  # [n, n]
    powers = torch.exp((diff.clamp(min=0) * stride).to(torch.float32)[None] * log_lam[:, None, None])
    return torch.where((diff >= 0)[None], powers, torch.zeros((), dtype=powers.dtype, device=powers.device))


def _real_block(m: torch.Tensor) -> torch.Tensor:
    """Real form [G, 2P, 2Q] of a complex batch [G, P, Q]: [[Re, -Im], [Im, Re]] acting on [re; im]."""
    return torch.cat([torch.cat([m.real, -m.imag], 2), torch.cat([m.imag, m.real], 2)], 1)


def recurrence_scan(x: torch.Tensor, log_lam: torch.Tensor, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """Same recurrence as recurrence_fft, as a two-level chunked scan of real batched matmuls.

    x [B, T, D, 2] float32 (interleaved Re/Im), returns the same layout. No loop over time: within a
    chunk of C steps h = L u with L[c, s] = lambda^(c-s); chunk-final states are carried across the
    T/C chunks by a second matrix of powers of lambda^C. Exact up to ordinary matmul round-off (nothing
    leaks from the future). Complex products are written as real bmm because complex bmm on CPU
    falls back to a per-matrix loop.
    """
    B, T, D, _ = x.shape
    C = min(chunk, T)
    N = -(-T // C)
    if N * C != T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))  # zero inputs after the end change nothing before it
    u = x.view(B, N, C, D, 2).permute(3, 4, 2, 0, 1).reshape(D, 2 * C, B * N)  # [D, (re|im, c), (b, n)]
    h = torch.bmm(_real_block(_decay_matrix(C, log_lam, 1, 0)), u).view(D, 2, C, B, N)  # zero carry-in
    if N > 1:
        inter = _decay_matrix(N, log_lam, C, 1).transpose(1, 2)  # [D, m, n] = lambda^(C(n-1-m)), m < n
        ends = h[:, :, -1].reshape(D, 2 * B, N)  # chunk-final states [D, (re|im, b), m]
        er, ei = (ends @ torch.cat([inter.real, inter.imag], 2)).view(D, 2, B, 2, N).unbind(1)
        cr, ci = er[:, :, 0] - ei[:, :, 1], er[:, :, 1] + ei[:, :, 0]  # state entering chunk n [D, B, N]
        steps = torch.arange(1, C + 1, device=x.device, dtype=torch.float32)
        p = torch.exp(steps[None] * log_lam[:, None])  # [D, C] lambda^(c+1)
        pr, pi = p.real[:, :, None, None], p.imag[:, :, None, None]
        cr, ci = cr[:, None], ci[:, None]
        h = h + torch.stack([cr * pr - ci * pi, cr * pi + ci * pr], 1)
    return h.permute(3, 4, 2, 0, 1).reshape(B, N * C, D, 2)[:, :T]


class ComplexRMSNorm(nn.Module):
    """psi / rms|psi| * gain, with a real per-channel gain (keeps phases). Output energy ~ D."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 2D] real, interleaved (Re, Im) pairs
        # rms over the 2D real features is rms|psi| / sqrt(2); the sqrt(1/2) restores energy D.
        weight = self.gain.float().repeat_interleave(2) * math.sqrt(0.5)  # [2D], same gain for Re and Im
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps)


class SEMBlock(nn.Module):
    """psi + MLP(recurrence(B norm(psi)) + skip * norm(psi))."""

    def __init__(self, d_model: int, mlp_ratio: float, recurrence: str, dropout: float, n_layers: int) -> None:
        super().__init__()
        d2 = 2 * d_model
        self.recurrence = recurrence
        self.norm = ComplexRMSNorm(d_model)
        # B as an R-linear map on [Re x, Im x]: one real matmul (autocast-friendly), a superset of C-linear.
        self.in_proj = nn.Linear(d2, d2, bias=False)
        # Spread of timescales 1/(1-|lambda|) log-uniform in [1, 1000] and phases in [0, pi] (S4D/LRU-like).
        tau = torch.exp(torch.linspace(0.0, math.log(1000.0), d_model))
        self.log_A_mag = nn.Parameter(torch.log(1.0 / tau))  # |lambda| = exp(-1/tau)
        self.theta = nn.Parameter(torch.rand(d_model) * math.pi)
        self.skip_D = nn.Parameter(torch.ones(d2))
        hidden = max(1, int(mlp_ratio * d2))
        self.mlp_in = nn.Linear(d2, 2 * hidden, bias=False)  # value and gate
        self.mlp_out = nn.Linear(hidden, d2, bias=False)
        nn.init.normal_(self.mlp_out.weight, std=0.02 / math.sqrt(2 * n_layers))
        self.drop = nn.Dropout(dropout)

    def log_lambda(self) -> torch.Tensor:
        """log lambda = -(exp(log_A_mag) + MIN_DECAY) + i theta: |lambda| < 1 for any value. [D] complex64."""
        return torch.complex(-self.decay_rate(), self.theta.float())

    def decay_rate(self) -> torch.Tensor:
        # MIN_DECAY keeps |lambda| <= exp(-1e-6) < 1 even in float32 (timescales up to 1e6 tokens).
        return torch.exp(self.log_A_mag.float()) + MIN_DECAY

    def mix(self, u: torch.Tensor) -> torch.Tensor:
        """Diagonal complex recurrence over time. u [B, T, 2D] real -> [B, T, 2D] float32."""
        with _no_autocast(u):
            log_lam = self.log_lambda()
            # LRU input normalisation sqrt(1 - |lambda|^2) keeps the state's variance ~ the input's.
            gamma = torch.sqrt(-torch.expm1(-2.0 * self.decay_rate()))  # [D]
            x = u.float().unflatten(-1, (-1, 2)) * gamma[:, None]  # [B, T, D, 2]
            h = recurrence_fft(x, log_lam) if self.recurrence == "fft" else recurrence_scan(x, log_lam)
            return h.flatten(-2)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:  # psi [B, T, 2D] float32
        return self._body(psi)[0]

    def _body(self, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(new residual [B, T, 2D], recurrence state h [B, T, 2D] float32 interleaved)."""
        x = self.norm(psi)
        h = self.mix(self.in_proj(x))
        value, gate = self.mlp_in(h + self.skip_D * x).chunk(2, dim=-1)
        return psi + self.drop(self.mlp_out(F.silu(gate) * value)).float(), h

    def step(self, psi: torch.Tensor, h: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: psi [B, 2D] float32, h [B, D] complex64 (this block's recurrence state),
        lam [D] complex64 = lambda, gamma [D] = input scale. Returns (psi', h'): h' = lambda h + gamma u."""
        x = self.norm(psi)
        u = self.in_proj(x)
        with _no_autocast(u):
            h = lam * h + torch.view_as_complex(u.float().unflatten(-1, (-1, 2)) * gamma[:, None])
        value, gate = self.mlp_in(torch.view_as_real(h).flatten(-2) + self.skip_D * x).chunk(2, dim=-1)
        return psi + self.mlp_out(F.silu(gate) * value).float(), h

    def decay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda [D] complex64, gamma [D] float32) for step(): computed once per decode, not per token."""
        with _no_autocast(self.log_A_mag):
            return torch.exp(self.log_lambda()), torch.sqrt(-torch.expm1(-2.0 * self.decay_rate()))


class CayleyPropagator(nn.Module):
    """U = (I + iH/2)^-1 (I - iH/2) for Hermitian H = sym(P) + i antisym(Q): exactly unitary."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.h_real = nn.Parameter(torch.randn(d_model, d_model) * 0.02)
        self.h_imag = nn.Parameter(torch.randn(d_model, d_model) * 0.02)

    def hamiltonian(self) -> torch.Tensor:  # [D, D] complex64, H^H == H
        p, q = self.h_real.float(), self.h_imag.float()
        return torch.complex(0.5 * (p + p.T), 0.5 * (q - q.T))

    def unitary(self) -> torch.Tensor:  # [D, D] complex64
        with _no_autocast(self.h_real):
            h = self.hamiltonian()
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            return torch.linalg.solve(eye + 0.5j * h, eye - 0.5j * h)

    def forward(self, psi: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """psi + alpha (U psi - psi) per token. psi [B, T, 2D] real, alpha scalar tensor."""
        with _no_autocast(psi):
            u = self.unitary()  # once per forward, not per token
            w = real_linear_of(u)  # [2D, 2D]
            eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
            return F.linear(psi.float(), eye + alpha * (w - eye))  # (1 - alpha) psi + alpha U psi


class SEMModel(nn.Module):
    """Encoder -> N SEMBlocks -> ComplexRMSNorm -> Cayley propagator -> Born (or linear) readout."""

    no_decay_keywords: ClassVar[tuple[str, ...]] = ("norm", "bias", "gain", "log_A_mag", "theta", "skip_D")
    # >=2-D weights that are not hidden matrices (kept out of Muon): the token table, the readout and
    # the propagator's h_real/h_imag (they parametrise H of U = Cayley(H), not a map on the state).
    non_matrix_keywords: ClassVar[tuple[str, ...]] = ("embed", "propagator", "readout")

    def __init__(
        self,
        vocab_size: int = 259,
        d_model: int = 128,
        n_layers: int = 4,
        max_seq_len: int = 2048,
        mlp_ratio: float = 2.0,
        readout: Literal["born", "linear"] = "born",
        unitary_lambda: float = 0.01,
        propagator_warmup_steps: int = 200,
        recurrence: Literal["fft", "scan"] = "scan",
        gradient_checkpointing: bool = False,
        born_eps: float = 1e-6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                            ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        checks = (
            ("mlp_ratio", mlp_ratio, mlp_ratio > 0),
            ("readout", readout, readout in ("born", "linear")),
            ("recurrence", recurrence, recurrence in ("fft", "scan")),
            ("unitary_lambda", unitary_lambda, unitary_lambda >= 0),
            ("propagator_warmup_steps", propagator_warmup_steps,
             isinstance(propagator_warmup_steps, int) and propagator_warmup_steps >= 0),
            ("born_eps", born_eps, born_eps > 0),
            ("dropout", dropout, 0.0 <= dropout < 1.0),
        )
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}")
        self.vocab_size, self.d_model, self.max_seq_len = vocab_size, d_model, max_seq_len
        self.readout_kind, self.unitary_lambda, self.born_eps = readout, unitary_lambda, born_eps
        self.propagator_warmup_steps = propagator_warmup_steps
        self.gradient_checkpointing = gradient_checkpointing
        # Set by each forward for probes(), never saved: [B, T] pre-norm energy, [B, T, 2D] final state.
        self._last_energy: torch.Tensor | None = None
        self._last_state: torch.Tensor | None = None

        # Encoder: one [V, 2D] table = Re and Im embeddings side by side; std 1/sqrt(2) -> energy ~ D.
        self.embed = nn.Embedding(vocab_size, 2 * d_model)
        nn.init.normal_(self.embed.weight, std=math.sqrt(0.5))
        self.blocks = nn.ModuleList(
            SEMBlock(d_model, mlp_ratio, recurrence, dropout, n_layers) for _ in range(n_layers)
        )
        self.norm_f = ComplexRMSNorm(d_model)
        self.propagator = CayleyPropagator(d_model)
        # Persistent so a loaded checkpoint runs with the alpha it was saved at.
        self.register_buffer("propagator_alpha", torch.tensor(self._alpha(0)))
        if readout == "born":
            # Complex W = w_re + i w_im, [V, D]; std 1/sqrt(2D) -> E|z_k|^2 ~ 1 >> born_eps at init.
            self.readout_re = nn.Parameter(torch.randn(vocab_size, d_model) / math.sqrt(2 * d_model))
            self.readout_im = nn.Parameter(torch.randn(vocab_size, d_model) / math.sqrt(2 * d_model))
        else:
            self.readout = nn.Linear(2 * d_model, vocab_size)

    def _alpha(self, step: int) -> float:
        if self.propagator_warmup_steps == 0:
            return 1.0
        return min(1.0, max(0, step) / self.propagator_warmup_steps)

    def set_step(self, step: int) -> None:
        """Propagator blend alpha = min(1, step / propagator_warmup_steps): a pure function of step."""
        self.propagator_alpha.fill_(self._alpha(step))

    @torch.no_grad()
    def probes(self) -> dict[str, float]:
        """Diagnostics of the SEM state, computed on demand (logging steps only), as Python floats.

        Always: ``sem/unitarity_error`` (max |U^H U - I|), ``sem/max_lambda`` (max |lambda| over all
        blocks), ``sem/alpha`` (propagator blend). After a forward, from that forward's batch:
        ``sem/energy_mean`` / ``sem/energy_max`` (pre-norm ||psi_t||^2 / D over tokens) and
        ``sem/phase_coherence`` (mean over tokens of R_t = |mean_d psi_td / |psi_td||, in [0, 1], of the
        state fed to the readout: 1 when all channels share one phase, ~1/sqrt(D) for random phases).
        """
        u = self.propagator.unitary()  # [D, D] complex64
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        out = {
            "sem/unitarity_error": (u.conj().T @ u - eye).abs().max().item(),
            # |lambda| = exp(-decay_rate), [D] per block
            "sem/max_lambda": max(torch.exp(-b.decay_rate()).max().item() for b in self.blocks),
            "sem/alpha": self.propagator_alpha.item(),
        }
        if self._last_energy is not None and self._last_state is not None:
            energy = self._last_energy.float()  # [B, T]
            psi = self._last_state.float().unflatten(-1, (-1, 2)).contiguous()  # [B, T, D, 2]
            z = torch.view_as_complex(psi)  # [B, T, D] complex64
            unit = z / z.abs().clamp_min(1e-12)  # e^{i phase}; a zero channel contributes 0
            out["sem/energy_mean"] = energy.mean().item()
            out["sem/energy_max"] = energy.max().item()
            out["sem/phase_coherence"] = unit.mean(-1).abs().mean().item()
        return out

    def _readout(self, psi: torch.Tensor) -> torch.Tensor:  # psi [B, T, 2D] -> logits [B, T, V] float32
        if self.readout_kind == "linear":
            return self.readout(psi).float()
        # z = W psi as one real matmul on interleaved features (may run in bf16 under autocast).
        w = real_linear_of(torch.complex(self.readout_re.float(), self.readout_im.float()))  # [2V, 2D]
        z = F.linear(psi, w).float().unflatten(-1, (-1, 2))  # [B, T, V, 2]
        return torch.log(z.pow(2).sum(-1) + self.born_eps)  # Born rule: p_k ~ |z_k|^2

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        check_input_length(input_ids, self.max_seq_len)
        psi = self.embed(input_ids).float()  # [B, T, 2D]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                psi = checkpoint(block, psi, use_reentrant=False)
            else:
                psi = block(psi)
        # The penalty reads the residual state entering norm_f: after the norm (and the unitary
        # propagator) the energy is ~1 by construction and the term would be inert (~1e-11).
        # Not detached: its gradient reaches the blocks and the embedding that write the residual.
        with _no_autocast(psi):
            energy = psi.float().pow(2).sum(-1) / self.d_model  # [B, T] ||psi_t||^2 / D
            unitary_div = torch.log(energy.clamp(1.0 / ENERGY_CLAMP, ENERGY_CLAMP)).pow(2).mean()
        psi = self.propagator(self.norm_f(psi), self.propagator_alpha)  # [B, T, 2D] float32
        # Detached views for probes(): references only, the statistics are computed there on demand.
        self._last_energy, self._last_state = energy.detach(), psi.detach()
        logits = self._readout(psi)
        if targets is None:
            return ModelOutput(logits=logits, loss=None, ce_loss=None, unitary_divergence=unitary_div)
        ce = cross_entropy(logits, targets)
        return ModelOutput(logits, ce + self.unitary_lambda * unitary_div, ce, unitary_div)

    # ------------------------------------------------------------------ recurrent decoding

    @torch.no_grad()
    def decode_state(self, batch_size: int = 1) -> DecodeState:
        """A fresh (empty-context) decoding state on the model's device."""
        ref = self.embed.weight
        with _no_autocast(ref):
            w = real_linear_of(self.propagator.unitary())
            eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
            propagator = eye + self.propagator_alpha * (w - eye)
            readout = (real_linear_of(torch.complex(self.readout_re.float(), self.readout_im.float()))
                       if self.readout_kind == "born" else None)
        h = [torch.zeros(batch_size, self.d_model, dtype=torch.complex64, device=ref.device) for _ in self.blocks]
        return DecodeState(h, [b.decay() for b in self.blocks], propagator, readout)

    @torch.no_grad()
    def step(self, token: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """Next-token logits [B, V] float32 after ``token`` [B], and the advanced state. O(1) time and
        memory per token, any context length (no max_seq_len: the recurrence has no window)."""
        psi = self.embed(token).float()  # [B, 2D]
        hs = []
        for block, h, (lam, gamma) in zip(self.blocks, state.h, state.decay):
            psi, h = block.step(psi, h, lam, gamma)
            hs.append(h)
        psi = F.linear(self.norm_f(psi).float(), state.propagator)
        state = DecodeState(hs, state.decay, state.propagator, state.readout, state.position + 1)
        return self._readout_with(psi, state.readout), state

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, state: DecodeState | None = None
                ) -> tuple[torch.Tensor, DecodeState]:
        """Consume a prompt [B, T] in one parallel pass (the scan), returning the last position's
        logits [B, V] and the state after it: the same as T calls of step(), much faster."""
        if state is not None and state.position > 0:  # continue a context: token by token
            logits = None
            for t in range(input_ids.shape[1]):
                logits, state = self.step(input_ids[:, t], state)
            assert logits is not None
            return logits, state
        state = self.decode_state(input_ids.shape[0])
        psi = self.embed(input_ids).float()
        hs = []
        for block in self.blocks:
            psi, h = block._body(psi)
            hs.append(torch.view_as_complex(h[:, -1].float().unflatten(-1, (-1, 2)).contiguous()))
        last = F.linear(self.norm_f(psi[:, -1]).float(), state.propagator)
        state = DecodeState(hs, state.decay, state.propagator, state.readout, input_ids.shape[1])
        return self._readout_with(last, state.readout), state

    def _readout_with(self, psi: torch.Tensor, readout: torch.Tensor | None) -> torch.Tensor:
        if readout is None:
            return self.readout(psi).float()
        z = F.linear(psi, readout).float().unflatten(-1, (-1, 2))
        return torch.log(z.pow(2).sum(-1) + self.born_eps)


@dataclass
class DecodeState:
    """Recurrent decoding state of an SEMModel: one complex [B, D] state per block (constant in the
    context length), plus per-decode constants (lambda, gamma per block; the propagator and readout
    maps), so a step costs the same at token 10 and at token 10^6."""

    h: list[torch.Tensor]
    decay: list[tuple[torch.Tensor, torch.Tensor]]
    propagator: torch.Tensor  # [2D, 2D] real map (1 - alpha) I + alpha U
    readout: torch.Tensor | None  # [2V, 2D] real form of the Born readout (None: linear readout)
    position: int = 0  # tokens consumed


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups, empty ones dropped, in this order:

    - "matrix": hidden 2-D weight matrices (the linear maps inside blocks), Muon's share; a model
      opts in by declaring ``non_matrix_keywords``: without it no weight is called a matrix;
    - "decay": every other >=2-D weight (embeddings, readout, positional tables, the propagator);
    - "no_decay": ``p.ndim < 2`` or a ``no_decay_keywords`` match (norms, gains, biases, per-channel
      recurrence parameters), weight decay 0.

    "matrix" and "decay" both get ``weight_decay``: for AdamW or SGD the split changes nothing.
    """
    no_decay_keys: tuple[str, ...] = getattr(model, "no_decay_keywords", ("norm", "bias"))
    non_matrix_keys: tuple[str, ...] | None = getattr(model, "non_matrix_keywords", None)
    matrix, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in no_decay_keys):
            no_decay.append(p)
        elif non_matrix_keys is not None and p.ndim == 2 and not any(k in name for k in non_matrix_keys):
            matrix.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "matrix", "params": matrix, "weight_decay": weight_decay},
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
