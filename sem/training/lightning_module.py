"""SEMLightningModule: wires model, optimizer, schedule, curriculum and distillation into
Lightning's hooks. It holds no policy of its own: every number comes from a core component."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from sem.data.datamodule import byte_targets
from sem.model import count_parameters, param_groups
from sem.training.callbacks import is_logging_step
from sem.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from sem.training.curriculum import CurriculumManager
from sem.training.distillation import DistillationLoss, EMATeacher
from sem.training.health import Decision, Faults, HealthMonitor, HealthStop


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of optimizer step ``step``'s random draws (dropout): a function of the step alone,
    so a resumed run, a prefetching loader or an extra validation cannot shift the stream."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


class SEMLightningModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        curriculum: CurriculumManager | None = None,
        teacher: Callable[..., EMATeacher] | None = None,
        distill_loss: DistillationLoss | None = None,
        faults: Faults | None = None,
        bpb: Callable[[float, int], float] | None = None,
        budget: dict[str, Any] | None = None,
        health: HealthMonitor | None = None,
        checkpoints: CheckpointManager | None = None,
        config: dict[str, Any] | None = None,
        seed: int = 0,
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
        self.faults = faults or Faults()
        self.health = health or HealthMonitor.off()
        self.checkpoints = checkpoints  # where a health rollback finds the last good state
        self.config = config  # the resolved run config, stored in every checkpoint
        self.seed = seed
        self.bpb = bpb or (lambda nats, n_bytes: nats / math.log(2) / max(n_bytes, 1))
        self.budget = dict(budget or {})  # lengths resolved from fractions of max_steps (sem.training.budget)
        self.num_parameters = count_parameters(model)
        self.final_validation = False
        self.last_train: dict[str, Any] = {}  # read by the metrics/console callbacks
        self.last_val: dict[str, float] = {}
        self.last_grad_norm = float("nan")
        self._micro_losses: list[torch.Tensor] = []  # [3] per micro-batch
        self._micro_tokens = 0
        self._decision = Decision()
        self._step_started: float | None = None

    # ------------------------------------------------------------------------------- optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        wd = float(getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(params=param_groups(self.model, wd))
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        curriculum = self.curriculum
        health = self.health

        def lr_scale(step: int) -> float:  # the stage's LR scale times the health policy's (rollbacks)
            return (curriculum.lr_scale(step) if curriculum is not None else 1.0) * health.lr_factor

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
        # Called once per optimizer step after unscaling, before the update: the one place to read
        # the true grad norm, and where the health policy decides whether the update is applied.
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        step = self.global_step
        self.faults.grads(step, params)
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = self.last_grad_norm = float(total_norm)
        loss = float(self.trainer.strategy.reduce(torch.stack([m[0] for m in self._micro_losses]).mean(),
                                                  reduce_op="mean"))
        seconds = time.perf_counter() - self._step_started if self._step_started is not None else None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and math.isfinite(loss) and not math.isfinite(norm):
            # fp16 loss-scale overflow: routine, the GradScaler skips this step and lowers its scale
            self._decision = Decision()
            return
        self._decision = self.health.check_step(step, loss, norm, seconds)
        if not self._decision.apply_update:
            for p in params:
                p.grad = None  # the optimizer leaves parameters without a gradient untouched
        elif gradient_clip_val and math.isfinite(norm) and norm > float(gradient_clip_val):
            torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), total_norm)

    # ------------------------------------------------------------------------------- training

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # [B, T] int64
        step = self.global_step  # index of the optimizer step this micro-batch belongs to
        if not self._micro_losses:  # the first micro-batch of the step
            self._step_started = time.perf_counter()
            torch.manual_seed(step_seed(self.seed, step, self.global_rank))
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
        loss = self.faults.loss(step, loss)  # faults.nan_at_step / spike_at_step (rehearsals)
        # A non-finite loss is judged with the gradients (configure_gradient_clipping): the health
        # policy then skips the update, rolls back or stops before anything reaches the weights.

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
        decision, self._decision = self._decision, Decision()
        self.last_train["health"] = decision.action
        if decision.action == "stop":
            raise HealthStop("; ".join(f"step {e.step}: {e.check}: {e.message}" for e in decision.events))
        if decision.action == "rollback":
            self._rollback(step)
        elif decision.apply_update and self.teacher is not None and self.teacher.active(step, self._stage_name(step)):
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
                    probe_decision = self.health.check_probes(step, values)
                    if probe_decision.action == "stop":
                        raise HealthStop("; ".join(e.message for e in probe_decision.events))
            self.last_train.update(self.health.metrics())

    def _rollback(self, step: int) -> None:
        """Reload the newest valid checkpoint's model, optimizer and teacher; the step counter, the
        data position and the schedule carry on (the windows since that checkpoint are skipped)."""
        found = self.checkpoints.newest_valid() if self.checkpoints is not None else None
        if found is None:
            raise HealthStop(f"step {step}: rollback needed but no valid checkpoint exists yet "
                             "(save earlier with checkpoint.every_n_steps, or use action skip)")
        path, payload = found
        self.load_state_dict(payload["state_dict"])
        for optimizer, state in zip(self.trainer.optimizers, payload["optimizer_states"]):
            optimizer.load_state_dict(state)
        teacher_state = (payload.get("sem") or {}).get("teacher")
        if self.teacher is not None and teacher_state is not None:
            self.teacher.load_state_dict(teacher_state)
            self.teacher.to(self.device)
        self.health.rolled_back(step, int(payload.get("global_step", -1)))

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
        step = self.trainer.global_step
        checkpoint["sem"] = {
            "format": 1,
            "step": step,
            "stage": self._stage_name(max(step - 1, 0)),
            "config": self.config,
            "rng": rng_state(),
            "health": self.health.state_dict(),
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
        if state.get("health") is not None:
            self.health.load_state_dict(state["health"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
