"""The Cayley propagator: an exactly unitary mixing U = Cayley(H) of the state, blended in by alpha."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from sem.models.sem.kernels import _no_autocast, real_linear_of


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
