"""HealthMonitor (sem/training/health.py): every check with every action, escalation from skips to a
rollback to a stop, the event log, state that survives a checkpoint, settings errors, and Faults."""

from __future__ import annotations

import io
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from sem.training.health import ACTIONS, Decision, Faults, HealthMonitor

NAN, INF = float("nan"), float("inf")
ALL_OFF: dict[str, Any] = {"nonfinite_loss": None, "nonfinite_grad": None, "loss_spike": {"action": None},
                           "grad_explosion": {"action": None}, "plateau": {"action": None},
                           "stall": {"action": None}, "probes": {"action": None}}
# (loss, grad_norm, seconds) of one bad step after a run of normal ones (loss ~3, norm ~1, 0.1 s)
TRIGGERS = {"nonfinite_loss": (NAN, 1.0, 0.1), "nonfinite_grad": (3.0, INF, 0.1),
            "loss_spike": (300.0, 1.0, 0.1), "grad_explosion": (3.0, 100.0, 0.1), "stall": (3.0, 1.0, 5.0)}


def only(**checks: Any) -> HealthMonitor:
    """A monitor with every check off but the ones given."""
    return HealthMonitor(**{**ALL_OFF, **checks})


def setting(check: str, action: str | None, **thresholds: Any) -> dict[str, Any]:
    return {check: action} if check.startswith("nonfinite") else {check: {"action": action, **thresholds}}


def normal(h: HealthMonitor, n: int = 30, start: int = 0, seed: int = 0) -> int:
    """Feed ``n`` healthy noisy steps (all must pass); returns the next step."""
    rng = random.Random(seed)
    for step in range(start, start + n):
        d = h.check_step(step, 3.0 + 0.05 * rng.gauss(0, 1), 1.0 + 0.05 * rng.gauss(0, 1),
                         0.1 + 0.005 * rng.gauss(0, 1))
        assert d.action == "ok" and not d.events, (step, d)
    return start + n


def summary(d: Decision) -> tuple[str, list[tuple[str, str]]]:
    return d.action, [(e.check, e.action) for e in d.events]


def strict_rows(path: Path) -> list[dict[str, Any]]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ check x action


@pytest.mark.parametrize("action", [*ACTIONS, None])
@pytest.mark.parametrize("check", list(TRIGGERS))
def test_each_step_check_takes_its_action(check: str, action: str | None) -> None:
    h = only(**setting(check, action))
    step = normal(h)
    d = h.check_step(step, *TRIGGERS[check])
    if action is None:  # switched off
        assert summary(d) == ("ok", [])
        return
    assert summary(d) == (action, [(check, action)])
    assert d.apply_update == (action == "warn")
    assert h.metrics()["health/skipped"] == (action == "skip")


@pytest.mark.parametrize("action", [*ACTIONS, None])
def test_plateau_takes_its_action_after_a_flat_window(action: str | None) -> None:
    h = only(plateau={"action": action, "window": 20})
    assert all(h.check_step(s, 3.0 - 0.01 * s, 1.0).action == "ok" for s in range(40))  # improving: fine
    assert all(h.check_step(s, 2.5, 1.0).action == "ok" for s in range(40, 59))  # the window fills
    d = h.check_step(59, 2.5, 1.0)
    taken = {"skip": "warn", "rollback": "warn"}.get(action, action)  # a trend never skips this update
    assert summary(d) == ((taken, [("plateau", taken)]) if action else ("ok", []))
    assert all(h.check_step(s, 2.5, 1.0).action == "ok" for s in range(60, 79))  # one event per window


def test_outliers_are_judged_only_after_min_history() -> None:
    h = only(loss_spike={"action": "skip", "min_history": 20, "extreme_ratio": None},
             grad_explosion={"action": "skip", "min_history": 20},
             stall={"action": "warn", "min_history": 10})
    step = normal(h, 9)
    assert summary(h.check_step(step, 300.0, 100.0, 5.0)) == ("ok", [])  # too little history to judge
    step = normal(h, 20, step + 1)
    assert summary(h.check_step(step, 300.0, 100.0, 5.0)) == (
        "skip", [("loss_spike", "skip"), ("grad_explosion", "skip"), ("stall", "warn")])


