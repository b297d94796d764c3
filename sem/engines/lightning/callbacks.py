"""Thin Lightning adapters: each callback turns hooks into calls and rows, nothing more.

The module records what happened in a step (``pl_module.last_train``, ``last_val``); these
callbacks time it and write it: ``metrics.jsonl`` rows and one console line every N steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from sem.training.checkpoint import CheckpointManager
from sem.training.metrics import ConsoleLine, MetricsLog, TrainClock, is_logging_step, plain
from sem.training.preemption import StopSignals
from sem.training.pruning import Pruned, Reports

__all__ = ["CheckpointCallback", "CurriculumCallback", "ManagedCheckpointIO", "MetricsWriter",
           "SEMConsoleLogger", "is_logging_step"]

log = logging.getLogger("sem")


class _Timed(pl.Callback):
    """Keeps a TrainClock running only while training batches run."""

    clock: TrainClock

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not self.clock.running:
            self.clock.start()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.pause()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.pause()

    @property
    def overall_tokens_per_s(self) -> float | None:
        return self.clock.tokens_per_s


class MetricsWriter(_Timed):
    """Appends ``metrics.jsonl`` in the run directory through ``MetricsLog`` (the rows both engines
    write: see sem/training/metrics.py)."""

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self.log: MetricsLog | None = None
        self.clock = TrainClock()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.log = MetricsLog(Path(trainer.default_root_dir) / self.filename, trainer.log_every_n_steps,
                              trainer.max_steps, enabled=trainer.is_global_zero)
        self.log.clock = self.clock

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.log is not None
        self.log.trim(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.last_train.get("step_done"):
            assert self.log is not None
            self.log.train(pl_module.last_train)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end: Lightning runs callbacks' epoch-end hooks before the module's
        if trainer.sanity_checking or not pl_module.last_val:
            return
        assert self.log is not None
        self.log.validation(trainer.global_step, pl_module.last_val)


class SEMConsoleLogger(_Timed):
    """One compact line every ``every_n_steps`` optimizer steps (``ConsoleLine``)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.line = ConsoleLine(every_n_steps)
        self.clock = self.line.clock
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.last_train.get("step_done"):
            text = self.line.train(pl_module.last_train, trainer.max_steps)
            if text is not None:
                rank_zero_only(log.info)(text)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.last_val:
            return
        rank_zero_only(log.info)(ConsoleLine.validation(trainer.global_step, pl_module.last_val))


class CurriculumCallback(pl.Callback):
    """Announces stage changes on the console (milestone checkpoints: ``CheckpointCallback``)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        curriculum = pl_module.curriculum
        if curriculum is not None and curriculum.stages[0].checkpoint and trainer.global_step == 0:
            rank_zero_only(log.warning)(
                "curriculum.stages[0].checkpoint=true has no effect: the first stage starts at step 0, "
                "before any training")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        row = pl_module.last_train
        if not row.get("step_done") or pl_module.curriculum is None:
            return
        for event in row.get("events") or []:
            rank_zero_only(log.info)("curriculum: %s %r at step %d (%s)", event.kind.replace("_", " "),
                                     event.stage, event.step, event.reason)


class CheckpointCallback(pl.Callback):
    """Adapts ``CheckpointManager`` to Lightning: a checkpoint every ``every_n_steps`` optimizer steps,
    at the start of each curriculum stage that asks for one (``stage_<name>_step_XXXXXXX.ckpt``, the
    weights after exactly ``event.step`` steps), after a stop signal and at the end of training
    (``save_on_exit``). Validation metrics at a checkpoint's step go into its sidecar (for ``best``)."""

    def __init__(self, manager: CheckpointManager, signals: StopSignals | None = None) -> None:
        self.manager = manager
        self.signals = signals

    def _take_back_signals(self, trainer: pl.Trainer) -> None:
        """Lightning installs its own SIGTERM handler when it starts fitting or validating (wrapping ours):
        it would raise SIGTERMException at the next batch (exit 1, nothing saved), and in a multi-rank run
        it broadcasts from inside the handler, a collective at an arbitrary point. Ours decides: a
        SIGTERM Lightning caught before now becomes ours."""
        if self.signals is None:
            return
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:
            self.signals.received = self.signals.received or "SIGTERM"
            connector.received_sigterm = False
        self.signals.install()

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_back_signals(trainer)  # still before training: a stop abandons the sanity check

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_back_signals(trainer)  # the final validation (trainer.validate) registers Lightning's again

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_back_signals(trainer)
        if self.signals is not None:
            # The first step starts: from here a stop finishes the step and saves it. (One received in the
            # set-up was raised there already; the rendezvous is over, so every rank is here.)
            self.signals.abandon("the set-up before training")
            self.signals.defer()

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, milestone: str | None = None) -> None:
        # Lightning's own checkpoint dict (loops, optimizer, scheduler, precision, callbacks, and the
        # module's "sem" entry); every rank builds it (collective-safe), rank zero writes it.
        payload = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        saved = True
        if trainer.is_global_zero:
            row = pl_module.last_train
            metrics = {k: plain(row.get(k)) for k in ("train/loss", "train/ce_loss")}
            path = self.manager.save(payload, step=trainer.global_step, stage=milestone or row.get("stage"),
                                     metrics=metrics, config=pl_module.config, milestone=milestone)
            saved = path is not None
            if saved and milestone is not None:
                log.info("curriculum: milestone checkpoint %s", path)
        # Every rank takes rank zero's word for what was saved (the broadcast is also the barrier): a save
        # that failed there (a full disk, non-finite weights) is retried at the end by every rank together,
        # not by rank zero alone, which would wait for the others in the collectives of the save.
        if bool(trainer.strategy.broadcast(saved, src=0)) and not trainer.is_global_zero:
            self.manager.last_saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        row = pl_module.last_train
        if not row.get("step_done"):
            return
        done = trainer.global_step
        curriculum = pl_module.curriculum
        for event in row.get("events") or []:
            if (event.kind == "stage_start" and event.step == done and curriculum is not None
                    and curriculum.stages[event.index].checkpoint):
                self.save(trainer, pl_module, milestone=event.stage)
        stop = self.signals is not None and self.signals.received is not None
        if trainer.world_size > 1:
            # Every rank must stop at the same step (a rank that stops alone leaves the others hung in
            # the next all-reduce): a collective decision, taken on logging and checkpoint steps, so a
            # step without either has no extra collective.
            if not (self.manager.due(done) or is_logging_step(done - 1, trainer.log_every_n_steps,
                                                              trainer.max_steps)):
                return
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
            if stop and self.signals is not None and self.signals.received is None:
                self.signals.received = "SIGTERM (another rank)"
        if self.manager.due(done) or (stop and self.manager.save_on_exit and done < trainer.max_steps):
            self.save(trainer, pl_module)
        if stop:
            trainer.should_stop = True
            if done < trainer.max_steps:
                # Lightning validates when should_stop is set (for early stopping); a preempted run must
                # not: it delays the exit and would add an off-schedule validation row and sidecar metric.
                # (At max_steps the run is complete and its final validation must run.)
                trainer.limit_val_batches = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.last_val:
            return
        # The final validation too: the final checkpoint is saved before it (and max_steps is rarely a
        # validation step), so without its metrics best.ckpt could never be the final model.
        if trainer.is_global_zero:
            self.manager.record_metrics(trainer.global_step, {k: v for k, v in pl_module.last_val.items()
                                                              if k.startswith("val/")})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.manager.save_on_exit and self.manager.last_saved_step != trainer.global_step \
                and trainer.global_step > 0:
            self.save(trainer, pl_module)


