"""Components -> an engine: build data, model, optimizer, scheduler, curriculum, distillation, health
monitor and checkpoint manager from their ``_target_`` nodes, then the engine around them (Lightning:
callbacks, loggers, precision plugin, accelerator, strategy, Trainer; standalone: ``SEMTrainer``).

With ``sem.recipe`` this is the composition root: objects are built only here (``make``, from
``_target_`` nodes), so every one comes from ``conf/`` and any of them can be swapped from the shell.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from sem.config.hardware import compile_choice
from sem.engines.base import Engine
from sem.engines.instantiate import make, optimizer_factory, scheduler_factory, without
from sem.engines.resume import Resume, shape_problems
from sem.errors import exit_if_invalid
from sem.record.summary import is_global_zero
from sem.training.checkpoint import CheckpointManager
from sem.training.preemption import StopSignals
from sem.training.pruning import Reports
from sem.training.pruning import current as current_trial
from sem.training.restore import build_model

if TYPE_CHECKING:
    import torch

    from sem.contracts import Corpus
    from sem.data.datamodule import SEMDataModule
    from sem.engines.standalone import SEMTrainer
    from sem.training.step import TrainStep

log = logging.getLogger("sem.build")


@dataclass
class Built:
    """Everything a fit needs, built from the config: the data, the engine (``sem.engines.base.Engine``:
    a LightningEngine or an SEMTrainer) and the run's checkpoint manager."""

    datamodule: SEMDataModule
    engine: Engine
    checkpoints: CheckpointManager
    resume_from: str | None
    precision_note: str
    signals: StopSignals | None = None
    quick: bool = False  # trainer.fast_dev_run: one validation batch at the end too
    trial: Reports | None = None  # a sweeper's judge of this run's validations (sem.training.pruning)

    def describe(self) -> None:
        from sem.models.common import count_parameters

        log.info("dry run: built everything, not training")
        log.info("model: %s (%s parameters)", type(self.engine.model).__name__,
                 f"{count_parameters(self.engine.model):,}")
        log.info("data: %s", self.datamodule.describe())
        log.info("precision: %s", self.precision_note)
        engine = self.engine.describe()
        log.info("engine: %s, max_steps=%d", engine, self.engine.max_steps)


def resolve_lengths(cfg: DictConfig, recorded: dict[str, int] | None = None
                    ) -> tuple[DictConfig, dict[str, int]]:
    """The run's config with every fraction of ``trainer.max_steps`` turned into steps (once, here),
    and the record of what was resolved (saved in checkpoints; ``recorded`` from the checkpoint a run
    resumes wins, so a decay branch keeps its parent's warm-up and stage boundaries)."""
    from sem.config.groups.distillation import with_schema_defaults
    from sem.training.budget import resolve_budget

    resolved, record = resolve_budget(OmegaConf.to_container(with_schema_defaults(cfg), resolve=True), recorded)
    if record:
        log.info("budget (trainer.max_steps=%d): %s", cfg.trainer.max_steps,
                 ", ".join(f"{k}={v}" for k, v in record.items()))
    return OmegaConf.create(resolved), record


