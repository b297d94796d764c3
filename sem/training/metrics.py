"""The run's training record, written the same way by both engines: ``metrics.jsonl`` rows, the
console line, and the train clock (tokens and seconds with validation left out). Plain Python.

Every row has ``time`` (Unix seconds when written). Train rows: ``step`` is the 0-based index of the
optimizer step the row describes (the step the LR
schedule and the curriculum are functions of), written every ``log_every`` steps and on the last.
Validation rows: ``step`` is the number of optimizer steps completed. Curriculum events are rows with
an ``event`` key.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("sem")

TRAIN_KEYS = ("train/loss", "train/ce_loss", "train/unitary_div", "lr", "seq_len", "batch_size", "stage",
              "grad_norm")
EXTRA_PREFIXES = ("train/", "distill/", "sem/", "health/")  # train/<name>: a model's ModelOutput.logged()


def plain(value: Any) -> Any:
    """A JSON-ready scalar from a tensor or number (NaN/inf become null: strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_logging_step(step: int, every: int, max_steps: int) -> bool:
    """Optimizer step ``step`` (0-based) gets a train row: every ``every`` steps, and the last one."""
    return step % every == 0 or step == max_steps - 1


class TrainClock:
    """Training tokens and wall time, with validation time left out.

    ``lap()`` returns (tokens, seconds) since the previous lap; ``tokens_per_s`` is the whole run.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._lap_tokens = 0
        self._lap_seconds = 0.0
        self._since: float | None = None

    @property
    def running(self) -> bool:
        return self._since is not None

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
        running = self.running
        self.pause()
        out = (self._lap_tokens, self._lap_seconds)
        self._lap_tokens, self._lap_seconds = 0, 0.0
        if running:
            self.start()
        return out

    @property
    def tokens_per_s(self) -> float | None:
        running = self.running
        self.pause()
        rate = self.tokens / self.seconds if self.seconds > 0 else None
        if running:
            self.start()
        return rate


class MetricsLog:
    """Appends ``metrics.jsonl``; ``enabled=False`` on ranks other than zero."""

    def __init__(self, path: Path, log_every: int, max_steps: int, enabled: bool = True) -> None:
        self.path = Path(path)
        self.log_every = log_every
        self.max_steps = max_steps
        self.enabled = enabled
        self.clock = TrainClock()

    def trim(self, steps_done: int) -> None:
        """On a resume into the same run, drop rows the restored state will produce again (those
        after the checkpoint, and a previous final validation), so every step appears once."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            train_row = "train/loss" in row
            if not row.get("final") and (row["step"] < steps_done if train_row else row["step"] <= steps_done):
                kept.append(line + "\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {**row, "time": round(time.time(), 3)}  # wall clock: val/bpb against time (bench.time_to_quality)
        with self.path.open("a") as f:
            f.write(json.dumps({k: plain(v) for k, v in row.items()}) + "\n")

    def train(self, row: dict[str, Any]) -> None:
        """A finished optimizer step's row (``step``, ``tokens``, metrics, ``events``)."""
        self.clock.add_tokens(row["tokens"])
        step = row["step"]
        if is_logging_step(step, self.log_every, self.max_steps):
            tokens, seconds = self.clock.lap()
            out = {"step": step, **{k: row.get(k) for k in TRAIN_KEYS},
                   "tokens_per_s": tokens / seconds if seconds > 0 else None}
            out.update({k: v for k, v in row.items() if k.startswith(EXTRA_PREFIXES)})
            self.write(out)
        for event in row.get("events") or []:
            self.write({"step": event.step, "event": event.kind, "stage": event.stage,
                        "stage_index": event.index, "reason": event.reason})

    def validation(self, steps_done: int, values: dict[str, Any]) -> None:
        self.write({"step": steps_done, **values})


class ConsoleLine:
    """One compact line every ``every_n_steps`` optimizer steps (and the last): step, cross-entropy
    (the headline: what val/loss measures) with the unitary penalty and distillation KL beside it,
    lr, grad norm, tokens/s over the interval, ETA."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"callbacks.console.every_n_steps must be > 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.clock = TrainClock()
        self._steps_in_lap = 0

    def train(self, row: dict[str, Any], max_steps: int) -> str | None:
        self.clock.add_tokens(row["tokens"])
        self._steps_in_lap += 1
        done = row["step"] + 1
        if done % self.every_n_steps != 0 and done != max_steps:
            return None
        tokens, seconds = self.clock.lap()
        rate = tokens / seconds if seconds > 0 else float("nan")
        eta = (max_steps - done) * seconds / max(self._steps_in_lap, 1)
        self._steps_in_lap = 0
        extra = f" | udiv {num(row.get('train/unitary_div')):.4f}"
        if "distill/kl" in row:
            extra += f" | kl {num(row['distill/kl']):.4f} (distill loss {num(row['distill/loss']):.4f})"
        return (f"step {done}/{max_steps} | ce {num(row['train/ce_loss']):.4f}{extra} | lr {row['lr']:.2e} | "
                f"grad {num(row.get('grad_norm')):.3f} | {rate / 1000:.1f}k tok/s | seq {row['seq_len']} | "
                f"{row['stage']} | ETA {duration(eta)}")

    @staticmethod
    def validation(steps_done: int, values: dict[str, Any]) -> str:
        final = f" (final, {values.get('val/windows')} windows)" if values.get("final") else ""
        return (f"validation at step {steps_done} | val/loss {values['val/loss']:.4f} | "
                f"val/bpb {values['val/bpb']:.4f}{final}")


def num(value: Any) -> float:
    """A float for a console line: NaN where there is no value."""
    p = plain(value)
    return float("nan") if p is None else float(p)


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
