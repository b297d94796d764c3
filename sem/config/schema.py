"""Config schemas: one dataclass per group option, kept beside each group's checks in
``sem.config.groups`` (re-exported here), and the root ``Config``.

Each YAML option in ``conf/<group>/`` starts its defaults list with the schema registered for it
(``sem.config.store``: ``schema_<group>[_<variant>]`` at the root, not a group option, so ``--help`` lists only
what a user can pick), so an unknown key or a value of the wrong type fails when Hydra composes the
config, and the schema holds each default once: an option carries only what differs from it.
``sem.config.validate`` then runs each group's value and cross-field checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from sem.config.groups.curriculum import CurriculumConf, StageConf
from sem.config.groups.data import (
    DataConf,
    JsonlCorpusConf,
    JsonlDataConf,
    StdlibCorpusConf,
    StdlibDataConf,
    TextFilesCorpusConf,
    TextFilesDataConf,
)
from sem.config.groups.distillation import DistillationConf, DistillationLossConf, EMADistillationConf, EMATeacherConf
from sem.config.groups.model import SEMModelConf, TransformerConf
from sem.config.groups.optimizer import AdamWConf, MuonConf, SchedulerConf, SGDConf
from sem.config.groups.run import (
    CheckpointConf,
    DynamicConf,
    EvalConf,
    FaultsConf,
    HealthConf,
    RunConf,
    SamplesConf,
)
from sem.config.groups.trainer import AcceleratorConf, PrecisionConf, StrategyConf, TrainerConf

__all__ = ["AcceleratorConf", "AdamWConf", "CheckpointConf", "Config", "CurriculumConf", "DataConf", "DistillationConf",
           "DistillationLossConf", "DynamicConf", "EMADistillationConf", "EMATeacherConf", "EvalConf", "FaultsConf",
           "HealthConf", "JsonlCorpusConf", "JsonlDataConf", "MuonConf", "PrecisionConf", "RunConf", "SamplesConf",
           "SchedulerConf", "SEMModelConf", "SGDConf", "StageConf", "StdlibCorpusConf", "StdlibDataConf",
           "StrategyConf", "TextFilesCorpusConf", "TextFilesDataConf", "TrainerConf", "TransformerConf"]


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING  # sem's schedules extend SchedulerConf; any torch LRScheduler works too
    curriculum: CurriculumConf = MISSING
    distillation: DistillationConf = field(default_factory=DistillationConf)
    precision: PrecisionConf = MISSING
    accelerator: AcceleratorConf = MISSING
    strategy: StrategyConf = field(default_factory=StrategyConf)
    trainer: TrainerConf = MISSING
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    health: HealthConf = field(default_factory=HealthConf)
    seed: int = 1234
    engine: str = "lightning"
    run: RunConf = field(default_factory=RunConf)
    resume: str | None = None
    dry_run: bool = False
    faults: FaultsConf = field(default_factory=FaultsConf)
    sample: SamplesConf = field(default_factory=SamplesConf)
    eval: EvalConf = field(default_factory=EvalConf)
    # torch intra-op threads for this job; null: the cores split between the jobs a parallel sweep
    # runs at once (sem.sweeps.job.job_threads), torch's default for a single run
    threads: int | None = None
    # the training forward and backward through torch.compile (inductor: a C++ compiler on CPU): true,
    # false, or auto (where inductor is ready and trainer.max_steps pays the compile back; config.hardware)
    compile: Any = "auto"
