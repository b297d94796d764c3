"""bench/profile_sem.py: the step the benches time (fp32 or bf16 autocast) and the time per model part."""

from __future__ import annotations

import pytest
import torch

from bench import profile_sem
from bench.profile_sem import PARTS, Trainer, profile_steps
from sem.models.common import param_groups
from sem.models.sem import SEMModel

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.0}


class _Recorder(torch.nn.Module):
    """A model that notes whether its forward ran under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = SEMModel(d_model=16, n_layers=1, max_steps=1000)
        self.autocast: list[bool] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.inner(x, y)


def test_trainer_autocasts_the_forward_exactly_under_bf16() -> None:
    for bf16 in (False, True):
        model = _Recorder()
        Trainer(model, 2, 8, ADAMW, param_groups, bf16).step()
        assert model.autocast == [bf16]


def test_every_labelled_part_is_reported_even_one_not_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of the model's ``sem/<part>`` labels gets its time, a label missing from PARTS too (attention
    and conv were dropped silently before they were listed)."""
    monkeypatch.setattr(profile_sem, "PARTS", tuple(p for p in PARTS if p != "attention"))
    torch.manual_seed(0)
    model = SEMModel(d_model=16, n_layers=2, conv_width=4, attention_every=1, attention_window=4, max_steps=1000)
    result = profile_steps(Trainer(model, 2, 16, ADAMW, param_groups), steps=1, top=5)
    for part in ("attention", "conv", "recurrence", "mlp", "optimizer"):
        assert result["parts"][part]["forward_ms"] > 0, part
    assert result["parts"]["attention"]["backward_ms"] > 0 and result["blocks"]["block1/conv"]["forward_ms"] > 0


def test_the_transformer_step_is_profiled_by_its_own_labels() -> None:
    """``--transformer``: transformer_small's parts come from its ``transformer/<part>`` labels, forward and
    backward, as the SEM's come from ``sem/<part>``; the labels themselves are not counted as ops."""
    from sem.models.transformer import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    result = profile_steps(Trainer(model, 2, 16, ADAMW, param_groups), steps=1, top=50)
    for part in ("embed", "attention", "mlp", "readout", "cross_entropy"):
        assert result["parts"][part]["forward_ms"] > 0, part
    assert result["parts"]["attention"]["backward_ms"] > 0 and result["parts"]["mlp"]["backward_ms"] > 0
    assert not any(op["op"].startswith("transformer/") for op in result["top_ops"])
