"""SEM's residual block: ComplexRMSNorm -> [causal depthwise conv + SiLU] -> complex recurrence
(``recurrence``) -> gated MLP. The convolution is optional (``conv_width``, 0 = off), and so is an
input-dependent decay and input gate (``selective``: Griffin's RG-LRU on SEM's complex lambda)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from sem.models.sem.kernels import _GatedSiLU, _no_autocast, _RMSNormFunction
from sem.models.sem.recurrence import MIN_DECAY, SELECTIVE_MAX_RATE, recurrence_fft, recurrence_scan, recurrence_selective

# Selective blocks: |a_t| = |lambda|^(SELECTIVE_C r_t), r_t in (0, 1) (Griffin's RG-LRU uses c = 8).
SELECTIVE_C = 8.0


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
                 conv_width: int, init: tuple[float, float, float], selective: bool) -> None:
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
        r_min, r_max, max_phase = init
        tau = torch.exp(torch.linspace(math.log(-1.0 / math.log(r_min)), math.log(-1.0 / math.log(r_max)), d_model))
        self.log_A_mag = nn.Parameter(torch.log(1.0 / tau))  # |lambda| = exp(-1/tau)
        self.theta = nn.Parameter(torch.rand(d_model) * max_phase)
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
        """log lambda = -(exp(log_A_mag) + MIN_DECAY) + i theta: |lambda| < 1 for any value. [D] complex64."""
        return torch.complex(-self.decay_rate(), self.theta.float())

    def decay_rate(self) -> torch.Tensor:
        # MIN_DECAY keeps |lambda| <= exp(-1e-6) < 1 even in float32 (timescales up to 1e6 tokens).
        return torch.exp(self.log_A_mag.float()) + MIN_DECAY

    def mix(self, u: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        """Diagonal complex recurrence over time. u [B, T, 2D] real -> [B, T, 2D] float32.

        ``h0`` [B, D] complex64: the state before the first step (None: zero, a document's start);
        it contributes lambda^(t+1) h0 at step t, so consecutive chunks give one whole sequence's h.
        """
        if self.gate is not None:
            return self._mix_selective(u, h0)
        with _no_autocast(u):
            log_lam = self.log_lambda()
            # LRU input normalisation sqrt(1 - |lambda|^2) keeps the state's variance ~ the input's.
            gamma = torch.sqrt(-torch.expm1(-2.0 * self.decay_rate()))  # [D]
            x = u.float().unflatten(-1, (-1, 2))  # [B, T, D, 2]
            recurrence = recurrence_fft if self.recurrence == "fft" else recurrence_scan
            h = recurrence(x, log_lam, gamma)
            if h0 is not None:
                steps = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=torch.float32)
                carry = torch.exp(steps[:, None] * log_lam[None]) * h0[:, None]  # [B, T, D] lambda^(t+1) h0
                h = h + torch.view_as_real(carry)
            return h.flatten(-2)

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

    def _mix_selective(self, v: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        with _no_autocast(v):
            log_a, w = self._gated(v, self.log_lambda())
            return torch.view_as_real(recurrence_selective(w, log_a, h0)).flatten(-2)

    def conv_input(self, u: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(causal depthwise conv of u) [B, T, 2D]; ``tail`` [B, k-1, 2D]: the k-1 inputs before
        u[:, 0] (None: zeros, a document's start). The identity when the block has no convolution."""
        if self.conv is None:
            return u
        with record_function("sem/conv"):
            k = self.conv_width
            if tail is None:
                x = F.pad(u.transpose(1, 2), (k - 1, 0))  # [B, 2D, k-1+T]: zeros before the start
            else:
                x = torch.cat([tail.to(u.dtype), u], 1).transpose(1, 2)
            return F.silu(F.conv1d(x, self.conv.weight, self.conv.bias, groups=x.shape[1]).transpose(1, 2))

    def forward(self, psi: torch.Tensor) -> torch.Tensor:  # psi [B, T, 2D] float32
        return self._body(psi)[0]

    def _body(self, psi: torch.Tensor, h0: torch.Tensor | None = None, tail: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new residual [B, T, 2D], recurrence state h [B, T, 2D] float32 interleaved, recurrence input
        before the convolution u [B, T, 2D]); ``h0``, ``tail``: a carried state (``mix``, ``conv_input``)."""
        # record_function labels name the parts for bench/profile_sem.py (a no-op unless profiling).
        with record_function("sem/norm"):
            x = self.norm(psi)
        with record_function("sem/in_proj"):
            u = self.in_proj(x)
        with record_function("sem/recurrence"):
            h = self.mix(self.conv_input(u, tail), h0)
        with record_function("sem/mlp"):
            hidden = _GatedSiLU.apply(self.mlp_in(h + self.skip_D * x))
            return psi + self.drop(self.mlp_out(hidden)).float(), h, u

    def step(self, psi: torch.Tensor, h: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor,
             tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One token: psi [B, 2D] float32, h [B, D] complex64 (this block's recurrence state),
        lam [D] complex64 = lambda, gamma [D] = input scale, ``tail`` [B, k-1, 2D] float32: the last k-1
        recurrence inputs before the convolution (None without one). Returns (psi', h', tail'):
        h' = lambda h + gamma u."""
        x = self.norm(psi)
        u = self.in_proj(x)
        if self.conv is not None:
            assert tail is not None, "a block with a convolution steps with its input tail"
            window = torch.cat([tail, u.float()[:, None]], 1)  # [B, k, 2D], oldest first
            conv = (window * self.conv.weight.float()[:, 0].t()).sum(1) + self.conv.bias.float()
            u, tail = F.silu(conv), window[:, 1:]
        with _no_autocast(u):
            if self.gate is not None:
                log_a, w = self._gated(u, self.log_lambda())
                h = torch.exp(log_a) * h + w
            else:
                h = lam * h + torch.view_as_complex(u.float().unflatten(-1, (-1, 2)) * gamma[:, None])
        value, gate = self.mlp_in(torch.view_as_real(h).flatten(-2) + self.skip_D * x).chunk(2, dim=-1)
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
