"""Training curriculum as data: a list of stages, looked up by optimizer step.

Each ``Stage`` fixes the sequence length, batch size and an LR scale for a span of steps. Lookup is a
pure function of the step (plus, for gated stages, the recorded gate decisions), so the data loader
asks ``shape_at(step)`` when it builds the batch for ``step`` and a new sequence length reaches it at
exactly the stage boundary: there is no loader state to rebuild or to forget.

Gated stages ("hold a stage until the loss plateaus"): a gated stage does not end at its nominal
length unless the loss has plateaued; it is held until it has. The boundary a gate decides is
recorded, checkpointed and never moves again. Feed ``observe`` the same loss on every rank (e.g. the
all-reduced train loss), or ranks will disagree about the stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from sem.training.budget import stage_lengths

log = logging.getLogger(__name__)


@dataclass
class Gate:
    """Plateau test: after at least ``min_steps`` steps in the stage (and its nominal length), the
    stage ends once ``(mean(previous window) - mean(last window)) / |mean(previous window)| <
    threshold``, the windows being the last ``2 * window`` finite losses observed in the stage."""

    min_steps: int = 0
    window: int = 50
    threshold: float = 0.01


@dataclass
class Stage:
    """One stage. Length: ``steps`` or ``fraction`` (of max_steps; fractions are rounded at their
    cumulative boundaries, see ``sem.training.budget.stage_lengths``; steps win when both are set),
    except the last stage, which always runs to max_steps and may give neither. ``checkpoint``
    asks for a milestone checkpoint at the stage's start."""

    name: str
    seq_len: int
    batch_size: int
    lr_scale: float = 1.0
    steps: int | None = None
    fraction: float | None = None
    gate: Gate | None = None
    checkpoint: bool = False


@dataclass
class StageEvent:
    step: int  # the first step of the new stage (for stage_end: the first step after the old one)
    kind: Literal["stage_start", "stage_end"]
    stage: str
    index: int
    reason: str


def _as_stage(item: Stage | dict[str, Any]) -> Stage:
    if isinstance(item, Stage):
        return item
    known = {f.name for f in dataclasses.fields(Stage)}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ValueError(f"stage {item.get('name', '?')!r}: unknown keys {unknown}")
    fields = dict(item)
    gate = fields.get("gate")
    if gate is not None and not isinstance(gate, (dict, Gate)):
        raise ValueError(f"gate={gate!r}: must be a mapping (min_steps, window, threshold) or null")
    if isinstance(gate, dict):
        unknown = sorted(set(gate) - {f.name for f in dataclasses.fields(Gate)})
        if unknown:
            raise ValueError(f"gate: unknown keys {unknown} (known: min_steps, window, threshold)")
        for key, value in gate.items():  # the schema types a gate Any: its values are checked here
            whole = key != "threshold"
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value != value:
                raise ValueError(f"gate.{key}={value!r}: must be {'a whole number of steps' if whole else 'a number'}")
        fields["gate"] = Gate(**gate)
    return Stage(**fields)


def _length_ok(st: Stage) -> bool:
    if st.steps is not None:
        return st.steps >= 0
    return st.fraction is None or 0.0 <= st.fraction <= 1.0


def stage_problems(
    stages: list[Stage] | list[dict[str, Any]],
    max_steps: int,
    max_seq_len: int | None,
    prefix: str = "curriculum",
) -> list[str]:
    """Every problem with a list of stages, one line each naming the key and the value."""
    out: list[str] = []
    if not stages:
        return [f"{prefix}.stages: empty, give at least one stage"]
    parsed: list[Stage] = []
    for i, item in enumerate(stages):
        try:
            parsed.append(_as_stage(item))
        except (TypeError, ValueError) as err:
            out.append(f"{prefix}.stages[{i}]: {err}")
    if out:
        return out
    seen: set[str] = set()
    for i, st in enumerate(parsed):
        key = f"{prefix}.stages[{i}]({st.name})"
        last = i == len(parsed) - 1
        if not st.name:
            out.append(f"{prefix}.stages[{i}].name: empty")
        elif st.name in seen:
            out.append(f"{key}.name={st.name!r}: duplicate stage name")
        seen.add(st.name)
        if st.seq_len <= 0:
            out.append(f"{key}.seq_len={st.seq_len} must be > 0")
        elif max_seq_len is not None and st.seq_len > max_seq_len:
            out.append(f"{key}.seq_len={st.seq_len} is more than the model's max_seq_len={max_seq_len}")
        if st.batch_size <= 0:
            out.append(f"{key}.batch_size={st.batch_size} must be > 0")
        if not (st.lr_scale > 0 and math.isfinite(st.lr_scale)):
            out.append(f"{key}.lr_scale={st.lr_scale} must be a finite number > 0")
        if st.steps is None and st.fraction is None and not last:
            out.append(f"{key}: give steps or fraction (only the last stage may give neither)")
        elif st.steps is not None and st.steps < 0:
            out.append(f"{key}.steps={st.steps} must be >= 0")
        elif st.steps is None and st.fraction is not None and not 0.0 <= st.fraction <= 1.0:
            out.append(f"{key}.fraction={st.fraction} must be in [0, 1]")
        if st.gate is not None:
            g = st.gate
            if g.window < 1:
                out.append(f"{key}.gate.window={g.window} must be >= 1")
            if g.min_steps < 0:
                out.append(f"{key}.gate.min_steps={g.min_steps} must be >= 0")
            if not g.threshold >= 0:
                out.append(f"{key}.gate.threshold={g.threshold} must be >= 0")
    valid = [st if _length_ok(st) else dataclasses.replace(st, steps=0, fraction=None) for st in parsed]
    total = sum(n for n in stage_lengths(valid, max_steps) if n is not None)
    if total > max_steps:
        out.append(f"{prefix}.stages: stage lengths add up to {total} steps, more than max_steps={max_steps}")
    return out


