"""The Hydra entry of ``python launch.py`` and ``python -m sem``: registers the configs, validates a
single run before Hydra writes anything (``ValidateFirst``), dispatches a job (train or dry run; in a
sweep, inside the job guard) and turns Hydra's own failures into sem's exit codes (``sem.errors``)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from sem.config.store import CONF_DIR, expand_switches, register_configs
from sem.config.validate import run_dir_problems, validate_run
from sem.engines.cluster import bind_ranks
from sem.errors import EXIT_BAD_CONFIG, SweepExit, exit_if_invalid
from sem.plan.dry_run import plan
from sem.recipe import train
from sem.record.lock import RunDirBusy, busy, hold
from sem.record.summary import is_global_zero
from sem.sweeps.job import apply_job_threads, sweep_job
from sem.sweeps.trial import trial_reports
from sem.training.allocator import keep_freed_memory
from sem.training.preemption import after_run
from sem.training.pruning import Pruned, judged

log = logging.getLogger("sem.app")

register_configs()  # schemas must be in Hydra's ConfigStore before @hydra.main composes

_main_started = False
SWITCHES = {"eval.dynamic": "eval.dynamic.enabled"}  # eval.dynamic=true: dynamic evaluation on, its defaults


def cli(app: Any) -> None:
    """Run the ``@hydra.main`` app. Hydra exits 1 when the config does not compose (unknown key,
    wrong type, no such option); that is a usage error, so it leaves with exit code 2 instead."""
    sys.argv[1:] = expand_switches(sys.argv[1:], SWITCHES)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 1 and not _main_started and not isinstance(exc, SweepExit):
            raise SystemExit(EXIT_BAD_CONFIG) from None
        raise
    finally:
        after_run()  # a stop signal while the process exits: a flag, not an exception in its clean-up


class ValidateFirst(HydraCallback):
    """Validates a single run before Hydra creates its directory, so a rejected config writes
    nothing (not even ``.hydra/`` into an existing ``outputs/<run.name>``). Sweep jobs are
    validated in ``sem.recipe.run_guard`` (each has a fresh directory)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job_cfg = copy.deepcopy(config)
        with open_dict(job_cfg):
            del job_cfg["hydra"]  # what the job itself will see
        run_dir = Path(config.hydra.run.dir)
        ranks, cluster = bind_ranks(job_cfg)
        holder = busy(run_dir) if ranks.is_global_zero else None  # at once, before the validation's imports
        if holder:
            exit_if_invalid([f"hydra.run.dir={str(run_dir)!r}: {holder}"])
        exit_if_invalid(cluster + validate_run(job_cfg)[0] + run_dir_problems(run_dir))
        if not ranks.is_global_zero:  # another node's process joins the run dir: its log is rank_<n>.log
            with open_dict(config.hydra):
                config.hydra.output_subdir = None
                config.hydra.job.name = f"rank_{ranks.global_rank}"
        try:  # what Hydra does next; a dir that cannot be made is a usage error, not a traceback
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            exit_if_invalid([f"hydra.run.dir={str(run_dir)!r}: cannot be created ({exc.strerror or exc})"])
        if is_global_zero():  # before Hydra writes .hydra/ and the log: a busy dir is left untouched
            try:
                hold(run_dir)
            except RunDirBusy as exc:
                exit_if_invalid([f"hydra.run.dir={str(run_dir)!r}: {exc}"])


def main(cfg: DictConfig) -> float | Pruned | None:
    """Run one job from a composed config: train it, or print its plan (``dry_run=true``); return the
    final ``val/bpb`` for sweepers. A sweep job runs inside ``sem.sweeps.job.sweep_job``: a job that
    fails is recorded (summary.json, ledger) and returns None, and the sweep goes on to its next job."""
    global _main_started
    _main_started = True
    apply_job_threads(cfg.get("threads"))  # every job: loky reuses its worker processes between jobs
    if note := keep_freed_memory():
        log.info("%s", note)
    bind_ranks(cfg)  # (again in a sweep: each job is a run of its own shape)
    job = plan if cfg.get("dry_run") else train
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return sweep_job(job, cfg)
    with judged(trial_reports(HydraConfig.get())):  # an extra DDP rank of an Optuna trial decides with rank 0
        return job(cfg)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float | None:
    return main(cfg)
