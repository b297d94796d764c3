"""Lengths that scale with the step budget, resolved once per run.

The shipped presets give warm-ups, curriculum stages and the teacher's start and ramp as fractions of
``trainer.max_steps``, so any budget from one step up works with no other override. ``resolve_budget``
turns every fraction into a step count at the start of a run and returns a record of what it resolved;
the record goes into every checkpoint. A resumed run, including a WSD decay branch that changes
``trainer.max_steps``, takes the recorded steps for every length that was given as a fraction, so the
parent's warm-up and stage boundaries stay where they were. The decay is the exception on purpose: it
is what a branch changes, so it is resolved against the branch's own ``max_steps`` by the scheduler.

Plain dicts in, plain dicts out: no Hydra, no OmegaConf (the composition root converts).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from sem.lengths import fraction_steps, length_problems  # noqa: F401 (length_problems: re-exported)

log = logging.getLogger(__name__)


def _field(stage: Any, name: str) -> Any:
    return stage.get(name) if isinstance(stage, dict) else getattr(stage, name, None)


def stage_lengths(stages: list[Any], max_steps: int) -> list[int | None]:
    """Nominal length of each stage; None for a last stage that gives neither steps nor fraction.

    Fractions are rounded at their *cumulative* boundaries (round(sum of fractions so far * max_steps)),
    so stages given as fractions that add up to at most 1 never overrun the budget, however small."""
    lengths: list[int | None] = []
    end = 0  # boundary reached so far, in steps
    cum_fraction = 0.0
    for st in stages:
        steps, fraction = _field(st, "steps"), _field(st, "fraction")
        if steps is not None:
            lengths.append(int(steps))
            end += int(steps)
            cum_fraction = end / max_steps if max_steps else 0.0
        elif fraction is not None:
            cum_fraction += float(fraction)
            boundary = max(end, fraction_steps(cum_fraction, max_steps))
            lengths.append(boundary - end)
            end = boundary
        else:
            lengths.append(None)
    return lengths


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _pick(key: str, fresh: int, recorded: dict[str, Any], max_steps: int) -> int:
    """The recorded value of ``key`` when the run resumes with one, else the freshly resolved one."""
    if key not in recorded:
        return fresh
    kept = int(recorded[key])
    if kept != fresh:
        log.info("budget: keeping %s=%d resolved at the start of the run (this run's "
                 "trainer.max_steps=%d alone would give %d)", key, kept, max_steps, fresh)
    return kept


def resolve_budget(cfg: dict[str, Any], recorded: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn every length given as a fraction of ``trainer.max_steps`` into steps.

    ``cfg`` is the resolved run config as plain containers. Returns ``(resolved config, record)``:
    the config with fractions replaced by steps (``scheduler.warmup_fraction`` -> ``warmup_steps``,
    ``model.propagator_warmup_fraction`` -> ``propagator_warmup_steps``, the teacher's
    ``start_fraction`` / ``ramp_fraction`` -> ``start_step`` / ``ramp_steps``, stage ``fraction`` ->
    ``steps``), curriculum stages that get no step in this budget dropped with a one-line warning each,
    and the record ``{dotted key: steps}`` of every value resolved from a fraction. ``recorded`` (from
    a checkpoint) wins over a fresh resolution for the keys it holds.
    """
    out = copy.deepcopy(cfg)
    recorded = dict(recorded or {})
    n = int(out["trainer"]["max_steps"])
    record: dict[str, Any] = {}

    def resolve(node: dict[str, Any], steps_key: str, fraction_key: str, prefix: str) -> None:
        fraction = node.get(fraction_key)
        if fraction is not None and node.get(steps_key) is None:
            key = f"{prefix}.{steps_key}"
            node[steps_key] = record[key] = _pick(key, fraction_steps(float(fraction), n), recorded, n)
        if fraction is not None and node.get(steps_key) is not None:
            node[fraction_key] = None  # the steps are the length now (a resumed run keeps them)

    sched = out.get("scheduler") or {}
    if sched:
        resolve(sched, "warmup_steps", "warmup_fraction", "scheduler")
    model = out.get("model") or {}
    if "propagator_warmup_fraction" in model:
        resolve(model, "propagator_warmup_steps", "propagator_warmup_fraction", "model")
    teacher = _get(out, "distillation.teacher")
    if teacher:
        resolve(teacher, "start_step", "start_fraction", "distillation.teacher")
        resolve(teacher, "ramp_steps", "ramp_fraction", "distillation.teacher")

    curriculum = out.get("curriculum") or {}
    if curriculum.get("stages"):
        _resolve_stages(out, n, recorded, record)
    return out, record


def _resolve_stages(out: dict[str, Any], n: int, recorded: dict[str, Any], record: dict[str, Any]) -> None:
    stages: list[dict[str, Any]] = out["curriculum"]["stages"]
    fresh = stage_lengths(stages, n)
    start = 0
    kept: list[dict[str, Any]] = []
    for i, (st, length) in enumerate(zip(stages, fresh)):
        last = i == len(stages) - 1
        if st.get("steps") is None and st.get("fraction") is not None and length is not None:
            key = f"curriculum.stages.{i}.steps"
            length = record[key] = _pick(key, length, recorded, n)
            st["steps"], st["fraction"] = length, None
        runs = start < n and (last or length is None or length > 0 or st.get("gate") is not None)
        if not runs:
            log.warning("curriculum: stage %r gets 0 of trainer.max_steps=%d steps (starts at step %d): "
                        "dropped", st["name"], n, start)
            _retarget_teacher(out, st["name"], start)
        else:
            kept.append(st)
        start += length or 0
    if not kept:  # max_steps >= 1, so only all-gated or pathological lists get here: keep the first
        kept = stages[:1]
    if len(kept) < len(stages):
        kept[-1] = {**kept[-1], "steps": None, "fraction": None}  # the last stage runs to the end
    out["curriculum"]["stages"] = kept


def _retarget_teacher(out: dict[str, Any], dropped: str, start: int) -> None:
    """A teacher set to switch on at a dropped stage switches on at the step that stage would have."""
    teacher = _get(out, "distillation.teacher")
    if teacher and teacher.get("start_stage") == dropped:
        n = int(out["trainer"]["max_steps"])
        when = f"switches on at step {start} instead" if start < n else "does not switch on in this budget"
        log.warning("distillation.teacher.start_stage=%r: that stage was dropped; the teacher %s", dropped, when)
        teacher["start_stage"] = None
        teacher["start_step"] = max(int(teacher.get("start_step") or 0), start)
