"""The recurrences of ``SEMBlock``, one subclass each, chosen once by ``build_block`` from the model's keys:

- ``DiagonalBlock`` (the default): h_t = lambda h_{t-1} + gamma u_t per complex channel, [B, D];
- ``ModesBlock`` (``modes`` N > 1): N such modes per channel read out by complex weights c, [B, D, N];
- ``RetentionBlock`` (``heads`` H > 0): a [K, K] matrix state per head written by keys, read by queries;
- ``SelectiveBlock`` (``selective``): an input-dependent decay and input gate per token.

Each has the same methods: ``mix`` (parallel over a window, from a carried state), ``recur`` (one token),
``recurrence_constants`` (what ``recur`` needs, once per decode) and ``empty_state``. Their parameters
keep the names and order they had as flags of one block class (``blocks.0.log_A_mag``, ``blocks.0.qk``,
``blocks.0.mode_c``, ``blocks.0.gate``): checkpoints of either load into the other."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sem.models.sem.blocks import SEMBlock, timescales
from sem.models.sem.kernels import _no_autocast
from sem.models.sem.recurrence import (
    SELECTIVE_MAX_RATE,
    recurrence_fft,
    recurrence_scan,
    recurrence_selective,
    retention,
)

# Selective blocks: |a_t| = |lambda|^(SELECTIVE_C r_t), r_t in (0, 1) (Griffin's RG-LRU uses c = 8).
SELECTIVE_C = 8.0
HEAD_NORM_EPS = 1e-6  # retention's per-head RMS norm


def _carry(log_lam: torch.Tensor, h0: torch.Tensor, T: int) -> torch.Tensor:
    """A carried state's share of steps 0..T-1, lambda^(t+1) h0: [B, T, *h0.shape[1:]]."""
    steps = torch.arange(1, T + 1, device=h0.device, dtype=torch.float32)
    powers = torch.exp(steps.view(-1, *[1] * log_lam.ndim) * log_lam)  # [T, D(, N)] lambda^(t+1)
    return powers * h0[:, None]


