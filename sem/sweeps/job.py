"""One job of a sweep: the torch threads it may use (the cores split between the jobs that run at
once), and a guard that makes a failing job the job's failure, not the sweep's, and writes its ledger
line. What a sweep leaves in ``multirun_outputs/<date>/<time>/``: see ``sem.sweeps``."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sem.config.job import identity, job_id
from sem.errors import EXIT_BAD_CONFIG, EXIT_PREEMPTED, TrainingFailed
from sem.record.lock import RunDirBusy, hold, release
from sem.record.summary import RunSummary, is_global_zero
from sem.record.units import fmt_duration
from sem.sweeps.ledger import append_ledger, identity_conflict
from sem.sweeps.records import job_record
from sem.sweeps.trial import trial_reports
from sem.training.preemption import StopSignals
from sem.training.pruning import Pruned, judged

log = logging.getLogger("sem.sweep")


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


_between_jobs: StopSignals | None = None  # this process's sweep-level stop signals (``_sweep_signals``)


def _sweep_signals() -> StopSignals:
    """The stop signals of the sweep itself, installed at its first job and kept: a signal between two
    jobs (the basic launcher making the next job's folder, the report after a job) is a flag, and the
    jobs after it are not started; each job's own (``sem.recipe.run_guard``) sit on top of them."""
    global _between_jobs
    if _between_jobs is None:
        _between_jobs = StopSignals(requeue=False)  # submitit's SIGUSR2 stays for each job to take over
        _between_jobs.on_stop = f"no further job of this sweep starts; it exits with code {EXIT_PREEMPTED}"
        _between_jobs.install()
    return _between_jobs


def sweep_job(run: Callable[[DictConfig], float | Pruned | None], cfg: DictConfig) -> float | Pruned | None:
    """Run one sweep job so that its failure is the job's, not the sweep's, and write its ledger line.

    A bad config, a health stop or an exception in fit is written to the job's ``summary.json``
    (status ``failed`` and the error) and the job returns None: Hydra's basic sweeper would stop the
    sweep at the first raised job, while a None is a failed trial a sweeper records and moves past. In
    an Optuna sweep each validation is reported to the job's trial, and a trial its pruner stops returns
    ``sem.training.pruning.Pruned`` (``summary.json`` status ``pruned``). A job preempted by a stop signal (NaN from
    ``run`` exits 75) returns None too, and the jobs after it in this process do not start (status
    ``not_started``): Ctrl-C or a scheduler's SIGTERM stops the sweep, saved; the same command with
    ``resume=auto`` carries on. A second signal (SystemExit) ends the process at once.
    """
    sweep = _sweep_signals()
    hc = HydraConfig.get()
    run_dir, sweep_dir = Path(hc.runtime.output_dir), Path(hc.sweep.dir)
    job, overrides = job_id(run_dir, sweep_dir), [str(o) for o in hc.overrides.task]
    started = time.time()
    error = identity_conflict(sweep_dir, job, overrides, run_dir)
    status = "failed" if error else None
    if error is None and sweep.received is not None:
        status, error = "not_started", f"not started: {sweep.received} stopped the sweep before this job"
    if error is None and is_global_zero():
        try:
            hold(run_dir)
        except RunDirBusy as exc:  # a second resume=auto of the same sweep: that process runs this job
            status, error = "not_started", f"running elsewhere: {exc}"
    try:
        if status is not None:
            log.error("job %s: %s", job, error)
            return None
        try:
            with judged(trial_reports(hc)):  # an Optuna trial: each validation reported, pruned where it says
                value = run(cfg)
        except SystemExit as exc:
            if exc.code == EXIT_PREEMPTED:  # stopped by a signal, saved: summary.json says so
                sweep.received = sweep.received or "a stop signal"  # (a second one exits at once)
                return None
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
        return value
    finally:
        release(run_dir)  # (a job running elsewhere was never held here: nothing to let go)
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


def record_line(rec: Mapping[str, Any]) -> str:
    """One line for the console: status, overrides, result."""
    what = " ".join(identity(rec.get("overrides", []))) or "(no overrides)"
    if rec.get("status") == "dry_run":
        plan = rec.get("plan") or {}
        return f"dry run | {what} | est. {fmt_duration(plan.get('estimated_s'))}"
    result = (f"val/bpb {rec['val_bpb']:.4f}" if isinstance(rec.get("val_bpb"), (int, float))
              else (rec.get("error") or "no result"))
    skipped = " (finished earlier, skipped)" if rec.get("skipped") else ""
    return f"{rec.get('status')}{skipped} | {what} | {result} | {fmt_duration(rec.get('wall_s'))}"
