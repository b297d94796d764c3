"""Unit tests for sem/training/optim.py: MuonAdamW routing, Newton-Schulz dtype, resume, LR scaling."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from sem.models.common import param_groups
from sem.models.sem import SEMModel
from sem.models.transformer import TransformerLM
from sem.training.optim import MuonAdamW, muon_lr_scale, newton_schulz, ns_dtype_for

V = 259


def tiny_sem() -> SEMModel:
    torch.manual_seed(0)
    return SEMModel(vocab_size=V, d_model=16, n_layers=2, max_seq_len=64, propagator_warmup_steps=0)


def tiny_transformer() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> float:
    x, y = batch(seed)
    out = model(x, y)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return out.ce_loss.item()


def ill_conditioned(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A [rows, cols] matrix with singular values spread over 1.5 decades (condition number ~30)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    k = min(rows, cols)
    return u[:, :k] @ torch.diag(torch.logspace(-1.5, 0.0, k)) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_newton_schulz_equalises_singular_values(shape: tuple[int, int]) -> None:
    g = ill_conditioned(*shape)
    s = torch.linalg.svdvals(newton_schulz(g))
    assert newton_schulz(g).shape == g.shape
    assert s.min() > 0.5 and s.max() < 1.3  # from a 30x spread to within the quintic's band


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_newton_schulz_of_a_stack_is_per_matrix(shape: tuple[int, int]) -> None:
    """MuonAdamW orthogonalises same-shape matrices as one batch: each result is its own matrix's."""
    stack = torch.stack([ill_conditioned(*shape, seed=s) * (s + 1) for s in range(3)])
    batched = newton_schulz(stack)
    for g, out in zip(stack, batched, strict=True):
        torch.testing.assert_close(out, newton_schulz(g), rtol=1e-5, atol=1e-6)


def test_auto_dtype_is_float32_on_cpu_and_bf16_on_cuda() -> None:
    assert ns_dtype_for("auto", torch.device("cpu")) == torch.float32
    assert ns_dtype_for("auto", torch.device("cuda")) == torch.bfloat16
    assert ns_dtype_for("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_muon_shape_scale() -> None:
    assert muon_lr_scale((64, 16)) == pytest.approx(2.0)
    assert muon_lr_scale((16, 64)) == 1.0


def set_grads(model: torch.nn.Module, seed: int) -> None:
    """The same synthetic gradient for a parameter whatever its value (so two copies stay comparable)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_routing_matrix_gets_muon_others_get_adamw() -> None:
    """Matrix params move by lr * scale * NS(Nesterov momentum), NS in fp32 on CPU; every other
    parameter moves exactly as under torch.optim.AdamW at adamw_lr."""
    model, twin = tiny_sem(), tiny_sem()
    lr, adamw_lr, mu, wd = 0.02, 3e-3, 0.95, 0.1
    opt = MuonAdamW(param_groups(model, wd), lr=lr, adamw_lr=adamw_lr, momentum=mu)
    ref = torch.optim.AdamW(param_groups(twin, wd), lr=adamw_lr, betas=(0.9, 0.95), eps=1e-8)
    assert [(g["name"], g["muon"], g["lr"]) for g in opt.param_groups] == [
        ("matrix", True, lr), ("decay", False, adamw_lr), ("no_decay", False, adamw_lr)]
    matrices = {id(p) for p in opt.param_groups[0]["params"]}
    w = model.blocks[0].mlp_in.weight  # [2 * hidden, 2D] = [128, 32]: tall, shape scale 2
    for step in range(3):
        before = w.detach().clone()
        set_grads(model, step)
        set_grads(twin, step)
        opt.step()
        ref.step()
        expected = newton_schulz(w.grad.lerp(opt.state[w]["momentum_buffer"], mu), dtype=torch.float32)
        update = (before * (1 - lr * wd) - w.detach()) / (lr * muon_lr_scale(w.shape))
        torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-5)  # fp32 NS: bf16 is ~1e-2 off
        s = torch.linalg.svdvals(update)
        assert s.max() / s.min() < 3.0, "a Muon update has near-equal singular values"
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if id(p) in matrices:
            assert not torch.allclose(p, q, atol=1e-4), f"{n}: a matrix got AdamW's update"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{n}: not AdamW's update")


def test_state_dict_round_trip_resumes_identically() -> None:
    model = tiny_sem()
    opt = MuonAdamW(param_groups(model, 0.1))
    for step in range(2):
        train_step(model, opt, seed=step)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train_step(model, opt, seed=2)

    fresh = tiny_sem()
    fresh.load_state_dict(saved_model)
    fresh_opt = MuonAdamW(param_groups(fresh, 0.1))
    fresh_opt.load_state_dict(saved_opt)
    train_step(fresh, fresh_opt, seed=2)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_lambda_lr_scales_every_group() -> None:
    model = tiny_sem()
    opt = MuonAdamW(param_groups(model, 0.1), lr=0.02, adamw_lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: [0.0, 0.5][min(step, 1)])
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt)  # multiplier 0: no group may move, Muon's or AdamW's
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 1.5e-3, 1.5e-3])
    train_step(model, opt)
    moved = {g["name"]: all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)
                            if any(p is q for q in g["params"])) for g in opt.param_groups}
    assert moved == {"matrix": True, "decay": True, "no_decay": True}


@pytest.mark.parametrize("make", [tiny_sem, tiny_transformer], ids=["sem", "transformer"])
def test_a_few_steps_reduce_the_loss(make) -> None:
    model = make()
    opt = MuonAdamW(param_groups(model, 0.1))
    losses = [train_step(model, opt) for _ in range(15)]
    assert losses[-1] < losses[0] - 1.0, losses


def test_no_matrix_group_degrades_to_adamw(caplog: pytest.LogCaptureFixture) -> None:
    param = torch.nn.Parameter(torch.ones(4, 3))
    with caplog.at_level(logging.WARNING):
        opt = MuonAdamW([param], lr=0.02, adamw_lr=1e-3)
    assert "no parameter group named 'matrix'" in caplog.text
    assert opt.param_groups[0]["lr"] == 1e-3 and not opt.param_groups[0]["muon"]
    (param ** 2).sum().backward()
    opt.step()
    assert "exp_avg" in opt.state[param]
    # AdamW's first step moves every weight by ~lr (plus decoupled decay): 1 - 1e-3 - 1e-4
    torch.testing.assert_close(param.detach(), torch.full((4, 3), 1 - 1e-3 - 1e-4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    ({"lr": 0.0}, "lr"), ({"adamw_lr": -1.0}, "adamw_lr"), ({"momentum": 1.0}, "momentum"),
    ({"ns_dtype": "fp32"}, "ns_dtype"), ({"adamw_betas": (0.9, 1.0)}, "adamw_betas"),
    ({"ns_steps": 0}, "ns_steps"),
])
def test_bad_args(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MuonAdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_matrix_group_must_be_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"name": "matrix", "params": [torch.nn.Parameter(torch.ones(2, 2, 2))]}])