@pytest.mark.parametrize(("action", "expected"), [("warn", "warn"), ("skip", "warn"), ("rollback", "warn"),
                                                  ("stop", "stop")])
def test_probes_over_their_limits(action: str, expected: str) -> None:
    h = only(probes={"action": action, "limits": {"sem/max_lambda": 1.0, "sem/unitarity_error": 1e-3}})
    ok = h.check_probes(0, {"sem/max_lambda": 0.99, "sem/unitarity_error": torch.tensor(1e-4), "other": 1e9})
    assert summary(ok) == ("ok", [])
    assert summary(h.check_probes(1, {"other": 1e9})) == ("ok", [])  # a probe not measured is not judged
    d = h.check_probes(2, {"sem/max_lambda": torch.tensor(1.5), "sem/unitarity_error": NAN})
    # the update is already applied: skip and rollback cannot be honoured and become a warning
    assert d.action == expected
    assert [e.check for e in d.events] == ["probe:sem/max_lambda", "probe:sem/unitarity_error"]
    assert d.events[0].value == pytest.approx(1.5) and d.events[0].limit == 1.0


def test_probes_off_or_without_limits_never_fire() -> None:
    assert only(probes={"action": None, "limits": {"x": 1.0}}).check_probes(0, {"x": 5.0}).action == "ok"
    assert only(probes={"action": "stop"}).check_probes(0, {"x": 5.0}).action == "ok"


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_a_downgraded_probe_event_records_the_action_taken(tmp_path: Path, action: str) -> None:
    h = only(probes={"action": action, "limits": {"x": 1.0}})
    h.events_path = tmp_path / "health.jsonl"
    d = h.check_probes(0, {"x": 5.0})
    assert d.action == "warn"
    assert [e.action for e in d.events] == ["warn"]
    assert [r["action"] for r in strict_rows(h.events_path)] == ["warn"]


# --------------------------------------------------------------------------------- escalation


def test_repeated_skips_escalate_to_a_rollback() -> None:
    h = only(loss_spike={"action": "skip"}, escalate_after=3)
    step = normal(h)
    actions = [h.check_step(step + i, 300.0, 1.0).action for i in range(2)]
    step = normal(h, 1, step + 2)  # a good step in between: the count starts again
    decisions = [h.check_step(step + i, 300.0, 1.0) for i in range(3)]
    assert actions + [d.action for d in decisions] == ["skip", "skip", "skip", "skip", "rollback"]
    assert summary(decisions[-1])[1] == [("loss_spike", "skip"), ("repeated", "rollback")]
    assert h.metrics()["health/skipped"] == 4  # the escalated step counts as a rollback, not a skip
    h.rolled_back(step + 2, 10)  # after the reload the count starts again
    assert [h.check_step(step + 3 + i, 300.0, 1.0).action for i in range(3)] == ["skip", "skip", "rollback"]


def test_escalate_after_one_rolls_back_at_once() -> None:
    h = only(nonfinite_grad="skip", escalate_after=1)
    assert summary(h.check_step(0, 3.0, NAN)) == ("rollback", [("nonfinite_grad", "skip"), ("repeated", "rollback")])


def test_rollbacks_beyond_max_rollbacks_stop_the_run() -> None:
    h = only(nonfinite_loss="rollback", max_rollbacks=2, rollback_lr_scale=0.5)
    for step in range(2):
        assert h.check_step(step, NAN, 1.0).action == "rollback"
        h.rolled_back(step, 0)
    assert h.lr_factor == 0.25
    d = h.check_step(2, NAN, 1.0)
    assert summary(d) == ("stop", [("nonfinite_loss", "rollback"), ("max_rollbacks", "stop")])
    assert h.metrics() == {"health/skipped": 0, "health/rollbacks": 2, "health/events": 6,
                           "health/lr_factor": 0.25}


