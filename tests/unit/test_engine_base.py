"""sem/engines/base.py: ``Engine``, what the recipe drives. Both engines, as ``build`` makes them from
the composed config, are one; what lacks a member the recipe calls is not."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sem.engines import Engine
from sem.engines.lightning.engine import LightningEngine
from sem.engines.standalone import SEMTrainer
from sem.training.step import TrainStep
from tests.conftest import compose_cfg, tiny_data_overrides

MEMBERS = {"model", "train_step", "device", "global_step", "max_steps", "tokens_per_s", "fit", "validate", "describe"}


def test_the_protocol_names_what_the_recipe_calls() -> None:
    assert {m for m in dir(Engine) if not m.startswith("_")} == MEMBERS
    for cls in (LightningEngine, SEMTrainer):
        for method in ("fit", "validate", "describe"):
            assert callable(getattr(cls, method)), (cls.__name__, method)


@pytest.mark.parametrize("engine", ["lightning", "standalone"])
def test_either_engine_built_is_an_engine(engine: str, one_thread: None, tmp_path: Path, corpus_dir: Path,
                                          cache_dir: Path) -> None:
    from hydra.utils import instantiate

    from sem.engines.build import build, resolve_lengths

    cfg, budget = resolve_lengths(compose_cfg([*tiny_data_overrides(corpus_dir, cache_dir), f"engine={engine}"]))
    built = build(cfg, tmp_path / engine, instantiate(cfg.data.corpus), budget=budget)
    assert isinstance(built.engine, LightningEngine if engine == "lightning" else SEMTrainer)
    assert isinstance(built.engine, Engine)
    assert isinstance(built.engine.train_step, TrainStep) and built.engine.train_step.model is built.engine.model
    assert built.engine.device == torch.device("cpu")
    assert (built.engine.global_step, built.engine.max_steps) == (0, cfg.trainer.max_steps)
    assert built.checkpoints.dir == tmp_path / engine / "checkpoints"


def test_an_object_without_the_train_step_is_not_an_engine() -> None:
    partial = SimpleNamespace(model=None, device="cpu", global_step=0, max_steps=1, tokens_per_s=None,
                              fit=lambda resume_from=None: None, validate=lambda loader, final=False: {},
                              describe=lambda: "")
    assert not isinstance(partial, Engine)
    assert isinstance(SimpleNamespace(**vars(partial), train_step=None), Engine)
