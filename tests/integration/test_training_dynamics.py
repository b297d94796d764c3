"""Curriculum, decay branches and EMA-teacher distillation, end to end through launch.py.

The shapes, LRs and teacher state a user would look for in metrics.jsonl, env.json and the
checkpoints: each launch runs once per module and writes only under tmp folders.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_launch, tiny_data_overrides

LR = 3e-3
# three stages over 24 steps: 8 + 8 + rest, seq_len 16/32/64, constant tokens per step (128)
STAGES = [
    "curriculum=three_stage", "trainer.max_steps=24", "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=12", "checkpoint.every_n_steps=8", f"optimizer.lr={LR}",
    "scheduler.warmup_steps=0", "scheduler.decay_steps=0", "scheduler.decay_fraction=null",
    "curriculum.stages.0.seq_len=16", "curriculum.stages.0.batch_size=8", "curriculum.stages.0.steps=8",
    "curriculum.stages.0.fraction=null",
    "curriculum.stages.1.seq_len=32", "curriculum.stages.1.batch_size=4", "curriculum.stages.1.steps=8",
    "curriculum.stages.1.fraction=null", "curriculum.stages.1.checkpoint=true",
    "curriculum.stages.2.seq_len=64", "curriculum.stages.2.batch_size=2",
    "distillation=ema_teacher", "distillation.teacher.start_stage=s1024",
    "distillation.teacher.ramp_steps=4",
]


def _launch(args: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    return run_launch(args, cwd=cwd, timeout=300, env={"SEM_CACHE_DIR": str(cache_dir)})


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Path:
    cwd = tmp_path_factory.mktemp("staged")
    run_dir = cwd / "run"
    proc = _launch([*tiny_data_overrides(corpus_dir, cache_dir), *STAGES, f"hydra.run.dir={run_dir}"],
                   cwd, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return run_dir


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_shapes_and_lr_change_exactly_at_the_boundaries(staged: Path) -> None:
    train = {r["step"]: r for r in _rows(staged) if "train/loss" in r}
    assert sorted(train) == list(range(24))
    expected = {0: (16, 8, 1.0, "s512"), 8: (32, 4, 0.7, "s1024"), 16: (64, 2, 0.5, "s2048")}
    for step, row in train.items():
        start = max(b for b in expected if b <= step)
        seq_len, batch, scale, name = expected[start]
        assert (row["seq_len"], row["batch_size"], row["stage"]) == (seq_len, batch, name), step
        assert row["lr"] == pytest.approx(LR * scale), step  # flat schedule: base x stage.lr_scale


def test_stage_events_and_milestone_checkpoint(staged: Path) -> None:
    events = [(r["step"], r["event"], r["stage"]) for r in _rows(staged) if "event" in r]
    assert (8, "stage_start", "s1024") in events and (16, "stage_start", "s2048") in events
    milestone = staged / "checkpoints" / "stage_s1024_step_0000008.ckpt"
    assert milestone.exists()
    assert torch.load(milestone, map_location="cpu", weights_only=False)["global_step"] == 8


def test_validation_seq_len_is_fixed(staged: Path) -> None:
    # one val_seq_len for the whole run (data.seq_len), whatever the stage
    cfg = (staged / "config_resolved.yaml").read_text()
    assert "val_seq_len: null" in cfg
    vals = [r for r in _rows(staged) if "val/bpb" in r]
    assert [r["step"] for r in vals] == [12, 24, 24]


def test_distillation_metrics_start_with_the_stage(staged: Path) -> None:
    train = {r["step"]: r for r in _rows(staged) if "train/loss" in r}
    assert all("distill/kl" not in train[s] for s in range(0, 9))  # first s1024 step copies the student
    distilled = [train[s] for s in range(9, 24)]
    assert all("distill/kl" in r and r["distill/kl"] >= 0 for r in distilled)
    assert distilled[0]["distill/kl"] == pytest.approx(0.0, abs=1e-6)  # teacher == student right after the copy
    assert max(r["distill/kl"] for r in distilled) > 0
    decays = [r["distill/teacher_decay"] for r in distilled]
    assert decays == sorted(decays) and decays[-1] == pytest.approx(0.999)


def test_checkpoint_holds_teacher_and_curriculum(staged: Path) -> None:
    ckpt = torch.load(staged / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sem = ckpt["sem"]
    teacher = sem["teacher"]
    assert teacher is not None and sem["curriculum"] is not None
    weights = next(v for v in teacher.values() if isinstance(v, dict))
    student = ckpt["state_dict"]
    # same tensors by name (the student's are prefixed "model."), different values: a real EMA
    shared = [k for k in weights if f"model.{k}" in student]
    assert shared
    assert any(not torch.equal(weights[k], student[f"model.{k}"]) for k in shared)


@pytest.fixture(scope="module")
def staged_resumed(staged: Path, corpus_dir: Path, cache_dir: Path) -> Path:
    """The staged run again from its step-16 checkpoint (in stage s2048), into a new directory."""
    run_dir = staged.parent / "resumed"
    proc = _launch([*tiny_data_overrides(corpus_dir, cache_dir), *STAGES, f"hydra.run.dir={run_dir}",
                    f"resume={staged / 'checkpoints' / 'step_0000016.ckpt'}"], staged.parent, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return run_dir


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_resume_restores_curriculum_and_teacher(staged: Path, staged_resumed: Path) -> None:
    train = {r["step"]: r for r in _rows(staged_resumed) if "train/loss" in r}
    assert sorted(train) == list(range(16, 24))
    assert all(r["stage"] == "s2048" and r["seq_len"] == 64 for r in train.values())
    # The teacher was switched on by stage s1024, which a fresh teacher would never see again:
    # distillation at step 16 proves the teacher (weights, activation, decay) came from the checkpoint.
    original = {r["step"]: r for r in _rows(staged) if "train/loss" in r}
    for step in range(16, 24):
        assert train[step]["distill/teacher_decay"] == pytest.approx(original[step]["distill/teacher_decay"])
    assert train[16]["distill/kl"] == pytest.approx(original[16]["distill/kl"], rel=1e-3, abs=1e-6)


# ----------------------------------------------------------------------- decay branches (WSD)


@pytest.fixture(scope="module")
def branches(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
             ) -> tuple[Path, Path]:
    cwd = tmp_path_factory.mktemp("branch")
    base = cwd / "base"
    common = [*tiny_data_overrides(corpus_dir, cache_dir), "trainer.log_every_n_steps=1",
              "scheduler.warmup_steps=2", f"optimizer.lr={LR}"]
    proc = _launch([*common, "trainer.max_steps=16", "checkpoint.every_n_steps=8",
                    f"hydra.run.dir={base}"], cwd, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = base / "checkpoints" / "step_0000008.ckpt"
    sweep = cwd / "sweep"
    proc = _launch(["-m", *common, f"resume={parent}", "scheduler.decay_start_step=8",
                    "scheduler.decay_fraction=null", "scheduler.decay_steps=4", "trainer.max_steps=12",
                    "scheduler.decay_shape=linear,1-sqrt", f"hydra.sweep.dir={sweep}"], cwd, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return parent, sweep


@pytest.mark.slow
def test_decay_branches_record_parent_and_decay_at_once(branches: tuple[Path, Path]) -> None:
    parent, sweep = branches
    lrs = {}
    for job, shape in (("0", "linear"), ("1", "1-sqrt")):
        run = sweep / job
        assert json.loads((run / "env.json").read_text())["parent_checkpoint"] == str(parent.resolve())
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        train = {r["step"]: r["lr"] for r in _rows(run) if "train/loss" in r}
        assert min(train) == 8  # resumed at the parent's step
        lrs[shape] = [train[s] for s in range(8, 12)]
        assert lrs[shape][0] < LR and lrs[shape][-1] > 0.0  # no step is wasted at LR 0
        assert lrs[shape] == sorted(lrs[shape], reverse=True)
    assert lrs["linear"] == pytest.approx([LR * 0.8, LR * 0.6, LR * 0.4, LR * 0.2])
    assert lrs["1-sqrt"] != pytest.approx(lrs["linear"])


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_decay_branch_keeps_the_parents_fraction_boundaries(tmp_path: Path, corpus_dir: Path,
                                                            cache_dir: Path) -> None:
    """Fractions are resolved once, against the parent's trainer.max_steps=40 (warm-up 2 steps, stages
    at 20 and 32); a branch with trainer.max_steps=24 keeps them. Resolved afresh against 24 they
    would be 1 warm-up step and stages at 12 and 19."""
    common = [*tiny_data_overrides(corpus_dir, cache_dir), "curriculum=three_stage", "trainer.log_every_n_steps=1",
              "scheduler.warmup_steps=null", "curriculum.stages.0.seq_len=16", "curriculum.stages.0.batch_size=8",
              "curriculum.stages.1.seq_len=32", "curriculum.stages.1.batch_size=4",
              "curriculum.stages.2.seq_len=64", "curriculum.stages.2.batch_size=2"]
    parent = tmp_path / "parent"
    proc = _launch([*common, "trainer.max_steps=40", "checkpoint.every_n_steps=10", "checkpoint.keep_last=4",
                    "trainer.val_check_interval=20", f"hydra.run.dir={parent}"], tmp_path, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ckpt = parent / "checkpoints" / "step_0000010.ckpt"
    recorded = torch.load(ckpt, map_location="cpu", weights_only=True)["sem"]["budget"]
    assert recorded == {"scheduler.warmup_steps": 2, "curriculum.stages.0.steps": 20,
                        "curriculum.stages.1.steps": 12, "model.propagator_warmup_steps": 8}
    branch = tmp_path / "branch"
    proc = _launch([*common, f"resume={ckpt}", "trainer.max_steps=24", "scheduler.decay_start_step=10",
                    "scheduler.decay_fraction=null", "scheduler.decay_steps=14", "trainer.val_check_interval=12",
                    f"hydra.run.dir={branch}"], tmp_path, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    train = {r["step"]: r for r in _rows(branch) if "train/loss" in r}
    assert sorted(train) == list(range(10, 24))
    assert [train[s]["stage"] for s in range(10, 24)] == ["s512"] * 10 + ["s1024"] * 4
    resolved = (branch / "config_resolved.yaml").read_text()
    assert "warmup_steps: 2\n" in resolved and "propagator_warmup_steps: 8\n" in resolved


# ------------------------------------------------------------------------------ a failing run


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_nan_loss_fails_a_strict_run_with_a_reason(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _launch([*tiny_data_overrides(corpus_dir, cache_dir), "faults.nan_at_step=3", "health=strict",
                    f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())  # strict JSON
    assert summary["status"] == "failed" and "step 3" in summary["error"]
    assert "HealthStop" in summary["error"] and "nonfinite_loss" in summary["error"]
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))


# ------------------------------------------------------------------- gradient accumulation


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_accumulation_counts_optimizer_steps(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    """With accumulate_grad_batches=2, rows, validation and the EMA teacher's decay ramp all count
    optimizer steps, not micro-batches (the once-per-step update guard is unit-tested)."""
    run_dir = tmp_path / "run"
    proc = _launch([*tiny_data_overrides(corpus_dir, cache_dir), "trainer.accumulate_grad_batches=2",
                    "trainer.log_every_n_steps=1", "distillation=ema_teacher",
                    "distillation.teacher.ramp_steps=100", f"hydra.run.dir={run_dir}"], tmp_path, cache_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = _rows(run_dir)
    train = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train) == list(range(12))
    assert [r["step"] for r in rows if "val/bpb" in r] == [6, 12, 12]
    # teacher activated (copied) at step 0; its ramp advances once per optimizer step
    for step in range(1, 12):
        assert train[step]["distill/teacher_decay"] == pytest.approx(0.99 + 0.009 * step / 100)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12


# ------------------------------------------------------------------- resume into the same run


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_resume_auto_continues_the_run_without_duplicate_rows(tmp_path: Path, corpus_dir: Path,
                                                              cache_dir: Path) -> None:
    """A run stopped at step 8 (checkpoints every 5: the final step is saved anyway) is continued
    to step 12 by the same command with resume=auto: each step appears once in metrics.jsonl."""
    common = [*tiny_data_overrides(corpus_dir, cache_dir), "run.name=again", "trainer.log_every_n_steps=1",
              "checkpoint.every_n_steps=5", "scheduler.decay_fraction=null", "scheduler.decay_steps=0"]
    first = _launch([*common, "trainer.max_steps=8"], tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "again"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 8
    second = _launch([*common, "trainer.max_steps=12", "resume=auto"], tmp_path, cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = _rows(run_dir)
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(12))
    assert [r["step"] for r in rows if r.get("final")] == [12]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["status"] == "completed"


@pytest.mark.slow  # two launches, ~5 s each
@pytest.mark.parametrize("engine", ["lightning", "standalone"])
def test_an_extreme_spike_is_caught_before_min_history(tmp_path: Path, corpus_dir: Path, cache_dir: Path,
                                                       engine: str) -> None:
    """A x100 loss at step 3 (min_history is 20): skipped, judged against the 3 steps before it."""
    run_dir = tmp_path / engine
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), "faults.spike_at_step=3", f"engine={engine}",
                       "logger=none", "sample.n=0", f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=300,
                      env={"SEM_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "health.jsonl").read_text().splitlines()]
    assert [(e["step"], e["check"], e["action"]) for e in events] == [(3, "loss_spike", "skip")], events
