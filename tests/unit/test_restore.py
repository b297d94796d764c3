"""sem/training/restore.py: a checkpoint written before the package layout (its config names
``sem.model.SEMModel``) still rebuilds, through the map of old ``_target_`` paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sem
from sem.models.sem import SEMModel
from sem.training.restore import LEGACY_TARGETS, _locate

TINY = {"vocab_size": 259, "d_model": 16, "n_layers": 1, "max_seq_len": 64, "max_steps": 1000}


@pytest.mark.parametrize("old, new", sorted(LEGACY_TARGETS.items()))
def test_every_old_target_names_a_class_of_today(old: str, new: str) -> None:
    assert _locate(old) is _locate(new)


def test_checkpoint_with_an_old_target_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SEMModel(**TINY)
    payload = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 3,
               "sem": {"config": {"model": {"_target_": "sem.model.SEMModel", **TINY}}}}
    path = tmp_path / "step_0000003.ckpt"
    torch.save(payload, path)
    loaded, cfg = sem.load(path)
    assert type(loaded) is SEMModel and cfg.model._target_ == "sem.model.SEMModel"
    x = torch.randint(0, 256, (1, 8))
    model.set_step(3)
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)
