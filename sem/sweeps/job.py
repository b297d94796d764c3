"""Multirun sweeps: thread budget per job, a job guard that lets a sweep outlive a failing job, the
sweep ledger, sweep-grouped loggers, and the Hydra callback that ends every sweep with its answer.

What a sweep leaves in ``multirun_outputs/<date>/<time>/`` besides one folder per job:

- ``sweep.json``: this invocation's command, the swept keys, launcher and sweeper (rewritten by each
  invocation into the same dir);
- ``ledger.jsonl``: one line per job and attempt (``sem.report.job_record``); the latest line of a job wins;
- ``summary.md``, ``summary.csv``, ``curves.png``, ``best.yaml``: written by ``sem.report`` at the end
  (``summary.md``/``.csv`` also after every job, so a killed sweep still has one). ``sem-report <dir>``
  regenerates them.

A job's identity is its task overrides minus execution settings (``resume``, ``threads``,
``dry_run``): re-running the same sweep command with ``hydra.sweep.dir=<dir> resume=auto`` maps every
job to its old folder, finished jobs return their recorded result and the rest resume from their
checkpoints. A folder that held a job with another identity is never resumed into.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sem.training.preemption import EXIT_PREEMPTED

log = logging.getLogger("sem.sweep")

EXECUTION_KEYS = ("resume", "threads", "dry_run")  # how a job runs, not what it is
EXIT_FAILED = 1  # as a single run's training failure; EXIT_PREEMPTED (75) as a single run's


class SweepExit(SystemExit):
    """The sweep finished with failed (exit 1) or preempted (exit 75) jobs, named in the log and in
    ``summary.md``. Raised after the summary is written; ``sem.run.cli`` passes it through."""


# ---------------------------------------------------------------------------------- threads


def cores_available() -> int:
    """CPU cores this process may run on (the affinity mask: SLURM and taskset shrink it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def concurrent_jobs(launcher: Mapping[str, Any] | None, cores: int) -> int:
    """How many jobs of this sweep run at once on this machine, from the launcher's config:
    joblib runs ``n_jobs`` (-1 = all cores, -2 = all but one, as joblib counts), every other known
    launcher one per process (basic: one after another; submitit: a process or node per job)."""
    target = str((launcher or {}).get("_target_", ""))
    if "joblib" in target:
        n = int(launcher.get("n_jobs") or 1)  # type: ignore[union-attr]
        return max(1, n if n > 0 else cores + 1 + n)
    return 1


def job_threads(requested: int | None, cores: int, concurrent: int, cpus_per_task: int | None = None
                ) -> int | None:
    """torch intra-op threads for one job: ``requested`` when given; else the cores split between the
    jobs that run at once (at least 1); else submitit's ``cpus_per_task``; None = leave torch's default
    (a single run, or a serial sweep, has the machine to itself)."""
    if requested is not None:
        return int(requested)
    if concurrent > 1:
        return max(1, cores // concurrent)
    return int(cpus_per_task) if cpus_per_task else None


def apply_job_threads(requested: int | None) -> int:
    """Set ``torch.set_num_threads`` at the start of a job. joblib's loky workers are reused between
    jobs, so this runs for every job, not once per worker. Returns the thread count in effect."""
    import torch

    launcher: Mapping[str, Any] | None = None
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        node = HydraConfig.get().launcher
        launcher = {k: OmegaConf.select(node, k, default=None) for k in ("_target_", "n_jobs", "cpus_per_task")}
    cores = cores_available()
    concurrent = concurrent_jobs(launcher, cores)
    threads = job_threads(requested, cores, concurrent, (launcher or {}).get("cpus_per_task"))
    if threads is not None:
        torch.set_num_threads(threads)
        how = "threads=" + str(requested) if requested is not None else (
            f"{cores} cores / {concurrent} concurrent jobs" if concurrent > 1 else "launcher cpus_per_task")
        log.info("torch threads: %d (%s)", threads, how)
    return torch.get_num_threads()


# -------------------------------------------------------------------------------- overrides


def split_override(override: str) -> tuple[str, str]:
    """``"optimizer.lr=1e-3"`` -> ``("optimizer.lr", "1e-3")``; ``"~x"`` -> ``("~x", "")``."""
    key, _, value = override.partition("=")
    return key, value


def _bare(key: str) -> str:
    return key.lstrip("+~")


def identity(overrides: Sequence[str]) -> list[str]:
    """What a job *is*: its task overrides without the execution settings."""
    return [o for o in overrides if _bare(split_override(o)[0]) not in EXECUTION_KEYS]


def job_label(overrides: Sequence[str], keys: Sequence[str]) -> str:
    """The job's values of ``keys`` (the swept ones), e.g. ``optimizer.lr=0.001,curriculum=none``."""
    wanted = {_bare(k) for k in keys}
    return ",".join(o for o in identity(overrides) if _bare(split_override(o)[0]) in wanted)


def swept_keys(config: DictConfig) -> list[str]:
    """Keys this multirun sweeps: comma lists, ranges and other sweeps on the command line, plus the
    sweeper's own ``params`` (Optuna's search space, a basic sweeper's ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in config.hydra.overrides.task]
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params")
    keys += [str(k) for k in (params or {})]
    return [k for i, k in enumerate(keys) if k not in keys[:i] and _bare(k) not in EXECUTION_KEYS]


# ------------------------------------------------------------------------- sweep.json, ledger


def job_id(run_dir: Path, sweep_dir: Path) -> str:
    """The job's folder relative to the sweep dir (``"3"`` for ``<sweep>/3``)."""
    try:
        return str(Path(run_dir).resolve().relative_to(Path(sweep_dir).resolve()))
    except ValueError:
        return Path(run_dir).name


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def next_free_job(sweep_dir: Path) -> int:
    """1 + the largest numbered job folder already in ``sweep_dir`` (0 for a new sweep)."""
    numbers = [int(p.name) for p in Path(sweep_dir).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(numbers, default=-1) + 1


def job_subdir(sweep_dir: str, num: int) -> str:
    """Resolver ``${sem.job_subdir:${hydra.sweep.dir},${hydra.job.num}}``: the job's number after the
    folders an earlier invocation left in the same sweep dir (recorded in ``sweep.json`` before any job
    starts). An Optuna study continued in its own dir asks new trials, numbered from 0 again by the
    sweeper: they get new folders instead of overwriting the earlier trials'."""
    return str(int(read_json(Path(sweep_dir) / "sweep.json").get("first_job", 0)) + int(num))


def sweep_seed(seed: int, sweep_dir: str) -> int:
    """Resolver ``${sem.sweep_seed:${seed},${hydra.sweep.dir}}``: ``seed`` for a new sweep, shifted by
    the job folders already there when a sweep continues in its dir, so a seeded Optuna sampler draws
    new points instead of repeating the first invocation's."""
    return int(seed) + int(read_json(Path(sweep_dir) / "sweep.json").get("first_job", 0))


def _storage(config: DictConfig) -> str | None:
    value = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    return str(value) if value else None


def sweep_info(config: DictConfig, sweep_dir: Path) -> dict[str, Any]:
    launcher = OmegaConf.to_container(config.hydra.launcher, resolve=False)
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    choices = OmegaConf.select(config, "hydra.runtime.choices", default={}) or {}
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "started_unix": time.time(),
        "swept": swept_keys(config),
        "launcher": choices.get("hydra/launcher") or str(launcher.get("_target_", "")),  # type: ignore[union-attr]
        "n_jobs": launcher.get("n_jobs"),  # type: ignore[union-attr]
        "sweeper": choices.get("hydra/sweeper") or sweeper,
        "study_name": OmegaConf.select(config, "hydra.sweeper.study_name", default=None),
        "storage": _storage(config) if "optuna" in sweeper.lower() else None,
        "first_job": next_free_job(sweep_dir),
    }


def append_ledger(sweep_dir: Path, record: Mapping[str, Any]) -> None:
    """One JSON line, appended under an exclusive lock: concurrent jobs (joblib) never interleave."""
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(Path(sweep_dir) / "ledger.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_ledger(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest ledger record of each job, in the order the jobs first appear."""
    latest: dict[str, dict[str, Any]] = {}
    path = Path(sweep_dir) / "ledger.jsonl"
    if not path.exists():
        return latest
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a killed sweep
        if isinstance(rec, dict) and "job" in rec:
            latest[str(rec["job"])] = rec
    return latest


def identity_conflict(sweep_dir: Path, job: str, overrides: Sequence[str], run_dir: Path) -> str | None:
    """Why this job must not run in ``run_dir``: the folder holds an earlier job of this sweep dir with
    other overrides (the sweep command changed), whose checkpoints ``resume=auto`` would continue."""
    before = read_ledger(sweep_dir).get(job)
    if before is None or identity(before.get("overrides", [])) == identity(overrides):
        return None
    if not ((run_dir / "summary.json").exists() or any((run_dir / "checkpoints").glob("*.ckpt"))):
        return None
    return (f"job {job}: {run_dir} holds an earlier job of this sweep with other overrides "
            f"({' '.join(identity(before.get('overrides', [])))}); this job is "
            f"({' '.join(identity(overrides))}). Re-run the same sweep command (same values in the same "
            "order) to resume it, or give a new hydra.sweep.dir")


# ----------------------------------------------------------------------------------- job guard


_stopped_by_signal = False  # a job of this process was preempted: the sweep launches no more here


def sweep_job(run: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """Run one sweep job so that its failure is the job's, not the sweep's, and write its ledger line.

    A bad config, a health stop or an exception in fit is written to the job's ``summary.json``
    (status ``failed`` and the error) and the job returns None: Hydra's basic sweeper would stop the
    sweep at the first raised job, and Optuna 2.10 cannot take NaN (``study.tell`` raises), while a
    None is a failed trial it records and moves past. A job preempted by a stop signal (NaN from
    ``run``) returns None too, and the jobs after it in this process do not start (status
    ``not_started``): Ctrl-C or a scheduler's SIGTERM stops the sweep, saved; the same command with
    ``resume=auto`` carries on. A second signal (SystemExit) ends the process at once.
    """
    from sem.report import job_record
    from sem.run import EXIT_BAD_CONFIG, TrainingFailed
    from sem.summary import RunSummary

    global _stopped_by_signal
    hc = HydraConfig.get()
    run_dir, sweep_dir = Path(hc.runtime.output_dir), Path(hc.sweep.dir)
    job, overrides = job_id(run_dir, sweep_dir), [str(o) for o in hc.overrides.task]
    started = time.time()
    error = identity_conflict(sweep_dir, job, overrides, run_dir)
    status = "failed" if error else None
    if error is None and _stopped_by_signal:
        status, error = "not_started", "not started: a stop signal ended an earlier job of this sweep"
    try:
        if status is not None:
            log.error("job %s: %s", job, error)
            return None
        try:
            value = run(cfg)
        except SystemExit as exc:
            if exc.code != EXIT_BAD_CONFIG:
                raise
            problems = getattr(exc, "problems", None) or ["rejected (see the job log)"]
            RunSummary(run_dir).finish("failed", wall_s=time.time() - started,
                                       error="config error: " + "; ".join(problems))
            return None
        except TrainingFailed:
            return None  # summary.json already says why
        except Exception as exc:  # anything else: still this job's failure only
            log.error("job failed: %s: %s", type(exc).__name__, exc)
            if _mtime(run_dir / "summary.json") < started:
                RunSummary(run_dir).finish("failed", wall_s=time.time() - started,
                                           error=f"{type(exc).__name__}: {exc}")
            return None
        if value is not None and math.isnan(value):  # preempted: summary.json says so
            _stopped_by_signal = True
            return None
        return value
    finally:
        from sem.summary import is_global_zero

        if is_global_zero():  # a multi-rank job (srun tasks) is one job: one ledger line
            record = job_record(run_dir, job, overrides, started=started, status=status, error=error)
            _finish_wandb(record["status"])
            append_ledger(sweep_dir, record)
            log.info("job %s: %s", job, record_line(record))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _finish_wandb(status: str) -> None:
    """One wandb run per job, closed when the job ends (the next job in this process starts its own)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if status == "failed" else 0)


# ------------------------------------------------------------------------------------- loggers


def group_name(sweep_dir: Path) -> str:
    """``2026-11-26/10-00-00`` for ``multirun_outputs/2026-11-26/10-00-00``, else the folder's name."""
    sweep_dir = Path(sweep_dir)
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep_dir.parent.name):
        return f"{sweep_dir.parent.name}/{sweep_dir.name}"
    return sweep_dir.name


def logger_kwargs(node: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Constructor arguments that group a sweep's runs (none outside a sweep, none the user set):
    wandb ``group`` = the sweep, ``job_type`` = the job's swept values, ``name`` = job and values;
    TensorBoard ``version`` = the job's swept values, so ``tensorboard --logdir <sweep>`` names each
    job by what it tried (and a resumed job keeps writing into its own event dir)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir)
    job = job_id(run_dir, sweep_dir)
    label = job_label(list(hc.overrides.task), read_json(sweep_dir / "sweep.json").get("swept", []))
    kind = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    if kind == "WandbLogger":
        extra = {"group": group_name(sweep_dir), "job_type": (label or "job")[:64],
                 "name": f"{job} {label}".strip()[:128]}
    elif kind == "TensorBoardLogger":
        extra = {"version": re.sub(r"[^\w.=,+-]", "_", label)[:200] or f"job_{job}"}
    else:
        return {}
    return {k: v for k, v in extra.items() if node.get(k) is None}


# ------------------------------------------------------------------------------------ callback


def _multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep``): ``sweep.json`` at the start, a ledger line after
    every job, and at the end the summary, ``curves.png``, ``best.yaml`` and the sweep's exit code."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from sem.summary import write_json

        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # Optuna's sqlite storage lives here
        write_json(sweep_dir / "sweep.json", sweep_info(config, sweep_dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from sem.summary import is_global_zero

        if not _multirun(config) or not is_global_zero():
            return
        from sem.report import job_record, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if job_return.status == JobStatus.FAILED:  # raised past sweep_job (another task function?)
            run_dir = Path(str(config.hydra.runtime.output_dir))
            exc = getattr(job_return, "_return_value", None)
            append_ledger(sweep_dir, job_record(run_dir, job_id(run_dir, sweep_dir),
                                                [str(o) for o in job_return.overrides or []],
                                                status="failed", error=f"{type(exc).__name__}: {exc}"))
        try:  # a summary so far after every job: a sweep killed halfway still has one
            write_report(sweep_dir, final=False)
        except Exception as exc:  # the summary must never fail a job
            log.warning("could not update the sweep summary: %s: %s", type(exc).__name__, exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from sem.report import write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        info = read_json(sweep_dir / "sweep.json")
        if info.get("started_unix"):  # this invocation's wall time, kept for sem-report
            from sem.summary import write_json

            write_json(sweep_dir / "sweep.json", {**info, "wall_s": time.time() - float(info["started_unix"])})
        report = write_report(sweep_dir, final=True)
        if report is None:
            return
        for line in report.console_lines():
            log.info("%s", line)
        if report.failed:
            names = "; ".join(f"job {r['job']} ({' '.join(identity(r['overrides'])) or 'no overrides'}): "
                              f"{r.get('error') or r['status']}" for r in report.failed)
            log.error("sweep: %d of %d jobs failed: %s", len(report.failed), len(report.records), names)
            raise SweepExit(EXIT_FAILED)
        if report.preempted:
            log.warning("sweep: %d jobs preempted or not started; the same command with hydra.sweep.dir=%s "
                        "resume=auto continues them", len(report.preempted), sweep_dir)
            raise SweepExit(EXIT_PREEMPTED)


def record_line(rec: Mapping[str, Any]) -> str:
    """One line for the console: status, overrides, result."""
    from sem.report import fmt_duration

    what = " ".join(identity(rec.get("overrides", []))) or "(no overrides)"
    if rec.get("status") == "dry_run":
        plan = rec.get("plan") or {}
        return f"dry run | {what} | est. {fmt_duration(plan.get('estimated_s'))}"
    result = (f"val/bpb {rec['val_bpb']:.4f}" if isinstance(rec.get("val_bpb"), (int, float))
              else (rec.get("error") or "no result"))
    skipped = " (finished earlier, skipped)" if rec.get("skipped") else ""
    return f"{rec.get('status')}{skipped} | {what} | {result} | {fmt_duration(rec.get('wall_s'))}"
