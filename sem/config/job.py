"""What a job is, read from its Hydra config: its identity (task overrides minus execution settings),
its label (the swept values), its folder in a sweep dir; the resolvers that number and seed the jobs of
a sweep continued in its own dir; the logger arguments that group a sweep's runs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from sem.record.summary import read_json

EXECUTION_KEYS = ("resume", "threads", "dry_run")  # how a job runs, not what it is


def split_override(override: str) -> tuple[str, str]:
    """``"optimizer.lr=1e-3"`` -> ``("optimizer.lr", "1e-3")``; ``"~x"`` -> ``("~x", "")``."""
    key, _, value = override.partition("=")
    return key, value


def _bare(key: str) -> str:
    return key.lstrip("+~")


def identity(overrides: Sequence[str]) -> list[str]:
    """What a job *is*: its task overrides without the execution settings."""
    return [o for o in overrides if _bare(split_override(o)[0]) not in EXECUTION_KEYS]


def job_label(overrides: Sequence[str], keys: Sequence[str]) -> str:
    """The job's values of ``keys`` (the swept ones), e.g. ``optimizer.lr=0.001,curriculum=none``."""
    wanted = {_bare(k) for k in keys}
    return ",".join(o for o in identity(overrides) if _bare(split_override(o)[0]) in wanted)


def job_id(run_dir: Path, sweep_dir: Path) -> str:
    """The job's folder relative to the sweep dir (``"3"`` for ``<sweep>/3``)."""
    try:
        return str(Path(run_dir).resolve().relative_to(Path(sweep_dir).resolve()))
    except ValueError:
        return Path(run_dir).name


def job_subdir(sweep_dir: str, num: int) -> str:
    """Resolver ``${sem.job_subdir:${hydra.sweep.dir},${hydra.job.num}}``: the job's number after the
    folders an earlier invocation left in the same sweep dir (recorded in ``sweep.json`` before any job
    starts): a basic sweep continued in its own dir gets new folders instead of overwriting the earlier
    jobs'. (sem's Optuna sweeper numbers each job by its trial, so a continued study needs no offset.)"""
    return str(int(read_json(Path(sweep_dir) / "sweep.json").get("first_job", 0)) + int(num))


def sweep_seed(seed: int, sweep_dir: str) -> int:
    """Resolver ``${sem.sweep_seed:${seed},${hydra.sweep.dir}}``: ``seed`` for a new sweep, shifted by
    the job folders already there when a sweep continues in its dir, so a seeded Optuna sampler draws
    new points instead of repeating the first invocation's."""
    return int(seed) + int(read_json(Path(sweep_dir) / "sweep.json").get("first_job", 0))


def group_name(sweep_dir: Path) -> str:
    """``2026-11-26/10-00-00`` for ``multirun_outputs/2026-11-26/10-00-00``, else the folder's name."""
    sweep_dir = Path(sweep_dir)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep_dir.parent.name):
        return f"{sweep_dir.parent.name}/{sweep_dir.name}"
    return sweep_dir.name


def logger_kwargs(node: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Constructor arguments that group a sweep's runs (none outside a sweep, none the user set):
    wandb ``group`` = the sweep, ``job_type`` = the job's swept values, ``name`` = job and values;
    TensorBoard ``version`` = the job's swept values, so ``tensorboard --logdir <sweep>`` names each
    job by what it tried (and a resumed job keeps writing into its own event dir)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir)
    job = job_id(run_dir, sweep_dir)
    label = job_label(list(hc.overrides.task), read_json(sweep_dir / "sweep.json").get("swept", []))
    kind = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    if kind == "WandbLogger":
        extra = {"group": group_name(sweep_dir), "job_type": (label or "job")[:64],
                 "name": f"{job} {label}".strip()[:128]}
    elif kind == "TensorBoardLogger":
        extra = {"version": re.sub(r"[^\w.=,+-]", "_", label)[:200] or f"job_{job}"}
    else:
        return {}
    return {k: v for k, v in extra.items() if node.get(k) is None}
