"""``strategy=ddp`` (two CPU ranks, gloo) as a user runs it: ``launch.py`` in a subprocess.

- the same global batch trains the same model: ``trainer.devices=2 data.batch_size=2`` logs the losses
  of one process with ``data.batch_size=4``, in one run dir, with one set of checkpoints;
- validation on two ranks counts every held-out window once (an odd count: one rank pads);
- a DDP job inside ``-m`` keeps one dir, and its extra rank starts no sweep of its own;
- SIGTERM to the launcher stops every rank at one step, saved (exit 75), and ``resume=auto`` continues.

Never ``strategy=ddp`` inside the pytest process (PLATFORM.md): each launch here is a subprocess in a
session of its own, without the DDP variables in its environment, killed with its ranks on a timeout.
Independent launches run at the same time (most of a launch's wall time is start-up and waiting for
the other rank).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, tiny_data_overrides

pytestmark = pytest.mark.slow

STEPS = 8               # steps of the runs compared step by step
LOSS_ATOL = 1e-4        # train/loss, single process vs 2 ranks (float32 sums in another order)
VAL_RTOL = 1e-6         # final val/bpb of one checkpoint on 1 and on 2 ranks
ODD_WINDOWS = 7         # final validation windows: 4 on rank 0, 3 + a padding window on rank 1
TIMEOUT_S = 480         # one launch on a busy 2-core machine (a 2-rank smoke run takes ~60 s here)
STOP_EXIT_S = 90        # SIGTERM -> launcher exit (finish the step, save, summarise, wait for rank 1)

QUICK = ["sample.n=0", "threads=1"]
DDP = ["strategy=ddp", "trainer.devices=2"]
# What a launch must not inherit from the process that starts it (a leftover makes it a rank of
# somebody else's job).
DDP_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "GROUP_RANK",
           "LOCAL_WORLD_SIZE")


@dataclass
class Launch:
    """``python launch.py <args>`` started in ``cwd``; console output in ``cwd/console.txt``."""

    proc: subprocess.Popen
    cwd: Path
    run_dir: Path
    started: float = field(default_factory=time.monotonic)
    wall_s: float | None = None

    @classmethod
    def start(cls, cwd: Path, args: list[str], cache_dir: Path, run_dir: Path | None = None) -> Launch:
        """Start it without waiting; ``run_dir`` defaults to ``cwd/run`` (set as ``hydra.run.dir``)."""
        env = {k: v for k, v in os.environ.items() if k not in DDP_ENV}
        env.update(SEM_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
        if run_dir is None:
            run_dir = cwd / "run"
            args = [*args, f"hydra.run.dir={run_dir}"]
        with open(cwd / "console.txt", "w") as out:
            # A session of its own: the launcher and the rank it starts can be killed together.
            proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, cwd, run_dir)

    def wait(self, timeout: float = TIMEOUT_S) -> Launch:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.wall_s = time.monotonic() - self.started
        return self

    def kill(self) -> None:
        """SIGKILL the launcher's process group (its ranks) while the launcher still runs."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def output(self) -> str:
        return (self.cwd / "console.txt").read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return f"[exit {self.proc.returncode}, {self.wall_s or 0:.0f} s]\n{self.output[-n:]}"

    def json(self, name: str) -> Any:
        return json.loads((self.run_dir / name).read_text())

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def train_losses(self) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in self.metrics() if "train/loss" in r}


def _base(corpus_dir: Path, cache_dir: Path, steps: int = STEPS) -> list[str]:
    return [*tiny_data_overrides(corpus_dir, cache_dir), *QUICK, f"trainer.max_steps={steps}"]


