"""Curriculum: stage lookup by step, gates held until plateau, the served-step rule, resume."""

from __future__ import annotations

import pickle

import pytest

from sem.training.curriculum import CurriculumManager, Gate, Stage, StageEvent, stage_problems


def three(max_steps: int = 100, gate: Gate | None = None) -> CurriculumManager:
    return CurriculumManager(
        [
            {"name": "short", "seq_len": 64, "batch_size": 32, "lr_scale": 1.0, "fraction": 0.2},
            {"name": "mid", "seq_len": 128, "batch_size": 16, "lr_scale": 0.5, "steps": 30,
             "gate": None if gate is None else vars(gate)},
            {"name": "long", "seq_len": 256, "batch_size": 8, "lr_scale": 0.25},
        ],
        max_steps=max_steps,
    )


def test_lookup_by_step_with_fraction_resolved_and_last_stage_to_the_end():
    cur = three(100)
    assert cur.boundaries() == [0, 20, 50]
    assert [cur.stage_at(s)[1].name for s in (0, 19, 20, 49, 50, 99, 500)] == [
        "short", "short", "mid", "mid", "long", "long", "long"]
    assert cur.shape_at(19) == (64, 32) and cur.shape_at(20) == (128, 16)
    assert cur.lr_scale(49) == 0.5 and cur.lr_scale(50) == 0.25
    assert three(1000).boundaries() == [0, 200, 230]  # fraction follows max_steps, steps do not


def test_dicts_become_dataclasses():
    cur = three(gate=Gate(min_steps=3, window=4, threshold=0.1))
    assert isinstance(cur.stages[1], Stage) and cur.stages[1].gate == Gate(3, 4, 0.1)


def test_single_stage_covers_every_step():
    cur = CurriculumManager.single_stage(seq_len=128, batch_size=4, max_steps=10)
    assert cur.boundaries() == [0]
    assert cur.stage_at(9) == (0, Stage("main", 128, 4)) and cur.shape_at(10_000) == (128, 4)


def test_zero_length_stage_is_skipped():
    cur = CurriculumManager([Stage("a", 8, 1, steps=0), Stage("b", 16, 1)], max_steps=10)
    assert cur.stage_at(0)[1].name == "b"


def _feed(cur: CurriculumManager, steps: range, loss, serve_ahead: int = 0) -> list[StageEvent]:
    """A training loop: the loader builds batch s+serve_ahead before step s's loss is observed."""
    events = []
    for s in steps:
        cur.shape_at(s + serve_ahead)
        events += cur.observe(s, loss(s))
    return events


def falling(s: int) -> float:
    return 100.0 * 0.9**s  # 10% better every step: far from a 1% plateau


def flat(s: int) -> float:
    return 1.0


def test_ungated_boundary_is_announced_at_its_step():
    cur = three(100)
    events = _feed(cur, range(100), flat)
    assert [(e.step, e.kind, e.stage) for e in events] == [
        (20, "stage_end", "short"), (20, "stage_start", "mid"),
        (50, "stage_end", "mid"), (50, "stage_start", "long")]


def test_gate_holds_stage_while_loss_falls_then_releases_on_plateau():
    cur = three(100, gate=Gate(min_steps=0, window=5, threshold=0.01))
    # nominal end of "mid" is 50; the loss keeps falling until step 69, then is flat
    loss = lambda s: falling(s) if s < 70 else falling(70)  # noqa: E731
    events = _feed(cur, range(0, 100), loss)
    assert cur.stage_at(60)[1].name == "mid"  # held past its nominal end
    ends = [e for e in events if e.kind == "stage_end" and e.stage == "mid"]
    assert len(ends) == 1 and "plateau" in ends[0].reason
    # the previous window must be all-flat too: steps 70..79 fill both windows, decided after 79
    assert ends[0].step == 80
    assert cur.boundaries() == [0, 20, 80]
    assert cur.stage_at(79)[1].name == "mid" and cur.stage_at(80)[1].name == "long"


