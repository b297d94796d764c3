"""Warmup-stable-decay (WSD) learning-rate schedule as a pure function of the optimizer step.

``wsd_multiplier`` does the maths; ``WSDScheduler`` binds it (times an optional per-step ``lr_scale``,
e.g. the curriculum stage's) into ``LambdaLR``. The learning rate is never changed by hand anywhere
else, so what the config says is what the optimizer gets, and the only state to checkpoint is the step.

Step convention (LambdaLR's): optimizer step ``s`` (0-based) runs with ``base_lr * multiplier(s)``;
a run of ``max_steps`` steps trains steps ``0 .. max_steps - 1``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from sem.training.budget import fraction_steps

log = logging.getLogger(__name__)

DecayShape = Literal["linear", "cosine", "1-sqrt"]
DECAY_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt")


def _decay_curve(progress: float, shape: str) -> float:
    """1 at progress 0, 0 at progress 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"decay_shape={shape!r}: expected one of {', '.join(DECAY_SHAPES)}")


def wsd_multiplier(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int,
    decay_steps: int,
    decay_start_step: int | None = None,
    decay_shape: DecayShape = "linear",
    min_lr_ratio: float = 0.0,
) -> float:
    """LR multiplier at optimizer step ``step``.

    - warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (step 0 gets a small nonzero LR,
      step ``warmup_steps - 1`` reaches 1);
    - stable: exactly 1.0 until the decay starts at ``decay_start_step`` if given (a decay branch from a
      stable-phase checkpoint), else at ``max_steps - decay_steps``;
    - decay: progress ``p = (step - decay_start + 1) / (decay_steps + 1)``, multiplier
      ``min_lr_ratio + (1 - min_lr_ratio) * curve(p)``. Every decay step trains at an LR strictly above
      ``min_lr_ratio``: the *last decay step* ``decay_start + decay_steps - 1`` (with the default decay
      start, ``max_steps - 1``, the last step trained) runs at ``curve(D / (D + 1))``, e.g.
      ``lr / (D + 1)`` for a linear decay to 0; the curve would reach ``min_lr_ratio`` one step later,
      after the run. So no step is wasted at LR 0, and ``decay_steps=1`` halves the LR for one step;
    - after the decay (a branch that decays before ``max_steps``): ``min_lr_ratio``.

    If warmup and decay overlap (which ``problems`` reports) the smaller of the two envelopes wins.
    """
    warm = 1.0 if step >= warmup_steps else (step + 1) / warmup_steps
    decay_start = decay_start_step if decay_start_step is not None else max_steps - decay_steps
    if step < decay_start:
        decayed = 1.0
    elif decay_steps <= 0 or step >= decay_start + decay_steps:
        decayed = min_lr_ratio
    else:
        progress = (step - decay_start + 1) / (decay_steps + 1)
        decayed = min_lr_ratio + (1.0 - min_lr_ratio) * _decay_curve(progress, decay_shape)
    return min(warm, decayed)


def resolve_steps(max_steps: int, steps: int | None, fraction: float | None, name: str) -> int:
    """A length given in steps or as a fraction of ``max_steps`` (rounded to nearest). Steps win when
    both are set: a preset gives a fraction, and ``scheduler.warmup_steps=200`` from the shell must
    simply work."""
    if steps is None and fraction is None:
        raise ValueError(f"{name}: give {name}_steps or {name}_fraction (both are null)")
    if steps is not None:
        if steps < 0:
            raise ValueError(f"{name}_steps={steps}: must be >= 0")
        return int(steps)
    assert fraction is not None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name}_fraction={fraction}: must be in [0, 1]")
    return fraction_steps(fraction, max_steps)