def build(cfg: DictConfig, run_dir: Path, corpus: Corpus, resume: Resume | None = None,
          budget: dict[str, int] | None = None, checkpoints: CheckpointManager | None = None,
          signals: StopSignals | None = None) -> Built:
    """Build data, model, optimizer, scheduler, curriculum, distillation, health monitor, checkpoint
    manager, then the engine (Lightning: callbacks, loggers, precision plugin, accelerator, Trainer;
    standalone: SEMTrainer), in that order. ``cfg`` has its lengths resolved (``resolve_lengths``).
    A checkpoint to resume from that does not fit the built model is a config error (exit 2)."""
    from sem.training.health import Faults
    from sem.training.step import TrainStep

    _seed_everything(cfg.seed)
    datamodule: SEMDataModule = make(without(cfg.data, "corpus"), corpus=corpus)
    datamodule.setup()
    log.info("data: %s", datamodule.describe())
    _log_memory_estimate(cfg)

    # vocab_size (the tokenizer's) passed where the constructor takes it and the config does not set it
    model = build_model(cfg.model, make=functools.partial(make, _convert_="all"))
    curriculum = make(cfg.curriculum)
    optimizer = optimizer_factory(cfg.optimizer)
    scheduler = scheduler_factory(cfg.scheduler)
    teacher = make(cfg.distillation.teacher) if cfg.distillation.teacher else None
    distill_loss = make(cfg.distillation.loss) if cfg.distillation.loss else None
    health = make(cfg.health)
    if is_global_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        health.events_path = run_dir / "health.jsonl"
        health.events_path.touch()  # present (empty) in every run: no events is news too
    if checkpoints is None:
        checkpoints = make(cfg.checkpoint, dirpath=str(run_dir / "checkpoints"))
    every, val_every = cfg.checkpoint.every_n_steps, cfg.trainer.val_check_interval
    if every and checkpoints.keep_best and every % val_every and every < cfg.trainer.max_steps:
        log.warning("checkpoint.every_n_steps=%d is not a multiple of trainer.val_check_interval=%d: "
                    "best.ckpt is chosen among checkpoints whose step had a validation", every, val_every)
    from sem.training.precision import device_type_for

    compiled, why = compile_choice(cfg.get("compile", "auto"), cfg.trainer.max_steps,
                                   device_type_for(cfg.accelerator.name), model)
    forward = None
    if compiled:  # auto falls back to the eager step if inductor fails on this model; true lets it fail
        from sem.training.compiled import compiled_forward

        forward = compiled_forward(model, eager_fallback=cfg.get("compile") == "auto")
    # The teacher is a plain object, not a submodule: it must never appear in the student's
    # parameters, optimizer or state_dict. It is saved under checkpoint["sem"] instead.
    train_step = TrainStep(model, curriculum, teacher(student=model) if teacher is not None else None,
                           distill_loss, Faults(**cfg.faults), health, cfg.seed, budget,
                           OmegaConf.to_container(cfg, resolve=True),
                           continues=datamodule.continues if cfg.data.get("tbptt", 0) >= 2 else None,
                           forward=forward)
    log.info("%s", why)
    if forward is not None:
        log.info("compile: the training forward and backward run through torch.compile (inductor); "
                 "validation and evaluation run the model as it is")
    trial = current_trial()
    engine: Engine
    if cfg.engine == "standalone":
        engine, note = _standalone(cfg, run_dir, train_step, datamodule, optimizer, scheduler, checkpoints, signals,
                                   trial)
    else:
        from sem.engines.lightning.build import lightning_engine

        engine, note = lightning_engine(cfg, run_dir, train_step, datamodule, optimizer, scheduler, checkpoints,
                                        signals, trial)
    resume = resume or Resume()
    if resume.payload is not None:
        exit_if_invalid(shape_problems(engine.model, resume.payload, resume.path))
    return Built(datamodule=datamodule, engine=engine, checkpoints=checkpoints, resume_from=resume.path,
                 quick=bool(cfg.trainer.get("fast_dev_run")),
                 precision_note=note, signals=signals, trial=trial)


def _log_memory_estimate(cfg: DictConfig) -> None:
    """The peak-memory estimate the validation checked (``sem.config.resources``), for the run's log."""
    from sem.config.resources import estimate_memory

    try:
        log.info("%s", estimate_memory(cfg).line())
    except Exception as exc:  # the estimate is advice: a model fake tensors cannot run still trains
        log.info("peak memory estimate: not available (%s: %s)", type(exc).__name__, exc)


def _seed_everything(seed: int) -> None:
    """What ``pl.seed_everything`` does, without Lightning: the same initial weights in both engines."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _standalone(cfg: DictConfig, run_dir: Path, train_step: TrainStep, datamodule: SEMDataModule,
                optimizer: Callable[..., torch.optim.Optimizer],
                scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
                checkpoints: CheckpointManager, signals: StopSignals | None,
                trial: Reports | None = None) -> tuple[SEMTrainer, str]:
    import torch

    from sem.engines.standalone import SEMTrainer
    from sem.training.precision import PrecisionPolicy, device_type_for

    unused = [name for name, node in cfg.logger.items() if node]
    if unused:
        log.warning("engine=standalone writes metrics.jsonl only: logger %s is not used (engine=lightning "
                    "runs Lightning's loggers)", ", ".join(unused))
    device_type = device_type_for(cfg.accelerator.name)
    precision = PrecisionPolicy.of(cfg.precision.precision, device_type)
    console = cfg.callbacks.get("console")
    trainer = SEMTrainer(
        train_step=train_step, datamodule=datamodule, optimizer=optimizer, scheduler=scheduler, checkpoints=checkpoints,
        precision=precision, device=torch.device(device_type), run_dir=run_dir,
        max_steps=cfg.trainer.max_steps, val_check_interval=cfg.trainer.val_check_interval,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        console_every_n_steps=console.every_n_steps if console else 10**9, signals=signals, trial=trial)
    dtype = {None: "fp32"}.get(precision.autocast_dtype, str(precision.autocast_dtype))
    return trainer, f"{precision.precision} on {device_type} (autocast {dtype}); complex regions in complex64"
