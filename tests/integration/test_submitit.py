"""The submitit launchers (hydra-submitit-launcher, the ``.[sweeps]`` extra), as docs/slurm.md describes
them: a ``submitit_local`` sweep run as a user runs it, the requeue a submitit signal (SIGUSR2) gives
and the one sem's own stop signals do not, and the sbatch script ``hydra/launcher=sem_slurm`` writes
(no SLURM here: the script is rendered, not submitted).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException

from tests.conftest import CONF, ROOT, run_launch

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweeps extra is not installed "
                    "(pip install -e '.[sweeps]'; '.[dev]' includes it)")


def _env(cache_dir: Path) -> dict[str, str]:
    return {"SEM_CACHE_DIR": str(cache_dir)}


def _small(corpus_dir: Path, cache_dir: Path) -> list[str]:
    """debug=smoke on the small test corpus, one thread per job (the jobs of a sweep run at once)."""
    return ["debug=smoke", "data=text_files", f"data.corpus.paths=[{corpus_dir}/*.py]",
            f"data.cache_dir={cache_dir}", "data.final_val_max_windows=4", "sample.n=0", "threads=1"]


def _latest(sweep: Path) -> dict[str, dict[str, Any]]:
    """The latest ledger line of each job."""
    return {rec["job"]: rec for rec in map(json.loads, (sweep / "ledger.jsonl").read_text().splitlines())}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _job_logs(sweep: Path, job: str) -> str:
    """Everything job ``job`` logged, in its dir and in submitit's per-task logs."""
    files = [*(sweep / job).glob("*.log"), *(sweep / ".submitit").glob("*/*_log.*")]
    return "\n".join(p.read_text(errors="replace") for p in files)


def _tail(proc: subprocess.CompletedProcess | Path) -> str:
    text = proc.read_text() if isinstance(proc, Path) else proc.stdout + proc.stderr
    return text[-3000:]