class DiagonalBlock(SEMBlock):
    """One complex mode per channel: h_t = lambda h_{t-1} + gamma u_t, the state [B, D] complex64."""

    def _init_recurrence(self, d_model: int, r_min: float, r_max: float, max_phase: float) -> None:
        self.log_A_mag = nn.Parameter(torch.log(1.0 / timescales(d_model, r_min, r_max)))  # |lambda| = e^(-1/tau)
        self.theta = nn.Parameter(torch.rand(d_model) * max_phase)

    def mix(self, u: torch.Tensor, h0: torch.Tensor | None = None, keep: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(u):
            log_lam, gamma = self.log_lambda(), self.input_scale()  # [D]
            x = u.float().unflatten(-1, (-1, 2))  # [B, T, D, 2]
            h = (recurrence_fft if self.recurrence == "fft" else recurrence_scan)(x, log_lam, gamma)
            if h0 is not None:
                carry = _carry(log_lam, h0, u.shape[1])  # [B, T, D]
                h = h + torch.view_as_real(carry if keep is None else carry * keep[..., None])
            with torch.no_grad():
                last = torch.view_as_complex(h[:, -1].contiguous())
            return h.flatten(-2), last

    def recurrence_constants(self) -> tuple[torch.Tensor, ...]:
        """(lambda [D] complex64, gamma per real feature [2D] float32, lambda's (Re, Im) [D, 2] float32)."""
        lam = torch.exp(self.log_lambda())
        return lam, self.input_scale().repeat_interleave(2), torch.view_as_real(lam)

    def recur(self, u: torch.Tensor, h: torch.Tensor, constants: tuple[torch.Tensor, ...]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        lam, gamma, pairs = constants
        x = (u * gamma).view(u.shape[0], -1, 2)  # [B, D, 2]
        if torch.compiler.is_compiling():
            # Inductor writes no complex code: lambda h + x in (Re, Im) pairs fuses with the ops around it,
            # where a complex product is a call of its own (with its views) per block.
            lr, li, hr, hi = pairs[:, 0], pairs[:, 1], h[..., 0], h[..., 1]
            h = torch.stack([lr * hr - li * hi + x[..., 0], lr * hi + li * hr + x[..., 1]], -1)
            return h.view(u.shape), h
        h = torch.view_as_real(torch.addcmul(torch.view_as_complex(x), lam, torch.view_as_complex(h)))
        return h.view(u.shape), h

    def empty_state(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch_size, *self.theta.shape, dtype=torch.complex64, device=device)


class ModesBlock(DiagonalBlock):
    """``modes`` N: each channel's N modes (timescales interleaved over the range: channel d has grid
    points d, D + d, ...) read out by complex weights c [D, N] (``mode_c``, S4D's state size); the state
    [B, D, N] complex64."""

    def __init__(self, *args: object, modes: int) -> None:
        self.modes = modes
        super().__init__(*args)

    def _init_recurrence(self, d_model: int, r_min: float, r_max: float, max_phase: float) -> None:
        shape = (d_model, self.modes)
        tau = timescales(d_model * self.modes, r_min, r_max)
        self.log_A_mag = nn.Parameter(torch.log(1.0 / tau).view(self.modes, d_model).t().reshape(shape))
        self.theta = nn.Parameter(torch.rand(shape) * max_phase)
        # c_n = 1/N at init: the channel reads the mean of its modes (each of unit variance, by gamma)
        self.mode_c = nn.Parameter(torch.stack([torch.full(shape, 1.0 / self.modes), torch.zeros(shape)], -1))

    def c(self) -> torch.Tensor:
        """The modes' complex readout weights [D, N]."""
        return torch.view_as_complex(self.mode_c.float())

    def mix(self, u: torch.Tensor, h0: torch.Tensor | None = None, keep: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(u):
            log_lam, gamma, c = self.log_lambda(), self.input_scale(), self.c()  # [D, N]
            x = u.float().unflatten(-1, (-1, 2))  # [B, T, D, 2]
            B, T, D, N = *x.shape[:3], c.shape[1]
            modes = None  # every mode's own state [B, T, D, N] complex64 when the scan computed it
            if self.recurrence == "fft":  # the N modes folded into one kernel
                h = recurrence_fft(x, log_lam, gamma, c)
            else:  # every mode scanned as a channel of its own, then read out
                modes = torch.view_as_complex(recurrence_scan(
                    x[:, :, :, None].expand(B, T, D, N, 2).reshape(B, T, D * N, 2), log_lam.reshape(-1),
                    gamma.reshape(-1)).view(B, T, D, N, 2))
                h = torch.view_as_real((modes * c).sum(-1))
            if h0 is not None:
                carry = (_carry(log_lam, h0, T) * c).sum(-1)  # [B, T, D]
                h = h + torch.view_as_real(carry if keep is None else carry * keep[..., None])
            return h.flatten(-2), self._last_state(x, log_lam, gamma, h0, keep, modes)

    @torch.no_grad()
    def _last_state(self, x: torch.Tensor, log_lam: torch.Tensor, gamma: torch.Tensor, h0: torch.Tensor | None,
                    keep: torch.Tensor | None, modes: torch.Tensor | None) -> torch.Tensor:
        """Each mode's own state after the last step [B, D, N], detached: the scan's last row (``modes``),
        or after the FFT path (which only has their read-out sum) sum_s lambda^(T-1-s) gamma u_s; +
        lambda^T h0 where kept."""
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

    def recurrence_constants(self) -> tuple[torch.Tensor, ...]:
        """(lambda, gamma, c), [D, N] each."""
        return torch.exp(self.log_lambda()), self.input_scale(), self.c()

    def recur(self, u: torch.Tensor, h: torch.Tensor, constants: tuple[torch.Tensor, ...]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        lam, gamma, c = constants
        v = torch.view_as_complex(u.view(u.shape[0], -1, 2))  # [B, D]
        h = torch.addcmul(gamma * v[..., None], lam, torch.view_as_complex(h))
        return torch.view_as_real((h * c).sum(-1)).view(u.shape), torch.view_as_real(h)


class RetentionBlock(SEMBlock):
    """``heads`` H: the state a [K, K] complex matrix per head (K = D / H) written by input-dependent keys
    and read by queries (``retention``: RetNet's retention as SEM's complex recurrence): one timescale per
    head (the same range over the heads), one phase per key channel; each head's output RMS-normalised
    (RetNet's group norm). The state [B, H, K, K] complex64."""

    def __init__(self, *args: object, heads: int) -> None:
        self.heads = heads
        super().__init__(*args)

    def _init_recurrence(self, d_model: int, r_min: float, r_max: float, max_phase: float) -> None:
        self.log_A_mag = nn.Parameter(torch.log(1.0 / timescales(self.heads, r_min, r_max)))  # [H]
        self.theta = nn.Parameter(torch.rand(self.heads, d_model // self.heads) * max_phase)  # [H, K]
        # Queries and keys, from the recurrence input (as Mamba's B and C): [2D] -> [2D | 2D].
        self.qk = nn.Linear(2 * d_model, 4 * d_model, bias=False)

    def log_lambda(self) -> torch.Tensor:  # [H, K]: one modulus per head, one phase per key channel
        return torch.complex(-self.decay_rate()[:, None].expand_as(self.theta), self.theta.float())

    def mix(self, u: torch.Tensor, h0: torch.Tensor | None = None, keep: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values: u; queries and keys: ``qk(u)``."""
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

    def recurrence_constants(self) -> tuple[torch.Tensor, ...]:
        """(lambda [H, K, 1] complex64,)."""
        return (torch.exp(self.log_lambda())[..., None],)

    def recur(self, u: torch.Tensor, h: torch.Tensor, constants: tuple[torch.Tensor, ...]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        (lam,) = constants
        B = u.shape[0]
        # (q, k, v) [B, H, K] complex64 as ``mix`` reads them: qk(u) is (Re q | Im q | Re k | Im k)
        qr, qi, kr, ki = F.linear(u, self.qk.weight).unflatten(-1, (4, self.heads, -1)).unbind(1)
        q = torch.complex(qr, qi) * self.theta.shape[1] ** -0.5
        v = torch.view_as_complex(u.view(B, self.heads, -1, 2))
        h = torch.addcmul(torch.complex(kr, ki)[..., None] * v[..., None, :], lam, torch.view_as_complex(h))
        y = (q.conj()[..., None] * h).sum(-2)  # [B, H, K]
        y = y * torch.rsqrt(y.real.square().add(y.imag.square()).mean(-1, keepdim=True) + HEAD_NORM_EPS)
        return torch.view_as_real(y).reshape(u.shape), torch.view_as_real(h)

    def empty_state(self, batch_size: int, device: torch.device) -> torch.Tensor:
        k = self.theta.shape[1]
        return torch.zeros(batch_size, self.heads, k, k, dtype=torch.complex64, device=device)


class SelectiveBlock(DiagonalBlock):
    """``selective``: from the recurrence input v_t, a decay gate r_t and an input gate i_t per channel
    (sigmoid; zero bias: 1/2 at init); h_t = a_t h_{t-1} + sqrt(1 - |a_t|^2) i_t v_t,
    a_t = |lambda|^(c r_t) e^(i theta) (Griffin's RG-LRU on SEM's complex lambda). The state [B, D]."""

    def _init_recurrence(self, d_model: int, r_min: float, r_max: float, max_phase: float) -> None:
        super()._init_recurrence(d_model, r_min, r_max, max_phase)
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        nn.init.zeros_(self.gate.bias)

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

    def mix(self, u: torch.Tensor, h0: torch.Tensor | None = None, keep: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(u):
            log_a, w = self._gated(u, self.log_lambda())
            if keep is None or h0 is None:
                h = recurrence_selective(w, log_a, h0)
            else:  # the carried state's share, (a_1 ... a_t) h0, only where it is kept
                decay = torch.exp(log_a.cumsum(1))  # [B, T, D]; Re(log a) is clamped in _gated
                h = recurrence_selective(w, log_a) + decay * h0[:, None] * keep[..., None]
            return torch.view_as_real(h).flatten(-2), h[:, -1].detach()

    def recurrence_constants(self) -> tuple[torch.Tensor, ...]:
        """(log lambda [D] complex64,)."""
        return (self.log_lambda(),)

    def recur(self, u: torch.Tensor, h: torch.Tensor, constants: tuple[torch.Tensor, ...]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        log_a, w = self._gated(u, constants[0])
        h = torch.view_as_real(torch.addcmul(w, torch.exp(log_a), torch.view_as_complex(h)))
        return h.view(u.shape), h


def build_block(d_model: int, mlp_ratio: float, recurrence: str, dropout: float, n_layers: int, conv_width: int,
                init: tuple[float, float, float], selective: bool = False, modes: int = 1, heads: int = 0
                ) -> SEMBlock:
    """The block whose recurrence the model's keys name (``SEMModel`` has checked that at most one of
    ``selective``, ``modes`` > 1, ``heads`` > 0 is set)."""
    args = (d_model, mlp_ratio, recurrence, dropout, n_layers, conv_width, init)
    if heads:
        return RetentionBlock(*args, heads=heads)
    if modes > 1:
        return ModesBlock(*args, modes=modes)
    return SelectiveBlock(*args) if selective else DiagonalBlock(*args)
