"""Stopping and resuming a run, end to end through launch.py as a user (or a scheduler) does it.

SIGKILL at random steps, stop signals (SIGTERM, SIGUSR1, SIGINT, a second SIGINT), a gate decided
but not yet reached, the health policy against injected faults, and resume input that must be
refused. A resumed run must give the same per-step training loss as an uninterrupted one: training
draws its randomness (dropout) from a seed per step, so nothing may shift when a run restarts.

Each launch runs once per module (module-scoped fixtures) or once per test, and writes only under
tmp folders.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sem.training.checkpoint import CheckpointManager, verify
from tests.conftest import ROOT, run_launch, tiny_data_overrides

# Everything a resume must restore at once: dropout, a gated two-stage curriculum with a milestone
# checkpoint at the second stage, and an EMA teacher (a second set of weights outside the model).
RESUME_CFG = [
    "trainer.log_every_n_steps=1", "model.dropout=0.1", "distillation=ema_teacher",
    "curriculum=two_stage", "curriculum.stages.0.seq_len=16", "curriculum.stages.0.batch_size=8",
    "curriculum.stages.1.seq_len=32", "curriculum.stages.1.batch_size=4", "curriculum.stages.0.fraction=0.2",
    "+curriculum.stages.0.gate={window:3,threshold:0.5,min_steps:6}", "curriculum.stages.1.checkpoint=true",
]
TOL = 1e-6  # per-step train/loss of a resumed run vs an uninterrupted one


# --------------------------------------------------------------------------------- helpers


def _env(cache_dir: Path) -> dict[str, str]:
    return {"SEM_CACHE_DIR": str(cache_dir)}


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def _config_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("config error:")]


class Running:
    """launch.py in the background (stdout and stderr into one log file), to signal or kill."""

    def __init__(self, args: list[str], cwd: Path, cache_dir: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
        env.update(_env(cache_dir), PYTHONUNBUFFERED="1")
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_for_step(self, metrics: Path, step: int, timeout: float = 120) -> bool:
        """True once metrics.jsonl has a train row for ``step`` or later; False if the process
        ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _last_train_step(metrics) >= step:
                return True
            time.sleep(0.005)
        raise TimeoutError(f"no train row for step {step} after {timeout} s:\n{self.output()[-3000:]}")

    def wait_for_text(self, text: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                return text in self.output()
            time.sleep(0.002)
        return False

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _last_train_step(metrics: Path) -> int:
    """The highest step with a train row so far (-1: none); a torn last line is ignored."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return -1
    best = -1
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in row:
            best = max(best, row["step"])
    return best


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, strictly: a torn line left behind by a killed attempt fails here."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss; each step must appear once."""
    train = [r for r in _rows(run_dir) if "train/loss" in r]
    steps = [r["step"] for r in train]
    assert len(steps) == len(set(steps)), f"duplicate train rows in {run_dir}: {steps}"
    return {r["step"]: r["train/loss"] for r in train}


def _events(run_dir: Path) -> list[tuple[int, str, str, str]]:
    return [(r["step"], r["event"], r["stage"], r["reason"]) for r in _rows(run_dir) if "event" in r]


def _assert_same_losses(run_dir: Path, reference: dict[int, float], steps: range | None = None) -> None:
    got = _losses(run_dir)
    steps = steps if steps is not None else range(max(reference) + 1)
    assert sorted(got) == list(steps), (run_dir.name, sorted(set(steps) ^ set(got)))
    diffs = {s: abs(got[s] - reference[s]) for s in steps}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{run_dir.name}: step {worst}: {got[worst]} vs {reference[worst]}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{a} vs {b}: {different[:5]}"


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values()
               if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()))


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _health(run_dir: Path) -> list[dict[str, Any]]:
    """health.jsonl without stall warnings (a busy shared machine makes some steps slow)."""
    rows = [json.loads(line) for line in (run_dir / "health.jsonl").read_text().splitlines()]
    return [r for r in rows if r["check"] != "stall"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _ckpt(run_dir: Path, step: int, stage: str | None = None) -> Path:
    name = f"step_{step:07d}.ckpt" if stage is None else f"stage_{stage}_step_{step:07d}.ckpt"
    return run_dir / "checkpoints" / name


# ------------------------------------------------- 1) SIGKILL at random steps (slow, still in CI)


KILL_STEPS = 45  # ~40 ms a step on 2 CPU cores with a save every 3 (fsync): ~2 s to land a kill in
KILL_TRIALS = 6


@dataclass
class KillTrial:
    target: int
    killed_after: int  # last step with a train row when the process died
    resumed_from: str | None  # the checkpoint the second attempt started from (None: fresh start)
    max_loss_diff: float = math.nan
    identical: bool = False


@pytest.mark.slow
def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path: Path, corpus_dir: Path,
                                                          cache_dir: Path) -> None:
    """An uninterrupted reference, then per trial: SIGKILL once a random step has run, relaunch the
    same command with resume=auto, and compare every step's train/loss, the curriculum's stage
    events and the final weights with the reference."""
    args = [*tiny_data_overrides(corpus_dir, cache_dir), *RESUME_CFG, f"trainer.max_steps={KILL_STEPS}",
            "trainer.val_check_interval=15", "checkpoint.every_n_steps=3"]
    outputs = tmp_path / "outputs"
    ref = run_launch([*args, "run.name=ref"], cwd=tmp_path, timeout=300, env=_env(cache_dir))
    assert ref.returncode == 0, _output(ref)[-3000:]
    ref_losses, ref_events = _losses(outputs / "ref"), _events(outputs / "ref")
    assert sorted(ref_losses) == list(range(KILL_STEPS))
    assert [e[1] for e in ref_events] == ["stage_end", "stage_start"]  # the gate fired in the reference

    rng = random.Random(1234)
    width = KILL_STEPS // KILL_TRIALS  # one target in each slice of the run: early, at the gate, late
    targets = [rng.randrange(i * width, (i + 1) * width) for i in range(KILL_TRIALS)]
    trials: list[KillTrial] = []
    non_trials = 0
    for i, target in enumerate(targets):
        for attempt in range(4):
            name = f"trial{i}" if attempt == 0 else f"trial{i}_retry{attempt}"
            run_dir = outputs / name
            running = Running([*args, f"run.name={name}"], tmp_path, cache_dir, tmp_path / f"{name}.log")
            reached = running.wait_for_step(run_dir / "metrics.jsonl", target)
            if reached:
                running.proc.kill()
            rc = running.wait()
            finished = (run_dir / "summary.json").exists() and _summary(run_dir)["status"] == "completed"
            if not reached or rc != -signal.SIGKILL or finished:
                assert rc in (0, -signal.SIGKILL), running.output()[-3000:]
                non_trials += 1  # the run got to the end first: not a kill mid-run, try earlier
                target = max(0, target - 2 * width)
                continue
            trial = KillTrial(target, _last_train_step(run_dir / "metrics.jsonl"), None)
            resumed = run_launch([*args, f"run.name={name}", "resume=auto"], cwd=tmp_path, timeout=300,
                                 env=_env(cache_dir))
            assert resumed.returncode == 0, (name, _output(resumed)[-3000:])
            attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
            trial.resumed_from = attempts[-1]["resumed_from"]
            got = _losses(run_dir)
            trial.max_loss_diff = max(abs(got[s] - ref_losses[s]) for s in ref_losses if s in got)
            trials.append(trial)
            print(f"kill trial {i}: target {target}, killed after step {trial.killed_after}, resumed "
                  f"from {Path(trial.resumed_from).name if trial.resumed_from else 'scratch'}, "
                  f"max |diff| {trial.max_loss_diff:.3g}")
            _assert_same_losses(run_dir, ref_losses)
            assert _events(run_dir) == ref_events, name
            _assert_same_weights(outputs / "ref" / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
            assert _summary(run_dir)["status"] == "completed"
            trial.identical = True
            break
    print(f"SIGKILL: {len(trials)} trials, {sum(t.identical for t in trials)} identical, "
          f"{non_trials} kills landed after the end (retried earlier)")
    assert len(trials) >= 5
    # a late kill resumed from a checkpoint, not from scratch
    assert any(t.resumed_from is not None and t.killed_after > KILL_STEPS // 2 for t in trials)
    assert all(t.identical for t in trials)


# --------------------------------------------- 2) a gate decided, its boundary not reached yet


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
          ) -> tuple[Path, list[str]]:
    """A gated run saving after every step, so one checkpoint falls between the gate's decision and
    the boundary it decided (the loader had already built the next batches at the old shape)."""
    cwd = tmp_path_factory.mktemp("gated")
    args = [*tiny_data_overrides(corpus_dir, cache_dir), *RESUME_CFG, "trainer.max_steps=20",
            "trainer.val_check_interval=10", "checkpoint.every_n_steps=1", "checkpoint.keep_last=30"]
    proc = run_launch([*args, "run.name=orig"], cwd=cwd, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 0, _output(proc)[-3000:]
    return cwd / "outputs" / "orig", args


def _between_decision_and_boundary(run_dir: Path) -> Path | None:
    for path in sorted((run_dir / "checkpoints").glob("step_*.ckpt")):
        cur = torch.load(path, map_location="cpu", weights_only=True)["sem"]["curriculum"]
        if "0" in cur["gate_ends"] and cur["announced"] == 0:  # decided, not reached
            return path
    return None


@pytest.fixture(scope="module")
def gated_resumed(gated: tuple[Path, list[str]], cache_dir: Path) -> tuple[Path, Path, str]:
    orig, args = gated
    ckpt = _between_decision_and_boundary(orig)
    assert ckpt is not None, sorted(p.name for p in (orig / "checkpoints").iterdir())
    proc = run_launch([*args, "run.name=from_gap", f"resume={ckpt}"], cwd=orig.parent.parent, timeout=300,
                      env=_env(cache_dir))
    assert proc.returncode == 0, _output(proc)[-3000:]
    return ckpt, orig.parent / "from_gap", _output(proc)


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_gate_checkpoint_before_the_boundary_still_starts_the_stage(
        gated: tuple[Path, list[str]], gated_resumed: tuple[Path, Path, str]) -> None:
    orig, _ = gated
    ckpt, resumed, output = gated_resumed
    events = _events(orig)
    assert [(e[1], e[2]) for e in events] == [("stage_end", "short"), ("stage_start", "long")]
    boundary = events[0][0]
    saved_at = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    print(f"gate: boundary at step {boundary}, resumed from the checkpoint of step {saved_at}")
    assert saved_at < boundary
    assert _events(resumed) == events  # the boundary, its reason and both rows, in the resumed run
    assert _ckpt(resumed, boundary, "long").exists(), sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert "curriculum: stage start 'long'" in output
    _assert_same_losses(resumed, _losses(orig), range(saved_at, 20))
    shapes = {r["step"]: r["seq_len"] for r in _rows(resumed) if "train/loss" in r}
    assert all(shapes[s] == (16 if s < boundary else 32) for s in shapes)


# ------------------------------------------------ 3, 4) stop signals: exit 75, saved, resumable


SIGNAL_STEPS = 100
SIGNAL_CFG = [*RESUME_CFG, f"trainer.max_steps={SIGNAL_STEPS}", "trainer.val_check_interval=25",
              "checkpoint.every_n_steps=25"]  # sparse: the stop's checkpoint is its own, not a periodic one
STOP_AT = {"SIGTERM": 15, "SIGUSR1": 40, "SIGINT": 60}  # before the gate, after it, later


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def signal_args(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return [*tiny_data_overrides(corpus_dir, cache_dir), *SIGNAL_CFG]


@pytest.fixture(scope="module")
def reference(work: Path, signal_args: list[str], cache_dir: Path) -> Path:
    """The uninterrupted run the stopped-and-resumed ones must match, step for step."""
    proc = run_launch([*signal_args, "run.name=ref"], cwd=work, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 0, _output(proc)[-3000:]
    return work / "outputs" / "ref"


@dataclass
class Stopped:
    name: str
    run_dir: Path
    returncode: int
    seconds_to_exit: float
    output: str
    summary: dict[str, Any]
    checkpoints: list[str]
    stop_ckpt_step: int | None  # global_step inside step_<summary steps>.ckpt (verified)
    last_train_step: int
    env_json: str
    attempts: int


@pytest.fixture(scope="module", params=list(STOP_AT))
def stopped(request: pytest.FixtureRequest, work: Path, signal_args: list[str], cache_dir: Path) -> Stopped:
    """The run stopped by one signal once step STOP_AT[sig] has run; what it left, before resuming."""
    name = request.param
    run_dir = work / "outputs" / name.lower()
    running = Running([*signal_args, f"run.name={name.lower()}"], work, cache_dir, work / f"{name}.log")
    assert running.wait_for_step(run_dir / "metrics.jsonl", STOP_AT[name]), running.output()[-3000:]
    sent = time.monotonic()
    running.send(getattr(signal, name))
    rc = running.wait(timeout=60)
    seconds = time.monotonic() - sent
    print(f"{name}: exit {rc} {seconds:.2f} s after the signal")
    summary = _summary(run_dir)
    stop_ckpt = _ckpt(run_dir, summary["steps"]) if isinstance(summary.get("steps"), int) else None
    step_in_ckpt = verify(stop_ckpt)["global_step"] if stop_ckpt is not None and stop_ckpt.exists() else None
    return Stopped(name, run_dir, rc, seconds, running.output(), summary,
                   sorted(p.name for p in (run_dir / "checkpoints").iterdir()), step_in_ckpt,
                   _last_train_step(run_dir / "metrics.jsonl"), (run_dir / "env.json").read_text(),
                   len((run_dir / "attempts.jsonl").read_text().splitlines()))


@pytest.fixture(scope="module")
def stopped_resumed(stopped: Stopped, work: Path, signal_args: list[str], cache_dir: Path
                    ) -> subprocess.CompletedProcess:
    return run_launch([*signal_args, f"run.name={stopped.name.lower()}", "resume=auto"], cwd=work, timeout=300,
                      env=_env(cache_dir))


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_signal_exits_75_within_seconds(stopped: Stopped) -> None:
    assert stopped.returncode == 75, stopped.output[-3000:]
    assert stopped.seconds_to_exit < 10
    assert "Traceback" not in stopped.output
    assert f"{stopped.name} received" in stopped.output


def test_signal_leaves_a_preempted_summary_and_the_stop_checkpoint(stopped: Stopped) -> None:
    s = stopped.summary
    assert s["status"] == "preempted", s
    assert STOP_AT[stopped.name] < s["steps"] < SIGNAL_STEPS, s  # stopped mid-run, after the target
    assert stopped.name in s["error"] and f"step {s['steps']}" in s["error"], s
    # the step it stopped after is saved (verified: sidecar sha256, weights-only, finite) and is last
    assert stopped.stop_ckpt_step == s["steps"], stopped.checkpoints
    assert s["last_checkpoint"] == str(_ckpt(stopped.run_dir, s["steps"]))
    assert stopped.last_train_step == s["steps"] - 1  # the step in flight was finished, none after
    assert stopped.attempts == 1


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_resume_after_signal_matches_an_uninterrupted_run(stopped: Stopped,
                                                          stopped_resumed: subprocess.CompletedProcess,
                                                          reference: Path) -> None:
    """Dropout 0.1, a gate and a teacher: every step's loss as if never stopped (the non-slow twin of
    the SIGKILL trials)."""
    assert stopped_resumed.returncode == 0, _output(stopped_resumed)[-3000:]
    assert yaml.safe_load((stopped.run_dir / "config_resolved.yaml").read_text())["model"]["dropout"] == 0.1
    _assert_same_losses(stopped.run_dir, _losses(reference))
    assert _events(stopped.run_dir) == _events(reference)
    _assert_same_weights(reference / "checkpoints" / "last.ckpt", stopped.run_dir / "checkpoints" / "last.ckpt")
    s = _summary(stopped.run_dir)
    assert s["status"] == "completed" and s["steps"] == SIGNAL_STEPS and "error" not in s, s


def test_each_attempt_is_recorded_and_env_json_is_the_first(stopped: Stopped,
                                                            stopped_resumed: subprocess.CompletedProcess) -> None:
    assert stopped_resumed.returncode == 0
    attempts = [json.loads(line) for line in (stopped.run_dir / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == stopped.attempts + 1 == 2
    assert attempts[0]["resumed_from"] is None
    assert attempts[1]["resumed_from"] == str(_ckpt(stopped.run_dir, stopped.summary["steps"]))
    assert (stopped.run_dir / "env.json").read_text() == stopped.env_json


def test_stop_signal_does_not_validate_off_schedule(stopped: Stopped,
                                                    stopped_resumed: subprocess.CompletedProcess,
                                                    reference: Path) -> None:
    """Finish the step, save, exit: validation belongs to trainer.val_check_interval (every 25)."""
    assert stopped_resumed.returncode == 0
    stop = stopped.summary["steps"]
    assert stop % 25 != 0  # (a stop on a validation step would validate anyway)
    assert f"validation at step {stop} " not in stopped.output
    val_steps = [r["step"] for r in _rows(stopped.run_dir) if "val/bpb" in r]
    assert val_steps == [r["step"] for r in _rows(reference) if "val/bpb" in r]


def test_second_sigint_exits_at_once(work: Path, signal_args: list[str], cache_dir: Path) -> None:
    run_dir = work / "outputs" / "twice"
    running = Running([*signal_args, "run.name=twice"], work, cache_dir, work / "twice.log")
    assert running.wait_for_step(run_dir / "metrics.jsonl", 30), running.output()[-3000:]
    running.send(signal.SIGINT)
    assert running.wait_for_text("SIGINT received"), running.output()[-3000:]
    sent = time.monotonic()
    running.send(signal.SIGINT)
    rc = running.wait(timeout=60)
    seconds = time.monotonic() - sent
    print(f"second SIGINT: exit {rc} {seconds:.2f} s after it")
    assert rc not in (0, 75), running.output()[-3000:]  # not a normal end, not the graceful stop
    assert seconds < 3  # measured: well under 0.1 s (the graceful path takes about 1 s)
    assert "exiting now" in running.output()
    found = CheckpointManager(run_dir / "checkpoints").newest_valid()
    assert found is not None  # the last complete checkpoint (periodic at 25) survives and verifies
    path, payload = found
    assert payload["global_step"] >= 25
    assert verify(run_dir / "checkpoints" / "last.ckpt")["global_step"] >= 25  # the pointer too


# ----------------------------------------------------------- 5) injected faults x health actions


FAULT_STEP = 10
FAULT_CFG = ["trainer.max_steps=24", "trainer.log_every_n_steps=1", "trainer.val_check_interval=12",
             "checkpoint.every_n_steps=4", "checkpoint.keep_last=10"]
SPIKE = [f"faults.spike_at_step={FAULT_STEP}", "health.loss_spike.min_history=5"]

# case: (overrides, exit code, the (check, action) event expected at the faulted step)
FAULTS: dict[str, tuple[list[str], int, tuple[str, str]]] = {
    "nan-default-skip": ([f"faults.nan_at_step={FAULT_STEP}"], 0, ("nonfinite_loss", "skip")),
    "nan-rollback": ([f"faults.nan_at_step={FAULT_STEP}", "health.nonfinite_loss=rollback"], 0,
                     ("nonfinite_loss", "rollback")),
    "nan-strict-stop": ([f"faults.nan_at_step={FAULT_STEP}", "health=strict"], 1, ("nonfinite_loss", "stop")),
    "inf-grad-skip": ([f"faults.inf_grad_at_step={FAULT_STEP}", "health.nonfinite_grad=skip"], 0,
                      ("nonfinite_grad", "skip")),
    "inf-grad-stop": ([f"faults.inf_grad_at_step={FAULT_STEP}", "health.nonfinite_grad=stop"], 1,
                      ("nonfinite_grad", "stop")),
    "spike-skip": ([*SPIKE, "health.loss_spike.action=skip"], 0, ("loss_spike", "skip")),
    "spike-rollback": ([*SPIKE, "health.loss_spike.action=rollback"], 0, ("loss_spike", "rollback")),
    "spike-stop": ([*SPIKE, "health.loss_spike.action=stop"], 1, ("loss_spike", "stop")),
    "spike-warn": ([*SPIKE, "health.loss_spike.action=warn"], 0, ("loss_spike", "warn")),
}


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
@pytest.mark.parametrize("case", list(FAULTS))
def test_fault_meets_its_health_action(case: str, tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    overrides, code, (check, action) = FAULTS[case]
    run_dir = tmp_path / "outputs" / "fault"
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), *FAULT_CFG, *overrides, "run.name=fault"],
                      cwd=tmp_path, timeout=300, env=_env(cache_dir))
    print(f"fault {case}: exit {proc.returncode}")
    assert proc.returncode == code, _output(proc)[-3000:]
    assert "Traceback" not in _output(proc)
    events = _health(run_dir)
    assert any((e["step"], e["check"], e["action"]) == (FAULT_STEP, check, action) for e in events), events
    summary = _summary(run_dir)
    saved = sorted((run_dir / "checkpoints").glob("*step_*.ckpt"))
    assert saved, "no checkpoint at all: the finiteness checks below would prove nothing"
    for path in saved:  # never a checkpoint with non-finite weights, whatever the action
        assert _all_finite(_weights(path)), path.name
    if code == 0:
        assert summary["status"] == "completed" and summary["steps"] == 24, summary
        assert not any(e["action"] == "stop" for e in events), events
        assert _all_finite(verify(run_dir / "checkpoints" / "last.ckpt")["state_dict"])
        assert math.isfinite(summary["val_bpb"])
        train = {r["step"]: r for r in _rows(run_dir) if "train/loss" in r}
        assert sorted(train) == list(range(24))
        assert all(math.isfinite(train[s]["train/loss"]) for s in train if s != FAULT_STEP)
    else:
        assert summary["status"] == "failed" and f"step {FAULT_STEP}" in summary["error"], summary
        assert max(int(p.stem.rsplit("_", 1)[1]) for p in saved) <= FAULT_STEP  # none after the fault
    if action == "rollback":  # to the newest checkpoint before the fault (step 8), then on to the end
        rollbacks = [e for e in events if e["check"] == "rollback"]
        assert len(rollbacks) == 1 and rollbacks[0]["step"] == FAULT_STEP, events
        assert rollbacks[0]["value"] == 8.0, rollbacks


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_default_policy_survives_a_late_spike(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    """health=default judges spikes after 20 steps of history: a x100 loss at step 21 is skipped."""
    run_dir = tmp_path / "outputs" / "spike"
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), *FAULT_CFG, "faults.spike_at_step=21",
                       "run.name=spike"], cwd=tmp_path, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 0, _output(proc)[-3000:]
    events = [(e["step"], e["check"], e["action"]) for e in _health(run_dir)]
    # the x100 loss also makes a x100 gradient: grad_explosion may warn about it too, nothing more
    assert [e for e in events if e[2] != "warn"] == [(21, "loss_spike", "skip")], events
    assert _summary(run_dir)["status"] == "completed"
    assert _all_finite(verify(run_dir / "checkpoints" / "last.ckpt")["state_dict"])


# ------------------------------------------------------------------------- 6) bad resume input


class _TouchOnLoad:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "sem": {"evil": _TouchOnLoad(marker)}}, path)
    return path


@pytest.mark.parametrize("kind", ["garbage", "truncated", "malicious"])
def test_resume_from_an_unusable_file_is_a_usage_error(kind: str, tmp_path: Path, reference: Path,
                                                       corpus_dir: Path, cache_dir: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / f"{kind} model.ckpt"  # a space in the name: the message must still name it whole
    if kind == "garbage":
        bad.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    elif kind == "truncated":  # a real checkpoint cut short, without its sidecar
        data = _ckpt(reference, 75).read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        probe = tmp_path / "probe"
        torch.load(_malicious(tmp_path / "probe.ckpt", probe), weights_only=False)
        assert probe.exists()  # loaded unsafely, the payload does run code: the test is live
        _malicious(bad, marker)
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), *SIGNAL_CFG, "run.name=bad",
                       f"resume={bad}"], cwd=tmp_path, timeout=120, env=_env(cache_dir))
    assert proc.returncode == 2, _output(proc)[-3000:]
    assert "Traceback" not in _output(proc)
    errors = _config_errors(proc.stderr)
    assert len(errors) == 1 and str(bad) in errors[0], errors
    assert not marker.exists()
    assert not (tmp_path / "outputs" / "bad" / "metrics.jsonl").exists()