def problems(
    max_steps: int,
    warmup_steps: int | None,
    warmup_fraction: float | None,
    decay_steps: int | None,
    decay_fraction: float | None,
    decay_start_step: int | None,
    min_lr_ratio: float,
    prefix: str = "scheduler",
    decay_shape: str = "linear",
) -> list[str]:
    """Every problem with a schedule config, one line each naming the key and the value.

    ``decay_steps`` and ``decay_fraction`` both unset means "decay over the whole rest of the run"
    (the cosine preset); warmup must be given one way or the other (0 is fine).
    """
    out: list[str] = []
    if max_steps <= 0:
        out.append(f"{prefix}: max_steps={max_steps} must be > 0")
    resolved: dict[str, int] = {}
    said: dict[str, str] = {}  # how each length was given, for the messages
    for name, steps, fraction, optional in (
        ("warmup", warmup_steps, warmup_fraction, False),
        ("decay", decay_steps, decay_fraction, True),
    ):
        if steps is None and fraction is None:
            if not optional:
                out.append(f"{prefix}.{name}_steps / {prefix}.{name}_fraction: both null, give one")
        elif steps is not None and steps < 0:
            out.append(f"{prefix}.{name}_steps={steps} must be >= 0")
        elif steps is None and fraction is not None and not 0.0 <= fraction <= 1.0:
            out.append(f"{prefix}.{name}_fraction={fraction} must be in [0, 1]")
        else:
            resolved[name] = resolve_steps(max(max_steps, 0), steps, fraction, name)
            said[name] = (f"{prefix}.{name}_steps={steps}" if steps is not None
                          else f"{prefix}.{name}_fraction={fraction} ({resolved[name]} steps)")
    if not 0.0 <= min_lr_ratio <= 1.0:
        out.append(f"{prefix}.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    if decay_shape not in DECAY_SHAPES:
        out.append(f"{prefix}.decay_shape={decay_shape!r} must be one of {', '.join(DECAY_SHAPES)}")
    warm, decay = resolved.get("warmup"), resolved.get("decay")
    if decay_start_step is not None:
        if decay_start_step < 0:
            out.append(f"{prefix}.decay_start_step={decay_start_step} must be >= 0")
        elif decay_start_step > max_steps:
            out.append(f"{prefix}.decay_start_step={decay_start_step} is past max_steps={max_steps}")
        elif decay is not None and decay_start_step + decay > max_steps:
            out.append(
                f"{prefix}.decay_start_step={decay_start_step} + {said['decay']} = "
                f"{decay_start_step + decay} is past max_steps={max_steps}"
            )
        if warm is not None and 0 <= decay_start_step < warm:
            out.append(
                f"{prefix}.decay_start_step={decay_start_step} falls inside the warmup ({warm} steps)"
            )
    elif warm is not None and decay is not None and warm + decay > max_steps:
        out.append(
            f"{said['warmup']} + {said['decay']} = {warm + decay} steps is more than "
            f"trainer.max_steps={max_steps}"
        )
    elif warm is not None and warm > max_steps:
        out.append(f"{said['warmup']} is more than trainer.max_steps={max_steps}")
    return out


class WSDScheduler(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with ``lr(step) = base_lr * wsd_multiplier(step) * lr_scale(step)``.

    Lengths are in steps or fractions of ``max_steps`` (steps win when both are set). The three presets
    are this one class:

    - ``wsd``: warmup, stable at 1.0, then ``decay_steps`` of decay ending at ``max_steps - 1``;
    - ``cosine``: ``decay_steps`` and ``decay_fraction`` both unset, which means the decay fills the whole
      rest of the run after the warmup (no stable phase), with ``decay_shape="cosine"``;
    - ``constant``: ``decay_steps=0``: warmup, then flat to the end.

    A decay branch from a stable-phase checkpoint sets ``decay_start_step``: the decay starts at that
    step whatever ``max_steps`` is (with no decay length given it runs to ``max_steps``).

    ``lr_scale`` (e.g. ``CurriculumManager.lr_scale``) is a pure function of the step too, so a stage
    boundary changes the LR at exactly the step the stage starts and is never overwritten.

    Checkpointing: ``state_dict`` holds only the step counters, never the callables. ``base_lrs`` are
    not restored either: they come from the optimizer as configured, so on resume the LR is the
    config's schedule at the restored step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_steps: int,
        warmup_steps: int | None = None,
        warmup_fraction: float | None = None,
        decay_steps: int | None = None,
        decay_fraction: float | None = None,
        decay_start_step: int | None = None,
        decay_shape: DecayShape = "linear",
        min_lr_ratio: float = 0.0,
        lr_scale: Callable[[int], float] | None = None,
        last_epoch: int = -1,
    ) -> None:
        found = problems(
            max_steps, warmup_steps, warmup_fraction, decay_steps, decay_fraction,
            decay_start_step, min_lr_ratio, decay_shape=decay_shape,
        )
        if found:
            raise ValueError("; ".join(found))
        self.max_steps = max_steps
        self.warmup_steps = resolve_steps(max_steps, warmup_steps, warmup_fraction, "warmup")
        if decay_steps is None and decay_fraction is None:
            # cosine preset: decay over everything after the warmup (or after the branch point)
            start = decay_start_step if decay_start_step is not None else self.warmup_steps
            self.decay_steps = max_steps - start
        else:
            self.decay_steps = resolve_steps(max_steps, decay_steps, decay_fraction, "decay")
        self.decay_start_step = decay_start_step
        self.decay_start = (
            decay_start_step if decay_start_step is not None else max_steps - self.decay_steps
        )
        self.decay_shape = decay_shape
        self.min_lr_ratio = min_lr_ratio
        self._lr_scale = lr_scale
        # set before super().__init__, which already evaluates the lambda at step 0
        super().__init__(optimizer, self.multiplier, last_epoch)
        log.info(
            "LR schedule: warmup %d, stable %d..%d, %s decay %d steps to %.3g x lr",
            self.warmup_steps, self.warmup_steps, self.decay_start, decay_shape,
            self.decay_steps, min_lr_ratio,
        )

    def wsd(self, step: int) -> float:
        """The warmup-stable-decay factor alone (no ``lr_scale``)."""
        return wsd_multiplier(
            step,
            max_steps=self.max_steps,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
            decay_start_step=self.decay_start,
            decay_shape=self.decay_shape,
            min_lr_ratio=self.min_lr_ratio,
        )

    def multiplier(self, step: int) -> float:
        """The factor on ``base_lr`` at ``step``: ``wsd(step) * lr_scale(step)``."""
        scale = 1.0 if self._lr_scale is None else float(self._lr_scale(step))
        return self.wsd(step) * scale

    def state_dict(self) -> dict[str, Any]:
        # only the step: the schedule itself is rebuilt from the config, callables are never pickled
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "last_epoch" not in state_dict:
            raise ValueError("the checkpoint's LR schedule is a torch scheduler; this run configures sem's WSD: "
                             "resume with the scheduler it was trained with")
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        # The optimizer's restored lr may come from a different config (or a different lr_scale
        # state); the next optimizer step must already run at this schedule's value.
        lrs = [base * self.multiplier(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


class ScaledSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Any torch ``LRScheduler`` with sem's per-step ``lr_scale`` (the curriculum stage's times the
    health policy's rollback factor) applied on top, so both compose with it as they do with WSD.

    The inner schedule only ever sees its own, unscaled learning rates: before each of its steps the
    groups get them back, after it the scale is applied again. Chainable schedules (cosine annealing,
    which computes the next LR from the current one) therefore stay exact. Stepped once per optimizer
    step; ``state_dict`` holds the inner schedule's state and the unscaled LRs.
    """

    def __init__(self, inner: torch.optim.lr_scheduler.LRScheduler, lr_scale: Callable[[int], float]) -> None:
        # No super().__init__: it would step the schedule once more; the inner one has done so already.
        self.inner, self.lr_scale = inner, lr_scale
        self.optimizer = inner.optimizer
        self.base_lrs = list(inner.base_lrs)
        self.last_epoch = inner.last_epoch
        self._unscaled = [g["lr"] for g in self.optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        scale = float(self.lr_scale(self.last_epoch))
        for group, lr in zip(self.optimizer.param_groups, self._unscaled, strict=True):
            group["lr"] = lr * scale
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:  # noqa: ARG002 - LRScheduler's signature
        for group, lr in zip(self.optimizer.param_groups, self._unscaled, strict=True):
            group["lr"] = lr
        self.inner.step()
        self._unscaled = [g["lr"] for g in self.optimizer.param_groups]
        self.last_epoch = self.inner.last_epoch
        self._apply()

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "unscaled": list(self._unscaled)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step (and the unscaled LRs a chainable schedule continues from) into the schedule
        *as configured now*: like WSD, a resumed run follows its config (a longer ``total_steps`` or
        ``T_max`` to train further), not the hyperparameters saved with the checkpoint."""
        if "inner" not in state_dict:
            raise ValueError(f"the checkpoint's LR schedule is sem's WSD; this run configures "
                             f"{type(self.inner).__name__}: resume with the scheduler it was trained with")
        saved = state_dict["inner"]
        self.inner.last_epoch = int(saved.get("last_epoch", self.inner.last_epoch))
        self.inner._step_count = int(saved.get("_step_count", self.inner.last_epoch + 1))
        self.inner._last_lr = list(state_dict["unscaled"])
        self._unscaled = list(state_dict["unscaled"])
        self.last_epoch = self.inner.last_epoch
        self._apply()