def test_gate_on_plateau_ends_at_nominal_length_not_before():
    cur = three(100, gate=Gate(window=5, threshold=0.01))
    _feed(cur, range(0, 100), flat)  # plateaued from the first window on
    assert cur.boundaries() == [0, 20, 50]


def test_gate_respects_min_steps():
    cur = three(100, gate=Gate(min_steps=45, window=5, threshold=0.01))
    _feed(cur, range(0, 100), flat)
    assert cur.boundaries() == [0, 20, 65]  # 20 + 45, past the nominal 30 steps


def test_gate_decision_never_reshapes_a_batch_already_served():
    cur = three(100, gate=Gate(window=5, threshold=0.01))
    served: dict[int, tuple[int, int]] = {}
    for s in range(120):
        for ahead in (s + 1, s + 2):  # the loader prefetches two steps
            served.setdefault(ahead, cur.shape_at(ahead))
        cur.observe(s, 1.0)
    assert cur.boundaries() == [0, 20, 52]  # decided after step 49, steps 50 and 51 already built
    assert all(cur.shape_at(s) == shape for s, shape in served.items())


def test_gate_ignores_non_finite_losses():
    cur = three(100, gate=Gate(window=5, threshold=0.01))
    # falling, then NaN from step 45 (past nothing: the nominal end is 50), flat from step 60
    loss = lambda s: falling(s) if s < 45 else float("nan") if s < 60 else 0.1  # noqa: E731
    _feed(cur, range(0, 100), loss)
    # NaNs neither release nor reset the gate: ten flat steps 60..69 are needed
    assert cur.boundaries()[2] == 70


def test_state_round_trip_mid_gated_stage_matches_continuous_run():
    gate = Gate(window=5, threshold=0.01)
    loss = lambda s: falling(s) if s < 70 else falling(70)  # noqa: E731
    cont = three(100, gate=gate)
    cont_events = _feed(cont, range(100), loss, serve_ahead=1)

    first = three(100, gate=gate)
    ev = _feed(first, range(62), loss, serve_ahead=1)  # inside the held "mid" stage
    assert first.stage_at(62)[1].name == "mid"
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = three(100, gate=gate)
    resumed.load_state_dict(state)
    ev += _feed(resumed, range(62, 100), loss, serve_ahead=1)
    assert resumed.boundaries() == cont.boundaries() == [0, 20, 81]
    assert ev == cont_events


def test_observing_a_step_twice_is_ignored():
    cur = three(100)
    cur.observe(19, 1.0)
    assert cur.observe(19, 1.0) == []


def test_stage_problems_one_line_each():
    good = [Stage("a", 64, 8, steps=10), Stage("b", 128, 8)]
    assert stage_problems(good, 100, 128) == []
    bad = [
        {"name": "a", "seq_len": 512, "batch_size": 0, "lr_scale": 0.0, "steps": 10, "fraction": 0.1},
        {"name": "a", "seq_len": 64, "batch_size": 8},
        {"name": "c", "seq_len": -1, "batch_size": 8, "steps": 200},
    ]
    lines = stage_problems(bad, 100, 256)
    for needle in ("seq_len=512", "max_seq_len=256", "batch_size=0", "lr_scale=0.0",
                   "duplicate", "stages[1](a): give steps or fraction",
                   "seq_len=-1", "add up to 210"):
        assert any(needle in ln for ln in lines), (needle, lines)
    assert any("unknown keys ['seqlen']" in ln for ln in stage_problems([{"name": "x", "seqlen": 1}], 10, None))
    assert stage_problems([], 10, None) == ["curriculum.stages: empty, give at least one stage"]
    with pytest.raises(ValueError, match="batch_size=0"):
        CurriculumManager(bad, 100)
    # steps win over a preset's fraction (`curriculum.stages.0.steps=300` from the shell just works)
    both = CurriculumManager([Stage("a", 8, 1, steps=10, fraction=0.5), Stage("b", 8, 1)], 100)
    assert both.boundaries() == [0, 10]
