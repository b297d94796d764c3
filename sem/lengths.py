"""Lengths given in steps or as a fraction of the step budget (``trainer.max_steps``): one rounding
rule and one check, for every component that takes such a length (the SEM's propagator warm-up, the
schedule's warm-up, the teacher's ramp, curriculum stages). A leaf: every layer may import it."""

from __future__ import annotations

import math
from typing import Any


def fraction_steps(fraction: float, max_steps: int) -> int:
    """``fraction * max_steps`` rounded to the nearest step (halves up)."""
    return int(math.floor(fraction * max_steps + 0.5))


def steps_of(steps: int | None, fraction: float | None, max_steps: int | None) -> int | None:
    """A length in steps: ``steps`` when given (they win), else ``fraction`` of ``max_steps``; None when
    neither is given. A fraction needs ``max_steps`` (``unplaced`` says so first)."""
    if steps is not None:
        return int(steps)
    return None if fraction is None else fraction_steps(float(fraction), int(max_steps or 0))


def unplaced(fraction_key: str, fraction: Any, steps_key: str, steps: Any, max_steps: Any, budget_key: str
             ) -> list[str]:
    """A length given only as a fraction to a constructor that was not given the budget it scales with."""
    if steps is None and fraction is not None and max_steps is None:
        return [f"{fraction_key}={fraction!r}: a fraction of {budget_key}, which is not given: pass {budget_key} "
                f"(the training budget) or {steps_key}"]
    return []


def length_problems(steps_key: str, steps: Any, fraction_key: str, fraction: Any, max_steps: int, *,
                    required: bool = True, strictly_inside: bool = False, may_overrun: bool = False
                    ) -> list[str]:
    """Problems with one length given in steps or as a fraction of ``trainer.max_steps`` (steps win
    when both are set). An explicit step count that cannot fit is a problem naming both keys, unless
    ``may_overrun`` (a ramp that simply stops where the run ends)."""
    if steps is None and fraction is None:
        return [f"{steps_key} / {fraction_key}: both null, give one"] if required else []
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            return [f"{steps_key}={steps!r} must be an integer >= 0"]
        if not may_overrun and (steps > max_steps or (strictly_inside and steps >= max_steps)):
            return [f"{steps_key}={steps} does not fit in trainer.max_steps={max_steps} "
                    f"(give {fraction_key} instead, or fewer steps)"]
        return []
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        return [f"{fraction_key}={fraction!r} must be in [0, 1]"]
    return []