def _copy_run(src: Path, name: str) -> Path:
    dst = src.parent / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_resume_auto_skips_a_damaged_newest_checkpoint(work: Path, reference: Path, signal_args: list[str],
                                                       cache_dir: Path) -> None:
    run_dir = _copy_run(reference, "damaged")
    newest = _ckpt(run_dir, SIGNAL_STEPS)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # silent corruption: same size, wrong sha256
    newest.write_bytes(bytes(data))
    (run_dir / "summary.json").unlink()  # as if killed before the end: resume=auto must continue it
    proc = run_launch([*signal_args, "run.name=damaged", "resume=auto"], cwd=work, timeout=300,
                      env=_env(cache_dir))
    assert proc.returncode == 0, _output(proc)[-3000:]
    warnings = [line for line in _output(proc).splitlines() if "skipping" in line]
    assert len(warnings) == 1 and newest.name in warnings[0], warnings
    previous = _ckpt(run_dir, 75)
    assert f"resuming from {previous}" in _output(proc)
    _assert_same_losses(run_dir, _losses(reference))
    _assert_same_weights(reference / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    assert _summary(run_dir)["status"] == "completed"


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_resume_with_another_model_shape_names_the_keys(tmp_path: Path, reference: Path, signal_args: list[str],
                                                        cache_dir: Path) -> None:
    ckpt = _ckpt(reference, 75)
    proc = run_launch([*signal_args, "model.d_model=48", "run.name=wider", f"resume={ckpt}"], cwd=tmp_path,
                      timeout=120, env=_env(cache_dir))
    assert proc.returncode == 2, _output(proc)[-3000:]
    assert "Traceback" not in _output(proc)
    errors = _config_errors(proc.stderr)
    assert len(errors) == 1 and str(ckpt) in errors[0], errors
    # each mismatching key with both shapes: sem_tiny's d_model=64 in the file, 48 asked for
    mismatches = re.findall(r"([\w.]+) \[([\d, ]+)\] in the checkpoint vs \[([\d, ]+)\] configured", errors[0])
    assert len(mismatches) >= 3, errors[0]
    assert all(old != new for _, old, new in mismatches)


def test_lightning_checkpoint_key_names_the_new_one(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), "checkpoint.every_n_train_steps=5"],
                      cwd=tmp_path, timeout=120, env=_env(cache_dir))
    assert proc.returncode == 2, _output(proc)[-3000:]
    assert "Traceback" not in _output(proc)
    errors = _config_errors(proc.stderr)
    assert len(errors) == 1 and "checkpoint.every_n_steps=5" in errors[0], errors
    assert not (tmp_path / "outputs").exists()


