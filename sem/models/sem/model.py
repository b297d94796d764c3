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
from torch.profiler import record_function
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
    return _real_linear(w.real, w.imag)


def _real_linear(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """real_linear_of(re + i im) from the real parts, without a complex tensor in between (whose .real
    and .imag cost a zero-filled [P, Q, 2] grad each in the backward)."""
    return torch.stack([torch.stack([re, -im], -1), torch.stack([im, re], -1)], 1).flatten(2).flatten(0, 1)


def recurrence_fft(x: torch.Tensor, log_lam: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = gamma * sum_{s<=t} lambda^(t-s) u_s by FFT convolution. x [B, T, D, 2] float32 (interleaved
    Re/Im), gamma [D] real input scale (None: 1), returns [B, T, D, 2].

    O(T log T) but leaks round-off across time (~1e-4 relative at fp32).
    """
    u = torch.view_as_complex(x.contiguous())  # [B, T, D] complex64
    T = u.shape[1]
    n = 1 << (2 * T - 1).bit_length()  # >= 2T-1: linear, not circular, convolution
    k = torch.arange(T, device=u.device, dtype=torch.float32)
    kernel = torch.exp(log_lam[:, None] * k[None, :])  # [D, T] lambda^k
    if gamma is not None:  # folded into the [D, T] kernel: no pass over [B, T, D], no [B, T, D] grad reduction
        kernel = kernel * gamma[:, None]
    # Time as the last, contiguous dim: an FFT along dim 1 would transpose-copy internally each time.
    spec = torch.fft.fft(u.transpose(1, 2), n=n, dim=-1) * torch.fft.fft(kernel, n=n, dim=-1)  # [B, D, n]
    h = torch.fft.ifft(spec, dim=-1)[..., :T].transpose(1, 2).contiguous()  # [B, T, D] complex64
    return torch.view_as_real(h)


def _decay_matrix(n: int, log_lam: torch.Tensor, stride: int, shift: int) -> torch.Tensor:
    """M[d, i, j] = lambda_d^(stride * (i - j - shift)) where i - j - shift >= 0, else 0. [D, n, n] complex."""
    idx = torch.arange(n, device=log_lam.device)
    diff = idx[:, None] - idx[None, :] - shift  # [n, n]
    powers = torch.exp((diff.clamp(min=0) * stride).to(torch.float32)[None] * log_lam[:, None, None])
    return torch.where((diff >= 0)[None], powers, torch.zeros((), dtype=powers.dtype, device=powers.device))


def _right_real(m: torch.Tensor) -> torch.Tensor:
    """Real form [G, 2P, 2Q] of z -> z m for a complex batch m [G, P, Q] acting on row vectors z of
    interleaved (Re, Im) pairs: (x + iy)(a + ib) = (xa - yb) + i(xb + ya)."""
    G, P, Q = m.shape
    a, b = m.real, m.imag
    return torch.stack([torch.stack([a, b], -1), torch.stack([-b, a], -1)], 2).view(G, 2 * P, 2 * Q)


def recurrence_scan(x: torch.Tensor, log_lam: torch.Tensor, gamma: torch.Tensor | None = None,
                    chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """Same recurrence as recurrence_fft, as a two-level chunked scan of real batched matmuls.

    x [B, T, D, 2] float32 (interleaved Re/Im), gamma [D] or None; returns the same layout. No loop
    over time: within a chunk of C steps h = L u with L[c, s] = lambda^(c-s); chunk-final states are
    carried across the T/C chunks by a second matrix of powers of lambda^C. Exact up to ordinary
    matmul round-off (nothing leaks from the future). Complex products are written as real bmm on
    interleaved (Re, Im) rows because complex bmm on CPU falls back to a per-matrix loop.
    """
    B, T, D, _ = x.shape
    C = min(chunk, T)
    N = -(-T // C)
    if N * C != T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * C - T))  # zero inputs after the end change nothing before it
    # One transpose of complex elements (8-byte pairs stay together: ~3x cheaper than a 5-D permute of
    # floats): per channel d a [B*N, C] matrix of row vectors, (c, re|im) interleaved.
    u = torch.view_as_complex(x.contiguous()).view(B * N * C, D).t().contiguous()  # [D, (b, n, c)]
    u = torch.view_as_real(u).view(D, B * N, 2 * C)
    intra = _decay_matrix(C, log_lam, 1, 0).transpose(1, 2)  # [D, s, c] = lambda^(c-s), s <= c
    if gamma is not None:  # folded into the [D, C, C] matrix rather than a pass over x
        intra = intra * gamma[:, None, None]
    h = torch.bmm(u, _right_real(intra))  # [D, B*N, 2C], zero carry-in
    if N > 1:
        ends = h.view(D, B, N, C, 2)[:, :, :, -1].reshape(D, B, 2 * N)  # chunk-final states [D, b, (m, re|im)]
        inter = _decay_matrix(N, log_lam, C, 1).transpose(1, 2)  # [D, m, n] = lambda^(C(n-1-m)), m < n
        carry = torch.bmm(ends, _right_real(inter)).view(D, B * N, 2)  # state entering chunk n
        steps = torch.arange(1, C + 1, device=x.device, dtype=torch.float32)
        p = torch.exp(steps[None] * log_lam[:, None])[:, None]  # [D, 1, C] lambda^(c+1)
        h = torch.baddbmm(h, carry, _right_real(p))
    h = torch.view_as_complex(h.view(D, B * N * C, 2)).t().contiguous()  # [(b, n, c), D] complex64
    return torch.view_as_real(h).view(B, N * C, D, 2)[:, :T]


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dim, with a hand-written backward.

    The forward is F.rms_norm's arithmetic (bitwise equal); autograd through that composite costs
    about a dozen passes over [B, T, F], this backward six (two of them read-only matrix-vector
    products): with n = x r, dx = r (g w - n mean(g w n)) and dweight = sum over tokens of g n.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float
                ) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))  # [..., 1]
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, r = ctx.saved_tensors
        features = x.shape[-1]
        with _no_autocast(x):
            gx = (grad * x).reshape(-1, features)  # [N, F]
            # mean(g w n) per token = r (gx @ w) / F; the weight's grad = sum over tokens of r g x = r^T gx
            coef = (r.pow(3) * (gx @ weight).view_as(r)).div_(-features)  # [..., 1]
            grad_weight = r.view(-1) @ gx if ctx.needs_input_grad[1] else None  # [F]
            return (grad * weight).mul_(r).addcmul_(x, coef), grad_weight, None


class _GatedSiLU(torch.autograd.Function):
    """silu(gate) * value for a = [value | gate] [..., 2H] -> [..., H], autograd's arithmetic (bitwise
    equal) without its last step: through chunk + silu + mul, autograd ends in a cat copying both
    halves' grads into [..., 2H]; this backward writes them into one buffer in place."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor) -> torch.Tensor:
        value, gate = a.chunk(2, dim=-1)
        s = F.silu(gate)
        ctx.save_for_backward(a, s)
        return s * value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        a, s = ctx.saved_tensors
        value, gate = a.chunk(2, dim=-1)
        grad_a = torch.empty_like(a)
        grad_value, grad_gate = grad_a.chunk(2, dim=-1)
        torch.mul(grad, s, out=grad_value)
        torch.ops.aten.silu_backward.grad_input(grad * value, gate, grad_input=grad_gate)
        return grad_a


class _BornLogits(torch.autograd.Function):
    """log(|z_k|^2 + eps) [..., V] from z [..., >= 2V] whose first 2V features are (Re, Im) pairs.

    Autograd's arithmetic (bitwise equal) with one pass over the [..., V, 2] amplitudes in the backward
    instead of three: d/dz log(|z|^2 + eps) = 2 z / (|z|^2 + eps). Features past 2V (padding that keeps
    the readout matmul's width a multiple of 16) get zero grad.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, vocab: int, eps: float) -> torch.Tensor:
        # |z|^2 + eps as Re^2 + Im^2 of strided halves: bitwise the same as pow(2).sum(-1), whose
        # reduction over a last dim of size 2 runs ~7x slower on CPU.
        sq = z[..., :2 * vocab].unflatten(-1, (vocab, 2)).square()
        s = (sq[..., 0] + sq[..., 1]).add_(eps)
        ctx.save_for_backward(z, s)
        ctx.vocab = vocab
        return torch.log(s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        z, s = ctx.saved_tensors
        pairs = (ctx.vocab, 2)
        grad_z = torch.empty_like(z)
        grad_z[..., 2 * ctx.vocab:].zero_()
        torch.mul(z[..., :2 * ctx.vocab].unflatten(-1, pairs), torch.div(grad, s).mul_(2).unsqueeze(-1),
                  out=grad_z[..., :2 * ctx.vocab].unflatten(-1, pairs))
        return grad_z, None, None


class ComplexRMSNorm(nn.Module):
    """psi / rms|psi| * gain, with a real per-channel gain (keeps phases). Output energy ~ D."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 2D] real, interleaved (Re, Im) pairs
        # rms over the 2D real features is rms|psi| / sqrt(2); the sqrt(1/2) restores energy D.
        weight = self.gain.float().repeat_interleave(2) * math.sqrt(0.5)  # [2D], same gain for Re and Im
        with _no_autocast(x):
            return _RMSNormFunction.apply(x.float(), weight, self.eps)


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
            x = u.float().unflatten(-1, (-1, 2))  # [B, T, D, 2]
            recurrence = recurrence_fft if self.recurrence == "fft" else recurrence_scan
            return recurrence(x, log_lam, gamma).flatten(-2)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:  # psi [B, T, 2D] float32
        return self._body(psi)[0]

    def _body(self, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(new residual [B, T, 2D], recurrence state h [B, T, 2D] float32 interleaved)."""
        # record_function labels name the parts for bench/profile_sem.py (a no-op unless profiling).
        with record_function("sem/norm"):
            x = self.norm(psi)
        with record_function("sem/in_proj"):
            u = self.in_proj(x)
        with record_function("sem/recurrence"):
            h = self.mix(u)
        with record_function("sem/mlp"):
            hidden = _GatedSiLU.apply(self.mlp_in(h + self.skip_D * x))
            return psi + self.drop(self.mlp_out(hidden)).float(), h

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
        with _no_autocast(self.h_real), record_function("sem/cayley_solve"):
            h = self.hamiltonian()
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            return torch.linalg.solve(eye + 0.5j * h, eye - 0.5j * h)

    def matrix(self, alpha: torch.Tensor) -> torch.Tensor:
        """The real [2D, 2D] map (1 - alpha) I + alpha U on interleaved features; alpha scalar tensor."""
        with _no_autocast(self.h_real):
            w = real_linear_of(self.unitary())  # [2D, 2D]
            eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
            return eye + alpha * (w - eye)

    def forward(self, psi: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """psi + alpha (U psi - psi) per token. psi [B, T, 2D] real, alpha scalar tensor."""
        with _no_autocast(psi):
            return F.linear(psi.float(), self.matrix(alpha))


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
        # Set by each forward for probes(), never saved: [B, T] pre-norm energy, [B, T, 2D] output of
        # norm_f and the [2D, 2D] propagator map that the readout applied to it.
        self._last_energy: torch.Tensor | None = None
        self._last_state: tuple[torch.Tensor, torch.Tensor] | None = None

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
            normed, propagator = self._last_state
            psi = F.linear(normed.float(), propagator).unflatten(-1, (-1, 2)).contiguous()  # [B, T, D, 2]
            z = torch.view_as_complex(psi)  # [B, T, D] complex64
            unit = z / z.abs().clamp_min(1e-12)  # e^{i phase}; a zero channel contributes 0
            out["sem/energy_mean"] = energy.mean().item()
            out["sem/energy_max"] = energy.max().item()
            out["sem/phase_coherence"] = unit.mean(-1).abs().mean().item()
        return out

    def _readout_map(self, propagator: torch.Tensor) -> torch.Tensor:
        """The readout composed with the propagator map [2D, 2D], float32: [2V padded to a multiple of
        16, 2D] Born amplitudes on interleaved features, or the linear readout's [V, 2D] weight.

        Both are per-token linear maps: composing them ([W, 2D] @ [2D, 2D], once) replaces applying the
        propagator to every token ([B*T, 2D] @ [2D, 2D], and two such products in the backward).
        """
        with _no_autocast(propagator):
            if self.readout_kind == "linear":
                return self.readout.weight.float() @ propagator
            w = _real_linear(self.readout_re.float(), self.readout_im.float()) @ propagator  # [2V, 2D]
            return F.pad(w, (0, 0, 0, -w.shape[0] % 16))  # width 518 -> 528: the CPU matmul runs ~1.6x faster

    def _logits(self, psi: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """psi [..., 2D] (output of norm_f), readout from _readout_map -> logits [..., V] float32."""
        if self.readout_kind == "linear":
            return F.linear(psi, readout, self.readout.bias).float()
        # z = W U psi as one real matmul (may run in bf16 under autocast); Born rule p_k ~ |z_k|^2.
        return _BornLogits.apply(F.linear(psi, readout).float(), self.vocab_size, self.born_eps)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        check_input_length(input_ids, self.max_seq_len)
        with record_function("sem/embed"):
            psi = self.embed(input_ids).float()  # [B, T, 2D]
        for i, block in enumerate(self.blocks):
            with record_function(f"sem/block{i}"):
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    psi = checkpoint(block, psi, use_reentrant=False)
                else:
                    psi = block(psi)
        # The penalty reads the residual state entering norm_f: after the norm (and the unitary
        # propagator) the energy is ~1 by construction and the term would be inert (~1e-11).
        # Not detached: its gradient reaches the blocks and the embedding that write the residual.
        with _no_autocast(psi), record_function("sem/unitary_penalty"):
            energy = psi.float().pow(2).sum(-1) / self.d_model  # [B, T] ||psi_t||^2 / D
            unitary_div = torch.log(energy.clamp(1.0 / ENERGY_CLAMP, ENERGY_CLAMP)).pow(2).mean()
        with record_function("sem/final_norm"):
            psi = self.norm_f(psi)  # [B, T, 2D] float32
        with record_function("sem/propagator"):
            propagator = self.propagator.matrix(self.propagator_alpha)  # [2D, 2D], applied by the readout
        # Detached references for probes(): the statistics are computed there on demand.
        self._last_energy, self._last_state = energy.detach(), (psi.detach(), propagator.detach())
        with record_function("sem/readout"):
            logits = self._logits(psi, self._readout_map(propagator))
        if targets is None:
            return ModelOutput(logits=logits, loss=None, ce_loss=None, unitary_divergence=unitary_div)
        with record_function("sem/cross_entropy"):
            ce = cross_entropy(logits, targets)
        return ModelOutput(logits, ce + self.unitary_lambda * unitary_div, ce, unitary_div)

    # ------------------------------------------------------------------ recurrent decoding

    @torch.no_grad()
    def decode_state(self, batch_size: int = 1) -> DecodeState:
        """A fresh (empty-context) decoding state on the model's device."""
        ref = self.embed.weight
        readout = self._readout_map(self.propagator.matrix(self.propagator_alpha))
        h = [torch.zeros(batch_size, self.d_model, dtype=torch.complex64, device=ref.device) for _ in self.blocks]
        return DecodeState(h, [b.decay() for b in self.blocks], readout)

    @torch.no_grad()
    def step(self, token: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """Next-token logits [B, V] float32 after ``token`` [B], and the advanced state. O(1) time and
        memory per token, any context length (no max_seq_len: the recurrence has no window)."""
        psi = self.embed(token).float()  # [B, 2D]
        hs = []
        for block, h, (lam, gamma) in zip(self.blocks, state.h, state.decay):
            psi, h = block.step(psi, h, lam, gamma)
            hs.append(h)
        state = DecodeState(hs, state.decay, state.readout, state.position + 1)
        return self._logits(self.norm_f(psi).float(), state.readout), state

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
        state = DecodeState(hs, state.decay, state.readout, input_ids.shape[1])
        return self._logits(self.norm_f(psi[:, -1]).float(), state.readout), state


@dataclass
class DecodeState:
    """Recurrent decoding state of an SEMModel: one complex [B, D] state per block (constant in the
    context length), plus per-decode constants (lambda, gamma per block; the readout composed with
    the propagator), so a step costs the same at token 10 and at token 10^6."""

    h: list[torch.Tensor]
    decay: list[tuple[torch.Tensor, torch.Tensor]]
    readout: torch.Tensor  # SEMModel._readout_map: readout after (1 - alpha) I + alpha U, [2V (padded) or V, 2D]
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
