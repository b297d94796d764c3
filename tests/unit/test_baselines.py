"""Unit tests for sem/models/transformer.py: TransformerLM follows the SEMModel forward contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sem
from sem.contracts import ModelOutput
from sem.models.common import param_groups
from sem.models.transformer import TransformerLM
from tests.conftest import losses_on_repeated_batch

V = 259


def tiny(**kw) -> TransformerLM:
    torch.manual_seed(0)
    args = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    args.update(kw)
    return TransformerLM(**args)


def test_causality() -> None:
    model = tiny().eval()
    x = torch.randint(0, 256, (2, 30))
    y = x.clone()
    y[:, 17] = (y[:, 17] + 1) % 256
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[:, :17] - b[:, :17]).abs().max().item() < 1e-5
    assert (a[:, 17] - b[:, 17]).abs().max().item() > 1e-4


def test_output_contract() -> None:
    model = tiny()
    x = torch.randint(0, 256, (3, 9))
    out = model(x, x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 9, V) and out.logits.dtype == torch.float32
    assert out.loss.shape == () and torch.equal(out.loss, out.ce_loss)
    assert out.aux_losses == {} and out.logged() == {}  # no loss terms of its own, nothing extra logged
    bare = model(x)
    assert bare.loss is None and bare.ce_loss is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).logits.dtype == torch.float32


def test_loss_falls_on_repeated_batch() -> None:
    losses = losses_on_repeated_batch(tiny())
    assert losses[-1] < 0.6 * losses[0], losses


def test_set_step_is_noop_and_checkpointing_matches() -> None:
    x = torch.randint(0, 256, (2, 16))
    plain, ckpt = tiny(), tiny(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    plain.set_step(123)
    for m in (plain, ckpt):
        m(x, x).loss.backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_param_groups() -> None:
    model = tiny()
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "blocks.0.norm1.weight" in no_decay and "blocks.0.qkv.bias" in no_decay
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    matrix = {names[id(p)] for p in groups["matrix"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert decay == {"tok_emb.weight", "pos_emb.weight", "head.weight"}
    assert "blocks.0.qkv.weight" in matrix and "blocks.1.fc_out.weight" in matrix
    assert len(matrix) + len(groups["decay"]["params"]) + len(no_decay) == len(names)


def test_a_checkpoint_of_earlier_versions_with_unitary_lambda_loads(tmp_path: Path) -> None:
    """TransformerLM no longer takes ``unitary_lambda`` (it never did anything); the model config inside
    checkpoints written before holds it, under the target of then: they still rebuild, same logits."""
    with pytest.raises(TypeError, match="unitary_lambda"):
        tiny(unitary_lambda=0.0)
    model = tiny()
    config = {"_target_": "sem.baselines.TransformerLM", "vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 4,
              "max_seq_len": 64, "mlp_ratio": 4.0, "dropout": 0.0, "gradient_checkpointing": False,
              "unitary_lambda": 0.0}
    path = tmp_path / "step_0000003.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 3,
                "sem": {"config": {"model": config}}}, path)
    loaded, cfg = sem.load(path)
    assert type(loaded) is TransformerLM and cfg.model.unitary_lambda == 0.0
    x = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"d_model": 30, "n_heads": 4}, "n_heads"), ({"d_model": 0}, "d_model"), ({"n_layers": 0}, "n_layers"),
     ({"mlp_ratio": -1.0}, "mlp_ratio"), ({"dropout": 2.0}, "dropout")],
)
def test_bad_args(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny(**kwargs)


def test_too_long_input_raises() -> None:
    with pytest.raises(ValueError, match="max_seq_len=64"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))
