"""``fit``: train to ``trainer.max_steps``, the same for both engines. A stop signal ends it saved
(``summary.json`` says preempted, exit 75); a sweeper's judge ends it at a validation (pruned). What
follows a completed fit: ``sem.engines.final`` (the final validation, the final checkpoint's scores,
``summary.json``), ``sem.engines.samples`` (``samples.txt``)."""

from __future__ import annotations

import logging
import time

from sem.engines.build import Built
from sem.errors import EXIT_PREEMPTED
from sem.record.summary import RunSummary, Status
from sem.training.checkpoint import CheckpointManager
from sem.training.pruning import Pruned

log = logging.getLogger("sem.fit")


def fit(built: Built, summary: RunSummary, started: float) -> Pruned | None:
    """Train to ``trainer.max_steps``. Stopped by a signal before that: ``summary.json`` says
    preempted, and ``SystemExit(75)`` (a sweep job records it and launches no more jobs here). Stopped by
    the sweeper's judge at a validation (``sem.training.pruning``): ``summary.json`` says pruned, with
    that step and val/bpb, and the verdict is returned (no final validation, test scores or samples)."""
    engine, checkpoints = built.engine, built.checkpoints
    engine.fit(built.resume_from)
    pruned = built.trial.pruned if built.trial is not None else None
    if pruned is not None:
        _ended_early(built, summary, started, "pruned", val_bpb=pruned.value,
                     pruned_at={"step": pruned.step, "val_bpb": pruned.value},
                     error=f"pruned by the sweeper at step {pruned.step} (val/bpb {pruned.value:.4f})")
        log.warning("pruned at step %d (val/bpb %.4f): checkpoint %s", pruned.step, pruned.value, checkpoints.last())
        return pruned
    stopped_by = built.signals.received if built.signals is not None else None
    if stopped_by is None or engine.global_step >= engine.max_steps:
        return None
    last = checkpoints.last()
    _ended_early(built, summary, started, "preempted", error=f"stopped by {stopped_by} at step {engine.global_step}")
    log.warning("preempted by %s at step %d: checkpoint %s; `resume=auto` (same run dir) continues",
                stopped_by, engine.global_step, last)
    log.warning("exit code %d (preempted)", EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)


def _ended_early(built: Built, summary: RunSummary, started: float, status: Status, **extra: object) -> None:
    """``summary.json`` of a fit that ended before ``trainer.max_steps``, at the engine's step, saved."""
    engine = built.engine
    summary.finish(status, wall_s=time.time() - started, steps=engine.global_step, tokens_per_s=engine.tokens_per_s,
                   **built.datamodule.compressor_bpb, **checkpoint_fields(built.checkpoints), **extra)


def checkpoint_fields(checkpoints: CheckpointManager) -> dict[str, str | None]:
    """``summary.json``'s ``best_checkpoint`` and ``last_checkpoint`` (paths; null before the first)."""
    best, last = checkpoints.best(), checkpoints.last()
    return {"best_checkpoint": str(best) if best is not None else None,
            "last_checkpoint": str(last) if last is not None else None}
