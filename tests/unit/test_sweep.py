"""sem/sweeps/job.py, sem/sweeps/ledger.py, sem/config/job.py: thread budget, job identity, ledger,
resolvers, logger grouping (no Hydra run)."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from sem.config.job import group_name, identity, job_label, job_subdir, logger_kwargs, sweep_seed
from sem.sweeps.job import concurrent_jobs, job_threads
from sem.sweeps.ledger import append_ledger, identity_conflict, next_free_job, read_ledger

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


@pytest.mark.parametrize(("launcher", "cores", "expected"), [
    (None, 8, 1),                                                     # a single run
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 8, 1),
    ({"_target_": JOBLIB, "n_jobs": 2}, 2, 2),
    ({"_target_": JOBLIB, "n_jobs": -1}, 6, 6),                       # joblib: -1 = every core
    ({"_target_": JOBLIB, "n_jobs": -2}, 6, 5),                       # all but one
    ({"_target_": JOBLIB, "n_jobs": -9}, 4, 1),
])
def test_concurrent_jobs(launcher: dict | None, cores: int, expected: int) -> None:
    assert concurrent_jobs(launcher, cores) == expected


@pytest.mark.parametrize(("requested", "cores", "concurrent", "cpus", "expected"), [
    (None, 8, 1, None, None),   # the machine to itself: torch's default
    (None, 2, 2, None, 1),      # two jobs on two cores do not fight
    (None, 16, 3, None, 5),
    (None, 2, 10, None, 1),     # never 0
    (3, 2, 2, None, 3),         # asked for: obeyed
    (None, 64, 1, 4, 4),        # submitit's cpus_per_task
])
def test_job_threads(requested: int | None, cores: int, concurrent: int, cpus: int | None,
                     expected: int | None) -> None:
    assert job_threads(requested, cores, concurrent, cpus) == expected


def test_identity_leaves_out_execution_settings() -> None:
    overrides = ["optimizer.lr=0.001", "resume=auto", "threads=2", "+seed=3", "dry_run=true", "~callbacks.x"]
    assert identity(overrides) == ["optimizer.lr=0.001", "+seed=3", "~callbacks.x"]
    assert job_label(overrides, ["seed", "optimizer.lr", "resume"]) == "optimizer.lr=0.001,+seed=3"


def test_identity_conflict(tmp_path: Path) -> None:
    sweep, run = tmp_path, tmp_path / "0"
    run.mkdir()
    assert identity_conflict(sweep, "0", ["a=1"], run) is None  # no ledger: a new sweep
    append_ledger(sweep, {"job": "0", "overrides": ["a=1"], "status": "completed"})
    (run / "summary.json").write_text("{}")
    assert identity_conflict(sweep, "0", ["a=1", "resume=auto"], run) is None  # the same job, resumed
    message = identity_conflict(sweep, "0", ["a=2", "resume=auto"], run)
    assert message is not None and "a=1" in message and "a=2" in message
    (run / "summary.json").unlink()
    assert identity_conflict(sweep, "0", ["a=2"], run) is None  # nothing there to lose


def _append_many(sweep: str, worker: int) -> None:
    for i in range(200):
        append_ledger(Path(sweep), {"job": f"{worker}-{i}", "overrides": ["x" * 300], "status": "completed"})


def test_ledger_lines_never_interleave(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 600 and all(json.loads(line)["status"] == "completed" for line in lines)
    assert len(read_ledger(tmp_path)) == 600


def test_read_ledger_takes_the_latest_line_and_skips_a_torn_one(tmp_path: Path) -> None:
    append_ledger(tmp_path, {"job": "0", "status": "preempted"})
    append_ledger(tmp_path, {"job": "1", "status": "completed"})
    append_ledger(tmp_path, {"job": "0", "status": "completed"})
    with (tmp_path / "ledger.jsonl").open("a") as f:
        f.write('{"job": "2", "sta')  # a sweep killed mid-write
    latest = read_ledger(tmp_path)
    assert list(latest) == ["0", "1"] and latest["0"]["status"] == "completed"


def test_job_subdir_and_seed_continue_after_earlier_jobs(tmp_path: Path) -> None:
    assert next_free_job(tmp_path) == 0 and job_subdir(str(tmp_path), 2) == "2"
    for name in ("0", "1", "7", "notes"):
        (tmp_path / name).mkdir()
    assert next_free_job(tmp_path) == 8
    (tmp_path / "sweep.json").write_text(json.dumps({"first_job": 8}))
    assert job_subdir(str(tmp_path), 0) == "8" and job_subdir(str(tmp_path), 3) == "11"
    assert sweep_seed(1234, str(tmp_path)) == 1242


def test_group_name() -> None:
    assert group_name(Path("multirun_outputs/2026-11-26/10-00-00")) == "2026-11-26/10-00-00"
    assert group_name(Path("/tmp/my_sweep")) == "my_sweep"


def test_logger_kwargs_only_in_a_sweep() -> None:
    # outside a Hydra multirun (a single run, a test) loggers get nothing extra
    assert logger_kwargs({"_target_": "pytorch_lightning.loggers.WandbLogger"}, Path("x")) == {}
