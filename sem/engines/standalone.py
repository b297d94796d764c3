"""SEMTrainer: the plain-PyTorch engine (``engine=standalone``).

The same model, data, optimizer, scheduler, curriculum, distillation, health monitor, checkpoint
manager, precision policy and metrics writer as the Lightning engine: every training decision lives in
the core (``TrainStep``, ``CheckpointManager``, ``MetricsLog``...); this loop only orders the calls,
in the order Lightning makes them, so both engines give the same per-step losses and each resumes the
other's checkpoints. No Lightning import: it runs where Lightning is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sem.contracts import set_step
from sem.engines.optim import build_optimizer, build_scheduler
from sem.training.checkpoint import MODEL_PREFIX, CheckpointManager, model_state
from sem.training.metrics import ConsoleLine, MetricsLog, is_logging_step, plain
from sem.training.precision import PrecisionPolicy
from sem.training.preemption import StopSignals
from sem.training.pruning import Reports
from sem.training.step import TrainStep, val_metrics, val_sums

if TYPE_CHECKING:
    from sem.data.datamodule import SEMDataModule

log = logging.getLogger("sem")

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, targets) [B, T] int64


class SEMTrainer:
    """Fit ``train_step.model`` for ``max_steps`` optimizer steps; see the module docstring. An
    ``Engine`` (``sem.engines.base``)."""

    def __init__(self, *, train_step: TrainStep, datamodule: SEMDataModule,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
                 checkpoints: CheckpointManager, precision: PrecisionPolicy, device: torch.device,
                 run_dir: Path, max_steps: int, val_check_interval: int, log_every_n_steps: int,
                 accumulate_grad_batches: int = 1, gradient_clip_val: float | None = None,
                 console_every_n_steps: int = 50, signals: StopSignals | None = None,
                 trial: Reports | None = None) -> None:
        self.train_step = train_step
        self.trial = trial
        self.model: nn.Module = train_step.model
        self.dm = datamodule
        self.checkpoints = checkpoints
        self.precision = precision
        self.device = device
        self.run_dir = Path(run_dir)
        self.max_steps = max_steps
        self.val_check_interval = val_check_interval
        self.log_every_n_steps = log_every_n_steps
        self.accumulate = accumulate_grad_batches
        self.clip = float(gradient_clip_val) if gradient_clip_val else None
        self.signals = signals
        self.global_step = 0
        self.last_val: dict[str, float] = {}
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", log_every_n_steps, max_steps)
        self.console = ConsoleLine(console_every_n_steps)

        self.model.to(device=device, dtype=precision.weights_dtype)
        self.optimizer = build_optimizer(optimizer, self.model)
        self.scheduler_factory = scheduler  # the dry-run calendar builds its own copy
        self.scheduler = build_scheduler(scheduler, self.optimizer, train_step.lr_scale)
        self.scaler = precision.scaler()

    # ---------------------------------------------------------------------------------- fit

    def fit(self, resume_from: str | None = None) -> None:
        """Train to ``max_steps``, from the checkpoint ``resume_from`` (either engine's) when given."""
        if resume_from is not None:
            self.load_payload(self.checkpoints.load(resume_from))
        if self.train_step.teacher is not None:
            self.train_step.teacher.to(self.device)
        self.metrics.trim(self.global_step)
        if self.signals is not None:
            self.signals.install()
            self.signals.defer()  # training: a stop finishes the step and saves it
        batches = self._prefetched(self.dm.train_loader(
            start_step=lambda: self.global_step,
            shape_at=self.train_step.curriculum.shape_at if self.train_step.curriculum is not None else None,
            accumulate=self.accumulate))
        self.model.train()
        while self.global_step < self.max_steps:
            self._step(batches)
            done = self.global_step
            stop = self.signals is not None and self.signals.received is not None
            if self.checkpoints.due(done) or (stop and self.checkpoints.save_on_exit and done < self.max_steps):
                self.save()
            if stop:
                break  # no validation on the way out: a preempted run exits as soon as it is saved
            if done % self.val_check_interval == 0:
                self.validate(self.dm.val_loader())
                if self.trial is not None and done < self.max_steps and self.trial.validated(done, self.last_val):
                    break
        self.metrics.clock.pause()
        self.console.clock.pause()
        if self.checkpoints.save_on_exit and self.checkpoints.last_saved_step != self.global_step \
                and self.global_step > 0:
            self.save()

    @staticmethod
    def _prefetched(loader: Iterable[Batch]) -> Iterator[Batch]:
        """Batches one ahead, as Lightning's fetcher builds them: a gated curriculum then sees the same
        highest-served step, and decides the same boundaries, in both engines. The loader's iterator
        is made here, before any step seeds the RNG (making one draws a seed from it)."""
        it = iter(loader)
        ahead = [next(it)]

        def stream() -> Iterator[Batch]:
            while True:
                current, ahead[0] = ahead[0], next(it)
                yield current

        return stream()

    def _step(self, batches: Iterator[Batch]) -> None:
        """One optimizer step: its micro-batches' forward and backward, the verdict, the update."""
        step, train_step = self.global_step, self.train_step
        if not self.metrics.clock.running:
            self.metrics.clock.start()
            self.console.clock.start()
        train_step.start(step)
        row: dict[str, Any] = {}
        for _ in range(self.accumulate):
            x, y = (t.to(self.device, non_blocking=True) for t in next(batches))
            with self.precision.autocast():
                loss, metrics = train_step.micro_loss(x, y, step)
            stage_index, stage = train_step.stage(step)
            row = {"step": step, "lr": self.optimizer.param_groups[0]["lr"], "seq_len": int(x.shape[1]),
                   "batch_size": int(x.shape[0]), "stage": stage, "stage_index": stage_index, **metrics}
            scaled = loss / self.accumulate
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        means = train_step.step_means()
        decision = train_step.judge(step, params, means[0], self.clip, scaler_active=self.scaler is not None,
                                optimizer=self.optimizer)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        row.update({"train/loss": means[0], "train/ce_loss": means[1], "train/unitary_div": means[2],
                    "tokens": train_step.tokens, "grad_norm": train_step.grad_norm})
        logging_step = is_logging_step(step, self.log_every_n_steps, self.max_steps)
        # Device-judged steps are read back on logging steps and before anything is saved.
        flush = (logging_step or step + 1 >= self.max_steps or self.checkpoints.due(step + 1)
                 or (self.signals is not None and self.signals.received is not None))
        row.update(train_step.finish(step, means, decision, flush, self._rollback))
        if self.scheduler is not None:
            self.scheduler.step()  # after finish, as Lightning: a rollback's optimizer state gets this step's LR
        self.global_step = step + 1
        self._last_row = row
        self.metrics.train(row)
        text = self.console.train(row, self.max_steps)
        if text is not None:
            log.info(text)
        for event in row.get("events") or []:
            log.info("curriculum: %s %r at step %d (%s)", event.kind.replace("_", " "), event.stage,
                     event.step, event.reason)
            if (event.kind == "stage_start" and event.step == self.global_step
                    and train_step.curriculum is not None and train_step.curriculum.stages[event.index].checkpoint):
                path = self.save(milestone=event.stage)
                log.info("curriculum: milestone checkpoint %s", path)

    def _rollback(self, step: int) -> None:
        self.train_step.rollback(step, self.checkpoints, self._load_model, [self.optimizer])

    # ---------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self, loader: Iterable[Batch], final: bool = False) -> dict[str, float]:
        self.metrics.clock.pause()
        self.console.clock.pause()
        was_training = self.model.training
        self.model.eval()
        set_step(self.model, self.global_step)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        # the final validation without mixed precision, as the Lightning engine (its validation_step)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False) if final else self.precision.autocast():
            for x, y in loader:
                sums += val_sums(self.model, x.to(self.device), y.to(self.device))
        self.model.train(was_training)
        self.last_val = val_metrics(sums, self.dm.val_bpb, final)
        self.metrics.validation(self.global_step, self.last_val)
        log.info(ConsoleLine.validation(self.global_step, self.last_val))
        # the final validation too (as the Lightning engine): the final checkpoint is saved before it
        self.checkpoints.record_metrics(self.global_step, {k: v for k, v in self.last_val.items()
                                                           if k.startswith("val/")})
        return self.last_val

    def describe(self) -> str:
        return f"standalone loop on {self.device} ({self.precision.precision})"

    @property
    def tokens_per_s(self) -> float | None:
        return self.metrics.clock.tokens_per_s

    # --------------------------------------------------------------------------- checkpoints

    def payload(self) -> dict[str, Any]:
        """The checkpoint dict, in the keys the Lightning engine writes (so either resumes either)."""
        return {
            "epoch": 0,
            "global_step": self.global_step,
            "engine": "standalone",
            "state_dict": {MODEL_PREFIX + k: v for k, v in self.model.state_dict().items()},
            "optimizer_states": [self.optimizer.state_dict()],
            "lr_schedulers": [self.scheduler.state_dict()] if self.scheduler is not None else [],
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sem": self.train_step.state_dict(self.global_step),
        }

    def save(self, milestone: str | None = None) -> Path | None:
        row = getattr(self, "_last_row", {})
        metrics = {k: plain(row.get(k)) for k in ("train/loss", "train/ce_loss") if k in row}
        return self.checkpoints.save(self.payload(), step=self.global_step, stage=milestone or row.get("stage"),
                                     metrics=metrics, config=self.train_step.config, milestone=milestone)

    def _load_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(model_state(state_dict))

    def load_payload(self, payload: dict[str, Any]) -> None:
        """Restore a checkpoint written by either engine. The step's state first (as Lightning restores
        the module before the optimizers): the scheduler's LR at the restored step depends on the
        curriculum's gate decisions."""
        self.train_step.load_state_dict(payload.get("sem") or {})
        self._load_model(payload["state_dict"])
        if payload.get("optimizer_states"):
            self.optimizer.load_state_dict(payload["optimizer_states"][0])
        if self.scheduler is not None and payload.get("lr_schedulers"):
            self.scheduler.load_state_dict(payload["lr_schedulers"][0])
        scaler_state = payload.get("grad_scaler") or payload.get("SEMPrecisionPlugin")  # either engine's
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self.global_step = int(payload["global_step"])
