"""A sweep's own files: ``sweep.json`` (this invocation's command, swept keys, launcher, sweeper) and
``ledger.jsonl`` (one line per job and attempt, the latest line of a job wins), and the check that a
job folder is not resumed into by a job of another identity."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sem.config.job import EXECUTION_KEYS, _bare, identity


def swept_keys(config: DictConfig) -> list[str]:
    """Keys this multirun sweeps: comma lists, ranges and other sweeps on the command line, plus the
    sweeper's own ``params`` (Optuna's search space, a basic sweeper's ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in config.hydra.overrides.task]
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params")
    keys += [str(k) for k in (params or {})]
    return [k for i, k in enumerate(keys) if k not in keys[:i] and _bare(k) not in EXECUTION_KEYS]


def next_free_job(sweep_dir: Path) -> int:
    """1 + the largest numbered job folder already in ``sweep_dir`` (0 for a new sweep)."""
    numbers = [int(p.name) for p in Path(sweep_dir).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(numbers, default=-1) + 1


def _storage(config: DictConfig) -> str | None:
    value = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    return str(value) if value else None


def sweep_info(config: DictConfig, sweep_dir: Path) -> dict[str, Any]:
    launcher = OmegaConf.to_container(config.hydra.launcher, resolve=False)
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    choices = OmegaConf.select(config, "hydra.runtime.choices", default={}) or {}
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "started_unix": time.time(),
        "swept": swept_keys(config),
        "launcher": choices.get("hydra/launcher") or str(launcher.get("_target_", "")),  # type: ignore[union-attr]
        "n_jobs": launcher.get("n_jobs"),  # type: ignore[union-attr]
        "sweeper": choices.get("hydra/sweeper") or sweeper,
        "study_name": OmegaConf.select(config, "hydra.sweeper.study_name", default=None),
        "storage": _storage(config) if "optuna" in sweeper.lower() else None,
        "first_job": next_free_job(sweep_dir),
    }


def append_ledger(sweep_dir: Path, record: Mapping[str, Any]) -> None:
    """One JSON line, appended under an exclusive lock: concurrent jobs (joblib) never interleave."""
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(Path(sweep_dir) / "ledger.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_ledger(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest ledger record of each job, in the order the jobs first appear."""
    latest: dict[str, dict[str, Any]] = {}
    path = Path(sweep_dir) / "ledger.jsonl"
    if not path.exists():
        return latest
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a killed sweep
        if isinstance(rec, dict) and "job" in rec:
            latest[str(rec["job"])] = rec
    return latest


def identity_conflict(sweep_dir: Path, job: str, overrides: Sequence[str], run_dir: Path) -> str | None:
    """Why this job must not run in ``run_dir``: the folder holds an earlier job of this sweep dir with
    other overrides (the sweep command changed), whose checkpoints ``resume=auto`` would continue."""
    before = read_ledger(sweep_dir).get(job)
    if before is None or identity(before.get("overrides", [])) == identity(overrides):
        return None
    if not ((run_dir / "summary.json").exists() or any((run_dir / "checkpoints").glob("*.ckpt"))):
        return None
    return (f"job {job}: {run_dir} holds an earlier job of this sweep with other overrides "
            f"({' '.join(identity(before.get('overrides', [])))}); this job is "
            f"({' '.join(identity(overrides))}). Re-run the same sweep command (same values in the same "
            "order) to resume it, or give a new hydra.sweep.dir")
