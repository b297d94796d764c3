"""``train(cfg)``: one run, as a recipe. Validate, resolve the budget, build, resume, fit, summarise,
sample; each stage is a function of the package that owns it. With ``sem.engines.build`` this is the
composition root: every object is built from a ``_target_`` node of the composed config.

``run_guard`` is what every stage runs inside: the config validated before anything is written, stop
signals turned into a saved checkpoint, and any failure turned into ``summary.json`` and an exit code
(``sem.errors``)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from sem.config.validate import run_dir_problems, validate_run
from sem.contracts import ContractError, Corpus
from sem.data.corpus import CorpusError
from sem.engines.build import Built, build, make, resolve_lengths
from sem.engines.cluster import bind_ranks
from sem.engines.final import summarise
from sem.engines.fit import fit
from sem.engines.resume import Resume, already_finished, find_resume
from sem.engines.samples import write_samples
from sem.errors import EXIT_BAD_CONFIG, EXIT_PREEMPTED, EXIT_TRAINING_FAILED, RunFailed, TrainingFailed, exit_if_invalid
from sem.record.lock import RunDirBusy, hold
from sem.record.summary import RunSummary, Status, is_global_zero
from sem.training.checkpoint import CheckpointManager
from sem.training.distributed import at_lost, ddp_env, end_distributed, peers_gone
from sem.training.preemption import Stopped, StopSignals
from sem.training.pruning import Pruned

log = logging.getLogger("sem.recipe")


def train(cfg: DictConfig) -> float | Pruned | None:
    """Train one run from a composed config; the final ``val/bpb`` (what a sweeper minimises), or where a
    sweeper's judge stopped it (``sem.training.pruning``)."""
    with run_guard(cfg) as run:
        resume = find_resume(cfg, run.checkpoints)
        if (done := already_finished(cfg, run.dir, resume)) is not None:
            return done
        built = prepare(run, resume)
        with run.signals.deferred():  # the run's records are written whole
            run.summary.begin(run.cfg, parent_checkpoint=built.resume_from)
        if (pruned := fit(built, run.summary, run.started)) is not None:  # (stop signals: at a step boundary)
            return pruned  # a sweeper's judge stopped it: the sweeper records the trial as pruned
        bpb = summarise(built, run.summary, run.started)
        if not built.quick:  # trainer.fast_dev_run saves no checkpoint to sample from
            write_samples(run.cfg, built.checkpoints, run.dir, run.signals)
        return bpb
    return None  # not reached: run_guard re-raises or exits


def prepare(run: Run, resume: Resume) -> Built:
    """Resolve the run's lengths (fractions of ``trainer.max_steps``; a resumed run keeps its
    checkpoint's), then build every component and the engine. Used by ``train`` and the dry run."""
    run.cfg, budget = resolve_lengths(run.cfg, resume.budget)
    return build(run.cfg, run.dir, run.corpus, resume=resume, budget=budget,
                 checkpoints=run.checkpoints, signals=run.signals)


@dataclass
class Run:
    """One run's context, set up by ``run_guard``: its config (lengths resolved once built), its
    directory, the corpus descriptor, the checkpoint manager, the stop signals and ``summary.json``."""

    cfg: DictConfig
    dir: Path
    corpus: Corpus
    checkpoints: CheckpointManager
    signals: StopSignals
    summary: RunSummary
    started: float


