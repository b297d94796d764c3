"""The distillation group: the teacher's and the loss's schemas, and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sem.config.groups.common import plain
from sem.lengths import length_problems


@dataclass
class EMATeacherConf:
    _target_: str = "sem.training.distillation.EMATeacher"
    _partial_: bool = True  # the student is passed in by the composition root
    decay_start: float = 0.99
    decay_end: float = 0.999
    # Lengths in steps or as fractions of max_steps (steps win; a resumed run keeps the steps its start
    # resolved: sem.training.budget).
    ramp_steps: int | None = None
    ramp_fraction: float | None = 0.5
    start_step: int | None = None
    start_fraction: float | None = None
    start_stage: str | None = None
    max_steps: int | None = "${trainer.max_steps}"  # type: ignore[assignment]  # the budget fractions scale with


@dataclass
class DistillationLossConf:
    _target_: str = "sem.training.distillation.DistillationLoss"
    alpha: float = 0.5
    temperature: float = 2.0


@dataclass
class DistillationConf:
    """``off`` leaves both null; ``ema_teacher`` sets both (``EMADistillationConf``). Typed Any here
    because OmegaConf cannot merge a dict into a null structured node: ``distillation.teacher={...}`` on
    ``off`` raised AttributeError inside Hydra's composition; validation checks what it gets."""

    teacher: Any = None
    loss: Any = None


@dataclass
class EMADistillationConf(DistillationConf):
    """``distillation=ema_teacher``: both nodes typed, so a wrong type fails at compose time."""

    teacher: EMATeacherConf | None = field(default_factory=EMATeacherConf)
    loss: DistillationLossConf | None = field(default_factory=DistillationLossConf)


def with_schema_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` with a teacher or loss node set by hand on ``distillation=off`` (untyped: it has only the
    keys it was given) completed by its schema's defaults, in place in the config so that its
    ``${trainer.max_steps}`` resolves: what validation checks is what the run builds."""
    out = cfg
    for key, schema in (("teacher", EMATeacherConf), ("loss", DistillationLossConf)):
        node = out.distillation.get(key)
        if isinstance(node, DictConfig) and "_target_" in node and OmegaConf.get_type(node) is dict:
            out = out.copy() if out is cfg else out
            out.distillation[key] = OmegaConf.merge(OmegaConf.structured(schema), node)
    return out


def distillation_problems(cfg: DictConfig) -> list[str]:
    from sem.training.distillation import distill_problems

    t, loss = cfg.distillation.teacher, cfg.distillation.loss
    if (t is None) != (loss is None):
        return ["distillation: teacher and loss must both be set or both be null"]
    if t is None:
        return []
    p = []
    for key, node in (("teacher", t), ("loss", loss)):  # distillation=off takes any value: it is typed Any
        if not isinstance(node, DictConfig) or "_target_" not in node:
            p.append(f"distillation.{key}={plain(node)!r}: not a component (no _target_); choose "
                     f"distillation=ema_teacher and override its keys (distillation.{key}.<name>=...)")
    if p:
        return p
    full = with_schema_defaults(cfg)  # a node set by hand on distillation=off: the schema's defaults fill in
    t, loss = full.distillation.teacher, full.distillation.loss
    n = cfg.trainer.max_steps
    return distill_problems(alpha=loss.alpha, temperature=loss.temperature, decay_start=t.decay_start,
                            decay_end=t.decay_end, start_stage=t.start_stage,
                            stage_names=[s.name for s in cfg.curriculum.stages]) + [
        *length_problems("distillation.teacher.ramp_steps", t.ramp_steps,
                         "distillation.teacher.ramp_fraction", t.get("ramp_fraction"), n, may_overrun=True),
        *length_problems("distillation.teacher.start_step", t.start_step,
                         "distillation.teacher.start_fraction", t.get("start_fraction"), n,
                         required=False, strictly_inside=True),
    ]
