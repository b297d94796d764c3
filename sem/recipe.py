"""The composition root: validate -> build -> fit -> summarise.

This is the only module that calls ``hydra.utils.instantiate``. Every object it builds comes from a
``_target_`` node in ``conf/``, so any of them can be swapped from the shell.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sem.validation import validate
from sem.config import register_configs
from sem.data.corpus import CorpusError
from sem.summary import RunSummary
from sem.sweep import SweepExit
from sem.training.preemption import EXIT_PREEMPTED, StopSignals

log = logging.getLogger("sem.run")
register_configs()  # schemas must be in Hydra's ConfigStore before @hydra.main composes

EXIT_BAD_CONFIG = 2
EXIT_TRAINING_FAILED = 1
# EXIT_PREEMPTED (75): stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint; resume=auto continues
# (submitit's SIGUSR2 saves the same way, then submitit requeues the job: sem.training.preemption)


_main_started = False


def cli(app: Any) -> None:
    """Run the ``@hydra.main`` app. Hydra exits 1 when the config does not compose (unknown key,
    wrong type, no such option); that is a usage error, so it leaves with exit code 2 instead."""
    try:
        app()
    except SystemExit as exc:
        if exc.code == 1 and not _main_started and not isinstance(exc, SweepExit):
            raise SystemExit(EXIT_BAD_CONFIG) from None
        raise


class TrainingFailed(RuntimeError):
    """Raised in multirun so Hydra records the job as failed; a single run exits 1 instead."""


class ValidateFirst(HydraCallback):
    """Validates a single run before Hydra creates its directory, so a rejected config writes
    nothing (not even ``.hydra/`` into an existing ``outputs/<run.name>``). Sweep jobs are
    validated in ``main`` (each has a fresh directory)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job_cfg = copy.deepcopy(config)
        with open_dict(job_cfg):
            del job_cfg["hydra"]  # what the job itself will see
        _exit_if_invalid(_validate(job_cfg)[0] + _run_dir_problems(Path(config.hydra.run.dir)))