def _live_pids(*needles: str) -> set[int]:
    """Processes whose command line holds every one of ``needles`` as an argument (zombies are gone)."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # exited meanwhile
        if state != "Z" and all(n.encode() in argv for n in needles):
            found.add(int(d.name))
    return found


def _tree(root: Path, depth: int = 2) -> str:
    paths = [p for p in root.rglob("*") if len(p.relative_to(root).parts) <= depth]
    return "\n".join([str(root), *sorted(str(p) for p in paths)])


def _launcher_log(run_dir: Path) -> str:
    """The job's own log (Hydra names it after the job; the ranks' are rank_<n>.log)."""
    logs = [p for p in run_dir.glob("*.log") if not p.name.startswith("rank_")]
    assert len(logs) == 1, sorted(p.name for p in run_dir.iterdir())
    return logs[0].read_text(errors="replace")


# ------------------------------------------------- 1) one process vs two ranks, same global batch


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
                   ) -> tuple[Launch, Launch]:
    """A: one process, batch 4. B: two ranks, batch 2 each (the same 4 windows a step). Same seed. In
    fp32, where only the order of the gradient sums differs: under bf16 autocast (precision=auto on a
    CPU with bf16) a matmul over 2 rows rounds otherwise than over 4, 8e-4 apart after 8 steps."""
    base = [*_base(corpus_dir, cache_dir), "trainer.log_every_n_steps=1", "precision=fp32"]
    single = Launch.start(tmp_path_factory.mktemp("single"), [*base, "data.batch_size=4"], cache_dir)
    ddp = Launch.start(tmp_path_factory.mktemp("ddp"), [*base, *DDP, "data.batch_size=2"], cache_dir)
    yield single.wait(), ddp.wait()
    single.kill()
    ddp.kill()


@pytest.fixture(scope="module")
def fault_on_one_rank(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Launch:
    """B again (fp32), with step 3's loss NaN on rank 1 only."""
    args = [*_base(corpus_dir, cache_dir), "trainer.log_every_n_steps=1", "precision=fp32", *DDP, "data.batch_size=2",
            "faults.nan_at_step=3", "faults.on_rank=1"]
    run = Launch.start(tmp_path_factory.mktemp("fault"), args, cache_dir)
    yield run.wait()
    run.kill()


def test_a_nan_on_one_rank_is_a_decision_of_all_ranks(fault_on_one_rank: Launch,
                                                      single_and_ddp: tuple[Launch, Launch]) -> None:
    """Rank 1's NaN reaches rank 0 through the loss average and the gradient all-reduce: both ranks hold
    the update back (the default action, skip), nobody hangs, and the run goes on to the end."""
    run = fault_on_one_rank
    assert run.proc.returncode == 0, run.tail()
    assert run.json("summary.json")["status"] == "completed"
    events = [json.loads(line) for line in (run.run_dir / "health.jsonl").read_text().splitlines()]
    assert [(e["step"], e["check"], e["action"]) for e in events] == [(3, "nonfinite_loss", "skip")], events
    losses, clean = run.train_losses(), single_and_ddp[1].train_losses()
    assert losses[3] is None  # NaN, written as null
    assert all(abs(losses[s] - clean[s]) < 1e-6 for s in range(3)), (losses, clean)  # the same run up to it
    assert all(losses[s] is not None and math.isfinite(losses[s]) for s in range(4, STEPS)), losses
    assert [r for r in run.metrics() if "health/skipped" in r][-1]["health/skipped"] == 1


def test_both_runs_complete(single_and_ddp: tuple[Launch, Launch]) -> None:
    for run in single_and_ddp:
        assert run.proc.returncode == 0, run.tail()
        summary = run.json("summary.json")
        assert summary["status"] == "completed" and summary["steps"] == STEPS, summary


def test_ddp_losses_match_single_process(single_and_ddp: tuple[Launch, Launch]) -> None:
    single, ddp = (run.train_losses() for run in single_and_ddp)
    assert sorted(single) == sorted(ddp) == list(range(STEPS)), (sorted(single), sorted(ddp))
    diffs = {step: abs(single[step] - ddp[step]) for step in single}
    table = "\n".join(f"step {s}: single {single[s]:.7f}  ddp {ddp[s]:.7f}  diff {d:.2e}"
                      for s, d in diffs.items())
    worst = max(diffs.values())
    assert worst <= LOSS_ATOL, f"max |diff| {worst:.2e} > {LOSS_ATOL:g}\n{table}"


def test_ddp_trains_the_same_weights(single_and_ddp: tuple[Launch, Launch]) -> None:
    single, ddp = (torch.load(run.run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                              weights_only=False)["state_dict"] for run in single_and_ddp)
    assert single.keys() == ddp.keys()
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)  # complex too: |a - b|
    assert worst <= LOSS_ATOL, f"max |weight diff| after {STEPS} steps: {worst:.2e}"


