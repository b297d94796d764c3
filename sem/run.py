"""The composition root: validate -> build -> fit -> summarise.

This is the only module that calls ``hydra.utils.instantiate``. Every object it builds comes from a
``_target_`` node in ``conf/``, so any of them can be swapped from the shell.
"""

from __future__ import annotations

import copy
import logging
import math
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

log = logging.getLogger("sem.run")
register_configs()  # schemas must be in Hydra's ConfigStore before @hydra.main composes

EXIT_BAD_CONFIG = 2
EXIT_TRAINING_FAILED = 1


_main_started = False


def cli(app: Any) -> None:
    """Run the ``@hydra.main`` app. Hydra exits 1 when the config does not compose (unknown key,
    wrong type, no such option); that is a usage error, so it leaves with exit code 2 instead."""
    try:
        app()
    except SystemExit as exc:
        if exc.code == 1 and not _main_started:
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
        _exit_if_invalid(_validate(job_cfg)[0])


def _exit_if_invalid(problems: list[str]) -> None:
    if problems:
        for line in problems:
            print(f"config error: {line}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def main(cfg: DictConfig) -> float | None:
    """Run one training job from a composed config; return the final ``val/bpb`` for sweepers."""
    global _main_started
    _main_started = True
    problems, corpus = _validate(cfg)
    _exit_if_invalid(problems)

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    started = time.time()
    summary = RunSummary(run_dir)
    resume_from = _resume_path(cfg, run_dir)
    cfg, budget = resolve_lengths(cfg, _recorded_budget(resume_from))
    try:
        built = build(cfg, run_dir, corpus, resume_from=resume_from, budget=budget)
        if cfg.dry_run:
            built.describe()
            return None
        summary.begin(cfg, parent_checkpoint=built.resume_from)
        return fit_and_summarise(cfg, built, summary, started)
    except CorpusError as exc:  # found when the corpus is read: still a problem with the input
        _exit_if_invalid([f"data.corpus: {exc}"])
    except InstantiationException as exc:  # a value only its constructor could check
        _exit_if_invalid([f"cannot build an object from the config: {exc.__cause__ or exc}"])
    except (KeyboardInterrupt, SystemExit) as exc:
        summary.finish("preempted", wall_s=time.time() - started, error=f"interrupted ({type(exc).__name__})")
        code = getattr(exc, "code", None)
        # SIGTERM reaches us as Lightning's SystemExit with no code: an interrupted run never exits 0
        raise SystemExit(code if code not in (None, 0) else EXIT_TRAINING_FAILED) from None
    except Exception as exc:  # a training failure: say why in summary.json, exit 1
        log.error("training failed: %s: %s", type(exc).__name__, exc)
        summary.finish("failed", wall_s=time.time() - started, error=f"{type(exc).__name__}: {exc}")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise TrainingFailed(str(exc)) from exc
        log.debug("traceback", exc_info=True)
        sys.exit(EXIT_TRAINING_FAILED)


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
    """Everything a fit needs, built from the config."""

    datamodule: Any
    module: Any
    trainer: Any
    checkpoint: Any
    resume_from: str | None
    precision_note: str

    def describe(self) -> None:
        log.info("dry run: built everything, not training")
        log.info("model: %s (%s parameters)", type(self.module.model).__name__,
                 f"{self.module.num_parameters:,}")
        log.info("data: %s", self.datamodule.describe())
        log.info("precision: %s", self.precision_note)
        log.info("trainer: max_steps=%d on %s", self.trainer.max_steps,
                 type(self.trainer.accelerator).__name__)


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


def _recorded_budget(resume_from: str | None) -> dict[str, Any] | None:
    """The lengths the checkpoint's run resolved, or None (a fresh run, or an older checkpoint)."""
    if resume_from is None:
        return None
    import torch

    ckpt = torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True)
    return (ckpt.get("sem") or {}).get("budget")


