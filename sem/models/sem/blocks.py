"""SEM's residual block: ComplexRMSNorm -> [causal depthwise conv + SiLU] -> complex recurrence -> gated MLP.

``SEMBlock`` holds what every block shares (the norm, the input projection, the optional convolution
(``conv_width``, 0 = off), the skip and the MLP) and runs them, in parallel over a window (``forward``)
or for one token (``step``). Its recurrence is a subclass's (``sem/models/sem/mixers.py``: diagonal,
modes, retention heads, selective), chosen once when the model is built (``mixers.build_block``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from sem.models.sem.kernels import _CausalConv, _GatedSiLU, _no_autocast, _RMSNormFunction
from sem.models.sem.recurrence import MIN_DECAY


class BlockConstants(NamedTuple):
    """A block's per-decode constants (``SEMBlock.decode_constants``), float32: its weights transposed to
    [in, out] (x @ W^T from a contiguous W^T: ~2x faster than ``F.linear`` on CPU for a cached weight) with
    the norm's weight (and ``unit_rms``'s sqrt(2D)) folded into the maps that read the norm's output."""

    floor: torch.Tensor  # unit_rms's sqrt(2D eps), 0-d
    in_proj: torch.Tensor  # [2D, 2D] diag(norm weight) in_proj^T sqrt(2D)
    skip: torch.Tensor  # [2D] skip_D * norm weight sqrt(2D)
    taps: torch.Tensor | None  # [k, 2D] the convolution's (None without one)
    bias: torch.Tensor | None  # [2D]
    mlp_in: torch.Tensor  # [2D, 2 hidden]
    mlp_out: torch.Tensor  # [hidden, 2D]
    recurrence: tuple[torch.Tensor, ...]  # SEMBlock.recurrence_constants