def test_an_escalated_rollback_with_none_allowed_stops() -> None:
    h = only(loss_spike={"action": "skip"}, escalate_after=2, max_rollbacks=0)
    step = normal(h)
    assert h.check_step(step, 300.0, 1.0).action == "skip"
    d = h.check_step(step + 1, 300.0, 1.0)
    assert summary(d) == ("stop", [("loss_spike", "skip"), ("repeated", "rollback"), ("max_rollbacks", "stop")])


def test_each_rollback_scales_the_lr_factor() -> None:
    h = HealthMonitor(rollback_lr_scale=0.5, max_rollbacks=5)
    for i in range(3):
        h.rolled_back(10 * i, 0)
    assert h.lr_factor == pytest.approx(0.125) and h.metrics()["health/lr_factor"] == pytest.approx(0.125)
    assert HealthMonitor().lr_factor == 1.0


@pytest.mark.parametrize("check", ["loss_spike", "grad_explosion"])
@pytest.mark.parametrize("action", ["skip", "warn"])
def test_a_skipped_step_does_not_enter_the_statistics(check: str, action: str) -> None:
    h = only(**setting(check, action, window=40), escalate_after=1000, max_rollbacks=1000)
    step = normal(h)
    flagged = [h.check_step(step + i, *TRIGGERS[check]).action == action for i in range(40)]
    if action == "skip":  # the baseline stays the healthy one: every spike is still a spike
        assert all(flagged)
    else:  # the control: warned steps are applied and remembered, so the spikes become the baseline
        assert flagged[0] and not flagged[-1]


def test_a_stalled_step_does_not_become_the_baseline() -> None:
    h = only(stall={"action": "warn"})
    step = normal(h)
    assert all(h.check_step(step + i, 3.0, 1.0, 5.0).action == "warn" for i in range(30))
    assert h.check_step(step + 30, 3.0, 1.0, 0.1).action == "ok"
    assert h.check_step(step + 31, 3.0, 1.0, None).action == "ok"  # no timing: not judged


# ----------------------------------------------------------------------------------- events


def test_events_go_to_health_jsonl_as_strict_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = HealthMonitor(escalate_after=3)
    h.events_path = tmp_path / "health.jsonl"
    step = normal(h)
    assert not h.events_path.exists()  # healthy steps write nothing
    with caplog.at_level(logging.WARNING, logger="sem.health"):
        h.check_step(step, NAN, 1.0, 0.1)
        h.check_step(step + 1, 3.0, INF, 0.1)
        h.check_step(step + 2, 300.0, 1.0, 0.1)
        h.rolled_back(step + 2, 20)
    rows = strict_rows(h.events_path)
    assert [(r["step"], r["check"], r["action"]) for r in rows] == [
        (30, "nonfinite_loss", "skip"), (31, "nonfinite_grad", "skip"), (32, "loss_spike", "skip"),
        (32, "repeated", "rollback"), (32, "rollback", "rollback")]
    assert rows[0]["value"] == "nan" and rows[1]["value"] == "inf" and rows[2]["value"] == 300.0
    assert all(set(r) == {"step", "check", "action", "value", "limit", "message"} for r in rows)
    assert len(rows) == h.events == h.metrics()["health/events"]
    assert sum("health: step" in r.getMessage() for r in caplog.records) == len(rows)


def test_an_infinite_limit_is_still_strict_json(tmp_path: Path) -> None:
    h = only(probes={"action": "warn", "limits": {"x": INF}})  # catch only a non-finite probe
    h.events_path = tmp_path / "health.jsonl"
    assert h.check_probes(0, {"x": NAN}).action == "warn"
    [row] = strict_rows(h.events_path)
    assert row["check"] == "probe:x"


# ------------------------------------------------------------------------------- checkpoint state

ROUND_TRIP = {"loss_spike": {"action": "skip", "window": 30, "min_history": 10},
              "grad_explosion": {"action": "warn", "window": 30, "min_history": 10},
              "plateau": {"action": "warn", "window": 16}, "stall": {"action": "warn", "window": 10, "min_history": 5},
              "escalate_after": 2, "max_rollbacks": 5, "rollback_lr_scale": 0.5}


