"""The Hydra callback (``hydra.callbacks.sweep``) that ends every sweep with its answer: ``sweep.json``
at the start, a ledger line after every job, and at the end ``summary.md``/``.csv``, ``curves.png``,
``best.yaml`` and the sweep's exit code (1 if a job failed, 75 if one was preempted)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sem.config.job import identity, job_id
from sem.errors import EXIT_PREEMPTED, EXIT_TRAINING_FAILED, SweepExit
from sem.record.summary import is_global_zero, read_json, write_json
from sem.sweeps.ledger import append_ledger, sweep_info
from sem.sweeps.records import job_record
from sem.sweeps.report import write_report

log = logging.getLogger("sem.sweep")


def _multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep``): ``sweep.json`` at the start, a ledger line after
    every job, and at the end the summary, ``curves.png``, ``best.yaml`` and the sweep's exit code."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # Optuna's journal storage lives here
        write_json(sweep_dir / "sweep.json", sweep_info(config, sweep_dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _multirun(config) or not is_global_zero():
            return
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
        sweep_dir = Path(str(config.hydra.sweep.dir))
        info = read_json(sweep_dir / "sweep.json")
        if info.get("started_unix"):  # this invocation's wall time, kept for sem-report
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
            raise SweepExit(EXIT_TRAINING_FAILED)
        if report.preempted:
            log.warning("sweep: %d jobs preempted or not started; the same command with hydra.sweep.dir=%s "
                        "resume=auto continues them", len(report.preempted), sweep_dir)
            raise SweepExit(EXIT_PREEMPTED)
