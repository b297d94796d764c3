"""LightningEngine: the Lightning Trainer and SEMLightningModule behind the ``Engine`` interface
(``sem.engines.base``) that ``sem/recipe.py`` drives, as the standalone ``SEMTrainer`` does: ``fit``,
``validate``, ``describe``, ``global_step``, ``max_steps``, ``tokens_per_s``, ``model``, ``train_step``,
``device``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch import nn

from sem.engines.lightning.module import SEMLightningModule
from sem.training.step import TrainStep

if TYPE_CHECKING:
    from sem.data.datamodule import SEMDataModule


class LightningEngine:
    """``trainer`` fits ``module`` on ``datamodule``'s stream, ``accumulate`` micro-batches a step."""

    def __init__(self, trainer: pl.Trainer, module: SEMLightningModule, datamodule: SEMDataModule,
                 accumulate: int) -> None:
        self.trainer = trainer
        self.module = module
        self.dm = datamodule
        self.accumulate = accumulate

    @property
    def model(self) -> nn.Module:
        return self.module.model

    @property
    def train_step(self) -> TrainStep:
        return self.module.train_step

    @property
    def device(self) -> torch.device:
        """The device the run trains on (the module itself may sit on the CPU between Trainer calls)."""
        return self.trainer.strategy.root_device

    @property
    def global_step(self) -> int:
        return self.trainer.global_step

    @property
    def max_steps(self) -> int:
        return self.trainer.max_steps

    @property
    def tokens_per_s(self) -> float | None:
        """Training tokens per second over the whole run (validation time excluded)."""
        for cb in self.trainer.callbacks:
            if hasattr(cb, "overall_tokens_per_s"):
                return cb.overall_tokens_per_s
        return None

    def fit(self, resume_from: str | None = None) -> None:
        curriculum = self.module.curriculum
        train_loader = self.dm.train_loader(
            start_step=lambda: self.trainer.global_step,
            shape_at=curriculum.shape_at if curriculum is not None else None,
            accumulate=self.accumulate,
        )
        self.trainer.fit(self.module, train_dataloaders=train_loader, val_dataloaders=self.dm.val_loader(),
                         ckpt_path=resume_from)

    def validate(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], final: bool = False) -> dict[str, float]:
        self.module.final_validation = final
        self.trainer.validate(self.module, dataloaders=loader, verbose=False)
        return self.module.last_val

    def describe(self) -> str:
        return f"Lightning Trainer on {type(self.trainer.accelerator).__name__}"
