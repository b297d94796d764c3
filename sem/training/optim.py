"""MuonAdamW: Muon for the hidden weight matrices, AdamW for every other parameter, in one optimizer.

Muon (K. Jordan, https://kellerjordan.github.io/posts/muon/) is SGD with momentum whose update for a
2-D weight is replaced by (approximately) the nearest semi-orthogonal matrix: ``U V^T`` of the momentum
``U S V^T``, computed by five quintic Newton-Schulz iterations. It suits the linear maps inside blocks
only; embeddings, readouts, gains and biases keep AdamW. ``sem.models.common.param_groups`` names the groups:
the one named "matrix" gets Muon, the others AdamW.

Why not ``torch.optim.Muon``: it takes 2-D parameters only (no AdamW side) and runs Newton-Schulz in
bfloat16 unconditionally, which on CPU is ~10x slower than float32 (no bf16 matmul units). Here the
iteration dtype is a choice, "auto" = bfloat16 on CUDA/XPU (as torch and the reference code do) and
float32 elsewhere.

All groups live in this one optimizer's ``param_groups``, each with its own ``lr`` (``lr`` for Muon,
``adamw_lr`` for AdamW), so ``LambdaLR`` (``WSDScheduler``) scales both by the same multiplier, and
gradient clipping and ``state_dict``/``load_state_dict`` work as for any torch optimizer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

MATRIX_GROUP = "matrix"  # the param_groups() name that routes a group to Muon
# Quintic Newton-Schulz coefficients (a, b, c) of the reference implementation: they maximise the slope
# at 0, so five steps map every singular value into roughly [0.7, 1.2] instead of exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NsDtype = Literal["auto", "float32", "bfloat16"]
NS_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FAST_BF16_DEVICES = ("cuda", "xpu")


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation ``U V^T`` of ``g = U S V^T``, per matrix of a batch.

    g [..., m, n] -> [..., m, n] in ``dtype``; a stack of same-shape matrices runs as batched matmuls.
    """
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: the Gram matrix is [min(m, n), min(m, n)]
        x = x.mT
    # Frobenius norm >= spectral norm: singular values now <= 1
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    a, b, c = NS_COEFFS
    mm, addmm = (torch.mm, torch.addmm) if x.ndim == 2 else (torch.bmm, torch.baddbmm)
    for _ in range(steps):
        gram = mm(x, x.mT)
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b A + c A^2) x
    return x.mT if tall else x


def ns_dtype_for(ns_dtype: NsDtype, device: torch.device) -> torch.dtype:
    """The Newton-Schulz dtype: "auto" is bfloat16 where bf16 matmuls are fast, float32 elsewhere."""
    if ns_dtype == "auto":
        return torch.bfloat16 if device.type in FAST_BF16_DEVICES else torch.float32
    return NS_DTYPES[ns_dtype]


def muon_lr_scale(shape: Sequence[int]) -> float:
    """Keller Jordan's shape factor sqrt(max(1, rows / cols)) on Muon's lr.

    An orthogonalised [rows, cols] update has RMS ~ 1/sqrt(max(rows, cols)); the factor gives tall
    matrices (rows = fan-out > fan-in) the same per-element step as square ones, which is what the usual
    Muon lr of ~0.02 assumes. (Moonlight's 0.2 * sqrt(max(rows, cols)) instead matches AdamW's update
    RMS so that one lr serves both; we keep two lrs.)
    """
    rows, cols = shape
    return math.sqrt(max(1.0, rows / cols))


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the group named "matrix", AdamW on the others.

    Per group: ``lr`` (Muon's, default ``lr``; AdamW's, default ``adamw_lr``) and ``weight_decay``
    (decoupled, ``p *= 1 - lr * weight_decay``, as torch's AdamW and Muon) may be set by the group,
    as ``param_groups`` does for weight decay. A model with no "matrix" group runs pure AdamW at
    ``adamw_lr``, with a warning.

    Muon step for W [rows, cols] with gradient G: ``B = lerp(B, G, 1 - momentum)``, Nesterov
    ``M = lerp(G, B, momentum)``, ``W -= lr * muon_lr_scale(W.shape) * newton_schulz(M)``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        adamw_lr: float = 3e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        adamw_betas: Sequence[float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_steps: int = 5,
        ns_dtype: NsDtype = "auto",
    ) -> None:
        betas = tuple(float(b) for b in adamw_betas)
        checks = (
            ("lr", lr, lr > 0),
            ("adamw_lr", adamw_lr, adamw_lr > 0),
            ("momentum", momentum, 0.0 <= momentum < 1.0),
            ("weight_decay", weight_decay, weight_decay >= 0),
            ("adamw_betas", adamw_betas, len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)),
            ("adamw_eps", adamw_eps, adamw_eps > 0),
            ("ns_steps", ns_steps, isinstance(ns_steps, int) and ns_steps > 0),
            ("ns_dtype", ns_dtype, ns_dtype == "auto" or ns_dtype in NS_DTYPES),
        )
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"MuonAdamW: invalid {name}={value!r}")
        self._adamw_lr = adamw_lr  # add_param_group (called by super().__init__) reads it
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, betas=betas, eps=adamw_eps)
        super().__init__(params, defaults)
        if not any(g["muon"] for g in self.param_groups):
            log.warning("MuonAdamW: no parameter group named %r: every parameter runs AdamW at "
                        "adamw_lr=%g (the model declares no hidden matrices; see sem.models.common.param_groups)",
                        MATRIX_GROUP, adamw_lr)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        muon = param_group.get("name") == MATRIX_GROUP
        param_group["muon"] = muon
        if not muon:
            param_group.setdefault("lr", self._adamw_lr)
        super().add_param_group(param_group)  # fills the remaining keys from defaults
        for p in param_group["params"] if muon else ():
            if p.ndim != 2:
                raise ValueError(f"MuonAdamW: group {MATRIX_GROUP!r} holds a parameter of shape "
                                 f"{tuple(p.shape)}: Muon takes 2-D matrices only")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        if not params:
            return
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1.0 - mu)
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        torch._foreach_mul_(params, 1.0 - lr * wd)
        # Same-shape matrices (every block's in_proj, ...) orthogonalise as one batch: fewer, larger calls.
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
        for (shape, dtype, device), idx in buckets.items():
            stacked = torch.stack([updates[i] for i in idx])
            ortho = newton_schulz(stacked, group["ns_steps"], ns_dtype_for(group["ns_dtype"], device))
            scale = -lr * muon_lr_scale(shape)
            for i, o in zip(idx, ortho.to(dtype).unbind(0)):
                params[i].add_(o, alpha=scale)

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch.optim.AdamW's update (amsgrad off), written out."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1.0 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            denom = (v.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(eps)
            p.mul_(1.0 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** t))
