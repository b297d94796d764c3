"""CheckpointManager: atomic saves, JSON sidecars, retention, discovery and verified loading.

Plain Python over ``torch.save``/``torch.load``: the Lightning adapter and the standalone engine hand it
a payload (a dict of tensors, numbers, strings, lists and dicts) and it owns everything on disk::

    checkpoints/step_0000500.ckpt        the payload
    checkpoints/step_0000500.json        its sidecar: step, stage, metrics, sha256, config hash, versions
    checkpoints/stage_long_step_0000800.ckpt (+ .json)   a curriculum-stage milestone
    checkpoints/last.ckpt -> step_...    relative symlinks, replaced atomically after each save
    checkpoints/best.ckpt -> step_...

A save never leaves a half-written file under a final name: temp file, fsync, sidecar, rename, fsync
of the directory, then the pointers. Loading is ``weights_only=True`` only and checks the sha256; a bad
file is skipped (with one warning line) in favour of the previous valid one. Retention scans the
directory, so it survives restarts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sem.training.checkpoint_file import (
    FORMAT,
    IN_FLIGHT,
    MODEL_PREFIX,
    CheckpointError,
    _fsync_dir,
    _mkstemp,
    _point,
    _versions,
    _write_atomic,
    config_hash,
    file_sha256,
    model_state,
    nonfinite_tensors,
    rng_state,
    set_rng_state,
    sidecar_of,
    verify,
)

__all__ = ["MODEL_PREFIX", "CheckpointError", "CheckpointManager", "Saved", "config_hash", "file_sha256",
           "model_state", "nonfinite_tensors", "rng_state", "set_rng_state", "sidecar_of", "verify"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(?:stage_(?P<stage>.+)_)?step_(?P<step>\d{7,})\.ckpt$")


# ------------------------------------------------------------------------------------- helpers


# ------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Saved:
    """One checkpoint on disk as its sidecar describes it."""

    path: Path
    step: int
    milestone: str | None
    metrics: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        value = self.metrics.get(name)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def settings_problems(every_n_steps: Any = 500, keep_last: Any = 2, keep_best: Any = 1, mode: Any = "min",
                      every_n_train_steps: Any = None, **_: Any) -> list[str]:
    """Every problem with the retention settings, one line each naming ``checkpoint.<key>``: run by
    ``CheckpointManager`` and by the config's validation (``sem.config.groups.run``)."""
    p = []
    if every_n_train_steps is not None:
        p.append(f"checkpoint.every_n_train_steps={every_n_train_steps}: removed; use "
                 f"checkpoint.every_n_steps={every_n_train_steps}")
    for key, value, low, why in (("every_n_steps", every_n_steps, 0, ""),
                                 ("keep_last", keep_last, 1, " (the newest is always kept)"),
                                 ("keep_best", keep_best, 0, "")):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            p.append(f"checkpoint.{key}={value!r}: must be an integer >= {low}{why}")
    if mode not in ("min", "max"):
        p.append(f"checkpoint.mode={mode!r}: must be min or max")
    return p