def _run_dir_problems(run_dir: Path) -> list[str]:
    """A run dir (or the part of its path that exists) must be writable: found now, not mid-save."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for d in {existing, existing / "checkpoints"}:
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            return [f"hydra.run.dir={str(run_dir)!r}: {d} is not writable (choose another run.name "
                    "or fix its permissions)"]
    return []


class BadConfig(SystemExit):
    """Exit code 2 with the config's problems (already printed, one per line); a sweep job records
    them in its summary.json instead of ending the sweep (``sem.sweep.sweep_job``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(EXIT_BAD_CONFIG)
        self.problems = problems


def _exit_if_invalid(problems: list[str]) -> None:
    if problems:
        for line in problems:
            print(f"config error: {line}", file=sys.stderr)
        raise BadConfig(problems)


def main(cfg: DictConfig) -> float | None:
    """Run one training job from a composed config; return the final ``val/bpb`` for sweepers.
    A sweep job runs inside ``sem.sweep.sweep_job``: a job that fails is recorded (summary.json,
    ledger) and returns None, and the sweep goes on to its next job."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from sem.sweep import sweep_job

        return sweep_job(train, cfg)
    return train(cfg)


def train(cfg: DictConfig) -> float | None:
    """Validate, build, fit, summarise; return the final ``val/bpb`` (None for a dry run)."""
    global _main_started
    _main_started = True
    problems, corpus = _validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _exit_if_invalid(problems or _run_dir_problems(run_dir))
    from sem.sweep import apply_job_threads

    apply_job_threads(cfg.threads)  # every job: loky reuses its worker processes between jobs

    from sem.distributed import ddp_env, end_distributed

    started, saved_env = time.time(), ddp_env()
    _quiet_other_ranks()
    signals = StopSignals()
    signals.install()  # from here on, SIGTERM/SIGINT/SIGUSR1 end the run at a step boundary, saved
    summary = RunSummary(run_dir)
    try:
        checkpoints = _instantiate(cfg.checkpoint, dirpath=str(run_dir / "checkpoints"))
        resume_from, payload = _resume(cfg, checkpoints)
        finished = _already_finished(cfg, run_dir, payload)
        if finished is not None:
            return finished
        recorded = (payload.get("sem") or {}).get("budget") if payload is not None else None
        cfg, budget = resolve_lengths(cfg, recorded)
        built = build(cfg, run_dir, corpus, resume_from=resume_from, budget=budget,
                      checkpoints=checkpoints, signals=signals)
        if payload is not None:
            _exit_if_invalid(_shape_problems(built.engine.model, payload, resume_from))
        if cfg.dry_run:
            from sem.calendar import dry_run

            # the timing probe trains a copy of the model with a fresh optimizer of the configured kind
            dry_run(cfg, built, run_dir, optimizer=_instantiate(cfg.optimizer),
                    one_line=HydraConfig.get().mode == RunMode.MULTIRUN)
            return None
        summary.begin(cfg, parent_checkpoint=built.resume_from)
        return fit_and_summarise(cfg, built, summary, started)
    except CorpusError as exc:  # found when the corpus is read: still a problem with the input
        _exit_if_invalid([f"data.corpus: {exc}"])
    except InstantiationException as exc:  # a value only its constructor could check
        _exit_if_invalid([f"cannot build an object from the config: {exc.__cause__ or exc}"])
    except (KeyboardInterrupt, SystemExit) as exc:
        code = getattr(exc, "code", None)
        if isinstance(exc, SystemExit) and code in (0, EXIT_BAD_CONFIG, EXIT_PREEMPTED):
            raise
        summary.finish("preempted", wall_s=time.time() - started, error=f"interrupted ({type(exc).__name__})")
        raise SystemExit(code if code not in (None, 0) else EXIT_TRAINING_FAILED) from None
    except Exception as exc:  # a training failure: say why in summary.json, exit 1
        log.error("training failed: %s: %s", type(exc).__name__, exc)
        summary.finish("failed", wall_s=time.time() - started, error=f"{type(exc).__name__}: {exc}")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise TrainingFailed(str(exc)) from exc
        log.debug("traceback", exc_info=True)
        sys.exit(EXIT_TRAINING_FAILED)
    finally:
        signals.restore()
        end_distributed(saved_env)  # the next job of a sweep in this process starts without a process group
        signals.hand_over()  # submitit's SIGUSR2, after the stop's checkpoint: submitit requeues (SystemExit)


def _quiet_other_ranks() -> None:
    """An extra DDP rank logs warnings and errors to the console, everything to its own log file
    (``rank_<n>.log`` in the run dir): the console reads as one run, not one per rank."""
    from sem.summary import is_global_zero

    if is_global_zero():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _validate(cfg: DictConfig) -> tuple[list[str], Any]:
    """The config's problems, and the corpus descriptor (cheap: nothing is read yet)."""
    if OmegaConf.missing_keys(cfg):
        return [f"{key}: missing value (set it, e.g. {key}=...)"
                for key in sorted(OmegaConf.missing_keys(cfg))], None
    try:
        corpus = _instantiate(cfg.data.corpus)
    except Exception as exc:
        cause = exc.__cause__ or exc
        return [f"data.corpus: cannot build {cfg.data.corpus.get('_target_')!r}: {cause}"], None
    return validate(cfg, corpus), corpus


# ------------------------------------------------------------------------------------- build


@dataclass
class Built:
    """Everything a fit needs, built from the config. ``engine`` is a LightningEngine or an SEMTrainer:
    both have fit, validate, global_step, max_steps, tokens_per_s and model."""

    datamodule: Any
    engine: Any
    checkpoint: Any
    resume_from: str | None
    precision_note: str
    signals: StopSignals | None = None

    def describe(self) -> None:
        from sem.model import count_parameters

        log.info("dry run: built everything, not training")
        log.info("model: %s (%s parameters)", type(self.engine.model).__name__,
                 f"{count_parameters(self.engine.model):,}")
        log.info("data: %s", self.datamodule.describe())
        log.info("precision: %s", self.precision_note)
        engine = self.engine.describe()
        log.info("engine: %s, max_steps=%d", engine, self.engine.max_steps)


def _without(node: DictConfig, *keys: str) -> DictConfig:
    """An untyped copy of ``node`` without ``keys`` (built separately or not constructor args)."""
    resolved = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in resolved.items() if k not in keys})


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    log.info("Instantiating <%s>", node._target_)
    return instantiate(node, **kwargs)


