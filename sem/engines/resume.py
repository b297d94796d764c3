"""Where a run starts: fresh, from its newest valid checkpoint (``resume=auto``) or from a named one;
whether it already finished; whether a checkpoint fits the configured model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from sem.errors import exit_if_invalid
from sem.record.summary import is_global_zero
from sem.training.checkpoint import CheckpointError, CheckpointManager, model_state

log = logging.getLogger("sem.resume")


@dataclass
class Resume:
    """The checkpoint a run resumes from (``path``) and its verified contents; both None: a fresh start."""

    path: str | None = None
    payload: dict[str, Any] | None = None

    @property
    def budget(self) -> dict[str, int] | None:
        """The lengths the checkpoint's run resolved (warm-up, stages): a resumed run keeps them."""
        return (self.payload.get("sem") or {}).get("budget") if self.payload is not None else None


def find_resume(cfg: DictConfig, checkpoints: CheckpointManager) -> Resume:
    """The checkpoint to resume from (path and verified payload), or a fresh start. ``resume=auto``
    takes the newest checkpoint that verifies (bad ones are skipped with a warning); an explicit path
    that does not verify is a usage error (exit 2)."""
    if cfg.resume is None:
        return Resume()
    if cfg.resume == "auto":
        found = checkpoints.newest_valid(keep=True)
        if found is None:
            log.info("resume=auto: no valid checkpoint in %s, starting fresh", checkpoints.dir)
            return Resume()
        path, payload = found
        checkpoints.last_saved_step = int(payload.get("global_step", -1))  # never re-save the resumed step
        log.info("resume=auto: resuming from %s (step %s)", path, payload.get("global_step"))
        return Resume(str(path), payload)
    path = Path(cfg.resume).expanduser().resolve()
    try:
        payload = checkpoints.load(path, keep=True)
    except CheckpointError as exc:
        exit_if_invalid([f"resume={cfg.resume}: {exc}"])
        raise  # not reached
    if path.parent == checkpoints.dir.resolve():  # an older checkpoint of this very run: a new branch
        step = int(payload.get("global_step", -1))
        if is_global_zero():  # the other ranks of a DDP run only read
            checkpoints.set_aside_after(step)
        checkpoints.last_saved_step = step
    return Resume(str(path), payload)


def already_finished(cfg: DictConfig, run_dir: Path, resume: Resume) -> float | None:
    """The final val/bpb when resuming a run that already completed all its steps (nothing to do)."""
    payload = resume.payload
    if payload is None or int(payload.get("global_step", -1)) < cfg.trainer.max_steps:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # trained to the end but never summarised (killed in the final validation): finish it
    if summary.get("status") != "completed" or summary.get("steps") != payload.get("global_step"):
        return None
    log.info("resume: this run already finished at step %d (summary.json: completed, val/bpb %s); "
             "nothing to do. Raise trainer.max_steps to train further.", summary["steps"], summary.get("val_bpb"))
    bpb = summary.get("val_bpb")
    return float(bpb) if bpb is not None else float("inf")


def shape_problems(model: nn.Module, payload: dict[str, Any], path: str | None) -> list[str]:
    """One line naming the mismatching keys when a checkpoint does not fit the configured model."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model_state(payload["state_dict"]).items() if hasattr(v, "shape")}
    missing, unexpected = sorted(set(have) - set(got)), sorted(set(got) - set(have))
    wrong = [f"{k} {list(got[k])} in the checkpoint vs {list(have[k])} configured"
             for k in sorted(set(have) & set(got)) if have[k] != got[k]]
    parts = []
    if wrong:
        parts.append("shape mismatch: " + "; ".join(wrong[:5]) + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    if missing:
        parts.append(f"missing in the checkpoint: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"not in the model: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    if not parts:
        return []
    return [f"resume={path}: the checkpoint does not fit the configured model ({'; '.join(parts)}); "
            "resume with the model config it was trained with"]
