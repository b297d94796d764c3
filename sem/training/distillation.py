"""Self-distillation from an exponential-moving-average (EMA) teacher.

``ema_update`` is the pure maths, ``EMATeacher`` holds what must be checkpointed (teacher weights,
the step of the last update and the activation step), ``DistillationLoss`` mixes cross-entropy with a
per-token KL to the teacher. The teacher is updated once per *optimizer* step, never per micro-batch.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sem.contracts import model_output
from sem.lengths import steps_of, unplaced

log = logging.getLogger(__name__)


def _averaged(t: Tensor) -> bool:
    # complex parameters (SEM is complex64) are averaged like real ones
    return t.is_floating_point() or t.is_complex()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, held: Tensor | None = None) -> None:
    """``t <- decay * t + (1 - decay) * s`` for every float/complex parameter and buffer, matched by
    name; integer/bool buffers (counters, masks) are copied. Pass the unwrapped student (no DDP
    ``module.`` prefix). ``held`` (a bool tensor on the device): when true the teacher is left as it
    is: the student's update of this step was held back on the device (no host sync to find out)."""
    t_state = dict(teacher.named_parameters())
    t_state.update(teacher.named_buffers())
    s_state = dict(student.named_parameters())
    s_state.update(student.named_buffers())
    if t_state.keys() != s_state.keys():
        missing = sorted(set(s_state) ^ set(t_state))
        raise ValueError(f"ema_update: teacher and student differ in tensors {missing[:5]}")
    for name, t in t_state.items():
        s = s_state[name].detach()
        if t.shape != s.shape:
            raise ValueError(f"ema_update: {name} has shape {tuple(t.shape)} in the teacher, {tuple(s.shape)} in the student")
        s = s.to(device=t.device, dtype=t.dtype)
        if held is not None:
            t.copy_(torch.where(held, t, t.mul(decay).add_(s, alpha=1.0 - decay) if _averaged(t) and decay > 0.0
                                else s))
        elif _averaged(t) and decay > 0.0:
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:  # decay 0 copies outright (0 * a non-finite stale value would still be NaN)
            t.copy_(s)


def decay_at(step: int, decay_start: float, decay_end: float, ramp_steps: int) -> float:
    """EMA decay ramped linearly from ``decay_start`` (step 0) to ``decay_end`` (step ``ramp_steps``
    and after). ``step`` counts from the teacher's activation."""
    if ramp_steps <= 0:
        return decay_end
    frac = min(max(step, 0) / ramp_steps, 1.0)
    return decay_start + (decay_end - decay_start) * frac


