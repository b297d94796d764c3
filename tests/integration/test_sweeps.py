"""Sweeps as a user runs them (``python launch.py -m ...`` in a subprocess), read through the files
they leave: ledger, summary.md/csv, curves.png, best.yaml, sem-report, the parallel launcher's threads,
a failing job, a preempted sweep resumed, an Optuna study, wandb offline runs and the dry-run calendar.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, run_launch, tiny_data_overrides

PNG = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the sweeps extra is not installed "
                    "(pip install -e '.[sweeps]'; '.[dev]' includes it)")


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    return {"SEM_CACHE_DIR": str(cache_dir), **extra}


def _ledger(sweep: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (sweep / "ledger.jsonl").read_text().splitlines()]


def _latest(sweep: Path) -> dict[str, dict[str, Any]]:
    return {rec["job"]: rec for rec in _ledger(sweep)}


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _first_table(md: str) -> tuple[list[str], list[list[str]]]:
    block: list[str] = []
    for ln in md.splitlines():
        if ln.startswith("|"):
            block.append(ln)
        elif block:
            break
    header = [c.strip() for c in block[0].strip("|").split("|")]
    return header, [[c.strip() for c in ln.strip("|").split("|")] for ln in block[2:]]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------- a 2 x 2 sweep on joblib: summary, report


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    cwd = tmp_path_factory.mktemp("grid")
    sweep = cwd / "sweep"
    args = ["-m", *tiny_data_overrides(corpus_dir, cache_dir), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            "optimizer.lr=1e-3,3e-3", "seed=1,2", f"hydra.sweep.dir={sweep}"]
    return run_launch(args, cwd=cwd, timeout=400, env=_env(cache_dir)), sweep


@pytest.mark.slow
def test_grid_sweep_summary(grid: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, sweep = grid
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ledger = _latest(sweep)
    assert sorted(ledger) == ["0", "1", "2", "3"]
    bpb = {}
    for job, rec in ledger.items():
        s = _summary(sweep / job)
        assert rec["status"] == s["status"] == "completed", rec
        assert rec["val_bpb"] == pytest.approx(s["val_bpb"])
        assert rec["best_val_bpb"] <= rec["val_bpb"] + 0.5  # periodic validations on a subset
        bpb[job] = s["val_bpb"]
    md = (sweep / "summary.md").read_text()
    header, rows = _first_table(md)
    assert header[:4] == ["rank", "job", "optimizer.lr", "seed"] and "final val/bpb" in header, header
    col = header.index("final val/bpb")
    assert [r[1] for r in rows] == sorted(bpb, key=bpb.get), "rows not sorted by final val/bpb"
    assert [float(r[col]) for r in rows] == pytest.approx([round(bpb[j], 4) for j in sorted(bpb, key=bpb.get)], abs=1e-4)
    best = min(bpb, key=bpb.get)
    assert f"**Best: job {best}**" in md
    # mean +- std over the two seeds of each learning rate
    assert "## Mean +- std over seeds" in md
    seeds_block = md.split("## Mean +- std over seeds")[1]
    _, groups = _first_table(seeds_block)
    by_lr: dict[str, list[float]] = {}
    for job in bpb:
        lr = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        by_lr.setdefault(next(o.split("=")[1] for o in lr if o.startswith("optimizer.lr=")), []).append(bpb[job])
    assert len(groups) == 2
    for lr_value, seeds, mean_std in groups:
        values = by_lr[lr_value]
        assert seeds == "2"
        mean, std = (float(x) for x in mean_std.split("+-"))
        assert mean == pytest.approx(statistics.fmean(values), abs=1e-4)
        assert std == pytest.approx(statistics.stdev(values), abs=1e-4)
    # summary.csv: the same order, full precision
    with (sweep / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == [r[1] for r in rows]
    assert float(table[0]["val_bpb"]) == pytest.approx(bpb[best])
    # best.yaml: the best job's own overrides, runnable
    best_yaml = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best_yaml["job"] == best
    assert best_yaml["overrides"] == yaml.safe_load((sweep / best / ".hydra" / "overrides.yaml").read_text())
    assert best_yaml["command"].startswith("python launch.py ")
    assert (sweep / "curves.png").read_bytes()[:8] == PNG
    assert "sweep summary:" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_joblib_jobs_split_the_cores(grid: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, sweep = grid
    threads = max(1, _cores() // 2)
    for job in ("0", "1", "2", "3"):
        env = json.loads((sweep / job / "env.json").read_text())
        assert env["hardware"]["torch_threads"] == threads, env["hardware"]
        # set by the job itself (loky's OMP_NUM_THREADS alone would give the same count)
        assert f"torch threads: {threads} ({_cores()} cores / 2 concurrent jobs)" in (sweep / job / "launch.log").read_text()


@pytest.mark.slow
def test_sem_report_regenerates_and_compares(grid: tuple[subprocess.CompletedProcess, Path], tmp_path: Path) -> None:
    _, sweep = grid
    original = (sweep / "summary.md").read_text()
    for name in ("summary.md", "summary.csv", "curves.png", "best.yaml"):
        (sweep / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "sem.report", str(sweep)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (sweep / "summary.md").read_text() == original
    assert all((sweep / n).exists() for n in ("summary.csv", "curves.png", "best.yaml"))
    # any set of run dirs: two jobs compared, files where --out says
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "sem.report", str(sweep / "0"), str(sweep / "3"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, rows = _first_table((out / "summary.md").read_text())
    assert len(rows) == 2 and {"optimizer.lr", "seed"} <= set(header), header
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert subprocess.run([sys.executable, "-m", "sem.report", str(tmp_path / "nope")], capture_output=True,
                          timeout=60).returncode == 2


# ------------------------------------------------------------------ a sweep with failing jobs


@pytest.mark.slow
def test_failing_jobs_do_not_end_the_sweep(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    # on joblib: the failures happen in worker processes, and the parent still exits 1 (not 2, a usage error)
    args = ["-m", *tiny_data_overrides(corpus_dir, cache_dir), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            "optimizer.lr=1e-3,-1", "faults.nan_at_step=null,3", "health.nonfinite_loss=stop", f"hydra.sweep.dir={sweep}"]
    proc = run_launch(args, cwd=tmp_path, timeout=300, env=_env(cache_dir))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    ledger = _latest(sweep)
    assert sorted(ledger) == ["0", "1", "2", "3"], "every job ran"
    assert ledger["0"]["status"] == "completed" and ledger["0"]["val_bpb"] > 0
    assert ledger["1"]["status"] == "failed" and "HealthStop" in ledger["1"]["error"]
    for job in ("2", "3"):  # caught when the job was validated
        assert ledger[job]["status"] == "failed" and "optimizer.lr=-1" in ledger[job]["error"], ledger[job]
        assert _summary(sweep / job)["status"] == "failed"
    assert re.search(r"3 of 4 jobs failed: job 1 \(.*\): HealthStop", out), out[-2000:]
    md = (sweep / "summary.md").read_text()
    assert "1 completed, 3 failed" in md and "**Best: job 0**" in md
    assert "- job 2 (" in md and "config error: optimizer.lr=-1" in md
    assert "Traceback" not in out


# -------------------------------------------------- a sweep stopped by a signal, then resumed


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{path} never appeared (sweep exit {proc.poll()})")
        time.sleep(0.05)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_stopped_sweep_resumes(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    common = ["-m", *tiny_data_overrides(corpus_dir, cache_dir), "trainer.max_steps=40", "checkpoint.every_n_steps=4",
              "trainer.val_check_interval=20", "optimizer.lr=1e-3,2e-3,3e-3", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(_env(cache_dir), PYTHONUNBUFFERED="1")
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *common], cwd=tmp_path, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(sweep / "1" / "checkpoints" / "step_0000004.json", first, timeout=300)
        first.send_signal(signal.SIGTERM)  # as a scheduler would: job 1 saves and stops, job 2 never starts
        assert first.wait(timeout=300) == 75, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    ledger = _latest(sweep)
    assert [ledger[j]["status"] for j in ("0", "1", "2")] == ["completed", "preempted", "not_started"]
    done_metrics = _digest(sweep / "0" / "metrics.jsonl")
    stopped_at = _summary(sweep / "1")["steps"]
    assert 4 <= stopped_at < 40

    proc = run_launch([*common, "resume=auto"], cwd=tmp_path, timeout=400, env=_env(cache_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ledger = _latest(sweep)
    assert ledger["0"]["status"] == "completed" and ledger["0"]["skipped"], ledger["0"]
    assert _digest(sweep / "0" / "metrics.jsonl") == done_metrics  # not trained again
    assert len((sweep / "0" / "attempts.jsonl").read_text().splitlines()) == 1
    for job in ("1", "2"):
        assert ledger[job]["status"] == "completed" and not ledger[job]["skipped"], ledger[job]
        assert _summary(sweep / job)["steps"] == 40
    attempts = [json.loads(x) for x in (sweep / "1" / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and attempts[1]["resumed_from"].endswith(f"step_{stopped_at:07d}.ckpt"), attempts
    steps = [r["step"] for r in map(json.loads, (sweep / "1" / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert len(steps) == len(set(steps)) and max(steps) == 39  # each step once, to the end
    md = (sweep / "summary.md").read_text()
    assert "3 completed" in md and "skipped: finished earlier" in md

    # the same dir with another sweep: a folder holding another job is never resumed into
    changed = [a for a in common if not a.startswith("optimizer.lr=")] + ["optimizer.lr=5e-3,2e-3,3e-3"]
    before = _digest(sweep / "0" / "summary.json")
    proc = run_launch([*changed, "resume=auto"], cwd=tmp_path, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "holds an earlier job of this sweep with other overrides" in _latest(sweep)["0"]["error"]
    assert _digest(sweep / "0" / "summary.json") == before


# ---------------------------------------------------------------------------- an Optuna study


@pytest.mark.slow
def test_optuna_study(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    pytest.importorskip("optuna")
    sweep = tmp_path / "study"
    # no scheduler.warmup_steps: the study searches scheduler.warmup_fraction, which steps would override
    tiny = [a for a in tiny_data_overrides(corpus_dir, cache_dir) if not a.startswith("scheduler.warmup_steps")]
    common = ["-m", *tiny, "hparams_search=optuna_lr", f"hydra.sweep.dir={sweep}"]
    proc = run_launch([*common, "hydra.sweeper.n_trials=3"], cwd=tmp_path, timeout=400, env=_env(cache_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (sweep / "optuna.journal").exists()  # the study, in the sweep dir
    ledger = _latest(sweep)
    assert sorted(ledger) == ["0", "1", "2"]
    lrs, bpb = {}, {}
    for job in ledger:
        cfg = yaml.safe_load((sweep / job / "config_resolved.yaml").read_text())
        sampled = dict(o.split("=", 1) for o in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text()))
        lrs[job], warmup = cfg["optimizer"]["lr"], float(sampled["scheduler.warmup_fraction"])
        assert lrs[job] == float(sampled["optimizer.lr"]) and 1e-4 <= lrs[job] <= 3e-2
        assert 0.0 <= warmup <= 0.2 and cfg["scheduler"]["warmup_steps"] == int(warmup * 12 + 0.5)  # it acted
        bpb[job] = _summary(sweep / job)["val_bpb"]
    assert len(set(lrs.values())) == 3
    best = min(bpb, key=bpb.get)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(bpb[best])  # the objective is the final val/bpb
    md = (sweep / "summary.md").read_text()
    assert f"Best trial {best} (job {best})" in md and f"optimizer.lr={results['best_params']['optimizer.lr']}" in md

    # continued in its dir up to 4 trials: the 4th fails (NaN at step 1, health stop), the study records it
    proc = run_launch([*common, "hydra.sweeper.n_trials=4", "faults.nan_at_step=1", "health.nonfinite_loss=stop"],
                      cwd=tmp_path, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    ledger = _latest(sweep)
    assert sorted(ledger) == ["0", "1", "2", "3"] and ledger["3"]["status"] == "failed"
    assert _summary(sweep / "0")["val_bpb"] == pytest.approx(bpb["0"])  # earlier trials untouched
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))
    trials = optuna.load_study(study_name="optuna_lr", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL"]
    assert yaml.safe_load((sweep / "3" / "config_resolved.yaml").read_text())["optimizer"]["lr"] not in lrs.values()
    assert "4 trials (3 complete, 1 fail)" in (sweep / "summary.md").read_text()


# ------------------------------------------------------------ loggers grouped by the sweep


def _wandb_run_record(path: Path) -> Any:
    """The run record (group, job_type, name) of an offline ``run-*.wandb`` file: a log of
    protobuf records in 32 KiB blocks, each piece behind a 7-byte header (crc, length, kind)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""  # 7: the file's own header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a header at the end of a block: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "run":
                return rec.run
    raise AssertionError(f"no run record in {path}")