def _stream(start: int, n: int) -> list[tuple[int, float, float, float]]:
    rng = random.Random(start)
    bad = {start: (300.0, 1.0, 0.1), start + 3: (NAN, 1.0, 0.1), start + 4: (3.0, NAN, 0.1),
           start + 9: (3.0, 50.0, 0.1), start + 13: (3.0, 1.0, 4.0), start + 21: (300.0, 1.0, 0.1),
           start + n - 1: (300.0, 1.0, 0.1)}  # a checkpoint after a skipped step: one bad step in a row
    return [(s, *bad.get(s, (3.0 - 0.002 * s + 0.05 * rng.gauss(0, 1), 1.0 + 0.05 * rng.gauss(0, 1),
                             0.1 + 0.005 * rng.gauss(0, 1))))
            for s in range(start, start + n)]


def _drive(h: HealthMonitor, stream: list[tuple[int, float, float, float]]) -> list[tuple]:
    out = []
    for step, loss, norm, seconds in stream:
        d = h.check_step(step, loss, norm, seconds)
        out.append((step, *summary(d)))
        if d.action == "rollback":
            h.rolled_back(step, step - 5)
    return out


def test_state_dict_round_trip_gives_the_same_later_decisions() -> None:
    before, after = _stream(0, 40), _stream(40, 40)
    original = HealthMonitor(**ROUND_TRIP)
    _drive(original, before)
    buf = io.BytesIO()
    torch.save({"health": original.state_dict()}, buf)  # as it travels in a checkpoint
    buf.seek(0)
    restored = HealthMonitor(**ROUND_TRIP)
    restored.load_state_dict(torch.load(buf, weights_only=True)["health"])
    expected = _drive(original, after)
    assert _drive(restored, after) == expected
    assert restored.state_dict() == original.state_dict()
    assert {a for _, a, _ in expected} >= {"ok", "skip", "warn", "rollback"}  # the stream exercises the policy
    assert _drive(HealthMonitor(**ROUND_TRIP), after) != expected  # the control: without the state it differs


def test_disabled_monitor_always_says_ok(tmp_path: Path) -> None:
    for h in (HealthMonitor(enabled=False, probes={"action": "stop", "limits": {"x": 1.0}}, nonfinite_loss="stop"),
              HealthMonitor.off()):
        h.events_path = tmp_path / "health.jsonl"
        step = normal(h)
        for i, trigger in enumerate(TRIGGERS.values()):
            assert summary(h.check_step(step + i, *trigger)) == ("ok", [])
        assert summary(h.check_probes(step, {"x": 1e9})) == ("ok", [])
        assert h.events == 0 and not h.events_path.exists()


# ------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"nonfinite_loss": "explode"}, "health.nonfinite_loss='explode'"),
    ({"nonfinite_grad": "ignore"}, "health.nonfinite_grad='ignore'"),
    ({"loss_spike": {"action": "explode"}}, "health.loss_spike.action='explode'"),
    ({"stall": {"action": "retry"}}, "health.stall.action='retry'"),
    ({"loss_spike": {"zz": 1.0}}, "health.loss_spike: unknown keys ['zz']"),
    ({"probes": {"limit": {}}}, "health.probes: unknown keys ['limit']"),
    ({"escalate_after": 0}, "health.escalate_after=0"),
    ({"max_rollbacks": -1}, "health.max_rollbacks=-1"),
    ({"rollback_lr_scale": 0.0}, "health.rollback_lr_scale=0.0"),
    ({"rollback_lr_scale": 1.5}, "health.rollback_lr_scale=1.5"),
])
def test_bad_settings_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as exc:
        HealthMonitor(**kwargs)
    assert key in str(exc.value)


@pytest.mark.parametrize("window", [0, 1])
def test_a_plateau_window_that_cannot_be_halved_is_refused(window: int) -> None:
    with pytest.raises(ValueError, match=r"health\.plateau"):
        HealthMonitor(plateau={"window": window})


