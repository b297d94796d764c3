"""The sweep: check everything (exit 2 before any trial), open or continue the study, then keep
``n_jobs`` trials in flight until the study has ``n_trials`` finished ones.

No batches: Hydra's ``Launcher.launch`` blocks until the jobs it is given have ended, so the sweeper
gives it one job at a time. A launcher that runs jobs in other processes (joblib, submitit, ray, rq) is
called from ``n_jobs`` threads, each waiting on its one job; the main thread asks the study for a new
trial as soon as any job ends and tells the study each result. The basic launcher runs a job in this
process (two at once would share Hydra's global state), so it gets one job after another.

Each job gets the trial's values, the fixed overrides, and ``hydra.job.env_set.SEM_OPTUNA_TRIAL`` /
``SEM_OPTUNA_STUDY`` / ``SEM_OPTUNA_STORAGE`` so that it can report intermediate values for pruning
(``sem.sweeps.trial.open_storage`` opens the storage string). The job's return value decides the trial's state:
a finite float COMPLETE, an object with ``pruned`` true PRUNED (its intermediate values are in the
storage already), anything else (None, NaN, an exception) FAIL.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from sem.sweeps.trial import ENV_STORAGE, ENV_STUDY, ENV_TRIAL, open_storage, storage_spec

from ._params import ParamError, SearchSpace, grid_values, legacy_distribution, quote, search_space

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
PARALLEL_LAUNCHERS = ("joblib", "submitit", "ray_launcher", "rq_launcher")  # jobs in other processes
RESULTS_FILE = "optimization_results.yaml"


@dataclass
class SweepSettings:
    """``hydra.sweeper`` as the plugin receives it (see ``config.OptunaSweeperConf``)."""

    sampler: Any = None
    pruner: Any = None
    direction: Any = "minimize"
    study_name: str | None = "optuna"
    storage: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    params: Any = None
    search_space: Any = None
    custom_search_space: str | None = None


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its root cause (Hydra's instantiate wraps the constructor's error)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, ImportError):
        return f"not found: {text}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _build(kind: str, node: Any, base: type, **extra: Any) -> tuple[Any, str | None]:
    """Instantiate a sampler or pruner node (its null keys left to Optuna's defaults); a problem line
    instead when it cannot be."""
    conf = _plain(node)
    if not isinstance(conf, Mapping) or not conf.get("_target_"):
        return None, f"hydra.sweeper.{kind}={conf!r}: needs a _target_ (an Optuna {kind} class)"
    target = conf["_target_"]
    kwargs = {k: v for k, v in conf.items() if v is not None and k != "_partial_"}
    try:
        obj = instantiate(kwargs, **extra)
    except Exception as exc:
        return None, f"hydra.sweeper.{kind}._target_={target!r}: cannot be instantiated ({_one_line(exc)})"
    if not isinstance(obj, base):
        return None, f"hydra.sweeper.{kind}._target_={target!r}: not an Optuna {kind} ({type(obj).__name__})"
    return obj, None


def _direction(direction: Any) -> tuple[str, str | None]:
    value = _plain(direction)
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            return "minimize", (f"hydra.sweeper.direction={value!r}: one objective only "
                                "(minimize or maximize)")
        value = value[0]
    name = str(getattr(value, "name", value)).lower()
    if name not in ("minimize", "maximize"):
        return "minimize", f"hydra.sweeper.direction={value!r}: must be minimize or maximize"
    return name, None


def outcome(ret: JobReturn | None, error: BaseException | None = None) -> tuple[TrialState, float | None, str]:
    """The trial's state, value and a few words, from its job's return."""
    if error is not None:
        return TrialState.FAIL, None, f"the launcher raised {type(error).__name__}: {error}"
    assert ret is not None
    if ret.status == JobStatus.FAILED:
        exc = getattr(ret, "_return_value", None)
        return TrialState.FAIL, None, f"the job raised {type(exc).__name__}: {exc}"
    value = ret.return_value
    if getattr(value, "pruned", False) is True:
        step = getattr(value, "step", None)
        return TrialState.PRUNED, None, "pruned" + (f" at step {step}" if step is not None else "")
    if value is None:
        return TrialState.FAIL, None, "the job returned no value (it failed: see its summary.json)"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None, f"the job returned {value!r}, not a number"
    if not math.isfinite(number):
        return TrialState.FAIL, None, f"the job returned {number}"
    return TrialState.COMPLETE, number, f"value {number:.6g}"


def stopped_by_signal(ret: JobReturn | None) -> bool:
    """A sem job stopped by a signal (Ctrl-C, SIGTERM) records ``preempted`` in its summary.json: the
    sweep then asks for no further trial."""
    try:
        run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))  # type: ignore[union-attr]
        import json

        return json.loads((run_dir / "summary.json").read_text()).get("status") == "preempted"
    except Exception:
        return False


@dataclass
class Prepared:
    study: optuna.Study
    space: SearchSpace
    spec: str  # the storage as the jobs open it (sem.sweeps.trial.open_storage)
    total: int  # n_trials, capped at a grid's size


# ------------------------------------------------------------------------------------- checks


def _space(s: SweepSettings, arguments: Sequence[str], problems: list[str]) -> SearchSpace:
    legacy: dict[str, Any] = {}
    if s.search_space and not s.params:  # Hydra's deprecated form; params win when both are set
        for key, node in (_plain(s.search_space) or {}).items():
            try:
                legacy[str(key)] = legacy_distribution(node or {})
            except ParamError as exc:
                problems.append(f"hydra.sweeper.search_space.{key}={node!r}: {exc}")
    elif s.search_space:
        log.warning("hydra.sweeper.params and hydra.sweeper.search_space are both set: params is used")
    space, bad = search_space(_plain(s.params) or {}, arguments, legacy)
    problems += bad
    return space


def prepare(s: SweepSettings, sweep_dir: Path, arguments: Sequence[str] = ()) -> Prepared:
    """Check the settings and open (or continue) the study; every problem is one line and the sweep
    exits 2 (``sem.errors.exit_if_invalid``) before any trial starts."""
    problems: list[str] = []
    direction, bad = _direction(s.direction)
    problems += [bad] if bad else []
    if not isinstance(s.n_trials, int) or s.n_trials < 0:
        problems.append(f"hydra.sweeper.n_trials={s.n_trials!r}: must be an int >= 0")
    if not isinstance(s.n_jobs, int) or s.n_jobs < 1:
        problems.append(f"hydra.sweeper.n_jobs={s.n_jobs!r}: must be an int >= 1")
    if not 0.0 <= float(s.max_failure_rate) <= 1.0:
        problems.append(f"hydra.sweeper.max_failure_rate={s.max_failure_rate!r}: must be in [0, 1]")
    if s.custom_search_space:
        problems.append(f"hydra.sweeper.custom_search_space={s.custom_search_space!r}: not supported by "
                        "sem's Optuna sweeper (put the search space in hydra.sweeper.params)")
    space = _space(s, arguments, problems)
    total = int(s.n_trials) if isinstance(s.n_trials, int) else 0

    extra: dict[str, Any] = {}
    sampler_conf = _plain(s.sampler)
    target = str(sampler_conf.get("_target_", "")) if isinstance(sampler_conf, Mapping) else ""
    grid_ok = True
    if target.rsplit(".", 1)[-1] == "GridSampler":  # its grid: params' choices and ranges
        try:
            extra["search_space"] = {k: grid_values(k, d) for k, d in space.distributions.items()}
        except ParamError as exc:
            problems.append(f"hydra.sweeper.params.{exc}")
            grid_ok = False
        else:
            size = math.prod(len(v) for v in extra["search_space"].values())
            if size < total:
                log.info("GridSampler: the grid has %d points: n_trials %d -> %d", size, total, size)
                total = size
    sampler = None
    if grid_ok:
        sampler, bad = _build("sampler", s.sampler, optuna.samplers.BaseSampler, **extra)
        problems += [bad] if bad else []
    pruner, bad = _build("pruner", s.pruner, optuna.pruners.BasePruner)
    problems += [bad] if bad else []

    spec = storage_spec(s.storage, sweep_dir)
    name = s.study_name or "optuna"
    study = None
    try:
        storage = open_storage(spec)
    except Exception as exc:
        problems.append(f"hydra.sweeper.storage={s.storage!r}: cannot be opened ({_one_line(exc)})")
    else:
        if not problems:
            try:
                study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                            direction=direction, load_if_exists=True)
            except Exception as exc:
                problems.append(f"hydra.sweeper.storage={s.storage!r}: cannot hold study {name!r} "
                                f"({_one_line(exc)})")
            else:
                if study.direction.name.lower() != direction:
                    problems.append(f"hydra.sweeper.direction={direction}: study {name!r} in {spec} was "
                                    f"created to {study.direction.name.lower()}")
    if problems:
        from sem.errors import exit_if_invalid

        exit_if_invalid(problems)
    assert study is not None
    return Prepared(study, space, spec, total)


class OptunaSweep:
    def __init__(self, settings: SweepSettings, *, hydra_context: HydraContext, task_function: TaskFunction,
                 config: DictConfig) -> None:
        self.settings = settings
        self.config = config
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    # -------------------------------------------------------------------------------------- sweep

    def _parallel(self) -> bool:
        cls = type(self.launcher)
        return any(k in f"{cls.__module__}.{cls.__name__}".lower() for k in PARALLEL_LAUNCHERS)

    def _job_overrides(self, study: optuna.Study, trial: optuna.Trial, space: SearchSpace, spec: str) -> list[str]:
        return [*space.overrides(trial.params),
                f"++hydra.job.env_set.{ENV_TRIAL}={trial._trial_id}",
                f"++hydra.job.env_set.{ENV_STUDY}={quote(study.study_name)}",
                f"++hydra.job.env_set.{ENV_STORAGE}={quote(spec)}"]

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        s = self.settings
        p = prepare(s, self.sweep_dir, arguments)
        study, space, spec, total = p.study, p.space, p.spec, p.total
        trials = study.get_trials(deepcopy=False)
        done_before = sum(t.state in FINISHED for t in trials)
        stale = sum(t.state not in FINISHED for t in trials)
        to_ask = max(0, total - done_before)
        parallel = self._parallel()
        workers = s.n_jobs if parallel else 1
        log.info("Optuna study %r in %s: %s, sampler %s, pruner %s", study.study_name, spec,
                 study.direction.name.lower(), type(study.sampler).__name__, type(study.pruner).__name__)
        log.info("n_trials=%d is the study's total: it has %d finished trials, so %d more are run, %d at a time "
                 "(%s)", total, done_before, to_ask, workers,
                 f"{type(self.launcher).__name__} in worker threads" if parallel else "one after another")
        if stale:
            log.warning("%d trials of this study are still marked running (another sweeper, or one that was "
                        "killed): they are not counted", stale)
        if s.n_jobs > 1 and not parallel:
            log.warning("hydra.sweeper.n_jobs=%d: %s runs its jobs in this process, one at a time "
                        "(hydra/launcher=joblib runs them at once)", s.n_jobs, type(self.launcher).__name__)
        launcher_jobs = OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=None)
        if parallel and isinstance(launcher_jobs, int) and 0 < launcher_jobs < s.n_jobs:
            log.warning("hydra.sweeper.n_jobs=%d > hydra.launcher.n_jobs=%d: the extra trials wait for a worker",
                        s.n_jobs, launcher_jobs)
        returns = self._run(study, space, spec, to_ask, workers, parallel)
        self._write_results(study, spec)
        return returns

    def _run(self, study: optuna.Study, space: SearchSpace, spec: str, to_ask: int, workers: int,
             parallel: bool) -> list[JobReturn]:
        s = self.settings
        returns: list[JobReturn] = []
        counts = {state: 0 for state in FINISHED}
        pending: dict[cf.Future, optuna.Trial] = {}
        asked, stop, hurry = 0, "", False
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="optuna-trial") if parallel else None

        def submit(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future:
            if pool is not None:
                return pool.submit(fn, *args, **kwargs)
            future: cf.Future = cf.Future()  # the basic launcher: the job runs here and now
            try:
                future.set_result(fn(*args, **kwargs))
            except Exception as exc:
                future.set_exception(exc)
            return future

        def finish(future: cf.Future) -> None:
            nonlocal stop
            trial = pending.pop(future)
            ret, error = None, future.exception()
            if error is None:
                ret = future.result()[0]
                returns.append(ret)
            state, value, why = outcome(ret, error)
            signalled = ret is not None and state == TrialState.FAIL and stopped_by_signal(ret)
            if signalled:
                why = "stopped by a signal (its run dir holds what it saved; the trial counts as failed)"
            try:
                study.tell(trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
            except Exception as exc:  # e.g. GridSampler's study.stop() once the grid is walked
                if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                    raise
                log.debug("tell trial %d: %s", trial.number, exc)
            counts[state] += 1
            (log.info if state != TrialState.FAIL else log.warning)("trial %d: %s: %s", trial.number, state.name, why)
            n_done = sum(counts.values())
            if not stop and counts[TrialState.FAIL] / n_done > s.max_failure_rate:
                stop = (f"{counts[TrialState.FAIL]} of {n_done} trials failed (> max_failure_rate="
                        f"{s.max_failure_rate})")
                log.error("%s: no new trial is started; the running ones finish", stop)
            if not stop and signalled:
                stop = "a stop signal"
                log.warning("no new trial is started after a stop signal")

        try:
            while True:
                while not stop and asked < to_ask and len(pending) < workers:
                    trial = study.ask(space.distributions)
                    asked += 1
                    overrides = self._job_overrides(study, trial, space, spec)
                    log.info("trial %d (%d/%d of this run): %s", trial.number, asked, to_ask,
                             " ".join(f"{k}={v}" for k, v in trial.params.items()) or "(no search space)")
                    # one job per launch, numbered by the trial: folders continue after earlier trials
                    try:
                        future = submit(self.launcher.launch, [overrides], initial_job_idx=trial.number)
                    except BaseException:  # a second Ctrl-C in a job of this process
                        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                        raise
                    pending[future] = trial
                if not pending:
                    break
                done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
                for future in done:
                    finish(future)
        except BaseException:  # Ctrl-C, a stop signal's exit: record the trials that end, then leave
            stop = stop or "interrupted"
            try:  # the running jobs got the signal too: they save and end
                for future in cf.as_completed(list(pending)):
                    finish(future)
            except BaseException:  # a second one: leave at once
                hurry = True
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=not hurry, cancel_futures=hurry)
            log.info("this run: %d trials: %d complete, %d pruned, %d failed%s", sum(counts.values()),
                     counts[TrialState.COMPLETE], counts[TrialState.PRUNED], counts[TrialState.FAIL],
                     f" (stopped: {stop})" if stop else "")
        return returns

    def _write_results(self, study: optuna.Study, spec: str) -> None:
        trials = study.get_trials(deepcopy=False)
        count = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "storage": spec,
                                   "direction": study.direction.name.lower(), "n_trials": len(trials),
                                   **{k: count[k] for k in ("complete", "pruned", "fail", "running")}}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            results.update(best_trial=best.number, best_params=dict(best.params), best_value=best.value)
            log.info("best trial %d: value %s, %s", best.number, best.value,
                     " ".join(f"{k}={v}" for k, v in best.params.items()))
        else:
            log.warning("no trial of study %r completed", study.study_name)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / RESULTS_FILE)
