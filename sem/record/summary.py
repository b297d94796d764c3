"""The files a run leaves behind besides metrics: ``config_resolved.yaml``, ``env.json`` (the first
attempt), ``attempts.jsonl`` (one line per start or resume), ``summary.json`` and ``plots/``. Written by
global rank zero only, atomically."""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from sem.record.provenance import environment
from sem.training.distributed import ranks

log = logging.getLogger(__name__)

Status = Literal["completed", "failed", "preempted", "pruned"]


def is_global_zero() -> bool:
    """This process writes the run's files (``sem.training.distributed.ranks``, read from the cluster
    environment Lightning selects)."""
    return ranks().is_global_zero


def _finite(value: Any) -> Any:
    """NaN and infinities become null: strict JSON that every reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, MiB (``getrusage``; Linux counts KiB)."""
    try:
        import resource
        import sys

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kib / (2**20 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, OSError):
        return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` if it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class RunSummary:
    """Writes the run's provenance at the start and its verdict at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = is_global_zero()

    def begin(self, cfg: DictConfig, parent_checkpoint: str | None = None) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        env = environment(parent_checkpoint)
        if not (self.run_dir / "env.json").exists():  # the run's origin; later attempts are appended below
            write_json(self.run_dir / "env.json", env)
        attempt = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "command": env["command_line"], "git_sha": env["git_sha"], "git_dirty": env["git_dirty"],
                   "resumed_from": parent_checkpoint}
        with (self.run_dir / "attempts.jsonl").open("a") as f:
            f.write(json.dumps(attempt) + "\n")

    def finish(self, status: Status, *, wall_s: float, steps: int | None = None,
               val_loss: float | None = None, val_bpb: float | None = None,
               stream_bpb: float | None = None, test_bpb: float | None = None,
               test_stream_bpb: float | None = None, test_dynamic_bpb: float | None = None,
               gzip_bpb: float | None = None, bz2_bpb: float | None = None, xz_bpb: float | None = None,
               val_anchors_bpb: dict[str, float | None] | None = None,
               test_anchors_bpb: dict[str, float | None] | None = None, tokens_per_s: float | None = None,
               best_checkpoint: str | None = None, last_checkpoint: str | None = None,
               error: str | None = None, pruned_at: dict[str, Any] | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "status": status,
            "steps": steps,
            "val_loss": val_loss,
            "val_bpb": val_bpb,
            "stream_bpb": stream_bpb,  # val documents scored whole (sem.engines.final.final_scores)
            # the test split, scored once at the end from the final checkpoint (the report; val chose)
            "test_bpb": test_bpb,
            "test_stream_bpb": test_stream_bpb,
            "test_dynamic_bpb": test_dynamic_bpb,
            "gzip_bpb": gzip_bpb,  # the val bytes under gzip -9, bz2 -9, xz -9e (also in val_anchors_bpb)
            "bz2_bpb": bz2_bpb,
            "xz_bpb": xz_bpb,
            # each split's bytes under every anchor (sem.data.anchors): gzip, bz2, xz alone; xz_prior,
            # ppmd_prior given the training set
            "val_anchors_bpb": val_anchors_bpb,
            "test_anchors_bpb": test_anchors_bpb,
            "tokens_per_s": tokens_per_s,
            "wall_s": round(wall_s, 2),
            "peak_rss_mb": peak_rss_mb(),
            "best_checkpoint": best_checkpoint,
            "last_checkpoint": last_checkpoint,
            "pruned_at": pruned_at,  # status pruned: the step and val/bpb where the sweeper stopped the trial
        }
        if error is not None:
            record["error"] = error
        if not self.enabled:
            return record
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "summary.json", record)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            try:
                from sem.record.plots import plot_run

                plot_run(metrics, self.run_dir / "plots")
            except Exception as exc:  # a plot must never turn a finished run into a failure
                log.warning("could not draw plots: %s: %s", type(exc).__name__, exc)
        return record
