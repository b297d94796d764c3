"""``write_samples``: the run's ``samples.txt``, what the final checkpoint writes (rebuilt from the
file alone, as a user would), the same for both engines."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from sem.errors import EXIT_PREEMPTED
from sem.record.summary import is_global_zero
from sem.training.checkpoint import CheckpointManager
from sem.training.preemption import Stopped, StopSignals, abandonable

log = logging.getLogger("sem.samples")


def write_samples(cfg: DictConfig, checkpoints: CheckpointManager, run_dir: Path, signals: StopSignals | None = None) -> None:
    """``samples.txt``: what the final checkpoint writes (rebuilt from the file alone, as a user would).
    A stop signal abandons it: the run is complete (``summary.json``), no samples, exit 75."""
    last = checkpoints.last()
    if cfg.sample.n == 0 or last is None or not is_global_zero():
        return
    try:
        with abandonable(signals, "sampling"):
            _write_samples(cfg, last, run_dir)
    except Stopped as stop:
        (run_dir / "samples.txt.tmp").unlink(missing_ok=True)
        log.warning("%s: samples.txt not written (the run is complete: summary.json); exit code %d",
                    stop, EXIT_PREEMPTED)
        raise SystemExit(EXIT_PREEMPTED) from None


def _write_samples(cfg: DictConfig, last: Path, run_dir: Path) -> None:
    try:
        from sem.models.generate import write_samples as generate_samples
        from sem.training.restore import load

        model, _ = load(last)
        s = cfg.sample
        path = generate_samples(model, run_dir / "samples.txt", prompts=list(s.prompts), n=s.n,
                                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, seed=s.seed)
        log.info("samples from %s: %s", last.name, path)
    except Exception as exc:  # samples are a courtesy: they never turn a finished run into a failure
        log.warning("could not write samples.txt: %s: %s", type(exc).__name__, exc)