def _unprivileged() -> list[str] | None:
    """A command prefix that runs without root's permission override: none needed for a normal user;
    for root, a user namespace mapping uid 1000 onto our own uid (file permissions then apply as to
    the files' owner). None when that is not possible here."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--user", "--map-user=1000", "--map-group=1000"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.geteuid())"],
                           capture_output=True, text=True)
    return prefix if probe.returncode == 0 and probe.stdout.strip() == "1000" else None


def test_run_dir_that_cannot_be_created_is_a_usage_error(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), f"hydra.run.dir={blocker}/run"], cwd=tmp_path,
                      timeout=120, env=_env(cache_dir))
    assert proc.returncode == 2, _output(proc)[-3000:]
    assert "Traceback" not in _output(proc)
    errors = _config_errors(proc.stderr)
    assert len(errors) == 1 and "a_file/run" in errors[0] and "cannot be created" in errors[0], errors


def test_read_only_run_dir_is_a_usage_error(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without user namespaces: a 0o555 dir stays writable")
    run_dir = tmp_path / "outputs" / "locked"
    (run_dir / "checkpoints").mkdir(parents=True)
    run_dir.chmod(0o555)
    try:
        check = "import os, sys; print(os.access(sys.argv[1], os.W_OK))"
        access = subprocess.run([*prefix, sys.executable, "-c", check, str(run_dir)], capture_output=True, text=True)
        assert access.stdout.strip() == "False", access  # the launch below really meets a read-only dir
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
        env.update(_env(cache_dir))
        proc = subprocess.run([*prefix, sys.executable, str(ROOT / "launch.py"),
                               *tiny_data_overrides(corpus_dir, cache_dir), "run.name=locked"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, _output(proc)[-3000:]
        assert "Traceback" not in _output(proc)
        errors = _config_errors(proc.stderr)
        assert len(errors) == 1 and "outputs/locked" in errors[0] and "not writable" in errors[0], errors
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # nothing written
    finally:
        run_dir.chmod(0o755)


def test_resuming_a_finished_run_retrains_nothing(work: Path, reference: Path, signal_args: list[str],
                                                  cache_dir: Path) -> None:
    run_dir = _copy_run(reference, "finished")
    before = _digests(run_dir)
    proc = run_launch([*signal_args, "run.name=finished", "resume=auto"], cwd=work, timeout=120,
                      env=_env(cache_dir))
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert "already finished" in _output(proc)
    after = _digests(run_dir)
    for name in ("metrics.jsonl", "env.json", "summary.json", "health.jsonl"):
        assert after[name] == before[name], name
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == \
           {k: v for k, v in before.items() if k.startswith("checkpoints/")}


@pytest.mark.slow  # a run in the background and a second launch, ~10 s
def test_a_second_process_on_a_busy_run_dir_exits_2_and_writes_nothing(tmp_path: Path, corpus_dir: Path,
                                                                       cache_dir: Path) -> None:
    run_dir = tmp_path / "outputs" / "busy"
    args = [*tiny_data_overrides(corpus_dir, cache_dir), "trainer.max_steps=100000", "trainer.val_check_interval=50000",
            "checkpoint.every_n_steps=0", "run.name=busy", "compile=false"]  # (auto would compile so long a run)
    first = Running(args, tmp_path, cache_dir, tmp_path / "first.log")
    try:
        assert first.wait_for_step(run_dir / "metrics.jsonl", 2), first.output()[-3000:]
        before = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        second = run_launch(args, cwd=tmp_path, timeout=120, env=_env(cache_dir))
        assert second.returncode == 2, _output(second)[-3000:]
        errors = _config_errors(second.stderr)
        assert len(errors) == 1 and "in use by another run" in errors[0] and f"pid {first.proc.pid}" in errors[0], errors
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == before  # the holder's files untouched
    finally:
        first.send(signal.SIGTERM)
        assert first.wait() == 75
    again = run_launch([*args, "trainer.max_steps=1", "resume=auto"], cwd=tmp_path, timeout=120, env=_env(cache_dir))
    assert again.returncode != 2 or "in use" not in again.stderr, _output(again)[-2000:]  # free once it exited
