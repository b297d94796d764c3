"""SEMLightningModule: wires model, optimizer, schedule and the step semantics (``TrainStep``: loss,
distillation, faults, health, curriculum gate, probes) into Lightning's hooks. It holds no policy of
its own: every number comes from a core component, the same ones the standalone engine uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.optimizer import LightningOptimizer

from sem.contracts import model_output, set_step
from sem.engines.optim import build_optimizer, build_scheduler
from sem.models.common import count_parameters
from sem.training.checkpoint import CheckpointManager
from sem.training.health import Decision
from sem.training.metrics import is_logging_step
from sem.training.preemption import StopSignals
from sem.training.step import TrainStep, val_metrics, val_sums


class SEMLightningModule(pl.LightningModule):
    def __init__(
        self,
        train_step: TrainStep,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        bpb: Callable[[float, int], float] | None = None,
        checkpoints: CheckpointManager | None = None,
        signals: StopSignals | None = None,
    ) -> None:
        super().__init__()
        self.train_step = train_step
        self.model = train_step.model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.checkpoints = checkpoints  # where a health rollback finds the last good state
        self.signals = signals  # a stop request: the step's checkpoint follows, so read back first
        self._means: torch.Tensor | None = None
        self.bpb = bpb or (lambda nats, n_bytes: nats / math.log(2) / max(n_bytes, 1))
        self.num_parameters = count_parameters(self.model)
        self.final_validation = False
        self.last_train: dict[str, Any] = {}  # read by the metrics/console callbacks
        self.last_val: dict[str, float] = {}
        self._decision = Decision()
        self._step_open = False  # a step's first micro-batch has run, its optimizer step not yet

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None,  # type: ignore[override]
                             hparams_file: Any = None, strict: bool | None = None, **kwargs: Any
                             ) -> SEMLightningModule:
        """A ready module from a sem checkpoint alone: the model rebuilt from the run config inside it
        (``weights_only`` loading, checked against the sidecar; a user's model class must be importable),
        with that config's optimizer and schedule, in eval mode. For a ``Trainer`` of one's own
        (``validate``, ``predict``, fine-tuning); ``sem.load`` is the plain-PyTorch way.

        Lightning's own loader would rebuild the module from saved hyperparameters; sem's module is
        built from components (the train step and the factories), so it is rebuilt from the config."""
        from omegaconf import OmegaConf

        from sem.engines.instantiate import optimizer_factory, scheduler_factory
        from sem.training.restore import load

        kwargs.pop("weights_only", None)  # always weights_only: sem's loader refuses pickled objects
        if hparams_file is not None or kwargs:
            raise TypeError("SEMLightningModule.load_from_checkpoint builds the module from the config inside "
                            f"the checkpoint; it takes no hparams_file or overrides (got {sorted(kwargs)})")
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        model, cfg = load(checkpoint_path, device)
        config = OmegaConf.to_container(cfg, resolve=True)
        train_step = TrainStep(model, seed=int(config.get("seed", 0)), config=config)
        module = cls(train_step=train_step, optimizer=optimizer_factory(cfg.optimizer),
                     scheduler=scheduler_factory(cfg.scheduler) if cfg.get("scheduler") else None)
        return module.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of the model (``Trainer.predict`` on a loaded module, a user's own loop)."""
        return model_output(self.model, input_ids).logits

    def predict_step(self, batch: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor],
                     batch_idx: int) -> torch.Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    # views of the train step's parts, for callbacks and the composition root
    curriculum = property(lambda self: self.train_step.curriculum)
    teacher = property(lambda self: self.train_step.teacher)
    health = property(lambda self: self.train_step.health)
    config = property(lambda self: self.train_step.config)
    budget = property(lambda self: self.train_step.budget)
    last_grad_norm = property(lambda self: self.train_step.grad_norm)

    # ------------------------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.optimizer_factory, self.model)
        scheduler = build_scheduler(self.scheduler_factory, optimizer, self.train_step.lr_scale)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # (After a restore WSDScheduler.load_state_dict re-applies the *configured* schedule at the
        # restored step, so a decay branch uses its new schedule from its first step.)
        if self.teacher is not None:
            self.teacher.to(self.device)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Called once per optimizer step after unscaling, before the update: where the train step reads
        # the true grad norm and the health monitor decides whether the update is applied.
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # Mean over micro-batches and ranks, on the device: every rank judges (and feeds the
        # curriculum) the same loss. One all-reduce per step, kept for optimizer_step.
        self._means = self.trainer.strategy.reduce(self.train_step.step_means(), reduce_op="mean")
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self._decision = self.train_step.judge(self.global_step, params, self._means[0],
                                           float(gradient_clip_val) if gradient_clip_val else None,
                                           scaler_active=scaler is not None,
                                           optimizer=getattr(optimizer, "_optimizer", optimizer),
                                           sharded=self._sum_over_ranks if self._sharded() else None)

    def _sharded(self) -> bool:
        from pytorch_lightning.strategies import FSDPStrategy

        return isinstance(self.trainer.strategy, FSDPStrategy)  # each rank holds a shard of the gradients

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    # ------------------------------------------------------------------------------- training

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # [B, T] int64
        step = self.global_step  # index of the optimizer step this micro-batch belongs to
        if not self._step_open:
            self.train_step.start(step, self.global_rank)
            self._step_open = True
        loss, metrics = self.train_step.micro_loss(x, y, step)
        stage_index, stage = self.train_step.stage(step)
        self.last_train = {
            "step": step,
            "train/loss": loss.detach(),
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "seq_len": int(x.shape[1]),
            "batch_size": int(x.shape[0]),
            "stage": stage,
            "stage_index": stage_index,
            **metrics,
        }
        # the loss and every train/ term by name (the model's aux_losses and metrics too), for Lightning's loggers
        self.log_dict({"train/loss": loss.detach(), **{k: v for k, v in metrics.items() if k.startswith("train/")}},
                      on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer | LightningOptimizer,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Exactly once per optimizer step, whatever accumulate_grad_batches is.
        step = self.global_step  # not yet incremented: the step just taken
        self._step_open = False
        means, self._means = self._means, None
        if means is None:  # no clipping hook ran (not expected): reduce here
            means = self.trainer.strategy.reduce(self.train_step.step_means(), reduce_op="mean")
        self.last_train.update({"train/loss": means[0], "train/ce_loss": means[1], "train/unitary_div": means[2],
                                "tokens": self.train_step.tokens * self.trainer.world_size,
                                "grad_norm": self.train_step.grad_norm, "step_done": True})
        decision, self._decision = self._decision, Decision()
        logging = is_logging_step(step, self.trainer.log_every_n_steps, self.trainer.max_steps)
        row = self.train_step.finish(step, means, decision, self._flush_due(step, logging), self._rollback)
        self.last_train.update(row)
        probes = {k: v for k, v in row.items() if k.startswith("sem/")}
        if probes:
            self.log_dict(probes, on_step=True, on_epoch=False)

    def _flush_due(self, step: int, logging: bool) -> bool:
        """Are device-judged steps read back after optimizer step ``step``? On logging steps, the last
        step and before anything is saved. A stop signal flushes at once in one process; with more ranks
        the stop is decided together on logging and checkpoint steps (``CheckpointCallback``), flush steps
        already, and a rank's own signal must not flush it alone: a gate's event would fall on another
        step there than on the other ranks, and a milestone save only some ranks take waits forever."""
        stopping = self.signals is not None and self.signals.received is not None and self.trainer.world_size == 1
        return (logging or step + 1 >= self.trainer.max_steps or stopping
                or (self.checkpoints is not None and self.checkpoints.due(step + 1)))

    def _rollback(self, step: int) -> None:
        self.train_step.rollback(step, self.checkpoints, self.load_state_dict, self.trainer.optimizers)

    # ----------------------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # nats, tokens, bytes, windows
        set_step(self.model, self.global_step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # The final validation (summary.json's val_bpb) without mixed precision: the model's own figure,
        # what `sem.evaluate` gives, whatever precision trained it (bf16 autocast moves it ~1e-4).
        # (Only then a context of its own: an enabled torch.autocast would impose its default dtype.)
        if not self.final_validation:
            self._val_sums += val_sums(self.model, *batch)
            return
        with torch.autocast(batch[0].device.type, enabled=False):
            self._val_sums += val_sums(self.model, *batch)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self.last_val = val_metrics(sums, self.bpb, self.final_validation)
        self.log_dict({"val/loss": self.last_val["val/loss"], "val/bpb": self.last_val["val/bpb"]}, sync_dist=False)

    # ---------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sem"] = self.train_step.state_dict(self.trainer.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_step.load_state_dict(checkpoint.get("sem") or {})