def test_ddp_run_has_one_dir(single_and_ddp: tuple[Launch, Launch]) -> None:
    """The extra rank writes rank_1.log into the run dir and nothing anywhere else (no outputs/ or
    multirun_outputs/ of its own in the cwd, no second summary or metrics file)."""
    ddp = single_and_ddp[1]
    assert (ddp.run_dir / "rank_1.log").stat().st_size > 0
    assert not _live_pids(f"hydra.run.dir={ddp.run_dir}"), "a rank outlived its run"
    assert sorted(p.name for p in ddp.cwd.iterdir()) == ["console.txt", "run"], _tree(ddp.cwd)
    for name in ("summary.json", "metrics.jsonl", "config_resolved.yaml", "env.json"):
        assert list(ddp.cwd.rglob(name)) == [ddp.run_dir / name], _tree(ddp.cwd, depth=9)


def test_ddp_checkpoints_written_once(single_and_ddp: tuple[Launch, Launch]) -> None:
    """The checkpoints of the one-process schedule (every 6 steps and the last), each file beside its
    sidecar and matching it: no second writer, no temp files or abandoned branches left behind."""
    from sem.training.checkpoint import verify

    single, ddp = (sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) for run in single_and_ddp)
    expected = ["best.ckpt", "last.ckpt", "step_0000006.ckpt", "step_0000006.json",
                "step_0000008.ckpt", "step_0000008.json"]
    assert ddp == single == expected, (ddp, single)
    for step in (6, 8):
        path = single_and_ddp[1].run_dir / "checkpoints" / f"step_{step:07d}.ckpt"
        assert verify(path)["global_step"] == step  # sha256 of the file == its sidecar's


# --------------------------------------- 2) one checkpoint validated on 1 and on 2 ranks, odd count


@pytest.fixture(scope="module")
def evaluations(single_and_ddp: tuple[Launch, Launch], tmp_path_factory: pytest.TempPathFactory,
                corpus_dir: Path, cache_dir: Path) -> tuple[Launch, Launch]:
    """Run A's last checkpoint resumed into fresh dirs at trainer.max_steps=STEPS: nothing left to
    train, only the final validation runs, on ODD_WINDOWS windows; once on 1 process, once on 2."""
    single = single_and_ddp[0]
    if single.proc.returncode != 0:
        pytest.fail(f"run A failed, nothing to evaluate:\n{single.tail()}")
    last = (single.run_dir / "checkpoints" / "last.ckpt").resolve()
    args = [*_base(corpus_dir, cache_dir), f"resume={last}", f"data.final_val_max_windows={ODD_WINDOWS}"]
    one = Launch.start(tmp_path_factory.mktemp("eval1"), args, cache_dir)
    two = Launch.start(tmp_path_factory.mktemp("eval2"), [*args, *DDP], cache_dir)
    yield one.wait(), two.wait()
    one.kill()
    two.kill()


def test_evaluations_only_validate(evaluations: tuple[Launch, Launch]) -> None:
    for run in evaluations:
        assert run.proc.returncode == 0, run.tail()
        summary = run.json("summary.json")
        assert summary["status"] == "completed" and summary["steps"] == STEPS, summary
        rows = run.metrics()
        assert [r for r in rows if "train/loss" in r] == [], "a step was trained"
        assert len(rows) == 1 and rows[0]["final"] is True, rows
        assert not list(run.run_dir.glob("checkpoints/*.ckpt"))  # nothing trained, nothing saved
    assert (evaluations[1].run_dir / "rank_1.log").exists()  # the second really ran on two ranks


def test_two_ranks_count_every_window_once(evaluations: tuple[Launch, Launch]) -> None:
    (one, two) = ([r for r in run.metrics() if r.get("final")][-1] for run in evaluations)
    assert one["val/windows"] == two["val/windows"] == ODD_WINDOWS, (one, two)
    assert two["val/bpb"] == pytest.approx(one["val/bpb"], rel=VAL_RTOL), (one, two)
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=VAL_RTOL), (one, two)
    for run, row in zip(evaluations, (one, two)):
        assert run.json("summary.json")["val_bpb"] == row["val/bpb"]


# ------------------------------------------------------------------------- 3) DDP inside -m


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Launch:
    cwd = tmp_path_factory.mktemp("sweep")
    args = ["-m", *_base(corpus_dir, cache_dir, steps=4), *DDP, "data.batch_size=2",
            "trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "optimizer.lr=1e-3,3e-3",
            f"hydra.sweep.dir={cwd}/sweep"]
    sweep = Launch.start(cwd, args, cache_dir, run_dir=cwd / "sweep")
    yield sweep.wait(TIMEOUT_S + 120)  # two jobs one after another
    sweep.kill()


