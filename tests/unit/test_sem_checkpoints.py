"""Checkpoints of earlier SEM versions load: the state_dict keys, shapes and parameter order of each
recurrence variant, and the optimizer groups, are the ones recorded in tests/unit/data/sem_state_dict_keys.json
(dumped from the model before its recurrences became classes of their own, sem/models/sem/mixers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sem.models.common import param_groups
from sem.models.sem import SEMModel

RECORD = json.loads((Path(__file__).parent / "data" / "sem_state_dict_keys.json").read_text())


def _model(variant: str) -> SEMModel:
    torch.manual_seed(0)
    return SEMModel(**{**RECORD["base"], **RECORD["variants"][variant]["overrides"], "max_steps": 1000})


@pytest.mark.parametrize("variant", sorted(RECORD["variants"]))
def test_state_dict_keys_shapes_and_order_are_the_earlier_versions(variant: str) -> None:
    """Same keys in the same order (an optimizer's state is matched to parameters by position)."""
    model = _model(variant)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == RECORD["variants"][variant]["state_dict"]


@pytest.mark.parametrize("variant", sorted(RECORD["variants"]))
def test_optimizer_groups_are_the_earlier_versions(variant: str) -> None:
    model = _model(variant)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in param_groups(model, 0.1)}
    assert groups == RECORD["variants"][variant]["param_groups"]


@pytest.mark.parametrize("variant", sorted(RECORD["variants"]))
def test_an_earlier_versions_state_dict_loads_strictly_and_runs(variant: str) -> None:
    """A state_dict in the recorded layout (values of its own) loads with strict=True, every tensor lands,
    and the model runs forward and decodes with it."""
    generator = torch.Generator().manual_seed(1)
    old = {k: torch.rand(shape, generator=generator) * 0.1 for k, shape in RECORD["variants"][variant]["state_dict"]}
    old["propagator_alpha"] = torch.tensor(1.0)
    model = _model(variant).eval()
    model.load_state_dict(old, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, old[key]), key
    x = torch.randint(0, 256, (2, 24), generator=generator)
    with torch.no_grad():
        full = model(x).logits
    logits, state = model.prefill(x[:, :20])
    for t in range(20, 24):
        logits, state = model.step(x[:, t], state)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(logits, full[:, -1], atol=1e-3, rtol=1e-4)
