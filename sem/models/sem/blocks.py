"""SEM's residual block: ComplexRMSNorm -> [causal depthwise conv + SiLU] -> complex recurrence
(``recurrence``) -> gated MLP. The convolution is optional (``conv_width``, 0 = off), and so is an
input-dependent decay and input gate (``selective``: Griffin's RG-LRU on SEM's complex lambda)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from sem.models.sem.kernels import _CausalConv, _GatedSiLU, _no_autocast, _RMSNormFunction
from sem.models.sem.recurrence import (
    MIN_DECAY,
    SELECTIVE_MAX_RATE,
    recurrence_fft,
    recurrence_scan,
    recurrence_selective,
    retention,
)

# Selective blocks: |a_t| = |lambda|^(SELECTIVE_C r_t), r_t in (0, 1) (Griffin's RG-LRU uses c = 8).
SELECTIVE_C = 8.0
HEAD_NORM_EPS = 1e-6  # retention's per-head RMS norm


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
    """psi + MLP(recurrence(u) + skip * norm(psi)), u = B norm(psi), or with ``conv_width`` k > 0
    u = SiLU(causal depthwise conv_k(B norm(psi))) (H3/Mamba's short convolution before the recurrence:
    each of the 2D real features of the recurrence input mixes its own last k values, then a SiLU)."""

    def __init__(self, d_model: int, mlp_ratio: float, recurrence: str, dropout: float, n_layers: int,
                 conv_width: int, init: tuple[float, float, float], selective: bool, modes: int = 1,
                 heads: int = 0) -> None:
        super().__init__()
        d2 = 2 * d_model
        self.recurrence = recurrence
        self.conv_width = conv_width
        self.norm = ComplexRMSNorm(d_model)
        # B as an R-linear map on [Re x, Im x]: one real matmul (autocast-friendly), a superset of C-linear.
        self.in_proj = nn.Linear(d2, d2, bias=False)
        # Depthwise: weight [2D, 1, k] (tap k-1 multiplies the current input), bias [2D]; torch's default init.
        self.conv = nn.Conv1d(d2, d2, conv_width, groups=d2) if conv_width > 0 else None
        # ``init`` (r_min, r_max, max_phase): timescales tau = -1/log|lambda| log-uniform between those of
        # r_min and r_max, phases uniform in [0, max_phase] (S4D/LRU-like; the default: tau 1..1000, [0, pi]).
        # With ``modes`` N > 1 each channel has N modes whose timescales interleave over the same range
        # (channel d: grid points d, D + d, ...), read out by complex weights c [D, N] (``mode_c``).
        # With ``heads`` H > 0 the state is a [K, K] matrix per head (K = D / H; ``retention``): one
        # timescale per head (the same range over the heads), one phase per key channel.
        r_min, r_max, max_phase = init
        self.modes, self.heads = modes, heads
        n = heads or d_model * modes
        tau = torch.exp(torch.linspace(math.log(-1.0 / math.log(r_min)), math.log(-1.0 / math.log(r_max)), n))
        shape = (d_model,) if modes == 1 else (d_model, modes)
        if heads:
            self.log_A_mag = nn.Parameter(torch.log(1.0 / tau))  # [H]
            self.theta = nn.Parameter(torch.rand(heads, d_model // heads) * max_phase)  # [H, K]
        else:
            self.log_A_mag = nn.Parameter(torch.log(1.0 / tau).view(modes, d_model).t().reshape(shape))  # |lambda| = e^(-1/tau)
            self.theta = nn.Parameter(torch.rand(shape) * max_phase)
        # Retention's queries and keys, from the recurrence input (as Mamba's B and C): [2D] -> [2D | 2D].
        self.qk = nn.Linear(d2, 2 * d2, bias=False) if heads else None
        # c_n = 1/N at init: the channel reads the mean of its modes (each of unit variance, by gamma)
        self.mode_c = nn.Parameter(torch.stack([torch.full(shape, 1.0 / modes), torch.zeros(shape)], -1)) \
            if modes > 1 else None
        self.skip_D = nn.Parameter(torch.ones(d2))
        # Selective: from the recurrence input v_t, a decay gate r_t and an input gate i_t per channel
        # (sigmoid; zero bias: 1/2 at init); h_t = a_t h_{t-1} + sqrt(1 - |a_t|^2) i_t v_t,
        # a_t = |lambda|^(c r_t) e^(i theta).
        self.gate = nn.Linear(d2, d2) if selective else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.bias)
        hidden = max(1, int(mlp_ratio * d2))
        self.mlp_in = nn.Linear(d2, 2 * hidden, bias=False)  # value and gate
        self.mlp_out = nn.Linear(hidden, d2, bias=False)
        nn.init.normal_(self.mlp_out.weight, std=0.02 / math.sqrt(2 * n_layers))
        self.drop = nn.Dropout(dropout)

    def log_lambda(self) -> torch.Tensor:
        """log lambda = -(exp(log_A_mag) + MIN_DECAY) + i theta: |lambda| < 1 for any value. [D] (or with
        modes [D, N], with heads [H, K]) complex64."""
        theta, rate = self.theta.float(), self.decay_rate()
        return torch.complex(-(rate[:, None].expand_as(theta) if self.heads else rate), theta)

    def decay_rate(self) -> torch.Tensor:
        # MIN_DECAY keeps |lambda| <= exp(-1e-6) < 1 even in float32 (timescales up to 1e6 tokens).
        return torch.exp(self.log_A_mag.float()) + MIN_DECAY

    def c(self) -> torch.Tensor | None:
        """The modes' complex readout weights [D, N] (None with one mode per channel)."""
        return None if self.mode_c is None else torch.view_as_complex(self.mode_c.float())

    def mix(self, u: torch.Tensor, h0: torch.Tensor | None = None, keep: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal complex recurrence over time. u [B, T, 2D] real -> (y [B, T, 2D] float32, the state
        after the last step [B, D] (with modes [B, D, N]) complex64, detached).

        ``h0`` (the state's shape): the state before the first step (None: zero, a document's start);
        it contributes lambda^(t+1) h0 at step t, so consecutive chunks give one whole sequence's h.
        ``keep`` [B, T] bool: where that contribution counts (None: everywhere); training lanes drop a
        carried state from a document's first token on (``SEMModel.forward``).
        """
        if self.gate is not None:
            return self._mix_selective(u, h0, keep)
        if self.qk is not None:
            return self._mix_retention(u, h0, keep)
        with _no_autocast(u):
            log_lam = self.log_lambda()
            # LRU input normalisation sqrt(1 - |lambda|^2) keeps the state's variance ~ the input's.
            gamma = torch.sqrt(-torch.expm1(-2.0 * self.decay_rate()))  # [D] or [D, N]
            x = u.float().unflatten(-1, (-1, 2))  # [B, T, D, 2]
            c = self.c()
            modes = None  # every mode's own state [B, T, D, N] complex64 when the scan computed it
            if self.recurrence == "fft":
                h = recurrence_fft(x, log_lam, gamma, c)
            elif c is None:
                h = recurrence_scan(x, log_lam, gamma)
            else:  # every mode scanned as a channel of its own, then read out
                B, T, D, N = *x.shape[:3], c.shape[1]
                modes = torch.view_as_complex(recurrence_scan(
                    x[:, :, :, None].expand(B, T, D, N, 2).reshape(B, T, D * N, 2), log_lam.reshape(-1),
                    gamma.reshape(-1)).view(B, T, D, N, 2))
                h = torch.view_as_real((modes * c).sum(-1))
            steps = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=torch.float32)
            if h0 is not None:
                powers = torch.exp(steps.view(-1, *[1] * log_lam.ndim) * log_lam)  # [T, D(, N)] lambda^(t+1)
                carry = powers * h0[:, None]  # [B, T, D(, N)]
                if c is not None:
                    carry = (carry * c).sum(-1)
                if keep is not None:
                    carry = carry * keep[..., None]
                h = h + torch.view_as_real(carry)
            return h.flatten(-2), self._last_state(x, h, log_lam, gamma, h0, keep, modes)

    @torch.no_grad()
    def _last_state(self, x: torch.Tensor, h: torch.Tensor, log_lam: torch.Tensor, gamma: torch.Tensor,
                    h0: torch.Tensor | None, keep: torch.Tensor | None, modes: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The recurrence state after the last step, detached: h's last row with one mode per channel;
        with modes, each mode's own: the scan's last row (``modes``), or after the FFT path (which only
        has their read-out sum) sum_s lambda^(T-1-s) gamma u_s; + lambda^T h0 where kept."""
        if self.mode_c is None:
            return torch.view_as_complex(h[:, -1].float().contiguous())
        T = x.shape[1]
        if modes is not None:
            state = modes[:, -1].detach().clone()
        else:
            back = torch.arange(T - 1, -1, -1, device=x.device, dtype=torch.float32)  # T-1-s
            weights = torch.exp(back[:, None, None] * log_lam) * gamma  # [T, D, N]
            state = torch.einsum("btd,tdn->bdn", torch.view_as_complex(x.contiguous()), weights)
        if h0 is not None:
            carry = torch.exp(T * log_lam) * h0  # [B, D, N]
            state = state + (carry if keep is None else carry * keep[:, -1, None, None])
        return state

    def _gated(self, v: torch.Tensor, log_lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log a_t, w_t) [..., D] complex64 of the selective recurrence from its input v [..., 2D]:
        a_t = |lambda|^(c r_t) e^(i theta), w_t = sqrt(1 - |a_t|^2) i_t v_t (the LRU normalisation at
        a_t's modulus). Only the modulus depends on the input: a phase of c r_t theta turned by up to
        8 pi as r_t moves, and training diverged (grad norm 10 -> 2500 in 400 steps, 2026-12-04)."""
        r, i = torch.sigmoid(self.gate(v).float()).chunk(2, dim=-1)  # [..., D] each
        rate = (SELECTIVE_C * r * log_lam.real).clamp(min=-SELECTIVE_MAX_RATE)  # log |a_t| <= 0
        scale = torch.sqrt(-torch.expm1(2.0 * rate)) * i
        log_a = torch.complex(rate, log_lam.imag.expand_as(rate))
        return log_a, torch.view_as_complex(v.float().unflatten(-1, (-1, 2)).contiguous()) * scale

    def _mix_selective(self, v: torch.Tensor, h0: torch.Tensor | None, keep: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(v):
            log_a, w = self._gated(v, self.log_lambda())
            if keep is None or h0 is None:
                h = recurrence_selective(w, log_a, h0)
            else:  # the carried state's share, (a_1 ... a_t) h0, only where it is kept
                decay = torch.exp(log_a.cumsum(1))  # [B, T, D]; Re(log a) is clamped in _gated
                h = recurrence_selective(w, log_a) + decay * h0[:, None] * keep[..., None]
            return torch.view_as_real(h).flatten(-2), h[:, -1].detach()

    def _mix_retention(self, u: torch.Tensor, h0: torch.Tensor | None, keep: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``heads``: retention over the heads (values: u; queries and keys: ``qk(u)``), each head's output
        RMS-normalised (RetNet's group norm); the state [B, H, K, K] complex64."""
        B, T, _ = u.shape
        H = self.heads
        qk = self.qk(u)
        with _no_autocast(u):
            qr, qi, kr, ki = qk.float().unflatten(-1, (4, H, -1)).unbind(2)  # [B, T, H, K] each
            vr, vi = u.float().unflatten(-1, (H, -1, 2)).unbind(-1)
            scale = self.theta.shape[1] ** -0.5
            (yr, yi), state = retention((qr * scale, qi * scale), (kr, ki), (vr, vi), -self.decay_rate(),
                                        self.theta.float(), h0, keep)
            norm = torch.rsqrt(yr.square().add(yi.square()).mean(-1, keepdim=True) + HEAD_NORM_EPS)
            return torch.stack([yr * norm, yi * norm], -1).reshape(B, T, -1), state

    def _heads(self, qk: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token's (q, k, v) [B, H, K] complex64 from ``qk(u)`` [B, 4D] ((Re q | Im q | Re k | Im k))
        and u [B, 2D] (interleaved), as ``_mix_retention`` reads them."""
        qr, qi, kr, ki = qk.float().unflatten(-1, (4, self.heads, -1)).unbind(1)
        scale = self.theta.shape[1] ** -0.5
        v = torch.view_as_complex(u.float().unflatten(-1, (self.heads, -1, 2)).contiguous())
        return torch.complex(qr, qi) * scale, torch.complex(kr, ki), v

    @staticmethod
    def _head_norm(y: torch.Tensor) -> torch.Tensor:
        """Each head's output [..., H, K] to unit mean |y|^2 (RetNet's group norm, without a gain)."""
        return y * torch.rsqrt(y.real.square().add(y.imag.square()).mean(-1, keepdim=True) + HEAD_NORM_EPS)

    def empty_state(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The recurrence state at a document's start: zeros, [B, D] complex64 ([B, D, N] with modes,
        [B, H, K, K] with heads)."""
        if self.heads:
            k = self.theta.shape[1]
            shape = (batch_size, self.heads, k, k)
        else:
            shape = (batch_size, *self.theta.shape)
        return torch.zeros(shape, dtype=torch.complex64, device=device)

    def conv_input(self, u: torch.Tensor, tail: torch.Tensor | None = None, keep: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """SiLU(causal depthwise conv of u) [B, T, 2D]; ``tail`` [B, k-1, 2D]: the k-1 inputs before
        u[:, 0] (None: zeros, a document's start); ``keep`` [B, T] bool: where the tail may be read (as in
        ``mix``). The identity when the block has no convolution."""
        if self.conv is None:
            return u
        with record_function("sem/conv"):
            k = self.conv_width
            # [B, k-1+T, 2D]: zeros (a document's start) or the tail before u
            x = F.pad(u, (0, 0, k - 1, 0)) if tail is None else torch.cat([tail.to(u.dtype), u], 1)
            if torch.is_autocast_enabled(u.device.type):  # as autocast runs conv1d: in its lower precision
                x = x.to(torch.get_autocast_dtype(u.device.type))
            pre = _CausalConv.apply(x, self.conv.weight[:, 0], self.conv.bias)
            if tail is not None and keep is not None and k > 1:
                # The tail reaches outputs 0..k-2 only: take its share back out where it is not kept.
                n = min(k - 1, u.shape[1])
                alone = F.pad(tail.to(u.dtype).transpose(1, 2), (0, k - 1))  # the tail, then zeros
                share = F.conv1d(alone, self.conv.weight, None, groups=alone.shape[1]).transpose(1, 2)[:, :n]
                pre = torch.cat([pre[:, :n] - share * ~keep[:, :n, None], pre[:, n:]], 1)
            return F.silu(pre)

    def forward(self, psi: torch.Tensor, h0: torch.Tensor | None = None, tail: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """psi [B, T, 2D] float32 -> (new residual [B, T, 2D], the recurrence state after the last step
        (``mix``), recurrence input before the convolution u [B, T, 2D]); ``h0``, ``tail``, ``keep``: a
        carried state and where it counts (``mix``, ``conv_input``)."""
        # record_function labels name the parts for bench/profile_sem.py (a no-op unless profiling).
        with record_function("sem/norm"):
            x = self.norm(psi)
        with record_function("sem/in_proj"):
            u = self.in_proj(x)
        with record_function("sem/recurrence"):
            h, last = self.mix(self.conv_input(u, tail, keep), h0, keep)
        with record_function("sem/mlp"):
            hidden = _GatedSiLU.apply(self.mlp_in(h + self.skip_D * x))
            return psi + self.drop(self.mlp_out(hidden)).float(), last, u

    def step(self, psi: torch.Tensor, h: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor,
             tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One token: psi [B, 2D] float32, h [B, D] complex64 (this block's recurrence state; with modes
        [B, D, N]), lam [D] complex64 = lambda, gamma [D] = input scale (with modes [D, N] each),
        ``tail`` [B, k-1, 2D] float32: the last k-1 recurrence inputs before the convolution (None
        without one). Returns (psi', h', tail'): h' = lambda h + gamma u."""
        x = self.norm(psi)
        u = self.in_proj(x)
        if self.conv is not None:
            assert tail is not None, "a block with a convolution steps with its input tail"
            window = torch.cat([tail, u.float()[:, None]], 1)  # [B, k, 2D], oldest first
            conv = (window * self.conv.weight.float()[:, 0].t()).sum(1) + self.conv.bias.float()
            u, tail = F.silu(conv), window[:, 1:]
        qk = self.qk(u) if self.qk is not None else None
        with _no_autocast(u):
            if self.gate is not None:
                log_a, w = self._gated(u, self.log_lambda())
                h = torch.exp(log_a) * h + w
                y = h
            elif qk is not None:
                q, k, v = self._heads(qk, u)  # [B, H, K]
                h = lam[..., None] * h + k[..., None] * v[..., None, :]
                y = self._head_norm((q.conj()[..., None] * h).sum(-2)).flatten(1)
            elif self.mode_c is not None:
                v = torch.view_as_complex(u.float().unflatten(-1, (-1, 2)).contiguous())  # [B, D]
                h = lam * h + gamma * v[..., None]
                y = (h * self.c()).sum(-1)
            else:
                h = lam * h + torch.view_as_complex(u.float().unflatten(-1, (-1, 2)) * gamma[:, None])
                y = h
        value, gate = self.mlp_in(torch.view_as_real(y).flatten(-2) + self.skip_D * x).chunk(2, dim=-1)
        return psi + self.mlp_out(F.silu(gate) * value).float(), h, tail

    def empty_tail(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """The convolution's input tail at a document's start: [B, k-1, 2D] zeros, or None without one."""
        if self.conv is None:
            return None
        return torch.zeros(batch_size, self.conv_width - 1, self.in_proj.in_features, device=device)

    def decay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda [D] complex64, gamma [D] float32) for step(): computed once per decode, not per token."""
        with _no_autocast(self.log_A_mag):
            return torch.exp(self.log_lambda()), torch.sqrt(-torch.expm1(-2.0 * self.decay_rate()))