def test_ddp_sweep_jobs_complete_in_their_dirs(ddp_sweep: Launch) -> None:
    sweep, tree = ddp_sweep.run_dir, _tree(ddp_sweep.cwd)
    assert ddp_sweep.proc.returncode == 0, f"{ddp_sweep.tail()}\n{tree}"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"], tree
    for job, lr in (("0", "0.001"), ("1", "0.003")):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 4, (job, summary, tree)
        assert (sweep / job / "rank_1.log").stat().st_size > 0, tree
        # rank 1 of this job: a single run of this job's overrides, in this job's dir
        started = [line for line in _launcher_log(sweep / job).splitlines() if "starting rank 1:" in line]
        assert len(started) == 1, (job, started)
        assert f"hydra.run.dir={sweep / job} " in started[0] + " " and f"optimizer.lr={lr}" in started[0], started
        assert " -m sem " in started[0] and "launch.py" not in started[0] and "1e-3,3e-3" not in started[0], started


def test_ddp_sweep_summary_lists_both_jobs(ddp_sweep: Launch) -> None:
    sweep = ddp_sweep.run_dir
    ledger = [json.loads(line) for line in (sweep / "ledger.jsonl").read_text().splitlines()]
    assert sorted((r["job"], r["status"]) for r in ledger) == [("0", "completed"), ("1", "completed")], ledger
    assert all(r["steps"] == 4 and math.isfinite(r["val_bpb"]) for r in ledger), ledger
    summary = (sweep / "summary.md").read_text()
    assert "2 jobs: 2 completed" in summary, summary


def test_ddp_sweep_ranks_start_no_sweep(ddp_sweep: Launch) -> None:
    """Only the one sweep dir in the cwd: the extra ranks ran as single runs of their jobs."""
    cwd, tree = ddp_sweep.cwd, _tree(ddp_sweep.cwd)
    assert sorted(p.name for p in cwd.iterdir()) == ["console.txt", "sweep"], tree
    for name in ("sweep.json", "multirun.yaml", "ledger.jsonl"):
        assert list(cwd.rglob(name)) == [ddp_sweep.run_dir / name], _tree(cwd, depth=9)
    assert len(list(cwd.rglob("summary.json"))) == 2, _tree(cwd, depth=9)


# ------------------------------------------------------ 4) SIGTERM to the launcher of a DDP run


@dataclass
class Stopped:
    launch: Launch
    rank_pids: set[int]         # rank 1, found by its command line while training
    exit_s: float | None        # SIGTERM -> launcher exit
    left: set[int]              # rank processes still alive after the launcher exited
    args: list[str]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Stopped:
    """A 2-rank run far from its end; SIGTERM to the launcher only, once it has logged a train row."""
    cwd = tmp_path_factory.mktemp("sigterm")
    args = [*_base(corpus_dir, cache_dir, steps=2000), *DDP, "data.batch_size=2", "trainer.log_every_n_steps=5",
            "trainer.val_check_interval=1000", "checkpoint.every_n_steps=1000", "callbacks.console.every_n_steps=50"]
    run = Launch.start(cwd, args, cache_dir)
    rank_args = (f"hydra.run.dir={run.run_dir}", "hydra.job.name=rank_1")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not run.train_losses():
            if run.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no train row before the run ended or {TIMEOUT_S} s:\n{run.wait(1).tail()}")
            time.sleep(0.5)
        rank_pids = _live_pids(*rank_args)
        run.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            run.proc.wait(timeout=STOP_EXIT_S)
            exit_s: float | None = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            exit_s = None
            run.kill()
        run.wait()
        left = rank_pids & _live_pids(*rank_args)
        for _ in range(20):  # a moment for the last one to be reaped
            if not left:
                break
            time.sleep(0.5)
            left = rank_pids & _live_pids(*rank_args)
        yield Stopped(run, rank_pids, exit_s, left, args)
    finally:
        run.kill()
        for pid in _live_pids(*rank_args):  # ranks this test started, never anything else
            os.kill(pid, signal.SIGKILL)


def _stop_step(stopped: Stopped) -> int:
    summary = stopped.launch.json("summary.json")
    assert summary["status"] == "preempted", summary
    return int(summary["steps"])


def test_sigterm_launcher_exits_75(stopped: Stopped) -> None:
    assert stopped.exit_s is not None, f"still running {STOP_EXIT_S} s after SIGTERM\n{stopped.launch.tail()}"
    assert stopped.launch.proc.returncode == 75, stopped.launch.tail()