@contextmanager
def run_guard(cfg: DictConfig) -> Iterator[Run]:
    """Validate (every problem at once, exit 2, nothing written), then hold the run: SIGTERM/SIGINT/
    SIGUSR1 stop it at once before training (nothing to save), at a step boundary during training,
    saved; either way ``summary.json`` says preempted and the exit code is 75. A failure is written to
    ``summary.json`` (exit 1; in a sweep, ``TrainingFailed`` so Hydra records the job)."""
    problems, corpus = validate_run(cfg)
    problems = bind_ranks(cfg)[1] + problems
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    exit_if_invalid(problems or run_dir_problems(run_dir))
    if is_global_zero():  # one process per run dir (taken already by a single run or a sweep job)
        try:
            hold(run_dir)
        except RunDirBusy as exc:
            exit_if_invalid([f"hydra.run.dir={str(run_dir)!r}: {exc}"])
    started, saved_env = time.time(), ddp_env()
    _quiet_other_ranks()
    signals = StopSignals()
    signals.install()
    summary = RunSummary(run_dir)
    checkpoints: CheckpointManager | None = None
    try:
        # Until training starts (the token cache, the build, the rendezvous, the sanity check) a stop
        # abandons the run at once: nothing to save yet (the engine defers stops from its first step).
        signals.abandon("the set-up before training")
        checkpoints = make(cfg.checkpoint, dirpath=str(run_dir / "checkpoints"))
        signals.last_words = lambda why: _stopped(summary, checkpoints, started, why)
        at_lost.append(lambda why: _stopped(summary, checkpoints, started, why, status="failed"))
        yield Run(cfg, run_dir, corpus, checkpoints, signals, summary, started)
    except Stopped as stop:  # a phase with nothing to save: the newest checkpoint (if any) is the run
        signals.defer()  # summary.json is written whole (a second signal still exits at once)
        last = _stopped(summary, checkpoints, started, str(stop))
        signals.release_ranks()  # (DDP) an extra rank still in a collective this one left: ended, not waited for
        log.warning("%s: nothing lost%s; exit code %d", stop, f", `resume=auto` goes on from {last.name}"
                    if last is not None else "", EXIT_PREEMPTED)
        raise SystemExit(EXIT_PREEMPTED) from None
    except (CorpusError, ContractError) as exc:  # found when the corpus is read: still a problem with the input
        exit_if_invalid([f"data.corpus: {exc}"])
    except InstantiationException as exc:  # a value only its constructor could check
        exit_if_invalid([f"cannot build an object from the config: {exc.__cause__ or exc}"])
    except (KeyboardInterrupt, SystemExit) as exc:
        code = getattr(exc, "code", None)
        if isinstance(exc, SystemExit) and code in (0, EXIT_BAD_CONFIG, EXIT_PREEMPTED):
            raise
        summary.finish("preempted", wall_s=time.time() - started, error=f"interrupted ({type(exc).__name__})")
        raise SystemExit(code if code not in (None, 0) else EXIT_TRAINING_FAILED) from None
    except Exception as exc:  # a training failure: say why in summary.json, exit 1
        why = str(exc) if isinstance(exc, RunFailed) else peers_gone(exc) or f"{type(exc).__name__}: {exc}"
        log.error("training failed: %s", why)
        summary.finish("failed", wall_s=time.time() - started, error=why)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise TrainingFailed(str(exc)) from exc
        log.debug("traceback", exc_info=True)
        sys.exit(EXIT_TRAINING_FAILED)
    finally:
        at_lost.clear()
        signals.restore()
        end_distributed(saved_env)  # the next job of a sweep in this process starts without a process group
        signals.hand_over()  # submitit's SIGUSR2, after the stop's checkpoint: submitit requeues (SystemExit)


def _stopped(summary: RunSummary, checkpoints: CheckpointManager | None, started: float, why: str,
             status: Status = "preempted") -> Path | None:
    """``summary.json`` of a run stopped where there was nothing to save (or ``failed``: a peer lost, the
    step in flight abandoned): at the newest checkpoint's step (0 and none before the first). The newest
    checkpoint, if any."""
    step = getattr(checkpoints, "last_saved_step", None)
    last = checkpoints.last() if checkpoints is not None else None
    summary.finish(status, wall_s=time.time() - started, steps=step if step is not None else 0,
                   last_checkpoint=str(last) if last is not None else None, error=why)
    return last


def _quiet_other_ranks() -> None:
    """An extra DDP rank logs warnings and errors to the console, everything to its own log file
    (``rank_<n>.log`` in the run dir): the console reads as one run, not one per rank."""
    if is_global_zero():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
