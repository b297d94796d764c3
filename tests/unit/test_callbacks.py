"""TrainClock arithmetic and the rows MetricsWriter / SEMConsoleLogger write, driven through their
Lightning hooks by a fake trainer and module on a fake clock (no training)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sem.engines.lightning.callbacks import MetricsWriter, SEMConsoleLogger, TrainClock
from sem.training import metrics as cb
from sem.training.curriculum import StageEvent

TOKENS = 128  # per optimizer step


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(cb.time, "perf_counter", fake)
    return fake


# ----------------------------------------------------------------------------------- TrainClock


def test_clock_excludes_paused_time(clock: FakeTime) -> None:
    c = TrainClock()
    c.start()
    c.add_tokens(100)
    clock.now += 2.0
    c.pause()  # validation: 10 s that must not count
    clock.now += 10.0
    c.start()
    c.add_tokens(50)
    clock.now += 1.0
    assert c.lap() == (150, pytest.approx(3.0))
    assert c.tokens_per_s == pytest.approx(50.0)


def test_clock_lap_restarts_and_total_accumulates(clock: FakeTime) -> None:
    c = TrainClock()
    c.start()
    c.add_tokens(10)
    clock.now += 1.0
    assert c.lap() == (10, pytest.approx(1.0))
    clock.now += 4.0  # still running after lap()
    c.add_tokens(30)
    assert c.tokens_per_s == pytest.approx(40 / 5.0)  # reading the rate does not end the lap
    clock.now += 1.0
    assert c.lap() == (30, pytest.approx(5.0))
    assert (c.tokens, c.seconds) == (40, pytest.approx(6.0))


def test_clock_without_time_has_no_rate(clock: FakeTime) -> None:
    c = TrainClock()
    c.add_tokens(5)
    assert c.tokens_per_s is None
    assert c.lap() == (5, 0.0)
    c.pause()  # pausing a stopped clock is a no-op
    assert c.seconds == 0.0


# ------------------------------------------------------------------- callbacks on a fake trainer


def fake_trainer(tmp_path: Path, max_steps: int = 8, every: int = 3) -> SimpleNamespace:
    return SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True, log_every_n_steps=every, max_steps=max_steps,
                           global_step=0, sanity_checking=False)


def train_row(step: int, loss: float = 2.0, done: bool = True, events: list | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "train/loss": torch.tensor(loss), "train/ce_loss": torch.tensor(loss),
                           "train/unitary_div": torch.tensor(0.0), "lr": 1e-3, "seq_len": 32,
                           "batch_size": 4, "stage": "main", "stage_index": 0}
    if done:
        row.update(tokens=TOKENS, grad_norm=0.5, step_done=True, events=events or [])
    return row


def drive(callback: Any, trainer: SimpleNamespace, module: SimpleNamespace, clock: FakeTime,
          steps: range, validate_after: dict[int, float] | None = None) -> None:
    """One second of training per optimizer step; a validation of the given length after a step."""
    for step in steps:
        # an accumulation micro-batch first: no row, no tokens
        module.last_train = train_row(step, done=False)
        callback.on_train_batch_start(trainer, module, None, 0)
        clock.now += 0.5
        callback.on_train_batch_end(trainer, module, None, None, 0)
        module.last_train = train_row(step, loss=float("nan") if step == 6 else 2.0)
        callback.on_train_batch_start(trainer, module, None, 0)
        clock.now += 0.5
        callback.on_train_batch_end(trainer, module, None, None, 0)
        trainer.global_step = step + 1
        if validate_after and step in validate_after:
            callback.on_validation_start(trainer, module)
            clock.now += validate_after[step]
            module.last_val = {"val/loss": 1.5, "val/bpb": 2.25, "final": False}
            callback.on_validation_end(trainer, module)
    callback.on_train_end(trainer, module)


def read_rows(path: Path) -> list[dict[str, Any]]:
    def no_nan(name: str) -> Any:
        raise AssertionError(f"metrics.jsonl must be strict JSON, found {name}")
    return [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]


def test_metrics_writer_rows(tmp_path: Path, clock: FakeTime) -> None:
    trainer = fake_trainer(tmp_path, max_steps=8, every=3)
    module = SimpleNamespace(last_train={}, last_val={})
    writer = MetricsWriter()
    writer.setup(trainer, module, "fit")
    drive(writer, trainer, module, clock, range(8), validate_after={4: 10.0})
    rows = read_rows(tmp_path / "metrics.jsonl")

    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/bpb" in r]
    assert [r["step"] for r in train] == [0, 3, 6, 7]  # every 3rd step and the last one
    assert [r["step"] for r in val] == [5]  # optimizer steps completed at that validation
    assert rows.index(val[0]) == 2  # written between the rows for steps 3 and 6
    for r in train:
        assert set(cb.TRAIN_KEYS) | {"step", "tokens_per_s"} <= set(r)
    # the 10 s validation inside steps 4..6 is not training time: 128 tokens per 1 s step throughout
    assert [r["tokens_per_s"] for r in train] == pytest.approx([TOKENS] * 4)
    assert train[2]["train/loss"] is None  # NaN becomes null
    assert writer.overall_tokens_per_s == pytest.approx(TOKENS)


def test_metrics_writer_events_and_sanity_check(tmp_path: Path, clock: FakeTime) -> None:
    trainer = fake_trainer(tmp_path, max_steps=10, every=5)
    module = SimpleNamespace(last_train={}, last_val={"val/loss": 1.0, "val/bpb": 1.0, "final": False})
    writer = MetricsWriter()
    writer.setup(trainer, module, "fit")
    trainer.sanity_checking = True
    writer.on_validation_end(trainer, module)  # sanity check: no row
    trainer.sanity_checking = False
    event = StageEvent(step=2, kind="stage_start", stage="long", index=1, reason="scheduled")
    module.last_train = train_row(2, events=[event])
    writer.on_train_batch_start(trainer, module, None, 0)
    writer.on_train_batch_end(trainer, module, None, None, 0)
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert all(isinstance(r.pop("time"), float) for r in rows)  # every row carries its wall-clock time
    assert rows == [{"step": 2, "event": "stage_start", "stage": "long", "stage_index": 1,
                     "reason": "scheduled"}]


def test_console_logger_lines(tmp_path: Path, clock: FakeTime, caplog: pytest.LogCaptureFixture) -> None:
    trainer = fake_trainer(tmp_path, max_steps=7)
    module = SimpleNamespace(last_train={}, last_val={})
    console = SEMConsoleLogger(every_n_steps=3)
    with caplog.at_level(logging.INFO, logger="sem"):
        drive(console, trainer, module, clock, range(7), validate_after={3: 5.0})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 3/7", "step 6/7", "step 7/7"]
    assert lines[0].startswith("step 3/7 | ce 2.0000 | udiv ") and "| lr 1.00e-03 |" in lines[0]
    assert "0.1k tok/s" in lines[1]  # 128 tok/s: the 5 s validation is left out
    assert any("validation at step 4 | val/loss 1.5000 | val/bpb 2.2500" in r.getMessage()
               for r in caplog.records)


def test_console_logger_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        SEMConsoleLogger(every_n_steps=0)