def resolve_lengths(cfg: DictConfig, recorded: dict[str, Any] | None = None
                    ) -> tuple[DictConfig, dict[str, Any]]:
    """The run's config with every fraction of ``trainer.max_steps`` turned into steps (once, here),
    and the record of what was resolved (saved in checkpoints; ``recorded`` from the checkpoint a run
    resumes wins, so a decay branch keeps its parent's warm-up and stage boundaries)."""
    from sem.training.budget import resolve_budget

    resolved, record = resolve_budget(OmegaConf.to_container(cfg, resolve=True), recorded)
    if record:
        log.info("budget (trainer.max_steps=%d): %s", cfg.trainer.max_steps,
                 ", ".join(f"{k}={v}" for k, v in record.items()))
    return OmegaConf.create(resolved), record


def build(cfg: DictConfig, run_dir: Path, corpus: Any, resume_from: str | None = None,
          budget: dict[str, Any] | None = None, checkpoints: Any = None,
          signals: StopSignals | None = None) -> Built:
    """Build data, model, optimizer, scheduler, curriculum, distillation, health monitor, checkpoint
    manager, then the engine (Lightning: callbacks, loggers, precision plugin, accelerator, Trainer;
    standalone: SEMTrainer), in that order. ``cfg`` has its lengths resolved (``resolve_lengths``)."""
    from sem.summary import is_global_zero
    from sem.training.health import Faults
    from sem.training.step import StepPolicy

    _seed_everything(cfg.seed)
    datamodule = _instantiate(_without(cfg.data, "corpus"), corpus=corpus)
    datamodule.setup()
    log.info("data: %s", datamodule.describe())

    model = _instantiate(cfg.model)
    curriculum = _instantiate(cfg.curriculum)
    optimizer = _instantiate(cfg.optimizer)
    scheduler = _instantiate(cfg.scheduler)
    teacher = _instantiate(cfg.distillation.teacher) if cfg.distillation.teacher else None
    distill_loss = _instantiate(cfg.distillation.loss) if cfg.distillation.loss else None
    health = _instantiate(cfg.health)
    if is_global_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        health.events_path = run_dir / "health.jsonl"
        health.events_path.touch()  # present (empty) in every run: no events is news too
    if checkpoints is None:
        checkpoints = _instantiate(cfg.checkpoint, dirpath=str(run_dir / "checkpoints"))
    every, val_every = cfg.checkpoint.every_n_steps, cfg.trainer.val_check_interval
    if every and checkpoints.keep_best and every % val_every and every < cfg.trainer.max_steps:
        log.warning("checkpoint.every_n_steps=%d is not a multiple of trainer.val_check_interval=%d: "
                    "best.ckpt is chosen among checkpoints whose step had a validation", every, val_every)
    # The teacher is a plain object, not a submodule: it must never appear in the student's
    # parameters, optimizer or state_dict. It is saved under checkpoint["sem"] instead.
    policy = StepPolicy(model, curriculum, teacher(student=model) if teacher is not None else None,
                        distill_loss, Faults(**cfg.faults), health, cfg.seed, budget,
                        OmegaConf.to_container(cfg, resolve=True))
    if cfg.engine == "standalone":
        engine, note = _standalone(cfg, run_dir, policy, datamodule, optimizer, scheduler, checkpoints, signals)
    else:
        engine, note = _lightning(cfg, run_dir, policy, datamodule, optimizer, scheduler, checkpoints, signals)
    return Built(datamodule=datamodule, engine=engine, checkpoint=checkpoints, resume_from=resume_from,
                 precision_note=note, signals=signals)


