"""SEMLightningModule: wires model, optimizer, schedule, curriculum and distillation into
Lightning's hooks. It holds no policy of its own: every number comes from a core component."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from sem.data.datamodule import byte_targets
from sem.model import count_parameters, param_groups
from sem.training.callbacks import is_logging_step
from sem.training.curriculum import CurriculumManager
from sem.training.distillation import DistillationLoss, EMATeacher


class SEMLightningModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        curriculum: CurriculumManager | None = None,
        teacher: Callable[..., EMATeacher] | None = None,
        distill_loss: DistillationLoss | None = None,
        nan_at_step: int | None = None,
        bpb: Callable[[float, int], float] | None = None,
        budget: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.curriculum = curriculum
        # The teacher is a plain object, not a submodule: it must never appear in the student's
        # parameters, optimizer or state_dict. It is saved under checkpoint["sem"] instead.
        self.teacher: EMATeacher | None = teacher(student=model) if teacher is not None else None
        self.distill_loss = distill_loss
        self.nan_at_step = nan_at_step
        self.bpb = bpb or (lambda nats, n_bytes: nats / math.log(2) / max(n_bytes, 1))
        self.budget = dict(budget or {})  # lengths resolved from fractions of max_steps (sem.training.budget)
        self.num_parameters = count_parameters(model)
        self.final_validation = False
        self.last_train: dict[str, Any] = {}  # read by the metrics/console callbacks
        self.last_val: dict[str, float] = {}
        self.last_grad_norm = float("nan")
        self._micro_losses: list[torch.Tensor] = []  # [3] per micro-batch
        self._micro_tokens = 0

    # ------------------------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        wd = float(getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(params=param_groups(self.model, wd))
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        lr_scale = self.curriculum.lr_scale if self.curriculum is not None else None
        scheduler = self.scheduler_factory(optimizer=optimizer, lr_scale=lr_scale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # (After a restore WSDScheduler.load_state_dict re-applies the *configured* schedule at the
        # restored step, so a decay branch uses its new schedule from its first step.)
        if self.teacher is not None:
            self.teacher.to(self.device)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Called once per optimizer step after unscaling: the one place to read the true grad norm.
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
        self.last_grad_norm = float(norm)

    # ------------------------------------------------------------------------------- training

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # [B, T] int64
        step = self.global_step  # index of the optimizer step this micro-batch belongs to
        self.model.set_step(step)
        out = self.model(x, y)
        loss = out.loss
        metrics: dict[str, Any] = {}
        # The teacher distils once ready: its first update (at activation) copies the student.
        if self.teacher is not None and self.distill_loss is not None and self.teacher.ready:
            self.teacher.module.set_step(step)  # step-driven blends (propagator alpha) match the student's
            teacher_logits = self.teacher(x)
            parts = self.distill_loss(out.logits, teacher_logits, out.ce_loss)
            # keep the unitary penalty; replace plain CE by the distillation mix
            loss = parts["loss"] + (out.loss - out.ce_loss)
            metrics.update({"distill/kl": parts["kl"].detach(), "distill/loss": parts["loss"].detach(),
                            "distill/teacher_decay": self.teacher.decay(step)})
        if self.nan_at_step is not None and step == self.nan_at_step:
            loss = loss * float("nan")  # fault injection for tests (faults.nan_at_step)
        if not torch.isfinite(loss):
            # Stop before a non-finite loss reaches the weights (and any checkpoint). The health
            # monitor's policies (skip, rollback) will refine this; failing loudly is the safe default.
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at step {step}")

        # [loss, ce, unitary_div] of each micro-batch: a step's row is their mean
        self._micro_losses.append(torch.stack([loss.detach(), out.ce_loss.detach(),
                                               out.unitary_divergence.detach()]))
        self._micro_tokens += x.numel()
        stage_index, stage = self._stage(step)
        self.last_train = {
            "step": step,
            "train/loss": loss.detach(),
            "train/ce_loss": out.ce_loss.detach(),
            "train/unitary_div": out.unitary_divergence.detach(),
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "seq_len": int(x.shape[1]),
            "batch_size": int(x.shape[0]),
            "stage": stage,
            "stage_index": stage_index,
            **metrics,
        }
        self.log_dict({"train/loss": loss.detach(), "train/ce_loss": out.ce_loss.detach(),
                       "train/unitary_div": out.unitary_divergence.detach()},
                      on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Exactly once per optimizer step, whatever accumulate_grad_batches is.
        step = self.global_step  # not yet incremented: the step just taken
        # Mean over micro-batches and ranks: every rank must feed the curriculum the same loss.
        means = self.trainer.strategy.reduce(torch.stack(self._micro_losses).mean(0), reduce_op="mean")
        # The curriculum's plateau gate watches the cross-entropy: the training loss also holds the
        # distillation mix (it roughly halves when a teacher switches on) and the unitary penalty.
        ce = float(means[1])
        self.last_train.update({"train/loss": means[0], "train/ce_loss": means[1],
                                "train/unitary_div": means[2]})
        world = self.trainer.world_size
        self.last_train["tokens"] = self._micro_tokens * world
        self.last_train["grad_norm"] = self.last_grad_norm
        self.last_train["step_done"] = True
        self._micro_losses, self._micro_tokens = [], 0
        if self.teacher is not None and self.teacher.active(step, self._stage_name(step)):
            self.teacher.update(self.model, step)
        if self.curriculum is not None:
            self.last_train["events"] = self.curriculum.observe(step, ce)
        if self._logging_step(step):
            probes = getattr(self.model, "probes", None)
            if probes is not None:
                with torch.no_grad():
                    values = probes()  # cheap diagnostics of the SEM state (sem/*), logging steps only
                self.last_train.update(values)
                if values:
                    self.log_dict(values, on_step=True, on_epoch=False)

    def _logging_step(self, step: int) -> bool:
        # the same steps MetricsWriter writes a row for: probes are computed only when they are written
        return is_logging_step(step, self.trainer.log_every_n_steps, self.trainer.max_steps)

    def _stage(self, step: int) -> tuple[int, str]:
        if self.curriculum is None:
            return 0, "main"
        index, stage = self.curriculum.stage_at(step)
        return index, stage.name

    def _stage_name(self, step: int) -> str:
        return self._stage(step)[1]

    # ----------------------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # nats, tokens, bytes, windows
        self.model.set_step(self.global_step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self.model(x, y)
        n = y.numel()
        self._val_sums += torch.stack([
            out.ce_loss.detach().double() * n,
            torch.tensor(n, dtype=torch.float64, device=self.device),
            torch.tensor(byte_targets(y), dtype=torch.float64, device=self.device),
            torch.tensor(y.shape[0], dtype=torch.float64, device=self.device),
        ])

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        nats, tokens, n_bytes, windows = (float(v) for v in sums)
        val_loss = nats / max(tokens, 1.0)
        val_bpb = self.bpb(nats, int(n_bytes))
        self.last_val = {"val/loss": val_loss, "val/bpb": val_bpb, "final": self.final_validation,
                         "val/windows": int(windows)}
        self.log_dict({"val/loss": val_loss, "val/bpb": val_bpb}, sync_dist=False)

    # ---------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sem"] = {
            "budget": self.budget,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sem") or {}
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
