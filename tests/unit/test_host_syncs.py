"""No host syncs between logging steps: a step that neither logs, prints, checkpoints nor ends the run
reads no tensor value back (``.item()``, ``float()``, ``bool()``...), in either engine, and the
health policy still holds back a bad update (judged on the device, replayed at the next logging step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.host_syncs import counting_reads, quiet_steps, syncs_per_step
from tests.conftest import tiny_data_overrides

STEPS, EVERY = 16, 4
# Until the health monitor's loss window holds loss_spike.min_history steps, every step is judged on the
# host (an extreme spike is caught from the 3rd step on): the guarantee holds from then on.
WARMUP = 4


def quiet_after_warmup() -> list[int]:
    return [s for s in quiet_steps(STEPS, EVERY) if s >= WARMUP]


def _overrides(corpus_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [*tiny_data_overrides(corpus_dir, cache_dir), f"trainer.max_steps={STEPS}",
            f"trainer.log_every_n_steps={EVERY}", f"callbacks.console.every_n_steps={EVERY}",
            f"trainer.val_check_interval={STEPS}", "checkpoint.every_n_steps=0", "checkpoint.save_on_exit=false",
            "~callbacks.progress_bar", "logger=none", f"health.loss_spike.min_history={WARMUP}", *extra]


@pytest.mark.parametrize("engine", ["lightning", "standalone"])
@pytest.mark.parametrize("extra", [[], ["curriculum=two_stage", "distillation=ema_teacher"]],
                         ids=["default", "curriculum+teacher"])
def test_no_host_reads_between_logging_steps(engine: str, extra: list[str], corpus_dir: Path, cache_dir: Path,
                                              tmp_path: Path, one_thread: None) -> None:
    counts, _ = syncs_per_step(_overrides(corpus_dir, cache_dir, f"engine={engine}", *extra), tmp_path)
    quiet = quiet_after_warmup()
    assert quiet and {s: counts[s] for s in quiet} == {s: 0 for s in quiet}, counts
    assert all(counts[s] > 0 for s in range(WARMUP))  # the warm-up steps are judged on the host
    assert counts[0] > 0  # the counter sees the reads a logging step does make


def test_a_gated_stage_reads_nothing_between_logging_steps(corpus_dir: Path, cache_dir: Path, tmp_path: Path,
                                                           one_thread: None) -> None:
    gate = "curriculum.stages.0.gate={min_steps:2,window:2,threshold:1.0}"  # decides at the first chance
    overrides = _overrides(corpus_dir, cache_dir, "engine=standalone", "curriculum=two_stage", gate,
                           "curriculum.stages.0.fraction=0.25")
    counts, _ = syncs_per_step(overrides, tmp_path)
    assert all(counts[s] == 0 for s in quiet_after_warmup()), counts
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in rows if r.get("event") == "stage_start"]
    # the gate saw the losses of steps 0..3 at the flush after step 3, and ended the stage there
    assert ends and ends[0]["step"] <= 2 * EVERY, ends


@pytest.mark.parametrize("engine", ["lightning", "standalone"])
def test_a_nan_step_is_held_back_on_the_device(engine: str, corpus_dir: Path, cache_dir: Path, tmp_path: Path,
                                               one_thread: None) -> None:
    """faults.nan_at_step=5: the update of step 5 never reaches the weights; the event is recorded
    (at the flush after step 7), and the quiet steps still read nothing."""
    counts, _ = syncs_per_step(_overrides(corpus_dir, cache_dir, f"engine={engine}", "faults.nan_at_step=5"),
                               tmp_path)
    assert all(counts[s] == 0 for s in quiet_after_warmup()), counts
    events = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert [(e["step"], e["check"], e["action"]) for e in events] == [(5, "nonfinite_loss", "skip")]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert all(r["train/loss"] is not None and r["train/loss"] == r["train/loss"] for r in rows if r["step"] != 5)
    assert rows[-1]["health/skipped"] == 1


def test_counter_counts_every_kind_of_read() -> None:
    step = [3]
    t = torch.ones(2)
    with counting_reads(step) as counts:
        t.sum().item(), float(t[0]), int(t[0]), bool(t[0]), t.tolist(), t.numpy()
    assert counts == {3: 6}


def test_a_deferred_rollback_restores_the_checkpoint_before_the_fault(corpus_dir: Path, cache_dir: Path,
                                                                       tmp_path: Path, one_thread: None) -> None:
    """nonfinite_loss=rollback with a logging step every 4: step 5's update is held back on the device,
    the flush after step 7 (a checkpoint is due after 8) replays it and rolls back to step 4's checkpoint."""
    overrides = [*_overrides(corpus_dir, cache_dir, "engine=standalone", "faults.nan_at_step=5",
                             "health.nonfinite_loss=rollback")]
    overrides = [o for o in overrides if not o.startswith("checkpoint.")] + ["checkpoint.every_n_steps=4"]
    syncs_per_step(overrides, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert [(e["step"], e["check"], e["action"]) for e in events] == [
        (5, "nonfinite_loss", "rollback"), (7, "rollback", "rollback")], events
    assert events[1]["value"] == 4.0  # back to the checkpoint of step 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert rows[-1]["step"] == STEPS - 1 and rows[-1]["health/rollbacks"] == 1