def half_life(decay: float) -> float:
    """Steps after which a past student's weight in the teacher has halved: ``decay ** h = 1/2``."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay} must be in (0, 1)")
    return math.log(0.5) / math.log(decay)


def decay_for_half_life(steps: float) -> float:
    if not steps > 0:
        raise ValueError(f"half-life steps={steps} must be > 0")
    return 0.5 ** (1.0 / steps)


def distill_problems(
    alpha: float | None = None,
    temperature: float | None = None,
    decay_start: float | None = None,
    decay_end: float | None = None,
    ramp_steps: int | None = None,
    start_step: int | None = None,
    start_stage: str | None = None,
    stage_names: list[str] | None = None,
    prefix: str = "distillation",
) -> list[str]:
    """Every problem with a distillation config, one line each; None skips a check."""
    out: list[str] = []
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        out.append(f"{prefix}.loss.alpha={alpha} must be in [0, 1]")
    if temperature is not None and not temperature > 0:
        out.append(f"{prefix}.loss.temperature={temperature} must be > 0")
    for key, d in (("decay_start", decay_start), ("decay_end", decay_end)):
        if d is not None and not 0.0 < d < 1.0:
            out.append(f"{prefix}.teacher.{key}={d} must be in (0, 1)")
    if decay_start is not None and decay_end is not None and decay_start > decay_end:
        out.append(f"{prefix}.teacher.decay_start={decay_start} is above decay_end={decay_end}")
    if ramp_steps is not None and ramp_steps < 0:
        out.append(f"{prefix}.teacher.ramp_steps={ramp_steps} must be >= 0")
    if start_step is not None and start_step < 0:
        out.append(f"{prefix}.teacher.start_step={start_step} must be >= 0")
    if start_stage is not None and stage_names is not None and start_stage not in stage_names:
        out.append(f"{prefix}.teacher.start_stage={start_stage!r} is not a curriculum stage ({', '.join(stage_names)})")
    return out


def _storages(module: nn.Module) -> set[int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


class EMATeacher:
    """An EMA copy of the student that supplies distillation targets.

    Deliberately not an ``nn.Module``: its weights never show up in the student's parameters, the
    optimizer or the LightningModule's state dict; they are checkpointed through this object's own
    ``state_dict``.

    Caller protocol, per optimizer step ``s`` in stage ``name``::

        if teacher.ready:                        # activated at an earlier step
            loss = distill(student_logits, teacher(input_ids), ce)
        ... backward, optimizer.step() ...
        if teacher.active(s, name):
            teacher.update(student, s)           # once per optimizer step

    The first ``update`` (activation) re-initialises the teacher from the student instead of
    averaging in the weights copied at construction; from the next step on the teacher is ready.
    The decay ramp counts steps from activation.
    """

    def __init__(
        self,
        student: nn.Module,
        decay_start: float = 0.99,
        decay_end: float = 0.999,
        ramp_steps: int | None = None,
        ramp_fraction: float | None = 0.5,
        start_step: int | None = None,
        start_fraction: float | None = None,
        start_stage: str | None = None,
        max_steps: int | None = None,
    ) -> None:
        found = distill_problems(
            decay_start=decay_start, decay_end=decay_end, ramp_steps=ramp_steps,
            start_step=start_step, prefix="EMATeacher",
        )
        found += unplaced("EMATeacher.ramp_fraction", ramp_fraction, "ramp_steps", ramp_steps, max_steps, "max_steps")
        found += unplaced("EMATeacher.start_fraction", start_fraction, "start_step", start_step, max_steps, "max_steps")
        if found:
            raise ValueError("; ".join(found))
        self.decay_start = decay_start
        self.decay_end = decay_end
        # Steps win; else a fraction of max_steps (the run's trainer.max_steps, given by the config node).
        self.ramp_steps = steps_of(ramp_steps, ramp_fraction, max_steps) or 0
        self.start_step = steps_of(start_step, start_fraction, max_steps)
        self.start_stage = start_stage
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        assert not (_storages(self.module) & _storages(student)), "teacher shares storage with the student"
        self.last_updated_step: int | None = None
        self.activated_step: int | None = None
        self._warned_repeat = False

    @property
    def ready(self) -> bool:
        """True once the teacher has been initialised from the student (its logits mean something)."""
        return self.activated_step is not None

    def active(self, step: int, stage_name: str | None = None) -> bool:
        """Whether the teacher is in use at ``step``: always once activated; before that, when
        ``step >= start_step`` and the stage is ``start_stage`` (each condition only if set)."""
        if self.activated_step is not None:
            return step >= self.activated_step
        if self.start_step is not None and step < self.start_step:
            return False
        return self.start_stage is None or stage_name == self.start_stage

    def decay(self, step: int) -> float:
        assert self.activated_step is not None
        return decay_at(step - self.activated_step, self.decay_start, self.decay_end, self.ramp_steps)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, held: Tensor | None = None) -> bool:
        """EMA step after optimizer step ``step``. A second call for the same (or an earlier) step is
        ignored and returns False: one update per optimizer step, whatever the accumulation. ``held``:
        see ``ema_update``."""
        if self.last_updated_step is not None and step <= self.last_updated_step:
            if not self._warned_repeat:
                log.warning(
                    "EMATeacher.update(step=%d) after an update at step %d: ignored "
                    "(the teacher updates once per optimizer step)", step, self.last_updated_step,
                )
                self._warned_repeat = True
            return False
        if self.activated_step is None:
            ema_update(self.module, student, 0.0, held)  # decay 0 = copy: start from the current student
            self.activated_step = step
            log.info("EMATeacher activated at step %d (initialised from the student)", step)
        else:
            ema_update(self.module, student, self.decay(step), held)
        self.last_updated_step = step
        return True

    @torch.no_grad()
    def forward(self, input_ids: Tensor) -> Tensor:
        """Teacher logits ``[B, T, V]`` for ``input_ids [B, T]``."""
        if not self.ready:
            raise RuntimeError("EMATeacher.forward before the teacher was activated by update()")
        return model_output(self.module, input_ids).logits

    __call__ = forward

    def to(self, device: torch.device | str) -> EMATeacher:
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "last_updated_step": self.last_updated_step,
            "activated_step": self.activated_step,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.module.load_state_dict(d["module"])
        self.last_updated_step = d["last_updated_step"]
        self.activated_step = d["activated_step"]


class DistillationLoss(nn.Module):
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`` with both distributions softened by
    temperature ``T``; the KL is summed over the vocabulary and averaged over tokens (masked tokens
    excluded), so it does not grow with sequence length. The ``T^2`` keeps the KL's gradient scale
    independent of ``T`` (Hinton et al., 2015). Returns ``{"loss", "kl", "ce"}``; ``kl`` is the
    per-token KL before the ``T^2`` factor."""

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0) -> None:
        super().__init__()
        found = distill_problems(alpha=alpha, temperature=temperature, prefix="DistillationLoss")
        if found:
            raise ValueError("; ".join(found))
        self.alpha = alpha
        self.temperature = temperature

    def forward(
        self,
        student_logits: Tensor,  # [B, T, V]
        teacher_logits: Tensor,  # [B, T, V]
        ce_loss: Tensor,  # scalar
        mask: Tensor | None = None,  # [B, T], nonzero = token counts
    ) -> dict[str, Tensor]:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ in shape"
            )
        temp = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / temp, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.detach().float() / temp, dim=-1)
        kl_tok = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)  # [B, T]
        if mask is None:
            kl = kl_tok.mean()
        else:
            if mask.shape != kl_tok.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != tokens {tuple(kl_tok.shape)}")
            m = mask.to(kl_tok.dtype)
            kl = (kl_tok * m).sum() / m.sum().clamp_min(1.0)
        loss = self.alpha * ce_loss + (1.0 - self.alpha) * temp**2 * kl
        return {"loss": loss, "kl": kl, "ce": ce_loss}