def build(cfg: DictConfig, run_dir: Path, corpus: Any, resume_from: str | None = None,
          budget: dict[str, Any] | None = None) -> Built:
    """Build data, model, optimizer, scheduler, curriculum, distillation, callbacks, loggers,
    precision plugin, accelerator and Trainer, in that order. ``cfg`` has its lengths resolved
    (``resolve_lengths``)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ProgressBar

    from sem.training.lightning_module import SEMLightningModule
    from sem.training.precision_plugin import device_type_of

    # Lightning 2.6 trips over its own torch-2.13 pytree deprecation on every fit: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = _instantiate(_without(cfg.data, "corpus"), corpus=corpus)
    datamodule.setup()
    log.info("data: %s", datamodule.describe())

    model = _instantiate(cfg.model)
    curriculum = _instantiate(cfg.curriculum)
    optimizer = _instantiate(cfg.optimizer)
    scheduler = _instantiate(cfg.scheduler)
    teacher = _instantiate(cfg.distillation.teacher) if cfg.distillation.teacher else None
    distill_loss = _instantiate(cfg.distillation.loss) if cfg.distillation.loss else None

    module = SEMLightningModule(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        curriculum=curriculum,
        teacher=teacher,
        distill_loss=distill_loss,
        nan_at_step=cfg.faults.nan_at_step,
        bpb=datamodule.val_bpb,
        budget=budget,
    )

    interactive = sys.stderr.isatty()
    callbacks = []
    for name, node in cfg.callbacks.items():
        if node is None:
            continue
        if name == "progress_bar" and not interactive:
            continue  # a live bar only makes sense in a terminal; logs get SEMConsoleLogger lines
        callbacks.append(_instantiate(node))
    checkpoint = _instantiate(cfg.checkpoint, dirpath=str(run_dir / "checkpoints"))
    callbacks.append(checkpoint)

    loggers = [_instantiate(node, save_dir=str(run_dir)) for node in cfg.logger.values() if node]

    accelerator = _instantiate(_without(cfg.accelerator, "name"))
    device_type = device_type_of(accelerator)
    precision_plugin = _instantiate(cfg.precision)(device_type=device_type)

    accumulate = cfg.trainer.accumulate_grad_batches
    trainer = _instantiate(
        cfg.trainer,
        accelerator=accelerator,
        plugins=[precision_plugin],
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        max_epochs=-1,
        check_val_every_n_epoch=None,  # the train loader is infinite: validate by step count
        val_check_interval=cfg.trainer.val_check_interval * accumulate,  # Lightning counts micro-batches
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )
    return Built(
        datamodule=datamodule,
        module=module,
        trainer=trainer,
        checkpoint=checkpoint,
        resume_from=resume_from,
        precision_note=precision_plugin.describe(),
    )


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            log.info("resume=auto: resuming from %s", last)
            return str(last)
        log.info("resume=auto: no checkpoint in %s, starting fresh", last.parent)
        return None
    return str(Path(cfg.resume).expanduser().resolve())


# --------------------------------------------------------------------------- fit and summarise


def _save_final_checkpoint(trainer: Any, checkpoint: Any) -> None:
    """ModelCheckpoint writes ``last.ckpt`` only at its own interval: when max_steps is not a
    multiple of it, the final weights would go unsaved and ``resume=auto`` would redo steps."""
    if checkpoint.last_model_path and checkpoint._last_global_step_saved == trainer.global_step:
        return
    ckpt_dir = Path(checkpoint.dirpath)
    path = ckpt_dir / f"step_{trainer.global_step:07d}.ckpt"
    trainer.save_checkpoint(path)
    if checkpoint.save_last:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")
        checkpoint.last_model_path = str(ckpt_dir / "last.ckpt")


def _throughput(trainer: Any) -> float | None:
    """Training tokens per second over the whole run (validation time excluded)."""
    for cb in trainer.callbacks:
        if hasattr(cb, "overall_tokens_per_s"):
            return cb.overall_tokens_per_s
    return None


def fit_and_summarise(cfg: DictConfig, built: Built, summary: RunSummary, started: float) -> float:
    trainer, module, dm = built.trainer, built.module, built.datamodule
    curriculum = module.curriculum
    train_loader = dm.train_loader(
        start_step=lambda: trainer.global_step,
        shape_at=curriculum.shape_at if curriculum is not None else None,
        accumulate=cfg.trainer.accumulate_grad_batches,
    )
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=dm.val_loader(),
                ckpt_path=built.resume_from)
    _save_final_checkpoint(trainer, built.checkpoint)

    final_windows = dm.final_val_max_windows
    n_windows = len(dm.val_windows(final_windows)[0])
    log.info("final validation on %s %d held-out windows",
             "all" if final_windows is None or n_windows < final_windows else "a fixed subset of", n_windows)
    module.final_validation = True
    trainer.validate(module, dataloaders=dm.val_loader(max_windows=final_windows), verbose=False)
    val = module.last_val
    summary.finish(
        "completed",
        wall_s=time.time() - started,
        steps=trainer.global_step,
        val_loss=val["val/loss"],
        val_bpb=val["val/bpb"],
        **dm.compressor_bpb,
        tokens_per_s=_throughput(trainer),
        best_checkpoint=None,  # no monitored metric yet: "best" comes with the checkpoint manager
        last_checkpoint=built.checkpoint.last_model_path or None,
    )
    bpb = val["val/bpb"]
    anchors = ", ".join(f"{name} {dm.compressor_bpb[key]:.4f}" for name, key in
                        (("gzip -9", "gzip_bpb"), ("bz2 -9", "bz2_bpb"), ("xz -9e", "xz_bpb")))
    beaten = sum(bpb < v for v in dm.compressor_bpb.values())
    log.info("final: val/bpb %.4f vs %s on the same held-out bytes (below %d of 3); val/loss %.4f "
             "nats/token, %d steps", bpb, anchors, beaten, val["val/loss"], trainer.global_step)
    return float(val["val/bpb"]) if math.isfinite(val["val/bpb"]) else float("inf")