def test_sigterm_leaves_no_rank_behind(stopped: Stopped) -> None:
    assert len(stopped.rank_pids) == 1, f"rank 1 not found while training: {stopped.rank_pids}"
    assert not stopped.left, f"rank processes {stopped.left} outlived the launcher"


def test_sigterm_saves_the_stop_step(stopped: Stopped) -> None:
    """Every rank stops at the same step, and that step is saved and verifies."""
    from sem.training.checkpoint import verify

    run = stopped.launch
    step = _stop_step(stopped)
    summary = run.json("summary.json")
    assert 0 < step < 2000 and "SIGTERM" in summary["error"], summary
    path = run.run_dir / "checkpoints" / f"step_{step:07d}.ckpt"
    assert summary["last_checkpoint"] == str(path) and (run.run_dir / "checkpoints" / "last.ckpt").resolve() == path
    assert verify(path)["global_step"] == step
    assert max(run.train_losses()) == step - 1  # the last step done was logged: the stop is collective
    assert f"preempted by SIGTERM at step {step}" in (run.run_dir / "rank_1.log").read_text()


@pytest.fixture(scope="module")
def resumed(stopped: Stopped, cache_dir: Path) -> tuple[Launch, int]:
    """The same command with resume=auto, to 4 steps past the stop."""
    if stopped.launch.proc.returncode != 75:
        pytest.fail(f"the stopped run did not exit 75:\n{stopped.launch.tail()}")
    step = _stop_step(stopped)
    run = stopped.launch
    (run.cwd / "console.txt").rename(run.cwd / "console_stopped.txt")
    again = Launch.start(run.cwd, [*stopped.args, "resume=auto", f"trainer.max_steps={step + 4}"], cache_dir)
    yield again.wait(), step
    again.kill()


def test_resume_auto_continues_from_the_stop(resumed: tuple[Launch, int]) -> None:
    run, step = resumed
    assert run.proc.returncode == 0, run.tail()
    summary = run.json("summary.json")
    assert summary["status"] == "completed" and summary["steps"] == step + 4, summary
    attempts = [json.loads(line) for line in (run.run_dir / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["resumed_from"] == str(run.run_dir / "checkpoints" / f"step_{step:07d}.ckpt"), attempts
    steps = [r["step"] for r in run.metrics() if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == step + 3, steps  # no step twice, on to the end


# ------------------------------------- 5) truncated BPTT on two ranks: each rank's lanes are saved


TBPTT_STEPS, TBPTT_BRANCH = 8, 6  # data.tbptt=4: step 6 continues the lanes of steps 4-5


@pytest.fixture(scope="module")
def tbptt_resumed(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
                  ) -> tuple[Launch, Launch]:
    """Two ranks with data.tbptt=4 to step 8, checkpoints every 2 steps; then the same command resumed
    from step 6's checkpoint, in the middle of a segment: every rank must continue its own lanes."""
    args = [*_base(corpus_dir, cache_dir, steps=TBPTT_STEPS), *DDP, "data.batch_size=2", "data.tbptt=4",
            "precision=fp32", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep_last=10",
            "eval.stream=false"]
    reference = Launch.start(tmp_path_factory.mktemp("tbptt_ref"), args, cache_dir).wait()
    if reference.proc.returncode != 0:
        pytest.fail(f"the reference run failed:\n{reference.tail()}")
    ckpt = reference.run_dir / "checkpoints" / f"step_{TBPTT_BRANCH:07d}.ckpt"
    resumed = Launch.start(tmp_path_factory.mktemp("tbptt_resumed"), [*args, f"resume={ckpt}"], cache_dir)
    yield reference, resumed.wait()
    resumed.kill()


def test_tbptt_resumes_every_ranks_lanes(tbptt_resumed: tuple[Launch, Launch]) -> None:
    reference, resumed = tbptt_resumed
    assert resumed.proc.returncode == 0, resumed.tail()
    ref, again = reference.train_losses(), resumed.train_losses()
    assert sorted(again) == list(range(TBPTT_BRANCH, TBPTT_STEPS)), sorted(again)
    for step, loss in again.items():  # rank 1 with rank 0's lane states gave another loss
        assert loss == pytest.approx(ref[step], abs=LOSS_ATOL / 10), (step, loss, ref[step])
