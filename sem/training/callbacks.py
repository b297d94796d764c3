"""Thin Lightning adapters: each callback turns hooks into calls and rows, nothing more.

The module records what happened in a step (``pl_module.last_train``, ``last_val``); these
callbacks time it and write it: ``metrics.jsonl`` rows and one console line every N steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from sem.training.checkpoint import CheckpointManager
from sem.training.preemption import StopSignals

log = logging.getLogger("sem")


def _plain(value: Any) -> Any:
    """A JSON-ready scalar from a tensor or number (NaN/inf become null: strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TrainClock:
    """Training tokens and wall time, with validation time left out.

    ``lap()`` returns (tokens, seconds) since the previous lap; ``total`` is the whole run.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._lap_tokens = 0
        self._lap_seconds = 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            elapsed = time.perf_counter() - self._since
            self.seconds += elapsed
            self._lap_seconds += elapsed
            self._since = None

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        self._lap_tokens += n

    def lap(self) -> tuple[int, float]:
        running = self._since is not None
        self.pause()
        out = (self._lap_tokens, self._lap_seconds)
        self._lap_tokens, self._lap_seconds = 0, 0.0
        if running:
            self.start()
        return out

    @property
    def tokens_per_s(self) -> float | None:
        running = self._since is not None
        self.pause()
        rate = self.tokens / self.seconds if self.seconds > 0 else None
        if running:
            self.start()
        return rate


class _Timed(pl.Callback):
    """Keeps a TrainClock running only while training batches run."""

    def __init__(self) -> None:
        self.clock = TrainClock()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.clock._since is None:
            self.clock.start()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.pause()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.pause()

    def _optimizer_step_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """True on the micro-batch that completed an optimizer step (and counts its tokens)."""
        row = pl_module.last_train
        if not row.get("step_done"):
            return False
        self.clock.add_tokens(row["tokens"])
        return True

    @property
    def overall_tokens_per_s(self) -> float | None:
        return self.clock.tokens_per_s


class MetricsWriter(_Timed):
    """Appends ``metrics.jsonl`` in the run directory: a train row every
    ``trainer.log_every_n_steps`` optimizer steps (and the first), a row per validation.

    Train rows: ``step`` is the 0-based index of the optimizer step the row describes (the step
    the LR schedule and the curriculum are functions of). Validation rows: ``step`` is the number
    of optimizer steps completed. Curriculum events are written as rows with an ``event`` key.
    """

    TRAIN_KEYS = ("train/loss", "train/ce_loss", "train/unitary_div", "lr", "seq_len", "batch_size",
                  "stage", "grad_norm")

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        super().__init__()
        self.filename = filename
        self.path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.path = Path(trainer.default_root_dir) / self.filename

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On a resume into the same run, drop rows the restored state will produce again (those
        after the checkpoint, and a previous final validation), so every step appears once."""
        assert self.path is not None
        if not self.path.exists():
            return
        g = trainer.global_step
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            train_row = "train/loss" in row
            if not row.get("final") and (row["step"] < g if train_row else row["step"] <= g):
                kept.append(line + "\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    @rank_zero_only
    def _write(self, row: dict[str, Any]) -> None:
        assert self.path is not None
        with self.path.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._optimizer_step_done(trainer, pl_module):
            return
        row = pl_module.last_train
        step = row["step"]
        if is_logging_step(step, trainer.log_every_n_steps, trainer.max_steps):
            tokens, seconds = self.clock.lap()
            out = {"step": step, **{k: row.get(k) for k in self.TRAIN_KEYS},
                   "tokens_per_s": tokens / seconds if seconds > 0 else None}
            out.update({k: v for k, v in row.items() if k.startswith(("distill/", "sem/", "health/"))})
            self._write(out)
        for event in row.get("events") or []:
            self._write({"step": event.step, "event": event.kind, "stage": event.stage,
                         "stage_index": event.index, "reason": event.reason})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end: Lightning runs callbacks' epoch-end hooks before the module's
        if trainer.sanity_checking or not pl_module.last_val:
            return
        self._write({"step": trainer.global_step, **pl_module.last_val})


class SEMConsoleLogger(_Timed):
    """One compact line every ``every_n_steps`` optimizer steps:
    step, loss, lr, grad norm, tokens/s over the interval, ETA."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.console.every_n_steps must be > 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._steps_in_lap = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._optimizer_step_done(trainer, pl_module):
            return
        self._steps_in_lap += 1
        row = pl_module.last_train
        done = row["step"] + 1
        if done % self.every_n_steps != 0 and done != trainer.max_steps:
            return
        tokens, seconds = self.clock.lap()
        rate = tokens / seconds if seconds > 0 else float("nan")
        eta = (trainer.max_steps - done) * seconds / max(self._steps_in_lap, 1)
        self._steps_in_lap = 0
        # Cross-entropy is the headline (what val/loss measures); the other terms of the training
        # loss sit beside it: the unitary penalty and, with a teacher, the distillation KL.
        extra = f" | udiv {_num(row.get('train/unitary_div')):.4f}"
        if "distill/kl" in row:
            extra += f" | kl {_num(row['distill/kl']):.4f} (distill loss {_num(row['distill/loss']):.4f})"
        rank_zero_only(log.info)(
            "step %d/%d | ce %.4f%s | lr %.2e | grad %.3f | %s tok/s | seq %d | %s | ETA %s",
            done, trainer.max_steps, _num(row["train/ce_loss"]), extra, row["lr"],
            row.get("grad_norm", float("nan")), f"{rate / 1000:.1f}k", row["seq_len"], row["stage"],
            _duration(eta))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end: Lightning runs callbacks' epoch-end hooks before the module's
        if trainer.sanity_checking or not pl_module.last_val:
            return
        v = pl_module.last_val
        rank_zero_only(log.info)("validation at step %d | val/loss %.4f | val/bpb %.4f%s",
                                 trainer.global_step, v["val/loss"], v["val/bpb"],
                                 f" (final, {v.get('val/windows')} windows)" if v.get("final") else "")


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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signals is not None:
            self.signals.install()  # Lightning installed its own SIGTERM handler at fit start: ours decides

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, milestone: str | None = None) -> None:
        # Lightning's own checkpoint dict (loops, optimizer, scheduler, precision, callbacks, and the
        # module's "sem" entry); every rank builds it (collective-safe), rank zero writes it.
        payload = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            row = pl_module.last_train
            metrics = {k: _plain(row.get(k)) for k in ("train/loss", "train/ce_loss")}
            path = self.manager.save(payload, step=trainer.global_step, stage=row.get("stage"),
                                     metrics=metrics, config=pl_module.config, milestone=milestone)
            if path is not None and milestone is not None:
                log.info("curriculum: milestone checkpoint %s", path)
        trainer.strategy.barrier("sem.checkpoint")

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
        if self.manager.due(done) or (stop and self.manager.save_on_exit and done < trainer.max_steps):
            self.save(trainer, pl_module)
        if stop:
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.last_val or pl_module.last_val.get("final"):
            return
        if trainer.is_global_zero:
            self.manager.record_metrics(trainer.global_step, {k: v for k, v in pl_module.last_val.items()
                                                              if k.startswith("val/")})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.manager.save_on_exit and self.manager.last_saved_step != trainer.global_step \
                and trainer.global_step > 0:
            self.save(trainer, pl_module)


class ManagedCheckpointIO(TorchCheckpointIO):
    """Lightning loads a checkpoint to resume through this: the manager's verified, weights-only
    payload (already read once to resolve the resume; not read twice)."""

    def __init__(self, manager: CheckpointManager) -> None:
        super().__init__()
        self.manager = manager

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        return self.manager.load(path)


def is_logging_step(step: int, every: int, max_steps: int) -> bool:
    """Optimizer step ``step`` (0-based) gets a train row: every ``every`` steps, and the last one."""
    return step % every == 0 or step == max_steps - 1


def _num(value: Any) -> float:
    """A float for a console line: NaN where there is no value."""
    plain = _plain(value)
    return float("nan") if plain is None else float(plain)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