@pytest.mark.parametrize("check", ["loss_spike", "grad_explosion", "stall"])
def test_a_window_shorter_than_min_history_is_refused_or_warned(check: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        try:
            HealthMonitor(**{check: {"window": 5, "min_history": 10}})
        except ValueError as exc:
            assert f"health.{check}" in str(exc)
            return
    assert f"health.{check}" in caplog.text


# -------------------------------------------------------------------------------------- faults


def test_faults_hit_only_their_step() -> None:
    faults = Faults(nan_at_step=3, spike_at_step=5, inf_grad_at_step=7)
    for step in range(10):
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        loss = faults.loss(step, (x * x).sum())  # 5.0
        loss.backward()
        if step == 3:
            assert math.isnan(loss.item()) and torch.isnan(x.grad).all()  # reaches the gradients like a real NaN
        elif step == 5:
            assert loss.item() == pytest.approx(500.0)
        else:
            assert loss.item() == 5.0
        no_grad = torch.nn.Parameter(torch.ones(2))
        first = torch.nn.Parameter(torch.ones(2, 3))
        second = torch.nn.Parameter(torch.ones(4))
        first.grad, second.grad = torch.zeros(2, 3), torch.ones(4)
        faults.grads(step, [no_grad, first, second])
        inf_entries = int(torch.isinf(first.grad).sum() + torch.isinf(second.grad).sum())
        assert inf_entries == (1 if step == 7 else 0)
        if step == 7:  # the first gradient there is hit, once, and nothing else changes
            assert math.isinf(first.grad[0, 0]) and first.grad.view(-1)[1:].eq(0).all()
            assert second.grad.eq(1).all() and no_grad.grad is None


def test_no_faults_by_default() -> None:
    faults = Faults()
    loss = torch.tensor(2.0)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for step in range(5):
        assert faults.loss(step, loss).item() == 2.0
        faults.grads(step, [p])
    assert p.grad.eq(1).all()


def test_injected_faults_drive_the_monitor() -> None:
    faults = Faults(nan_at_step=31, spike_at_step=33, inf_grad_at_step=35)
    h = HealthMonitor()
    normal(h)
    actions = {}
    for step in range(30, 37):
        p = torch.nn.Parameter(torch.ones(2))
        loss = faults.loss(step, (p * 1.5).sum())  # 3.0
        loss.backward()
        faults.grads(step, [p])
        actions[step] = h.check_step(step, loss.item(), float(p.grad.norm()), 0.1).action
    assert actions == {30: "ok", 31: "skip", 32: "ok", 33: "skip", 34: "ok", 35: "skip", 36: "ok"}


def test_an_extreme_loss_spike_is_caught_from_the_third_step() -> None:
    """Before min_history: a loss >= extreme_ratio x the median of the steps so far (x100 here) is a
    spike from the 3rd step on; a loss that is merely high early in training is not."""
    h = only(loss_spike={"action": "skip", "min_history": 20})  # extreme_ratio 20 by default
    assert summary(h.check_step(0, 5.6, 1.0)) == ("ok", [])
    assert summary(h.check_step(1, 300.0, 1.0)) == ("ok", [])  # one step seen: nothing to compare with yet
    h = only(loss_spike={"action": "skip", "min_history": 20})
    for step, loss in enumerate([5.6, 5.4]):
        assert summary(h.check_step(step, loss, 1.0)) == ("ok", [])
    assert h.limits()[0] == pytest.approx(20 * 5.5)  # what the device holds an update back for
    assert summary(h.check_step(2, 5.5 * 100, 1.0)) == ("skip", [("loss_spike", "skip")])
    assert summary(h.check_step(3, 5.5 * 19, 1.0)) == ("ok", [])  # 19x: left to the z-score check later
    off = only(loss_spike={"action": "skip", "min_history": 20, "extreme_ratio": None})
    for step, loss in enumerate([5.6, 5.4]):
        off.check_step(step, loss, 1.0)
    assert summary(off.check_step(2, 550.0, 1.0)) == ("ok", [])


@pytest.mark.parametrize("bad", [1.0, 0, -3, "big"])
def test_extreme_ratio_must_be_above_one(bad: Any) -> None:
    with pytest.raises(ValueError, match="extreme_ratio"):
        only(loss_spike={"action": "skip", "extreme_ratio": bad})
