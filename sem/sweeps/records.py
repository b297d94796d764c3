"""A job's record: one plain dict per job and attempt (a ledger line), read from the files the run left
behind (``summary.json``, ``metrics.jsonl``, ``plan.json``, ``.hydra/overrides.yaml``); a sweep's
records from its ledger, or from its job folders for a sweep older than the ledger."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from sem.record.plots import read_metrics
from sem.record.summary import read_json
from sem.sweeps.ledger import read_ledger


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:

    path = Path(run_dir) / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_val_bpb(run_dir: Path) -> float | None:
    """The lowest val/bpb of any validation of the run (periodic ones use ``data.val_max_windows``)."""
    values = [v for r in _metrics(run_dir) if (v := _num(r.get("val/bpb"))) is not None]
    return min(values) if values else None


def job_record(run_dir: Path, job: str, overrides: list[str], *, started: float = float("-inf"),
               status: str | None = None, error: str | None = None) -> dict[str, Any]:
    """The ledger line of a job that ran in ``run_dir`` from ``started`` (unix time) on.

    ``summary.json`` written before ``started`` with status completed means the job found its run
    finished (``resume=auto``) and skipped it. ``status``/``error`` given by the caller (the job was
    refused, not started, or raised past the guard) win over whatever the folder holds."""
    run_dir = Path(run_dir)
    rec: dict[str, Any] = {"job": job, "run_dir": str(run_dir.resolve()), "overrides": list(overrides),
                           "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "status": "failed", "skipped": False}
    summary = read_json(run_dir / "summary.json")
    fresh = _mtime(run_dir / "summary.json") >= started - 1.0
    if status is not None or error is not None:
        rec.update(status=status or "failed", error=error)
        return rec
    plan_at = _mtime(run_dir / "plan.json")
    if plan_at > _mtime(run_dir / "summary.json") and plan_at >= started - 1.0:  # this job was a dry run
        rec.update(status="dry_run", plan=read_json(run_dir / "plan.json"))
        return rec
    if not summary or (not fresh and summary.get("status") != "completed"):
        rec["error"] = f"no summary.json written (see {run_dir / 'launch.log'})"
        return rec
    rec.update(status=summary.get("status", "failed"), skipped=not fresh,
               steps=summary.get("steps"), val_bpb=_num(summary.get("val_bpb")),
               val_loss=_num(summary.get("val_loss")), best_val_bpb=best_val_bpb(run_dir),
               tokens_per_s=_num(summary.get("tokens_per_s")), wall_s=_num(summary.get("wall_s")))
    if summary.get("pruned_at"):
        rec["pruned_at"] = summary["pruned_at"]
    if summary.get("error"):
        rec["error"] = summary["error"]
    return rec


def run_dir_record(run_dir: Path, job: str) -> dict[str, Any]:
    """A record for any run dir (not from a ledger): what its files say."""
    overrides: list[str] = []
    try:
        overrides = [str(o) for o in yaml.safe_load((Path(run_dir) / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, yaml.YAMLError):
        pass
    rec = job_record(run_dir, job, overrides)
    if not (Path(run_dir) / "summary.json").exists() and _metrics(run_dir):
        rec["status"] = "incomplete"  # still running, or killed before its summary
        rec.pop("error", None)
    return rec


def is_sweep_dir(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in ("ledger.jsonl", "sweep.json", "multirun.yaml"))


def sweep_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """The latest record of each job: from the ledger, else (a sweep older than the ledger) from the
    numbered job folders."""
    sweep_dir = Path(sweep_dir)
    ledger = read_ledger(sweep_dir)
    if ledger:
        return list(ledger.values())
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    return [run_dir_record(p, p.name) for p in jobs]
