"""sem/config/components.py: validation by contract for classes sem has never seen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sem.config.components import (
    lightning_component_problems,
    locate,
    model_contract_problems,
    optimizer_schedule_problems,
    signature_problems,
)


class ListArgLM(nn.Module):
    def __init__(self, dims: list[int], vocab_size: int = 259, note: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dims[0])
        self.head = nn.Linear(dims[0], vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_list_arguments_and_unknown_hints_bind() -> None:
    node = {"_target_": f"{__name__}.ListArgLM", "dims": [8, 16], "note": None}
    assert signature_problems("model", ListArgLM, node, injected=("vocab_size",)) == []
    assert model_contract_problems("model", ListArgLM, node)[0] == []


def test_a_wrong_plain_type_is_named() -> None:
    problems = signature_problems("model", ListArgLM, {"dims": "wide"})
    assert problems == [f"model.dims='wide': {__name__}.ListArgLM wants list"]


def test_nested_targets_are_built_as_the_run_builds_them() -> None:
    optimizer = {"_target_": "torch.optim.SGD", "lr": 0.1}
    scheduler = {"_target_": "torch.optim.lr_scheduler.LambdaLR",
                 "lr_lambda": {"_target_": "math.sqrt", "_partial_": True}}
    assert optimizer_schedule_problems(optimizer, scheduler) == []


def test_a_classmethod_target_locates() -> None:
    obj, err = locate("model", "torch.nn.Linear.forward")
    assert err is None and obj is torch.nn.Linear.forward


@pytest.mark.parametrize(("node", "needle"), [
    ({"_target_": "pytorch_lightning.loggers.CSVLoggr"}, "did you mean CSVLogger"),
    ({"_target_": "pytorch_lightning.loggers.CSVLogger", "nme": "x"}, "does not take 'nme'"),
])
def test_loggers_are_checked_before_anything_is_built(node: dict, needle: str) -> None:
    problems = lightning_component_problems("logger", {"mine": node})
    assert len(problems) == 1 and needle in problems[0] and problems[0].startswith("logger.mine"), problems


def test_a_logger_gets_save_dir_from_sem() -> None:
    assert lightning_component_problems("logger", {"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger"}}) == []