class ComplexRMSNorm(nn.Module):
    """psi / rms|psi| * gain, with a real per-channel gain (keeps phases). Output energy ~ D."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(d_model))

    def weight(self) -> torch.Tensor:
        # rms over the 2D real features is rms|psi| / sqrt(2); the sqrt(1/2) restores energy D.
        return self.gain.float().repeat_interleave(2) * math.sqrt(0.5)  # [2D], same gain for Re and Im

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 2D] real, interleaved (Re, Im) pairs
        with _no_autocast(x):
            return _RMSNormFunction.apply(x.float(), self.weight(), self.eps)


def unit_rms(x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + floor^2) over the last dim [..., F], floor = sqrt(F eps) (``norm_floor``): the RMS
    norm's x / sqrt(mean(x^2) + eps) divided by sqrt(F), in three tensor ops; the decoding step folds the
    sqrt(F) and the norm's weight into the maps that read it (``norm_map``)."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), floor)


def norm_floor(norm: ComplexRMSNorm, features: int, device: torch.device) -> torch.Tensor:
    """``unit_rms``'s floor for ``norm``'s eps over ``features``, 0-d float32."""
    return torch.tensor(math.sqrt(features * norm.eps), device=device)


def norm_map(norm: ComplexRMSNorm, weight: torch.Tensor) -> torch.Tensor:
    """The map [F, out] = diag(norm weight sqrt(F)) weight^T that reads ``unit_rms``'s output as ``weight``
    [out, F] reads the norm's, contiguous (the decoding step's x @ map)."""
    scale = norm.weight() * math.sqrt(weight.shape[1])
    return (scale[:, None] * weight.float().t()).contiguous()


def timescales(n: int, r_min: float, r_max: float) -> torch.Tensor:
    """[n] timescales tau = -1/log|lambda|, log-uniform between those of moduli r_min and r_max."""
    return torch.exp(torch.linspace(math.log(-1.0 / math.log(r_min)), math.log(-1.0 / math.log(r_max)), n))


class SEMBlock(nn.Module):
    """psi + MLP(recurrence(u) + skip * norm(psi)), u = B norm(psi), or with ``conv_width`` k > 0
    u = SiLU(causal depthwise conv_k(B norm(psi))) (H3/Mamba's short convolution before the recurrence:
    each of the 2D real features of the recurrence input mixes its own last k values, then a SiLU).

    A subclass is one recurrence: it registers its parameters in ``_init_recurrence`` (called between the
    convolution and the skip, so that every variant's state_dict keys and parameter order are those of
    the single class this replaced: checkpoints and optimizer states of earlier versions load) and
    implements ``mix`` (parallel), ``recur`` (one token), ``empty_state`` and ``recurrence_constants``.

    ``init`` (r_min, r_max, max_phase): timescales tau = -1/log|lambda| log-uniform between those of r_min
    and r_max (``timescales``), phases uniform in [0, max_phase] (S4D/LRU-like).
    """

    def __init__(self, d_model: int, mlp_ratio: float, recurrence: str, dropout: float, n_layers: int,
                 conv_width: int, init: tuple[float, float, float]) -> None:
        super().__init__()
        d2 = 2 * d_model
        self.recurrence = recurrence  # "fft" | "scan": how the parallel pass evaluates a linear recurrence
        self.conv_width = conv_width
        self.norm = ComplexRMSNorm(d_model)
        # B as an R-linear map on [Re x, Im x]: one real matmul (autocast-friendly), a superset of C-linear.
        self.in_proj = nn.Linear(d2, d2, bias=False)
        # Depthwise: weight [2D, 1, k] (tap k-1 multiplies the current input), bias [2D]; torch's default init.
        self.conv = nn.Conv1d(d2, d2, conv_width, groups=d2) if conv_width > 0 else None
        self._init_recurrence(d_model, *init)
        self.skip_D = nn.Parameter(torch.ones(d2))
        hidden = max(1, int(mlp_ratio * d2))
        self.mlp_in = nn.Linear(d2, 2 * hidden, bias=False)  # value and gate
        self.mlp_out = nn.Linear(hidden, d2, bias=False)
        nn.init.normal_(self.mlp_out.weight, std=0.02 / math.sqrt(2 * n_layers))
        self.drop = nn.Dropout(dropout)

    # ------------------------------------------------------------------ the recurrence (a subclass's)

    def _init_recurrence(self, d_model: int, r_min: float, r_max: float, max_phase: float) -> None:
        """Register ``log_A_mag``, ``theta`` and the variant's own parameters."""
        raise NotImplementedError

    def mix(self, u: torch.Tensor, h0: torch.Tensor | None = None, keep: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence over time, in parallel. u [B, T, 2D] real -> (y [B, T, 2D] float32, the state after
        the last step (``empty_state``'s shape) complex64, detached).

        ``h0``: the state before the first step (None: zero, a document's start), so that consecutive
        chunks give one whole sequence's output. ``keep`` [B, T] bool: where that carried state counts (None:
        everywhere); training lanes drop a carried state from a document's first token on
        (``SEMModel.forward``)."""
        raise NotImplementedError

    def recur(self, u: torch.Tensor, h: torch.Tensor, constants: tuple[torch.Tensor, ...]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: u [B, 2D] float32, h the state as real pairs (``torch.view_as_real`` of
        ``empty_state``'s complex64: [..., 2] float32, as ``DecodeState`` holds it) -> (y [B, 2D] float32,
        the next state, pairs likewise)."""
        raise NotImplementedError

    def recurrence_constants(self) -> tuple[torch.Tensor, ...]:
        """What ``recur`` needs of the parameters (lambda, input scales), computed once per decode."""
        raise NotImplementedError

    def empty_state(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The recurrence state at a document's start: zeros, complex64."""
        raise NotImplementedError

    def decay_rate(self) -> torch.Tensor:
        """-log|lambda| = exp(log_A_mag) + MIN_DECAY: |lambda| <= exp(-1e-6) < 1 even in float32 (timescales up
        to 1e6 tokens) for any value of the parameter."""
        return torch.exp(self.log_A_mag.float()) + MIN_DECAY

    def log_lambda(self) -> torch.Tensor:
        """log lambda = -decay_rate + i theta, complex64 (theta's shape)."""
        return torch.complex(-self.decay_rate(), self.theta.float())

    def input_scale(self) -> torch.Tensor:
        """The LRU input normalisation sqrt(1 - |lambda|^2): the state's variance ~ the input's."""
        return torch.sqrt(-torch.expm1(-2.0 * self.decay_rate()))

    # ------------------------------------------------------------------ shared parts

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

    @torch.no_grad()
    def decode_constants(self) -> BlockConstants:
        """What ``step`` needs of the parameters, computed once per decode rather than per token."""
        with _no_autocast(self.in_proj.weight):
            d2 = self.in_proj.in_features
            taps = bias = None
            if self.conv is not None:
                taps, bias = self.conv.weight[:, 0].float().t().contiguous(), self.conv.bias.float()  # [k, 2D]
            return BlockConstants(
                norm_floor(self.norm, d2, self.skip_D.device), norm_map(self.norm, self.in_proj.weight),
                self.skip_D.float() * self.norm.weight() * math.sqrt(d2), taps, bias,
                self.mlp_in.weight.float().t().contiguous(), self.mlp_out.weight.float().t().contiguous(),
                self.recurrence_constants())

    def step(self, psi: torch.Tensor, h: torch.Tensor, constants: BlockConstants, tail: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One token, float32, no autograd: psi [B, 2D], h this block's recurrence state, ``constants`` from
        ``decode_constants``, ``tail`` [B, k-1, 2D]: the last k-1 recurrence inputs before the convolution
        (None without one). Returns (psi', h', tail'). As few tensor ops as the arithmetic allows: at a
        few hundred thousand multiply-adds per token, dispatch is the cost."""
        floor, in_proj, skip, taps, bias, mlp_in, mlp_out, recurrence = constants
        x = unit_rms(psi, floor)  # the norm's weight is in in_proj and skip
        u = x @ in_proj
        if taps is not None:
            window = torch.cat([tail, u[:, None]], 1)  # [B, k, 2D], oldest first
            u, tail = F.silu((window * taps).sum(1).add_(bias)), window[:, 1:]
        y, h = self.recur(u, h, recurrence)
        value, gate = (torch.addcmul(y, skip, x) @ mlp_in).chunk(2, dim=-1)
        return torch.addmm(psi, F.silu(gate).mul_(value), mlp_out), h, tail

    def empty_tail(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """The convolution's input tail at a document's start: [B, k-1, 2D] zeros, or None without one."""
        if self.conv is None:
            return None
        return torch.zeros(batch_size, self.conv_width - 1, self.in_proj.in_features, device=device)
