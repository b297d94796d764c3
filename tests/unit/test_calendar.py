"""sem/plan/calendar.py: the dry-run calendar laid out from the run's own schedule objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from sem.plan.calendar import build_calendar, calendar_lines, estimate_seconds
from sem.plan.schedule import phase_spans, plot_schedule
from sem.training.checkpoint import CheckpointManager
from sem.training.curriculum import CurriculumManager
from sem.training.distillation import EMATeacher
from sem.training.scheduler import WSDScheduler

STAGES = [{"name": "short", "seq_len": 64, "batch_size": 8, "lr_scale": 1.0, "steps": 40},
          {"name": "mid", "seq_len": 128, "batch_size": 4, "lr_scale": 0.5, "steps": 30, "checkpoint": True},
          {"name": "long", "seq_len": 256, "batch_size": 2, "lr_scale": 0.25}]


def _calendar(tmp_path: Path, teacher: EMATeacher | None = None, max_steps: int = 100):
    import torch

    cur = CurriculumManager(STAGES, max_steps)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WSDScheduler(opt, max_steps=max_steps, warmup_steps=10, decay_steps=20, lr_scale=cur.lr_scale)
    ckpt = CheckpointManager(tmp_path / "ckpt", every_n_steps=25)

    def stage_at(step: int) -> tuple[str, int, int, bool]:
        _, st = cur.stage_at(step)
        return st.name, st.seq_len, st.batch_size, st.gate is not None

    return build_calendar(
        max_steps=max_steps, base_lr=0.01, multiplier=sched.multiplier, warmup_steps=sched.warmup_steps,
        decay_start=sched.decay_start, decay_steps=sched.decay_steps, stage_at=stage_at,
        stage_starts=cur.boundaries(), val_every=30, checkpoint_due=ckpt.due, save_on_exit=True,
        milestone_stages={"mid"}, teacher_active=(lambda s: teacher.active(s, stage_at(s)[0])) if teacher else None,
        propagator_ramp_steps=20, tokens_per_step_factor=2), sched


def test_segments_follow_phases_and_stages(tmp_path: Path) -> None:
    cal, sched = _calendar(tmp_path)
    got = [(s.start, s.end, s.phase, s.stage, s.seq_len, s.batch_size) for s in cal.segments]
    assert got == [(0, 10, "warmup", "short", 64, 8), (10, 40, "stable", "short", 64, 8),
                   (40, 70, "stable", "mid", 128, 4), (70, 80, "stable", "long", 256, 2),
                   (80, 100, "decay", "long", 256, 2)]
    # LRs are the schedule's own, stage scale included
    for s in cal.segments:
        assert s.lr_start == pytest.approx(0.01 * sched.multiplier(s.start))
        assert s.lr_end == pytest.approx(0.01 * sched.multiplier(s.end - 1))
    assert cal.segments[2].lr_start == pytest.approx(0.005)
    assert cal.val_steps == [30, 60, 90]
    assert cal.checkpoint_steps == [25, 50, 75, 100] and cal.milestones == [(40, "mid")]
    assert cal.tokens == (40 * 512 + 30 * 512 + 30 * 512) * 2
    assert cal.stage_starts == [(0, "short"), (40, "mid"), (70, "long")]
    assert [p for p, _, _ in phase_spans(cal)] == ["warmup", "stable", "decay"]


@pytest.mark.parametrize("n_samples", [2000, 7])
def test_plot_samples_span_the_run(tmp_path: Path, n_samples: int) -> None:
    import torch

    cur = CurriculumManager(STAGES, 100)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WSDScheduler(opt, max_steps=100, warmup_steps=10, decay_steps=20, lr_scale=cur.lr_scale)
    cal = build_calendar(max_steps=100, base_lr=1.0, multiplier=sched.multiplier, warmup_steps=10,
                         decay_start=80, decay_steps=20, stage_at=lambda s: ("x", 8, 2, False),
                         stage_starts=cur.boundaries(), val_every=50, checkpoint_due=lambda s: False,
                         save_on_exit=False, milestone_stages=set(), n_samples=n_samples)
    steps = [s[0] for s in cal.samples]
    assert steps[0] == 0 and steps[-1] == 99 and steps == sorted(set(steps))
    assert {9, 10, 39, 40, 79, 80} <= set(steps)  # both sides of every boundary
    if n_samples >= 100:
        assert steps == list(range(100))
    assert all(lr == pytest.approx(sched.multiplier(s)) for s, lr, _, _ in cal.samples)


def test_teacher_start_is_the_first_active_step(tmp_path: Path) -> None:
    import torch

    teacher = EMATeacher(torch.nn.Linear(2, 2), start_stage="mid", start_step=45, max_steps=2000)
    cal, _ = _calendar(tmp_path, teacher)
    assert cal.teacher_start == 45
    assert _calendar(tmp_path / "b", EMATeacher(torch.nn.Linear(2, 2), start_stage="long", max_steps=2000))[0].teacher_start == 70


def test_estimate_and_lines(tmp_path: Path) -> None:
    cal, _ = _calendar(tmp_path)
    per_step = {(64, 8): 0.1, (128, 4): 0.2, (256, 2): 0.4}
    train, val = estimate_seconds(cal, per_step, per_window=0.01, periodic_windows=10, final_windows=50)
    assert train == pytest.approx((40 * 0.1 + 30 * 0.2 + 30 * 0.4) * 2)  # 2 micro-batches per step
    assert val == pytest.approx((3 * 10 + 50) * 0.01)
    text = "\n".join(calendar_lines(cal, val_every=30, ckpt_every=25, periodic_windows=10, final_windows=50))
    assert "0 .. 9" in text and "warmup" in text and "mid at 40" in text and "30, 60, 90" in text


def test_one_step_run(tmp_path: Path) -> None:
    cal = build_calendar(max_steps=1, base_lr=1.0, multiplier=lambda s: 1.0, warmup_steps=0, decay_start=1,
                         decay_steps=0, stage_at=lambda s: ("main", 8, 2, False), stage_starts=[0], val_every=5,
                         checkpoint_due=lambda s: False, save_on_exit=False, milestone_stages=set())
    assert [(s.start, s.end, s.phase) for s in cal.segments] == [(0, 1, "stable")]
    assert cal.val_steps == [] and cal.checkpoint_steps == [] and cal.tokens == 16
    assert plot_schedule(cal, tmp_path / "p.png", "t").read_bytes()[:4] == b"\x89PNG"


def test_plot_writes_png(tmp_path: Path) -> None:
    cal, _ = _calendar(tmp_path)
    assert plot_schedule(cal, tmp_path / "plots" / "schedule.png", "title").read_bytes()[:4] == b"\x89PNG"