def _seed_everything(seed: int) -> None:
    """What ``pl.seed_everything`` does, without Lightning: the same initial weights in both engines."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _standalone(cfg: DictConfig, run_dir: Path, policy: Any, datamodule: Any, optimizer: Any, scheduler: Any,
                checkpoints: Any, signals: StopSignals | None) -> tuple[Any, str]:
    import torch

    from sem.engines.standalone import SEMTrainer
    from sem.training.precision import PrecisionPolicy, device_type_for

    unused = [name for name, node in cfg.logger.items() if node]
    if unused:
        log.warning("engine=standalone writes metrics.jsonl only: logger %s is not used (engine=lightning "
                    "runs Lightning's loggers)", ", ".join(unused))
    device_type = device_type_for(cfg.accelerator.name)
    precision = PrecisionPolicy.of(cfg.precision.precision, device_type)
    console = cfg.callbacks.get("console")
    trainer = SEMTrainer(
        policy=policy, datamodule=datamodule, optimizer=optimizer, scheduler=scheduler, checkpoints=checkpoints,
        precision=precision, device=torch.device(device_type), run_dir=run_dir,
        max_steps=cfg.trainer.max_steps, val_check_interval=cfg.trainer.val_check_interval,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        console_every_n_steps=console.every_n_steps if console else 10**9, signals=signals)
    dtype = {None: "fp32"}.get(precision.autocast_dtype, str(precision.autocast_dtype))
    return trainer, f"{precision.precision} on {device_type} (autocast {dtype}); complex regions in complex64"


def _lightning(cfg: DictConfig, run_dir: Path, policy: Any, datamodule: Any, optimizer: Any, scheduler: Any,
               checkpoints: Any, signals: StopSignals | None) -> tuple[Any, str]:
    from pytorch_lightning.callbacks import ProgressBar

    from sem.engines.lightning.callbacks import CheckpointCallback, ManagedCheckpointIO
    from sem.engines.lightning.engine import LightningEngine
    from sem.engines.lightning.module import SEMLightningModule
    from sem.engines.lightning.precision import device_type_of

    # Lightning 2.6 trips over its own torch-2.13 pytree deprecation on every fit: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # val/loss and val/bpb are logged already summed over ranks (SEMLightningModule): no sync_dist needed
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
    module = SEMLightningModule(policy=policy, optimizer=optimizer, scheduler=scheduler,
                                bpb=datamodule.val_bpb, checkpoints=checkpoints, signals=signals)
    interactive = sys.stderr.isatty()
    callbacks = []
    for name, node in cfg.callbacks.items():
        if node is None:
            continue
        if name == "progress_bar" and not interactive:
            continue  # a live bar only makes sense in a terminal; logs get SEMConsoleLogger lines
        callbacks.append(_instantiate(node))
    callbacks.append(CheckpointCallback(checkpoints, signals))
    from sem.sweep import logger_kwargs

    loggers = [_instantiate(node, save_dir=str(run_dir), **logger_kwargs(node, run_dir))
               for node in cfg.logger.values() if node]
    accelerator = _instantiate(_without(cfg.accelerator, "name"))
    device_type = device_type_of(accelerator)
    precision_plugin = _instantiate(cfg.precision)(device_type=device_type)
    strategy = _instantiate(cfg.strategy)(device_type=device_type, devices=cfg.trainer.devices,
                                          num_nodes=cfg.trainer.num_nodes, precision=precision_plugin.precision)
    plugins: list[Any] = [ManagedCheckpointIO(checkpoints, cfg.trainer.accumulate_grad_batches)]
    if cfg.strategy.name == "fsdp":  # FSDP brings its own precision plugin, built from the precision flag
        precision = {"precision": precision_plugin.precision}
    else:
        precision, plugins = {}, [precision_plugin, *plugins]
    accumulate = cfg.trainer.accumulate_grad_batches
    trainer = _instantiate(
        cfg.trainer,
        accelerator=accelerator,
        strategy=strategy,
        plugins=plugins,
        **precision,
        # The train stream and the validation windows shard themselves by rank (validation without
        # the padding of Lightning's DistributedSampler, which would count windows twice).
        use_distributed_sampler=False,
        enable_checkpointing=False,  # sem's CheckpointCallback saves; Lightning's ModelCheckpoint is not used
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        max_epochs=-1,
        check_val_every_n_epoch=None,  # the train loader is infinite: validate by step count
        val_check_interval=cfg.trainer.val_check_interval * accumulate,  # Lightning counts micro-batches
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )
    return LightningEngine(trainer, module, datamodule, accumulate), precision_plugin.describe()


def _resume(cfg: DictConfig, checkpoints: Any) -> tuple[str | None, dict[str, Any] | None]:
    """(path, verified payload) to resume from, or (None, None) for a fresh start. ``resume=auto``
    takes the newest checkpoint that verifies (bad ones are skipped with a warning); an explicit path
    that does not verify is a usage error (exit 2)."""
    from sem.training.checkpoint import CheckpointError

    if cfg.resume is None:
        return None, None
    if cfg.resume == "auto":
        found = checkpoints.newest_valid(keep=True)
        if found is None:
            log.info("resume=auto: no valid checkpoint in %s, starting fresh", checkpoints.dir)
            return None, None
        path, payload = found
        checkpoints.last_saved_step = int(payload.get("global_step", -1))  # never re-save the resumed step
        log.info("resume=auto: resuming from %s (step %s)", path, payload.get("global_step"))
        return str(path), payload
    path = Path(cfg.resume).expanduser().resolve()
    try:
        payload = checkpoints.load(path, keep=True)
    except CheckpointError as exc:
        _exit_if_invalid([f"resume={cfg.resume}: {exc}"])
        raise  # not reached
    if path.parent == checkpoints.dir.resolve():  # an older checkpoint of this very run: a new branch
        from sem.summary import is_global_zero

        step = int(payload.get("global_step", -1))
        if is_global_zero():  # the other ranks of a DDP run only read
            checkpoints.set_aside_after(step)
        checkpoints.last_saved_step = step
    return str(path), payload


def _already_finished(cfg: DictConfig, run_dir: Path, payload: dict[str, Any] | None) -> float | None:
    """The final val/bpb when resuming a run that already completed all its steps (nothing to do)."""
    if payload is None or int(payload.get("global_step", -1)) < cfg.trainer.max_steps:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # trained to the end but never summarised (killed in the final validation): finish it
    if summary.get("status") != "completed" or summary.get("steps") != payload.get("global_step"):
        return None
    log.info("resume: this run already finished at step %d (summary.json: completed, val/bpb %s); "
             "nothing to do. Raise trainer.max_steps to train further.", summary["steps"], summary.get("val_bpb"))
    bpb = summary.get("val_bpb")
    return float(bpb) if bpb is not None else float("inf")


def _shape_problems(model: Any, payload: dict[str, Any], path: str | None) -> list[str]:
    """One line naming the mismatching keys when a checkpoint does not fit the configured model."""
    from sem.training.checkpoint import model_state

    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model_state(payload["state_dict"]).items() if hasattr(v, "shape")}
    missing, unexpected = sorted(set(have) - set(got)), sorted(set(got) - set(have))
    wrong = [f"{k} {list(got[k])} in the checkpoint vs {list(have[k])} configured"
             for k in sorted(set(have) & set(got)) if have[k] != got[k]]
    parts = []
    if wrong:
        parts.append("shape mismatch: " + "; ".join(wrong[:5]) + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    if missing:
        parts.append(f"missing in the checkpoint: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"not in the model: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    if not parts:
        return []
    return [f"resume={path}: the checkpoint does not fit the configured model ({'; '.join(parts)}); "
            "resume with the model config it was trained with"]


# --------------------------------------------------------------------------- fit and summarise


def _write_samples(cfg: DictConfig, checkpoints: Any, run_dir: Path) -> None:
    """``samples.txt``: what the final checkpoint writes (rebuilt from the file alone, as a user would)."""
    from sem.summary import is_global_zero

    last = checkpoints.last()
    if cfg.sample.n == 0 or last is None or not is_global_zero():
        return
    try:
        import sem
        from sem.sample import write_samples

        model, _ = sem.load(last)
        s = cfg.sample
        path = write_samples(model, run_dir / "samples.txt", prompts=list(s.prompts), n=s.n,
                             max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p, seed=s.seed)
        log.info("samples from %s: %s", last.name, path)
    except Exception as exc:  # samples are a courtesy: they never turn a finished run into a failure
        log.warning("could not write samples.txt: %s: %s", type(exc).__name__, exc)


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def fit_and_summarise(cfg: DictConfig, built: Built, summary: RunSummary, started: float) -> float:
    engine, dm, checkpoints = built.engine, built.datamodule, built.checkpoint
    engine.fit(built.resume_from)
    stopped_by = built.signals.received if built.signals is not None else None
    if stopped_by is not None and engine.global_step < engine.max_steps:
        last = checkpoints.last()
        summary.finish("preempted", wall_s=time.time() - started, steps=engine.global_step,
                       **dm.compressor_bpb, tokens_per_s=engine.tokens_per_s,
                       best_checkpoint=_str(checkpoints.best()), last_checkpoint=_str(last),
                       error=f"stopped by {stopped_by} at step {engine.global_step}")
        log.warning("preempted by %s at step %d: checkpoint %s; `resume=auto` (same run dir) continues",
                    stopped_by, engine.global_step, last)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return float("nan")  # preempted, in summary.json; sem.sweep.sweep_job stops the sweep there
        log.warning("exit code %d (preempted)", EXIT_PREEMPTED)
        sys.exit(EXIT_PREEMPTED)

    final_windows = dm.final_val_max_windows
    n_windows = len(dm.val_windows(final_windows)[0])
    log.info("final validation on %s %d held-out windows",
             "all" if final_windows is None or n_windows < final_windows else "a fixed subset of", n_windows)
    val = engine.validate(dm.val_loader(max_windows=final_windows), final=True)
    summary.finish(
        "completed",
        wall_s=time.time() - started,
        steps=engine.global_step,
        val_loss=val["val/loss"],
        val_bpb=val["val/bpb"],
        **dm.compressor_bpb,
        tokens_per_s=engine.tokens_per_s,
        best_checkpoint=_str(checkpoints.best()),
        last_checkpoint=_str(checkpoints.last()),
    )
    _write_samples(cfg, checkpoints, summary.run_dir)
    bpb = val["val/bpb"]
    anchors = ", ".join(f"{name} {dm.compressor_bpb[key]:.4f}" for name, key in
                        (("gzip -9", "gzip_bpb"), ("bz2 -9", "bz2_bpb"), ("xz -9e", "xz_bpb")))
    beaten = sum(bpb < v for v in dm.compressor_bpb.values())
    log.info("final: val/bpb %.4f vs %s on the same held-out bytes (below %d of 3); val/loss %.4f "
             "nats/token, %d steps", bpb, anchors, beaten, val["val/loss"], engine.global_step)
    return float(bpb) if math.isfinite(bpb) else float("inf")
