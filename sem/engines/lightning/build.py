"""The Lightning engine, built: the SEM LightningModule around the train step, the configured callbacks
and loggers, the precision plugin, accelerator and strategy, and the ``pytorch_lightning.Trainer``."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from sem.config.components import locate, takes
from sem.engines.instantiate import make, without
from sem.training.checkpoint import CheckpointManager
from sem.training.preemption import StopSignals
from sem.training.pruning import Reports
from sem.training.step import TrainStep

if TYPE_CHECKING:
    from sem.data.datamodule import SEMDataModule
    from sem.engines.lightning.engine import LightningEngine

log = logging.getLogger("sem.build")


def lightning_engine(cfg: DictConfig, run_dir: Path, train_step: TrainStep, datamodule: SEMDataModule,
                     optimizer: Callable[..., torch.optim.Optimizer],
                     scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
                     checkpoints: CheckpointManager, signals: StopSignals | None,
                     trial: Reports | None = None) -> tuple[LightningEngine, str]:
    """The Lightning engine of ``cfg`` around ``train_step``, and a line saying the precision in effect."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ProgressBar

    from sem.engines.lightning.callbacks import CheckpointCallback, ManagedCheckpointIO, TrialCallback
    from sem.engines.lightning.engine import LightningEngine
    from sem.engines.lightning.module import SEMLightningModule
    from sem.engines.lightning.precision import device_type_of

    # Lightning 2.6 trips over its own torch-2.13 pytree deprecation on every fit: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # val/loss and val/bpb are logged already summed over ranks (SEMLightningModule): no sync_dist needed
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
    module = SEMLightningModule(train_step=train_step, optimizer=optimizer, scheduler=scheduler,
                                bpb=datamodule.val_bpb, checkpoints=checkpoints, signals=signals)
    interactive = sys.stderr.isatty()
    callbacks: list[pl.Callback] = []
    for name, node in cfg.callbacks.items():
        if node is None:
            continue
        if name == "progress_bar" and not interactive:
            continue  # a live bar only makes sense in a terminal; logs get SEMConsoleLogger lines
        callbacks.append(make(node))
    quick = cfg.trainer.get("fast_dev_run")
    if quick:  # Lightning's quick check: no checkpoints (and Lightning silences the loggers)
        log.info("trainer.fast_dev_run=%s: %s training step(s) and one validation batch, no checkpoints, "
                 "no loggers, no samples (Lightning's quick check of the whole loop)", quick,
                 1 if quick is True else int(quick))
    else:
        callbacks.append(CheckpointCallback(checkpoints, signals))
    if trial is not None:
        callbacks.append(TrialCallback(trial))
    from sem.config.job import logger_kwargs

    loggers = [make(node, **_save_dir(node, run_dir), **logger_kwargs(node, run_dir))
               for node in cfg.logger.values() if node]
    # sem's accelerator targets take the name; a class of one's own may not (the validator reads it)
    accelerator = make(cfg.accelerator if takes(locate("accelerator", cfg.accelerator._target_)[0], "name")
                       else without(cfg.accelerator, "name"))
    device_type = device_type_of(accelerator)
    precision_plugin = make(cfg.precision)(device_type=device_type)
    strategy = make(cfg.strategy)(device_type=device_type, devices=cfg.trainer.devices,
                                          num_nodes=cfg.trainer.num_nodes, precision=precision_plugin.precision)
    plugins: list[Any] = [ManagedCheckpointIO(checkpoints, cfg.trainer.accumulate_grad_batches)]
    if cfg.strategy.name == "fsdp":  # FSDP brings its own precision plugin, built from the precision flag
        precision = {"precision": precision_plugin.precision}
    else:
        precision, plugins = {}, [precision_plugin, *plugins]
    accumulate = cfg.trainer.accumulate_grad_batches
    trainer = make(
        cfg.trainer,
        accelerator=accelerator,
        strategy=strategy,
        plugins=plugins,
        **precision,
        # The train stream and the validation windows shard themselves by rank (validation without
        # the padding of Lightning's DistributedSampler, which would count windows twice).
        use_distributed_sampler=False,
        enable_checkpointing=False,  # sem's CheckpointCallback saves; Lightning's ModelCheckpoint is not used
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        max_epochs=-1,
        check_val_every_n_epoch=None,  # the train loader is infinite: validate by step count
        val_check_interval=cfg.trainer.val_check_interval * accumulate,  # Lightning counts micro-batches
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )
    return LightningEngine(trainer, module, datamodule, accumulate), precision_plugin.describe()


def _save_dir(node: DictConfig, run_dir: Path) -> dict[str, str]:
    """``save_dir=<run dir>`` for a logger that takes one (CSV, TensorBoard, wandb...), unless set."""
    from sem.config.components import locate, takes

    cls, _ = locate("logger", node.get("_target_"))
    return {"save_dir": str(run_dir)} if cls is not None and takes(cls, "save_dir") and "save_dir" not in node else {}
