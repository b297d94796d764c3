"""Step budgets: fractions of trainer.max_steps resolved once (sem/training/budget.py), and every
shipped scheduler, curriculum and distillation preset working at any budget with no other override."""

from __future__ import annotations

import logging
import math

import pytest
from hydra.utils import instantiate

from sem.config.validate import validate
from sem.engines.build import resolve_lengths
from sem.training.budget import fraction_steps, length_problems, resolve_budget, stage_lengths
from tests.conftest import CONF, compose_cfg

BUDGETS = (1, 7, 30)
PRESETS = [(group, option.stem) for group in ("scheduler", "curriculum", "distillation")
           for option in sorted((CONF / group).glob("*.yaml"))]


def test_fraction_steps_rounds_to_nearest() -> None:
    assert fraction_steps(0.05, 1000) == 50
    assert fraction_steps(0.05, 30) == 2  # 1.5 -> 2
    assert fraction_steps(0.05, 7) == 0
    assert fraction_steps(0.3, 1) == 0 and fraction_steps(0.5, 1) == 1


def test_stage_fractions_round_at_cumulative_boundaries_and_never_overrun() -> None:
    quarters = [{"fraction": 0.25}, {"fraction": 0.25}, {"fraction": 0.25}, {}]
    # rounded one by one, 0.25 * 2 = 0.5 -> 1 each would add up to 3 > 2
    assert stage_lengths(quarters, 2) == [1, 0, 1, None]
    assert stage_lengths(quarters, 100) == [25, 25, 25, None]
    for n in range(1, 50):
        assert sum(stage_lengths(quarters, n)[:-1]) <= n
    assert stage_lengths([{"steps": 10}, {"fraction": 0.5}, {}], 40) == [10, 20, None]


def test_explicit_steps_win_over_the_preset_fraction() -> None:
    cfg = {"trainer": {"max_steps": 100}, "scheduler": {"warmup_steps": 7, "warmup_fraction": 0.05}}
    out, record = resolve_budget(cfg)
    assert out["scheduler"]["warmup_steps"] == 7 and out["scheduler"]["warmup_fraction"] is None
    assert record == {}  # nothing came from a fraction
    assert cfg["scheduler"]["warmup_fraction"] == 0.05  # the input is not modified


def test_recorded_lengths_win_on_resume_and_the_decay_is_left_alone() -> None:
    cfg = {"trainer": {"max_steps": 650},
           "scheduler": {"warmup_fraction": 0.05, "warmup_steps": None, "decay_fraction": 0.3},
           "model": {"propagator_warmup_fraction": 0.2, "propagator_warmup_steps": None},
           "curriculum": {"stages": [{"name": "a", "fraction": 0.5}, {"name": "b", "fraction": 0.3},
                                     {"name": "c"}]}}
    _, parent = resolve_budget({**cfg, "trainer": {"max_steps": 1000}})
    assert parent == {"scheduler.warmup_steps": 50, "model.propagator_warmup_steps": 200,
                      "curriculum.stages.0.steps": 500, "curriculum.stages.1.steps": 300}
    out, record = resolve_budget(cfg, recorded=parent)
    assert record == parent
    assert out["scheduler"]["warmup_steps"] == 50 and out["scheduler"]["decay_fraction"] == 0.3
    assert out["model"]["propagator_warmup_fraction"] is None  # the steps are the length now
    # stage c would start at 800 > 650: it cannot run in the branch and is dropped; b runs to the end
    assert [(s["name"], s["steps"]) for s in out["curriculum"]["stages"]] == [("a", 500), ("b", None)]


def test_a_stage_with_no_steps_is_dropped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = {"trainer": {"max_steps": 1},
           "curriculum": {"stages": [{"name": "a", "fraction": 0.5}, {"name": "b", "fraction": 0.3},
                                     {"name": "c"}]},
           "distillation": {"teacher": {"start_stage": "b", "start_step": None, "ramp_fraction": 0.5}}}
    with caplog.at_level(logging.WARNING, logger="sem.training.budget"):
        out, _ = resolve_budget(cfg)
    assert [s["name"] for s in out["curriculum"]["stages"]] == ["a"]
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("curriculum:")]
    assert len(dropped) == 2 and "'b'" in dropped[0] and "trainer.max_steps=1" in dropped[0]
    # a teacher meant to start with a dropped stage starts where that stage would have
    teacher = out["distillation"]["teacher"]
    assert teacher["start_stage"] is None and teacher["start_step"] == 1
    assert teacher["ramp_steps"] == 1 and teacher["ramp_fraction"] is None


def test_an_explicit_length_that_cannot_fit_names_both_keys() -> None:
    [line] = length_problems("model.propagator_warmup_steps", 200, "model.propagator_warmup_fraction",
                             None, 30)
    assert "model.propagator_warmup_steps=200" in line and "trainer.max_steps=30" in line
    assert length_problems("a_steps", None, "a_fraction", 1.5, 30) == ["a_fraction=1.5 must be in [0, 1]"]
    assert length_problems("r_steps", 100, "r_fraction", None, 30, may_overrun=True) == []
    cfg = compose_cfg(["trainer.max_steps=30", "scheduler.warmup_steps=100"])
    lines = validate(cfg, instantiate(cfg.data.corpus))
    assert any("scheduler.warmup_steps=100" in ln and "trainer.max_steps=30" in ln for ln in lines), lines


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("group", "option"), PRESETS, ids=[f"{g}={o}" for g, o in PRESETS])
def test_every_preset_works_at_any_budget(group: str, option: str, budget: int) -> None:
    """The preset with nothing else changed but trainer.max_steps: valid, and every step of the run
    gets a stage, a shape and an LR > 0 (no step is wasted at LR 0)."""
    raw = compose_cfg([f"{group}={option}", f"trainer.max_steps={budget}"])
    assert validate(raw, instantiate(raw.data.corpus)) == []
    cfg, _ = resolve_lengths(raw)
    assert validate(cfg, instantiate(cfg.data.corpus)) == []  # the resolved config is still valid
    curriculum = instantiate(cfg.curriculum)
    model = instantiate(cfg.model)
    import torch

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = instantiate(cfg.optimizer)(params=[param])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, lr_scale=curriculum.lr_scale)
    teacher = instantiate(cfg.distillation.teacher)(student=model) if cfg.distillation.teacher else None
    for step in range(budget):
        seq_len, batch = curriculum.shape_at(step)
        assert seq_len > 0 and batch > 0
        lr = optimizer.param_groups[0]["lr"]
        assert lr > 0 and math.isfinite(lr), (step, lr)
        model.set_step(step) if hasattr(model, "set_step") else None
        if teacher is not None and teacher.active(step, curriculum.stage_at(step)[1].name):
            teacher.update(model, step)
        optimizer.step()
        scheduler.step()