@pytest.mark.slow
def test_wandb_offline_and_tensorboard_per_job(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    pytest.importorskip("wandb")
    sweep = tmp_path / "wandb_sweep"
    home = tmp_path / "home"
    home.mkdir()
    # no key, no network: a base URL nothing listens on, and a home without credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")
           and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(_env(cache_dir), HOME=str(home), WANDB_BASE_URL="http://127.0.0.1:9")
    args = ["-m", *tiny_data_overrides(corpus_dir, cache_dir), "logger=[wandb,tensorboard]",
            "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.003")):
        runs = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, list((sweep / job).rglob("*"))[:20]
        run = _wandb_run_record(runs[0])
        assert run.run_group == "wandb_sweep" and run.job_type == f"optimizer.lr={lr}", run
        assert run.display_name == f"{job} optimizer.lr={lr}"
        events = list((sweep / job / "tensorboard").glob(f"optimizer.lr={lr}/events.out.tfevents.*"))
        assert events, list((sweep / job / "tensorboard").rglob("*"))
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in out
    assert f"tensorboard --logdir {sweep}" in out


# ------------------------------------------------------------------------- dry-run calendar


@pytest.mark.slow
def test_dry_run_calendar_three_stage(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*tiny_data_overrides(corpus_dir, cache_dir), "curriculum=three_stage", "trainer.max_steps=20",
            "dry_run=true", f"hydra.run.dir={run_dir}"]
    started = time.time()
    proc = run_launch(args, cwd=tmp_path, timeout=300, env=_env(cache_dir))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert time.time() - started < 120
    assert "├── model" in out and "parameters:" in out and "GFLOP/token" in out
    assert "estimated wall time:" in out and "timing probe (3 steps per shape" in out
    plan = json.loads((run_dir / "plan.json").read_text())
    segs = plan["segments"]
    assert segs[0]["start"] == 0 and segs[-1]["end"] == 20
    assert all(a["end"] == b["start"] for a, b in zip(segs, segs[1:]))
    starts = {}
    for s in segs:
        starts.setdefault(s["stage"], s["start"])
    assert starts == {"s512": 0, "s1024": 10, "s2048": 16}  # fractions 0.5 and 0.3 of 20 steps
    shapes = {(s["stage"], s["seq_len"], s["batch_size"]) for s in segs}
    assert shapes == {("s512", 512, 8), ("s1024", 1024, 4), ("s2048", 2048, 2)}
    # adamw's default; scheduler.warmup_steps=2, decay 30% = steps 14..19; lr_scale 1.0/0.7/0.5
    from sem.config.schema import AdamWConf

    lr = AdamWConf.lr
    first_stable = next(s for s in segs if s["phase"] == "stable")
    assert first_stable["start"] == 2 and first_stable["lr_start"] == pytest.approx(lr)
    assert next(s for s in segs if s["stage"] == "s1024")["lr_start"] == pytest.approx(0.7 * lr)
    assert next(s for s in segs if s["stage"] == "s2048")["phase"] == "decay"
    assert plan["val_steps"] == [6, 12, 18] and plan["checkpoint_steps"] == [6, 12, 18, 20]
    assert plan["tokens"] == 20 * 4096
    assert plan["estimated_s"] > 0 and set(plan["probe"]["seconds_per_step"]) == {"512x8", "1024x4", "2048x2"}
    for line in ("s512", "s1024", "s2048", "validation (", "checkpoints after steps 6, 12, 18, 20"):
        assert line in out, line
    assert (run_dir / "plots" / "schedule.png").read_bytes()[:8] == PNG
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_dry_run_sweep_one_line_per_job(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_data_overrides(corpus_dir, cache_dir), "dry_run=true", "optimizer.lr=1e-3,3e-3",
            f"hydra.sweep.dir={sweep}"]
    proc = run_launch(args, cwd=tmp_path, timeout=300, env=_env(cache_dir))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [ln for ln in out.splitlines() if "dry run |" in ln and "params" in ln]
    assert len(lines) == 2 and "optimizer.lr=0.001" in lines[0] and "optimizer.lr=0.003" in lines[1], lines
    assert "├── model" not in out  # no config tree per job
    assert "dry run: 2 jobs, estimated" in out
    assert not (sweep / "summary.md").exists()
