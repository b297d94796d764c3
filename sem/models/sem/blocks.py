"""SEM's residual block: ComplexRMSNorm -> complex recurrence (``recurrence``) -> gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from sem.models.sem.kernels import _GatedSiLU, _no_autocast, _RMSNormFunction
from sem.models.sem.recurrence import MIN_DECAY, recurrence_fft, recurrence_scan


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
