"""Every option of every config group composes on the tiny base and builds what it names.

Options are discovered from ``conf/<group>/*.yaml``, so a new option is covered automatically and a
new group fails loudly until it has a check here.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sem.config.validate import validate
from sem.engines.build import resolve_lengths
from tests.conftest import CONF, compose_cfg, tiny_data_overrides

OPTIONS = sorted((group.name, option.stem) for group in CONF.iterdir() if group.is_dir()
                 for option in group.glob("*.yaml"))
VOCAB = 259


@pytest.fixture(scope="module")
def base(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return tiny_data_overrides(corpus_dir, cache_dir)


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    # 60 documents: enough for both sides of a 5% split; a line without the field is not used here
    path.write_text("".join(json.dumps({"body": f"def f_{i}(x):\n    return x + {i}\n" * 20}) + "\n"
                            for i in range(60)))
    return path


def _problems(cfg: DictConfig) -> list[str]:
    return validate(cfg, instantiate(cfg.data.corpus))


def _datamodule(cfg: DictConfig) -> Any:
    """Built as the composition root builds it: the corpus separately, then the rest of data."""
    node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                             if k != "corpus"})
    return instantiate(node, corpus=instantiate(cfg.data.corpus))


# ------------------------------------------------------------------------- one check per group


def check_model(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    assert _problems(cfg) == []
    model = instantiate(cfg.model)
    x = torch.randint(0, 256, (2, 16))
    out = model(x, x)
    assert out.logits.shape == (2, 16, VOCAB)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss)


def check_data(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    assert _problems(cfg) == []
    dm = _datamodule(cfg)
    dm.setup()
    x, y = dm.train_batch(0)
    assert x.shape == y.shape == (cfg.data.batch_size, cfg.data.seq_len)
    vx, _ = dm.val_windows(None)
    assert len(vx) > 0
    assert math.isfinite(dm.gzip_bpb) and dm.gzip_bpb > 0


def check_optimizer(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    assert _problems(cfg) == []
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = instantiate(cfg.optimizer)(params=[param])
    (param ** 2).sum().backward()
    optimizer.step()
    # muon: a 1-D weight is never Muon's, it runs on the AdamW side at adamw_lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.get("adamw_lr", cfg.optimizer.lr))
    assert torch.all(param < 1.0), "one step against the gradient must lower every weight"


def check_scheduler(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    assert _problems(cfg) == []
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = instantiate(cfg.optimizer)(params=[param])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, lr_scale=None)
    lr0 = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    lr1 = optimizer.param_groups[0]["lr"]
    # tiny base: warmup_steps=2, so the LR climbs from step 0 to step 1 whatever the preset
    assert 0 < lr0 < lr1 <= cfg.optimizer.lr


def check_curriculum(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from sem.training.curriculum import CurriculumManager

    assert _problems(cfg) == []
    manager = instantiate(cfg.curriculum)
    assert isinstance(manager, CurriculumManager)
    first, last = manager.stages[0], manager.stages[-1]
    assert manager.shape_at(0) == (first.seq_len, first.batch_size)
    assert manager.shape_at(cfg.trainer.max_steps - 1) == (last.seq_len, last.batch_size)


def check_distillation(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    assert _problems(cfg) == []
    if cfg.distillation.teacher is None:
        assert cfg.distillation.loss is None
        return
    student = instantiate(cfg.model)
    teacher = instantiate(cfg.distillation.teacher)(student=student)
    loss_fn = instantiate(cfg.distillation.loss)
    teacher.update(student, 0)  # activation: the teacher starts as a copy of the student
    x = torch.randint(0, 256, (2, 16))
    out = student(x, x)
    parts = loss_fn(out.logits, teacher(x), out.ce_loss)
    assert torch.isfinite(parts["loss"])
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-5)  # identical weights: no divergence


def check_precision(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from sem.training.precision import resolve_precision

    problems = _problems(cfg)
    if resolve_precision(cfg.precision.precision, "cpu") == "16-mixed":
        assert len(problems) == 1 and "16-mixed" in problems[0] and "cpu" in problems[0], problems
        return
    assert problems == []
    plugin = instantiate(cfg.precision)(device_type="cpu")
    assert plugin.describe()


def check_accelerator(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from pytorch_lightning.accelerators import Accelerator

    problems = _problems(cfg)
    if option in ("cpu", "auto") or not problems:
        assert problems == []
        assert isinstance(instantiate(cfg.accelerator), Accelerator)  # the node is a constructor call
        return
    # a device this machine lacks: one clear line naming it, nothing else
    assert len(problems) == 1, problems
    assert f"accelerator={option}" in problems[0] and "no " in problems[0]


def check_trainer(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from pytorch_lightning.accelerators import CPUAccelerator

    assert _problems(cfg) == []
    trainer = instantiate(cfg.trainer, accelerator=CPUAccelerator(), max_steps=3, logger=False,
                          callbacks=[], enable_checkpointing=False, default_root_dir=str(tmp_path),
                          max_epochs=-1, check_val_every_n_epoch=None)
    assert trainer.max_steps == 3
    assert isinstance(trainer.accelerator, CPUAccelerator)


def check_callbacks(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    assert _problems(cfg) == []
    built = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    assert built and all(isinstance(cb, pl.Callback) for cb in built)
    # metrics.jsonl is part of the run contract: the default set must write it
    assert any(type(cb).__name__ == "MetricsWriter" for cb in built)


_LOGGER_MODULES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}


def check_logger(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from pytorch_lightning.loggers import Logger

    assert _problems(cfg) == []
    needs = _LOGGER_MODULES.get(option, ())
    if needs and not any(importlib.util.find_spec(m) for m in needs):
        pytest.skip(f"logger={option} needs {' or '.join(needs)}, not installed here")
    loggers = [instantiate(node, save_dir=str(tmp_path)) for node in cfg.logger.values() if node]
    if option == "none":
        assert loggers == []
    else:
        assert len(loggers) == 1 and isinstance(loggers[0], Logger)


def check_checkpoint(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from sem.training.checkpoint import CheckpointManager

    assert _problems(cfg) == []
    ckpt = instantiate(cfg.checkpoint, dirpath=str(tmp_path / "checkpoints"))
    assert isinstance(ckpt, CheckpointManager)
    assert ckpt.save_on_exit and ckpt.keep_last >= 1 and ckpt.every_n_steps > 0


def check_health(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from sem.training.health import HealthMonitor

    assert _problems(cfg) == []
    monitor = instantiate(cfg.health)
    assert isinstance(monitor, HealthMonitor)
    assert monitor.enabled == (option != "off")
    nan_action = monitor.check_step(0, float("nan"), 1.0).action
    assert nan_action == {"default": "skip", "strict": "stop", "off": "ok"}[option]


def _check_preset(cfg: DictConfig) -> None:
    """A `# @package _global_` preset: valid as composed, and its model runs."""
    assert _problems(cfg) == []
    model = instantiate(cfg.model)
    x = torch.randint(0, 256, (2, 16))
    assert model(x, x).logits.shape == (2, 16, VOCAB)


def check_debug(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    _check_preset(cfg)
    assert cfg.accelerator.name == "cpu"
    assert cfg.trainer.max_steps <= 100
    assert cfg.trainer.val_check_interval <= cfg.trainer.max_steps


def check_experiment(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    _check_preset(cfg)


def check_strategy(option: str, cfg: DictConfig, tmp_path: Path) -> None:
    from pytorch_lightning.strategies import DDPStrategy

    problems = _problems(cfg)
    if option == "fsdp":  # GPUs only: one line saying so on this CPU machine
        assert len(problems) == 1 and "strategy=fsdp" in problems[0] and "CPU" in problems[0], problems
        return
    assert problems == []
    one = instantiate(cfg.strategy)(device_type="cpu", devices=1, num_nodes=1)
    two = instantiate(cfg.strategy)(device_type="cpu", devices=2, num_nodes=1)
    # one device: Lightning's single-device choice for auto, DDP (one rank) when asked for; two: DDP, gloo
    assert (one == "auto") if option == "auto" else isinstance(one, DDPStrategy)
    assert isinstance(two, DDPStrategy) and two._process_group_backend == "gloo"


CHECKS: dict[str, Callable[[str, DictConfig, Path], None]] = {
    "model": check_model, "data": check_data, "optimizer": check_optimizer,
    "scheduler": check_scheduler, "curriculum": check_curriculum,
    "distillation": check_distillation, "precision": check_precision,
    "accelerator": check_accelerator, "trainer": check_trainer, "callbacks": check_callbacks,
    "logger": check_logger, "checkpoint": check_checkpoint, "health": check_health, "debug": check_debug,
    "experiment": check_experiment, "strategy": check_strategy,
}


def _overrides(group: str, option: str, base: list[str], jsonl: Path) -> list[str]:
    if group == "data" and option != "text_files":
        # each source gets its own tmp corpus; a new option gets none and must say what it needs
        corpus = {"jsonl": [f"data.corpus.paths=[{jsonl}]", "data.corpus.text_field=body"]}
        kept = [o for o in base if not o.startswith(("data=", "data.corpus"))]
        return [*kept, f"data={option}", *corpus.get(option, [])]
    if group in ("debug", "experiment"):
        # a preset is meant to stand on its own: only the data cache stays in the tmp folder
        cache = next(o for o in base if o.startswith("data.cache_dir="))
        return [f"{group}={option}", cache]
    return [*base, f"{group}={option}"]


# data=stdlib reads the real standard library (its whole token cache, anchors too): 28 s measured, so slow
@pytest.mark.parametrize(("group", "option"), [
    pytest.param(g, o, id=f"{g}={o}", marks=[pytest.mark.slow] if (g, o) == ("data", "stdlib") else [])
    for g, o in OPTIONS])
def test_option_composes_and_builds(group: str, option: str, base: list[str], jsonl_corpus: Path,
                                    tmp_path: Path) -> None:
    if group == "hparams_search":
        pytest.skip("hparams_search options configure a Hydra sweeper plugin: covered by sweep tests")
    assert group in CHECKS, f"config group {group!r} is new: add a check for it in {__file__}"
    cfg = compose_cfg(_overrides(group, option, base, jsonl_corpus))
    assert not OmegaConf.missing_keys(cfg)
    # as the composition root does: fractions of trainer.max_steps become steps before anything is built
    cfg, _ = resolve_lengths(cfg)
    CHECKS[group](option, cfg, tmp_path)


def test_every_group_has_options() -> None:
    groups = {g for g, _ in OPTIONS}
    for must in ("model", "data", "optimizer", "scheduler", "curriculum", "precision", "accelerator",
                 "trainer", "callbacks", "logger", "checkpoint", "health", "debug"):
        assert must in groups, f"conf/{must}/ has no options"


def test_tiny_default_config_is_valid(base: list[str]) -> None:
    assert _problems(compose_cfg(base)) == []


@pytest.mark.parametrize("override", ["model.foo=1", "optimizer.foo=1", "trainer.max_stepz=3"])
def test_unknown_key_fails_at_compose(base: list[str], override: str) -> None:
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose_cfg([*base, override])


@pytest.mark.parametrize("override", ["optimizer.lr=abc", "trainer.max_steps=1.5x", "data.batch_size=four"])
def test_wrong_type_fails_at_compose(base: list[str], override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_cfg([*base, override])
