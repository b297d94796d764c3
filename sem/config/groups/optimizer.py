"""The optimizer and scheduler groups: schemas and checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from sem.config.components import optimizer_problems
from sem.config.components import scheduler_problems as contract_scheduler_problems
from sem.config.groups.common import positive


@dataclass
class AdamWConf:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # One kernel per step (on CPU ~20x faster than the per-tensor loop), and it can skip an update on
    # the device: health checks then need no host sync between logging steps (sem.training.step).
    fused: bool | None = True


@dataclass
class SGDConf:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    fused: bool | None = True  # as AdamW's


@dataclass
class MuonConf:
    """Muon on hidden matrices, AdamW on the rest (sem.training.optim.MuonAdamW)."""

    _target_: str = "sem.training.optim.MuonAdamW"
    _partial_: bool = True
    lr: float = 0.02  # Muon's, on the "matrix" group; scaled by sqrt(max(1, rows/cols)) per matrix
    adamw_lr: float = 3e-3  # every other group
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.1  # decoupled, both sides
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    ns_steps: int = 5
    ns_dtype: str = "auto"  # auto (bfloat16 on CUDA/XPU, float32 elsewhere) | float32 | bfloat16


@dataclass
class SchedulerConf:
    _target_: str = "sem.training.scheduler.WSDScheduler"
    _partial_: bool = True
    max_steps: int = "${trainer.max_steps}"  # type: ignore[assignment]
    warmup_steps: int | None = None
    warmup_fraction: float | None = None
    decay_steps: int | None = None
    decay_fraction: float | None = None
    decay_start_step: int | None = None
    decay_shape: str = "linear"  # linear | cosine | 1-sqrt
    min_lr_ratio: float = 0.0


MAX_NS_STEPS = 100  # Muon's orthogonalisation: each iteration is 3 matmuls per matrix per step
OWN_OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.SGD", "sem.training.optim.MuonAdamW")
OWN_SCHEDULES = ("sem.training.scheduler.WSDScheduler",)

def optimizer_value_problems(o: DictConfig) -> list[str]:
    p: list[str] = [] if o.get("_target_") in OWN_OPTIMIZERS else optimizer_problems(OmegaConf.to_container(o, resolve=True))
    if p:
        return p
    if "lr" in o:
        positive(p, "optimizer.lr", o.lr)
    if "weight_decay" in o:
        positive(p, "optimizer.weight_decay", o.weight_decay, strict=False)
    for key in ("betas", "adamw_betas"):  # adamw_betas: muon's AdamW side
        for i, beta in enumerate(o.get(key) or []):
            if not 0.0 <= beta < 1.0:
                p.append(f"optimizer.{key}[{i}]={beta!r}: must be in [0, 1)")
    if "eps" in o:
        positive(p, "optimizer.eps", o.eps, strict=False)
    if "adamw_lr" in o:
        positive(p, "optimizer.adamw_lr", o.adamw_lr)
    if "momentum" in o and not 0.0 <= o.momentum < 1.0:
        p.append(f"optimizer.momentum={o.momentum!r}: must be in [0, 1)")
    if "ns_steps" in o and not (isinstance(o.ns_steps, int) and 1 <= o.ns_steps <= MAX_NS_STEPS):
        p.append(f"optimizer.ns_steps={o.ns_steps!r}: must be in [1, {MAX_NS_STEPS}] (Newton-Schulz iterations "
                 "per step; 5 is usual)")
    if o.get("ns_dtype", "auto") not in ("auto", "float32", "bfloat16"):
        p.append(f"optimizer.ns_dtype={o.ns_dtype!r}: must be auto, float32 or bfloat16")
    return p


def budget_problems(cfg: DictConfig) -> list[str]:
    """sem's components that take their own max_steps (the budget their fractions scale with) must
    agree with the Trainer's."""
    from sem.config.groups.model import OWN_MODELS

    nodes = {"scheduler": cfg.scheduler if cfg.scheduler.get("_target_") in OWN_SCHEDULES else None,
             "curriculum": cfg.curriculum, "model": cfg.model if cfg.model.get("_target_") in OWN_MODELS else None,
             "distillation.teacher": cfg.distillation.get("teacher")}
    return [f"{key}.max_steps={node.max_steps}: must equal trainer.max_steps={cfg.trainer.max_steps} (leave it "
            "at its default, ${trainer.max_steps})" for key, node in nodes.items()
            if isinstance(node, DictConfig) and node.get("max_steps") not in (None, cfg.trainer.max_steps)]


def scheduler_problems(cfg: DictConfig) -> list[str]:
    from sem.training.scheduler import problems as wsd_problems

    node = cfg.scheduler
    if node.get("_target_") in OWN_SCHEDULES:
        return wsd_problems(**{k: v for k, v in node.items() if not k.startswith("_")}, prefix="scheduler")
    return contract_scheduler_problems(OmegaConf.to_container(node, resolve=True))