class CheckpointManager:
    """Owns ``<run>/checkpoints/``.

    every_n_steps: save after every N optimizer steps (0 = only on exit and at milestones).
    keep_last: newest periodic checkpoints kept (>= 1). keep_best: best ones by ``monitor`` kept (0 = none).
    monitor/mode: the metric in a checkpoint's sidecar that ranks it (``val/bpb``, min).
    save_on_exit: save at the end of training and when stopped by a signal.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 500, keep_last: int = 2,
                 keep_best: int = 1, monitor: str = "val/bpb", mode: Literal["min", "max"] = "min",
                 save_on_exit: bool = True, every_n_train_steps: int | None = None) -> None:
        bad = settings_problems(every_n_steps=every_n_steps, keep_last=keep_last, keep_best=keep_best, mode=mode,
                                every_n_train_steps=every_n_train_steps)
        if bad:
            raise ValueError("; ".join(bad))
        self.dir = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self.save_on_exit = save_on_exit
        self.last_saved_step: int | None = None
        self._loaded: tuple[Path, dict[str, Any]] | None = None  # the last verified payload, reused once

    # --------------------------------------------------------------------------------- save

    def due(self, steps_done: int) -> bool:
        """Is a periodic save due after ``steps_done`` optimizer steps?"""
        return self.every_n_steps > 0 and steps_done > 0 and steps_done % self.every_n_steps == 0

    def path_for(self, step: int, milestone: str | None = None) -> Path:
        name = f"step_{step:07d}.ckpt" if milestone is None else f"stage_{milestone}_step_{step:07d}.ckpt"
        return self.dir / name

    def save(self, payload: dict[str, Any], *, step: int, stage: str | None = None,
             metrics: dict[str, Any] | None = None, config: Any = None,
             milestone: str | None = None) -> Path | None:
        """Write ``payload`` for ``step`` (optimizer steps done); returns the path, or None when the
        payload's weights are not finite or the disk refused (the previous checkpoints stay valid)."""
        bad = nonfinite_tensors(payload.get("state_dict", {}), "state_dict")
        if bad:
            log.warning("checkpoint: not saving step %d: non-finite weights (%s)", step, ", ".join(bad[:3]))
            return None
        path = self.path_for(step, milestone)
        metrics = {k: v for k, v in (metrics or {}).items()
                   if isinstance(v, (str, bool)) or (isinstance(v, (int, float)) and math.isfinite(v))}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.last_saved_step is None:  # the first save of this process: clear a killed save's leftovers
                for stale in self.dir.glob(".*.tmp"):
                    stale.unlink(missing_ok=True)
            fd, tmp = _mkstemp(path)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(payload, f)
                    f.flush()
                    os.fsync(f.fileno())
                sidecar = {
                    "format": FORMAT,
                    "file": path.name,
                    "step": step,
                    "stage": stage,
                    "milestone": milestone,
                    "metrics": metrics,
                    "config_hash": config_hash(config) if config is not None else None,
                    "sha256": file_sha256(tmp),
                    "bytes": tmp.stat().st_size,
                    "versions": _versions(),
                }
                _write_atomic(sidecar_of(path), (json.dumps(sidecar, indent=2, allow_nan=False,
                                                            default=str) + "\n").encode())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                IN_FLIGHT.discard(tmp)
            _fsync_dir(self.dir)
            _point(self.dir / "last.ckpt", path)
        except OSError as exc:
            log.error("checkpoint: could not save step %d to %s: %s (previous checkpoints kept)",
                      step, self.dir, exc)
            return None
        self.last_saved_step = step
        self._retain()
        return path

    def _retain(self) -> None:
        try:
            self.apply_retention()
        except (OSError, ValueError) as exc:  # the checkpoints stay; only the clean-up waits for the next save
            log.error("checkpoint: retention in %s failed: %s", self.dir, exc)

    def set_aside_after(self, step: int) -> Path | None:
        """Move checkpoints newer than ``step`` into ``abandoned_<time>/`` (a run resumed from an older
        checkpoint of its own dir starts a new branch: the old future must not win ``last`` or
        retention, nor be deleted)."""
        newer = [s for s in self.scan() if s.step > step]
        if not newer:
            return None
        from datetime import datetime

        dest = self.dir / f"abandoned_{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        for s in newer:
            for f in (s.path, sidecar_of(s.path)):
                if f.exists():
                    os.replace(f, dest / f.name)
        last = self.last()
        if last is not None:
            _point(self.dir / "last.ckpt", last)
        self._retain()
        log.warning("checkpoint: resuming from step %d of this run: %d newer checkpoint(s) moved to %s",
                    step, len(newer), dest)
        return dest

    def record_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Add metrics measured after a save (e.g. a validation at the same step) to its sidecars,
        so retention can rank it; then re-apply retention. A failure is logged, never raised."""
        try:
            self._record_metrics(step, metrics)
        except (OSError, ValueError) as exc:
            log.error("checkpoint: could not add metrics of step %d to its sidecar: %s", step, exc)

    def _record_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        for saved in self.scan():
            if saved.step != step:
                continue
            side = sidecar_of(saved.path)
            if not side.is_file():
                continue
            data = json.loads(side.read_text())
            data["metrics"].update({k: v for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and math.isfinite(v)})
            _write_atomic(side, (json.dumps(data, indent=2) + "\n").encode())
        self._retain()

    # ---------------------------------------------------------------------------- retention

    def scan(self) -> list[Saved]:
        """Every checkpoint file (with its sidecar's metrics where it has one), oldest first."""
        found: list[Saved] = []
        if not self.dir.is_dir():
            return found
        for path in self.dir.glob("*.ckpt"):
            m = _NAME.match(path.name)
            if m is None or path.is_symlink():
                continue
            try:
                side = json.loads(sidecar_of(path).read_text())
            except (OSError, ValueError):
                side = {}  # killed between the rename and the sidecar: still a checkpoint (verify decides)
            found.append(Saved(path, int(m["step"]), m["stage"], side.get("metrics") or {}))
        return sorted(found, key=lambda s: (s.step, s.milestone is None))

    def ranked(self, saved: list[Saved] | None = None) -> list[Saved]:
        """Checkpoints carrying the monitored metric, best first (ties: the newer first)."""
        scored = [s for s in (saved if saved is not None else self.scan()) if s.metric(self.monitor) is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(scored, key=lambda s: (sign * s.metric(self.monitor), -s.step))  # type: ignore[operator]

    def keep_set(self, saved: list[Saved]) -> set[Path]:
        """What retention keeps: the newest ``keep_last`` periodic ones, the ``keep_best`` best by
        the monitor, every milestone, and always the newest and the best."""
        periodic = [s for s in saved if s.milestone is None]
        keep = {s.path for s in periodic[-self.keep_last:]}
        keep |= {s.path for s in saved if s.milestone is not None}
        keep |= {s.path for s in self.ranked(saved)[: max(self.keep_best, 1)]}
        if saved:
            keep.add(max(saved, key=lambda s: s.step).path)
        return keep

    def apply_retention(self) -> list[Path]:
        """Delete what the policy does not keep; point ``best.ckpt`` at the best. Returns the deleted."""
        saved = self.scan()
        keep = self.keep_set(saved)
        deleted = []
        for s in saved:
            if s.path not in keep:
                s.path.unlink(missing_ok=True)
                sidecar_of(s.path).unlink(missing_ok=True)
                deleted.append(s.path)
        best = self.best()
        if best is not None:
            _point(self.dir / "best.ckpt", best)
        for link in (self.dir / "last.ckpt", self.dir / "best.ckpt"):
            if link.is_symlink() and not link.exists():  # dangling: its target was removed by hand
                link.unlink()
        return deleted

    def best(self) -> Path | None:
        ranked = self.ranked()
        return ranked[0].path if ranked else None

    def last(self) -> Path | None:
        saved = self.scan()
        return max(saved, key=lambda s: (s.step, s.milestone is None)).path if saved else None

    # --------------------------------------------------------------------------------- load

    def load(self, path: str | Path, map_location: Any = "cpu", keep: bool = False) -> dict[str, Any]:
        """The verified payload of ``path``; raises CheckpointError saying what is wrong with it.
        ``keep=True`` hands the payload on to the next ``load`` of the same path, once (the resume:
        the run resolves it, then the engine restores it, without reading it twice)."""
        path = Path(path)
        cached, self._loaded = self._loaded, None
        if cached is not None and cached[0] == path.resolve():
            return cached[1]  # once: the engine's restore takes ownership of the tensors
        payload = verify(path, map_location)
        if keep:
            self._loaded = (path.resolve(), payload)
        return payload

    def newest_valid(self, keep: bool = False) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies, skipping bad ones with one warning line each."""
        for s in sorted(self.scan(), key=lambda s: (s.step, s.milestone is None), reverse=True):
            try:
                return s.path, self.load(s.path, keep=keep)
            except CheckpointError as exc:
                log.warning("checkpoint: skipping %s: %s", s.path.name, exc)
        return None