# ------------------------------------------------------------------ a sweep on submitit_local


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_submitit_local_sweep(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", *_small(corpus_dir, cache_dir), "trainer.max_steps=3",
            "trainer.val_check_interval=3", "checkpoint.every_n_steps=3", "optimizer.lr=1e-3,3e-3",
            f"hydra.sweep.dir={sweep}"]
    proc = run_launch(args, cwd=tmp_path, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 0, _tail(proc)

    ledger = _latest(sweep)
    assert sorted(ledger) == ["0", "1"]
    for job, rec in ledger.items():
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert rec["status"] == summary["status"] == "completed", rec
        assert summary["steps"] == 3 and summary["val_bpb"] > 0
        rows = _lines(sweep / job / "metrics.jsonl")
        assert any("train/loss" in r for r in rows) and any("val/bpb" in r for r in rows)
        # the job ran in a process of submitit's, not in the launching one
        command = " ".join(json.loads((sweep / job / "env.json").read_text())["command_line"])
        assert "submitit" in command, command
    assert {r["overrides"][-1] for r in ledger.values()} == {"optimizer.lr=0.001", "optimizer.lr=0.003"}
    md = (sweep / "summary.md").read_text()
    assert "2 jobs: 2 completed. Launcher: submitit_local." in md, md
    assert json.loads((sweep / "sweep.json").read_text())["launcher"] == "submitit_local"
    # submitit's own logs: one folder per job, each with the job's stdout
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2, sorted(p.name for p in (sweep / ".submitit").iterdir())
    assert all("torch threads: 1 (threads=1)" in p.read_text() for p in logs)


# ------------------------------------- submitit's signal requeues; sem's stop signals do not


def _job_process(sweep: Path, job: str) -> int | None:
    """The pid of the submitit task running ``job``: the process that holds a file of the job's dir open
    (Hydra's job log) and runs ``submitit.core._submit``."""
    job_dir = str(sweep / job) + os.sep
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"submitit.core._submit" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            if any(os.readlink(fd).startswith(job_dir) for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return int(pid)
        except OSError:  # gone, or not ours to read
            continue
    return None


def _wait_for_training(metrics: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until ``metrics`` (a job's metrics.jsonl) has a train row: the job is past its first steps."""
    deadline = time.time() + timeout
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"no train row in {metrics} (sweep exit {proc.poll()}): {_tail(log)}")
        time.sleep(0.05)


@pytest.mark.slow  # 35-100 s here: two 100-step jobs, one of them started twice
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the job processes through /proc")
def test_submitit_signal_requeues_sem_signal_stops(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    """Job 0 gets SIGUSR2 (what submitit's sbatch ``--signal`` sends before the time limit): sem saves
    the step it is at, then submitit requeues it and, with resume=auto, it continues from that step in
    the same sweep (periodic checkpoints come every 50 steps: none exists yet). Job 1 gets SIGUSR1
    (sem's stop signal): it saves and stops, is not requeued, and the sweep exits 75."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", *_small(corpus_dir, cache_dir), "trainer.max_steps=100",
            "trainer.val_check_interval=50", "checkpoint.every_n_steps=50", "resume=auto",
            "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(_env(cache_dir), PYTHONUNBUFFERED="1")
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        for job, sig in (("0", signal.SIGUSR2), ("1", signal.SIGUSR1)):
            _wait_for_training(sweep / job / "metrics.jsonl", proc, log)
            pid = _job_process(sweep, job)
            assert pid is not None, f"no submitit process holds {sweep / job} open"
            os.kill(pid, sig)
        assert proc.wait(timeout=300) == 75, _tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()

    ledger = _latest(sweep)
    # job 0: requeued by submitit within this one sweep command, resumed, finished
    attempts = _lines(sweep / "0" / "attempts.jsonl")
    assert len(attempts) == 2 and attempts[1]["resumed_from"], attempts
    resumed = re.search(r"step_(\d{7})\.ckpt$", attempts[1]["resumed_from"])
    assert resumed and 0 < int(resumed.group(1)) < 50, attempts  # the step of the signal, saved by sem
    assert "handing over to submitit" in log.read_text() or "handing over to submitit" in _job_logs(sweep, "0")
    assert ledger["0"]["status"] == "completed" and json.loads((sweep / "0" / "summary.json").read_text())["steps"] == 100
    steps = [r["step"] for r in _lines(sweep / "0" / "metrics.jsonl") if "train/loss" in r]
    assert len(steps) == len(set(steps)) and max(steps) == 99  # each logged step once, to the end
    # job 1: sem saved at a step boundary and stopped; nobody requeued it
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    assert ledger["1"]["status"] == summary["status"] == "preempted", ledger["1"]
    assert summary["error"].startswith("stopped by SIGUSR1") and 1 <= summary["steps"] < 100, summary
    assert Path(summary["last_checkpoint"]).name == f"step_{summary['steps']:07d}.ckpt"
    assert len(_lines(sweep / "1" / "attempts.jsonl")) == 1
    assert "resume=auto continues them" in log.read_text()


# ------------------------------------------------------ sem_slurm / sem_local: what they ask for


def _launcher_config(tmp_path: Path, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="launch"):
        return compose(config_name="config", return_hydra_config=True,
                       overrides=[*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"])


def _slurm_executor(tmp_path: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """submitit's SlurmExecutor as ``hydra/launcher=sem_slurm`` sets it up for a sweep (nothing is
    submitted: the launcher stops where it would hand the jobs to sbatch)."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit's SlurmExecutor looks for srun
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    captured: list[Any] = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array",
                        lambda self, fn, *args: captured.append(self) or [])
    cfg = _launcher_config(tmp_path, ["hydra/launcher=sem_slurm", *overrides])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)  # type: ignore[arg-type]
    launcher.launch([["optimizer.lr=1e-3"]], initial_job_idx=0)
    (executor,) = captured
    return executor._executor


def _sbatch(executor: Any) -> str:
    """The sbatch script submitit would submit for one job."""
    return executor._make_submission_file_text("python -m submitit.core._submit", "uid")


def test_sem_slurm_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor = _slurm_executor(tmp_path, [], monkeypatch)
    script = _sbatch(executor)
    for flag in ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--mem=32GB", "--time=240", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "#SBATCH --partition" not in script  # the cluster's default unless given
    assert executor.max_num_timeout == 0  # a job at its time limit ends, unless asked (docs/slurm.md)


def test_sem_slurm_sbatch_multinode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/slurm.md's two-node example: four ranks per node, one GPU each, a partition and a setup line."""
    executor = _slurm_executor(tmp_path, ["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
                                         "hydra.launcher.partition=gpu", "hydra.launcher.max_num_timeout=3",
                                         "+hydra.launcher.additional_parameters.requeue=true",
                                         "hydra.launcher.setup=[module load cuda]"], monkeypatch)
    script = _sbatch(executor)
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--requeue"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    setup, command = script.index("module load cuda"), script.index("srun ")
    assert setup < command, script
    assert executor.max_num_timeout == 3


def test_sem_local_config(tmp_path: Path) -> None:
    launcher = _launcher_config(tmp_path, ["hydra/launcher=sem_local"]).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert launcher.cpus_per_task == 1 and launcher.timeout_min == 1440
    with pytest.raises(ConfigCompositionException, match="partition"):  # a SLURM-only key: a compose error
        _launcher_config(tmp_path, ["hydra/launcher=sem_local", "hydra.launcher.partition=gpu"])
