"""Registration: every schema into Hydra's ConfigStore (``conf/`` options extend them) and sem's
resolvers (``sem.run_dir``, ``sem.job_subdir``, ``sem.sweep_seed``, ``sem.abspath``)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sem.config.job import job_subdir, sweep_seed
from sem.config.schema import (
    AcceleratorConf,
    AdamWConf,
    CheckpointConf,
    Config,
    CurriculumConf,
    DistillationConf,
    EMADistillationConf,
    HealthConf,
    JsonlDataConf,
    MuonConf,
    PrecisionConf,
    SchedulerConf,
    SEMModelConf,
    SGDConf,
    StdlibDataConf,
    StrategyConf,
    TextFilesDataConf,
    TrainerConf,
    TransformerConf,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's configs (pip install -e .)


# Registered at the root as ``schema_<group>[_<variant>]``, not as options of their group, so Hydra's
# ``--help`` lists only what a user can pick; each option of conf/<group>/ extends one of them
# (``defaults: [/schema_model_sem@_here_, _self_]``).
_SCHEMAS: dict[str | None, dict[str, Any]] = {
    None: {"config_schema": Config},
    "model": {"sem": SEMModelConf, "transformer": TransformerConf},
    "data": {"stdlib": StdlibDataConf, "text_files": TextFilesDataConf, "jsonl": JsonlDataConf},
    "optimizer": {"adamw": AdamWConf, "sgd": SGDConf, "muon": MuonConf},
    "scheduler": {"": SchedulerConf},
    "curriculum": {"": CurriculumConf},
    "distillation": {"": DistillationConf, "ema_teacher": EMADistillationConf},
    "precision": {"": PrecisionConf},
    "accelerator": {"": AcceleratorConf},
    "strategy": {"": StrategyConf},
    "trainer": {"": TrainerConf},
    "checkpoint": {"": CheckpointConf},
    "health": {"": HealthConf},
}


def schema_name(group: str | None, variant: str) -> str:
    """The ConfigStore name of a group's schema: ``schema_model_sem``, ``schema_trainer``."""
    return variant if group is None else "_".join(part for part in ("schema", group, variant) if part)


def _run_dir(name: str | None) -> str:
    """``outputs/<run.name>`` when a name is set, else ``outputs/<date>/<time>``."""
    return name if name else datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore and register the run-dir resolver (idempotent)."""
    cs = ConfigStore.instance()
    for group, entries in _SCHEMAS.items():
        for variant, node in entries.items():
            cs.store(name=schema_name(group, variant), node=node)
    if not OmegaConf.has_resolver("sem.run_dir"):
        OmegaConf.register_new_resolver("sem.run_dir", _run_dir, use_cache=True)
    if not OmegaConf.has_resolver("sem.job_subdir"):  # sweeps that continue in their own dir (Optuna)
        OmegaConf.register_new_resolver("sem.job_subdir", job_subdir)
        OmegaConf.register_new_resolver("sem.sweep_seed", sweep_seed)
    if not OmegaConf.has_resolver("sem.abspath"):  # e.g. an sqlite URL that works from any cwd
        OmegaConf.register_new_resolver("sem.abspath", lambda path: str(Path(str(path)).resolve()))


def expand_switches(argv: list[str], switches: dict[str, str]) -> list[str]:
    """Command-line shorthands for a node that is switched on and tuned: ``eval.dynamic=true`` means
    ``eval.dynamic.enabled=true`` (``switches = {"eval.dynamic": "eval.dynamic.enabled"}``), so
    ``eval.dynamic=true eval.dynamic.lr=1e-4`` works in either order, in sweeps too (``=true,false``)."""
    out = []
    for arg in argv:
        plus = len(arg) - len(arg.lstrip("+~"))
        key, eq, value = arg[plus:].partition("=")
        out.append(f"{arg[:plus]}{switches[key]}={value}" if eq and key in switches else arg)
    return out