class CurriculumManager:
    """Which stage, sequence length, batch size and LR scale each optimizer step gets.

    No curriculum is ``CurriculumManager.single_stage(seq_len, batch_size, max_steps)``: one stage at
    the data defaults, so every step still has a stage name and a seq_len to log.
    """

    def __init__(self, stages: list[Stage] | list[dict[str, Any]], max_steps: int) -> None:
        found = stage_problems(stages, max_steps, None)
        if found:
            raise ValueError("; ".join(found))
        self.stages: list[Stage] = [_as_stage(s) for s in stages]
        self.max_steps = max_steps
        self._nominal = stage_lengths(self.stages, max_steps)
        self._gate_ends: dict[int, int] = {}  # stage index -> decided first step of the next stage
        self._window: deque[float] = deque()  # finite losses of the current gated stage
        self._window_stage = -1  # which stage _window belongs to
        self._last_observed = -1
        self._max_served = -1
        self._announced = 0  # stages up to this index have had their stage_start reported
        self._gate_reasons: dict[int, str] = {}
        last = self.stages[-1]
        if last.gate is not None:
            log.warning("curriculum: gate on the last stage %r has no effect (it runs to the end)", last.name)
        given = sum(n for n in self._nominal if n is not None)
        if self._nominal[-1] is not None and given != max_steps:
            log.warning(
                "curriculum: stage lengths add up to %d, but the last stage %r runs to max_steps=%d",
                given, last.name, max_steps,
            )

    @classmethod
    def single_stage(
        cls, seq_len: int, batch_size: int, max_steps: int, name: str = "main"
    ) -> CurriculumManager:
        return cls([Stage(name=name, seq_len=seq_len, batch_size=batch_size)], max_steps)

    # ----------------------------------------------------------------------------- lookup

    def _starts(self) -> list[int | None]:
        """Start step of each stage; None after a gated stage whose end is not decided yet."""
        starts: list[int | None] = [0]
        for i, st in enumerate(self.stages[:-1]):
            start = starts[i]
            if start is None:
                starts.append(None)
            elif st.gate is not None:
                starts.append(self._gate_ends.get(i))
            else:
                starts.append(start + (self._nominal[i] or 0))
        return starts

    def stage_at(self, step: int) -> tuple[int, Stage]:
        """(index, stage) for optimizer step ``step``; a held gated stage covers every later step."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        index = 0
        for i, start in enumerate(self._starts()):
            if start is None:
                break
            if start <= step:
                index = i  # zero-length stages are skipped: a later one with the same start wins
            else:
                break
        return index, self.stages[index]

    def shape_at(self, step: int) -> tuple[int, int]:
        """(seq_len, batch_size) for the batch of ``step``. Call it when the batch is built: the
        highest step served is what a later gate decision must not change retroactively."""
        _, st = self.stage_at(step)
        self._max_served = max(self._max_served, step)
        return st.seq_len, st.batch_size

    def lr_scale(self, step: int) -> float:
        return self.stage_at(step)[1].lr_scale

    def boundaries(self) -> list[int]:
        """Start step of each stage as known now, capped at max_steps. A held gated stage is shown
        ending at the earliest step it still could; stages that will never run start at max_steps."""
        out: list[int] = [0]
        for i, st in enumerate(self.stages[:-1]):
            start = out[i]
            if st.gate is not None and i in self._gate_ends:
                end = self._gate_ends[i]
            else:
                end = start + (self._nominal[i] or 0)
                if st.gate is not None:
                    end = max(end, self._max_served + 1, self._last_observed + 1, start + st.gate.min_steps)
            out.append(min(end, self.max_steps))
        return out

    # ---------------------------------------------------------------------------- gating

    def needs_loss(self, step: int) -> bool:
        """Whether ``observe(step, ...)`` needs the step's loss: a gate is deciding the stage's end."""
        index, st = self.stage_at(step)
        return st.gate is not None and index < len(self.stages) - 1 and index not in self._gate_ends

    def observe(self, step: int, loss: float | None) -> list[StageEvent]:
        """Record the train loss of optimizer step ``step`` (after it ran). Returns the stage events
        that are reached: boundaries at ``step + 1`` (a gate decision may put a boundary a step or two
        ahead when the loader has already built those batches; it is announced when reached). A step
        seen twice is ignored."""
        if step <= self._last_observed:
            return []
        self._last_observed = step
        if self.needs_loss(step):
            if loss is None:
                raise ValueError(f"curriculum: step {step} is gated: observe() needs its loss")
            self._gate_step(*self.stage_at(step), step, loss)
        return self._announce(step + 1)

    def _gate_step(self, index: int, st: Stage, step: int, loss: float) -> None:
        gate = st.gate
        assert gate is not None
        if self._window_stage != index:
            self._window = deque(maxlen=2 * gate.window)
            self._window_stage = index
        if math.isfinite(loss):  # a NaN step says nothing about a plateau
            self._window.append(float(loss))
        start = self._starts()[index]
        assert start is not None
        done = step + 1 - start
        nominal = self._nominal[index] or 0
        if done < max(nominal, gate.min_steps) or len(self._window) < 2 * gate.window:
            return
        losses = list(self._window)
        prev = sum(losses[: gate.window]) / gate.window
        recent = sum(losses[gate.window :]) / gate.window
        improvement = (prev - recent) / max(abs(prev), 1e-12)
        if improvement >= gate.threshold:
            return  # still improving: hold the stage
        end = max(step + 1, self._max_served + 1)
        self._gate_ends[index] = end
        reason = f"plateau: relative improvement {improvement:.4g} < {gate.threshold:g}"
        self._gate_reasons[index] = reason
        log.info("curriculum: stage %r ends at step %d (%s)", st.name, end, reason)

    def _announce(self, upto: int) -> list[StageEvent]:
        """Events for every stage whose start is known and <= ``upto``."""
        events: list[StageEvent] = []
        starts = self._starts()
        while self._announced + 1 < len(self.stages):
            j = self._announced + 1
            start = starts[j]
            prev = self.stages[j - 1]
            decided_by_gate = prev.gate is not None and (j - 1) in self._gate_ends
            # Announced when the boundary is reached, never ahead: a gate decision taken a step or two
            # early (the loader had built those batches) lives in the state until then, so a checkpoint
            # in between keeps it and a resumed run still writes the events and the milestone.
            if start is None or start > upto or start >= self.max_steps:
                break
            reason = self._gate_reasons.get(j - 1, "gate") if decided_by_gate else "nominal length"
            events.append(StageEvent(start, "stage_end", prev.name, j - 1, reason))
            events.append(StageEvent(start, "stage_start", self.stages[j].name, j, "scheduled"))
            self._announced = j
        return events

    # ------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "gate_ends": {str(k): v for k, v in self._gate_ends.items()},
            "gate_reasons": {str(k): v for k, v in self._gate_reasons.items()},
            "window": list(self._window),
            "window_stage": self._window_stage,
            "last_observed": self._last_observed,
            "max_served": self._max_served,
            "announced": self._announced,
            "stage_names": [s.name for s in self.stages],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        names = [s.name for s in self.stages]
        if d.get("stage_names", names) != names:
            log.warning(
                "curriculum: checkpoint stages %s differ from the configured %s; gate decisions restored by index",
                d["stage_names"], names,
            )
        self._gate_ends = {int(k): int(v) for k, v in d["gate_ends"].items()}
        self._gate_reasons = {int(k): str(v) for k, v in d.get("gate_reasons", {}).items()}
        self._window_stage = int(d["window_stage"])
        gate = self.stages[self._window_stage].gate if 0 <= self._window_stage < len(self.stages) else None
        self._window = deque(d["window"], maxlen=2 * gate.window if gate is not None else None)
        self._last_observed = int(d["last_observed"])
        self._max_served = int(d["max_served"])
        self._announced = int(d["announced"])
