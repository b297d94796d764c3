"""WSD schedule: the pure multiplier at its edges, the LambdaLR binding, lr_scale, resume."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from sem.training.scheduler import WSDScheduler, problems, resolve_steps, wsd_multiplier


def _opt(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * (g + 1)} for g in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def _run(sched: WSDScheduler, steps: int) -> list[float]:
    """LR used by optimizer steps 0..steps-1, as a training loop would see it."""
    lrs = []
    for _ in range(steps):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return lrs


def m(step: int, **kw) -> float:
    base = dict(max_steps=100, warmup_steps=10, decay_steps=20)
    base.update(kw)
    return wsd_multiplier(step, **base)


def test_warmup_starts_small_nonzero_and_reaches_one():
    assert m(0) == pytest.approx(0.1)
    assert m(4) == pytest.approx(0.5)
    assert m(9) == 1.0
    assert all(m(s) < m(s + 1) for s in range(9))


def test_zero_warmup_starts_at_full_lr():
    assert m(0, warmup_steps=0) == 1.0


def test_stable_phase_is_flat_for_its_whole_length():
    # warmup 0..9, stable 10..79, decay 80..99
    assert [m(s) for s in range(10, 80)] == [1.0] * 70
    assert m(80) < 1.0


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_every_decay_step_trains_above_min_lr_ratio(shape, min_ratio):
    kw = dict(decay_shape=shape, min_lr_ratio=min_ratio)
    decay = [m(s, **kw) for s in range(80, 100)]  # decay_start 80 .. max_steps - 1
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    assert decay[-1] > min_ratio  # the last step trained is not wasted at min (0 by default)
    assert m(99, **kw) == pytest.approx(min_ratio + (1 - min_ratio) * _curve(shape, 20 / 21))
    assert m(100, **kw) == min_ratio  # after the decay
    assert m(150, **kw) == min_ratio


def _curve(shape: str, p: float) -> float:
    return {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "1-sqrt": 1 - math.sqrt(p)}[shape]


def test_linear_decay_to_zero_ends_at_lr_over_decay_plus_one():
    assert m(99) == pytest.approx(1 / 21)
    one = dict(max_steps=10, warmup_steps=0, decay_steps=1)
    assert [wsd_multiplier(s, **one) for s in (8, 9)] == [1.0, pytest.approx(0.5)]


@pytest.mark.parametrize(
    ("shape", "expected"), [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))]
)
def test_decay_shape_midpoint(shape, expected):
    # progress (step - 80 + 1) / 21 = 0.5 at step 89.5: decay_steps=19 puts it on step 89 (10 / 20)
    assert m(89, decay_shape=shape, decay_steps=19, max_steps=99) == pytest.approx(expected)
    assert m(89, decay_shape=shape, decay_steps=19, max_steps=99, min_lr_ratio=0.2) == pytest.approx(
        0.2 + 0.8 * expected)


def test_cosine_and_linear_differ_off_midpoint():
    assert m(84, decay_shape="cosine") > m(84, decay_shape="linear") > m(84, decay_shape="1-sqrt")


def test_zero_decay_stays_flat_to_the_end():
    assert [m(s, decay_steps=0) for s in range(10, 100)] == [1.0] * 90


def test_decay_branch_starts_at_decay_start_step():
    kw = dict(max_steps=1000, decay_steps=20, decay_start_step=400)
    assert m(399, **kw) == 1.0
    assert m(400, **kw) == pytest.approx(20 / 21)
    assert m(419, **kw) == pytest.approx(1 / 21)
    assert m(420, **kw) == 0.0
    assert m(700, **kw) == 0.0


def test_resolve_steps():
    assert resolve_steps(1000, 30, None, "warmup") == 30
    assert resolve_steps(1000, None, 0.3, "decay") == 300
    assert resolve_steps(10, None, 0.25, "decay") == 3  # rounded to nearest (2.5 -> 3)
    assert resolve_steps(100, 3, 0.1, "decay") == 3  # steps win over a preset's fraction
    with pytest.raises(ValueError, match="decay"):
        resolve_steps(100, None, None, "decay")


def test_problems_one_line_each_naming_key_and_value():
    assert problems(100, 10, None, None, 0.3, None, 0.0) == []
    lines = problems(100, 10, 0.1, 95, None, None, 1.5)
    assert not any("warmup_fraction" in ln for ln in lines)  # steps win: both set is not a problem
    assert any("min_lr_ratio=1.5" in ln for ln in lines)
    assert any("scheduler.warmup_steps=10 + scheduler.decay_steps=95" in ln and "more than trainer.max_steps=100" in ln
               for ln in problems(100, 10, None, 95, None, None, 0.0))
    assert any("decay_steps=-1" in ln for ln in problems(100, 0, None, -1, None, None, 0.0))
    assert any("decay_start_step=90" in ln for ln in problems(100, 10, None, 20, None, 90, 0.0))
    assert any("decay_shape='exp'" in ln for ln in problems(100, 0, None, 0, None, None, 0.0, decay_shape="exp"))
    assert all(ln.startswith("sched") for ln in problems(100, None, None, 5, 0.1, -3, -1.0, prefix="sched"))
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WSDScheduler(_opt(), max_steps=100, warmup_steps=1, decay_steps=1, min_lr_ratio=2.0)


def test_scheduler_drives_optimizer_lr_through_the_schedule():
    sched = WSDScheduler(_opt(0.5), max_steps=40, warmup_steps=5, decay_fraction=0.25, min_lr_ratio=0.1)
    lrs = _run(sched, 40)
    assert lrs == pytest.approx([0.5 * sched.multiplier(s) for s in range(40)])
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.5 * (0.1 + 0.9 / 11))  # last trained step: above min_lr_ratio
    assert sched.decay_steps == 10 and sched.decay_start == 30


def test_cosine_preset_has_no_stable_phase():
    sched = WSDScheduler(_opt(), max_steps=50, warmup_steps=10, decay_shape="cosine", min_lr_ratio=0.1)
    assert sched.decay_start == 10 and sched.decay_steps == 40
    assert sched.wsd(9) == 1.0 and sched.wsd(10) < 1.0
    assert sched.wsd(49) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 41)))


def test_constant_preset_is_flat_after_warmup():
    sched = WSDScheduler(_opt(), max_steps=50, warmup_steps=10, decay_steps=0)
    assert [sched.wsd(s) for s in range(9, 50)] == [1.0] * 41


def test_lr_scale_composes_across_a_stage_boundary():
    scale = lambda step: 1.0 if step < 20 else 0.5  # noqa: E731
    opt = _opt(2.0, groups=2)
    sched = WSDScheduler(opt, max_steps=40, warmup_steps=4, decay_steps=10, lr_scale=scale)
    for step in range(40):
        for g, base in zip(opt.param_groups, (2.0, 4.0)):
            assert g["lr"] == pytest.approx(base * sched.wsd(step) * scale(step)), step
        opt.step()
        sched.step()
    assert sched.multiplier(19) == 1.0 and sched.multiplier(20) == 0.5


@pytest.mark.parametrize("k", [0, 3, 17, 35])
def test_resume_from_state_dict_matches_continuous(k):
    kw = dict(max_steps=40, warmup_steps=5, decay_fraction=0.3, decay_shape="cosine", min_lr_ratio=0.1)
    scale = lambda step: 1.0 if step < 12 else 0.25  # noqa: E731
    cont = WSDScheduler(_opt(), lr_scale=scale, **kw)
    full = _run(cont, 40)

    first = WSDScheduler(_opt(), lr_scale=scale, **kw)
    _run(first, k)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    opt = _opt()
    resumed = WSDScheduler(opt, lr_scale=scale, **kw)
    # the restored optimizer state carries some other lr (another config, or a stale value), as
    # Lightning restores optimizers before schedulers: the schedule at the restored step wins
    opt.param_groups[0].update(lr=123.0, initial_lr=123.0)
    resumed.load_state_dict(state)
    assert _run(resumed, 40 - k) == pytest.approx(full[k:])


def test_state_dict_holds_no_callables():
    sched = WSDScheduler(_opt(), max_steps=10, warmup_steps=2, decay_steps=2, lr_scale=lambda s: 1.0)
    state = sched.state_dict()
    assert set(state) == {"last_epoch", "_step_count"}
    assert not any(callable(v) for v in state.values())
    pickle.dumps(state)  # a lambda anywhere inside would fail here


def _cosine(steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def test_scaled_schedule_multiplies_a_chainable_torch_schedule_exactly() -> None:
    """A stage scale of 0.5 from step 4 on halves cosine annealing's LR there, and the schedule itself
    (which computes each LR from the last) goes on as if unscaled."""
    from sem.training.scheduler import ScaledSchedule

    ref_opt, ref = _cosine(10)
    opt, inner = _cosine(10)
    scaled = ScaledSchedule(inner, lambda step: 0.5 if step >= 4 else 1.0)
    for step in range(10):
        want = ref_opt.param_groups[0]["lr"] * (0.5 if step >= 4 else 1.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12), step
        assert scaled.get_last_lr() == [opt.param_groups[0]["lr"]]
        ref_opt.step(), opt.step()
        ref.step(), scaled.step()


def test_scaled_schedule_state_round_trip_resumes_mid_schedule() -> None:
    from sem.training.scheduler import ScaledSchedule

    opt, inner = _cosine(10)
    scaled = ScaledSchedule(inner, lambda step: 0.5)
    for _ in range(6):
        opt.step()
        scaled.step()
    state = scaled.state_dict()
    opt2, inner2 = _cosine(10)
    resumed = ScaledSchedule(inner2, lambda step: 0.5)
    resumed.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    for _ in range(3):
        opt.step(), opt2.step()
        scaled.step(), resumed.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


def test_scaled_schedule_resumes_into_the_schedule_as_configured_now() -> None:
    """OneCycleLR saved at step 10 of 10, resumed with total_steps=20: it follows the new config (the
    checkpoint's total_steps would raise at the next step), as WSD does; WSD state is refused by name."""
    from sem.training.scheduler import ScaledSchedule

    def onecycle(total: int) -> tuple[torch.optim.Optimizer, ScaledSchedule]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        inner = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, cycle_momentum=False)
        return opt, ScaledSchedule(inner, lambda step: 1.0)

    opt, sched = onecycle(10)
    for _ in range(9):
        opt.step()
        sched.step()
    opt2, resumed = onecycle(20)
    resumed.load_state_dict(sched.state_dict())
    for _ in range(5):
        opt2.step()
        resumed.step()  # would raise "Tried to step 11 times" with the checkpoint's total_steps
    assert resumed.last_epoch == 14
    with pytest.raises(ValueError, match="sem's WSD"):
        resumed.load_state_dict({"last_epoch": 3, "_step_count": 4})