class TrialCallback(pl.Callback):
    """A sweeper's judge of this trial (``sem.training.pruning``): global rank 0 reports each validation
    during fit; where the judge says stop, every rank stops at that step (a broadcast: the decision is
    rank 0's), and ``CheckpointCallback.on_train_end`` saves it."""

    def __init__(self, reports: Reports) -> None:
        self.reports = reports

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not pl_module.last_val:
            return
        if trainer.global_step >= (trainer.max_steps or 0):
            return  # the last validation: the run is complete, not pruned
        verdict = self.reports.validated(trainer.global_step, pl_module.last_val) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            verdict = trainer.strategy.broadcast(verdict, src=0)
        if verdict is not None:
            self.reports.pruned = Pruned(*verdict)  # (rank 0's own; the broadcast's on the other ranks)
            trainer.should_stop = True


class ManagedCheckpointIO(TorchCheckpointIO):
    """Lightning loads a checkpoint to resume through this: the manager's verified, weights-only
    payload (already read once to resolve the resume; not read twice)."""

    def __init__(self, manager: CheckpointManager, accumulate: int = 1) -> None:
        super().__init__()
        self.manager = manager
        self.accumulate = accumulate

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        payload = self.manager.load(path)
        if "loops" not in payload:  # written by the standalone engine: give Lightning its loop counters
            payload = from_standalone(payload, self.accumulate)
        return payload


def from_standalone(payload: dict[str, Any], accumulate: int) -> dict[str, Any]:
    """A standalone checkpoint in the shape Lightning 2.x writes at the end of an optimizer step: the
    loop progress counters of ``steps`` steps of ``accumulate`` micro-batches, the Lightning version,
    and the grad scaler under the precision plugin's key."""
    import pytorch_lightning

    n, a = int(payload["global_step"]), accumulate

    def progress(done: int, started: bool = True) -> dict[str, Any]:
        one = {"ready": done, "completed": done, **({"started": done} if started else {})}
        return {"total": dict(one), "current": dict(one)}

    batches = {"ready": n * a, "completed": n * a - 1, "started": n * a, "processed": n * a}
    epoch = {"ready": 1, "completed": 0, "started": 1, "processed": 0}
    nothing = {"ready": 0, "completed": 0, "started": 0, "processed": 0}
    fit_loop = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": n - 1},
        "epoch_loop.batch_progress": {"total": dict(batches), "current": dict(batches), "is_last_batch": False},
        "epoch_loop.scheduler_progress": progress(n, started=False),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {"step": progress(n, started=False), "zero_grad": progress(n)}},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": progress(0, started=False),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {"total": dict(nothing), "current": dict(nothing),
                                               "is_last_batch": False},
        "epoch_progress": {"total": dict(epoch), "current": dict(epoch)},
    }
    other = {"state_dict": {}, "batch_progress": {"total": dict(nothing), "current": dict(nothing),
                                                  "is_last_batch": False}}
    out = {**payload, "loops": {"fit_loop": fit_loop, "validate_loop": other, "test_loop": other,
                                "predict_loop": other},
           "callbacks": {}, "pytorch-lightning_version": pytorch_lightning.__version__}
    if payload.get("grad_scaler"):
        out["SEMPrecisionPlugin"] = payload["grad_scaler"]
    return out
