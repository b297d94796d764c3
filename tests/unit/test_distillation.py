"""EMA teacher maths and bookkeeping, and the per-token distillation KL."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sem.training.distillation import (
    DistillationLoss,
    EMATeacher,
    decay_at,
    decay_for_half_life,
    distill_problems,
    ema_update,
    half_life,
)


class Tiny(nn.Module):
    """Float, complex and integer state, like SEM: an embedding, a complex weight, a step counter."""

    def __init__(self, vocab: int = 11, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Parameter(torch.randn(dim, dim, dtype=torch.complex64))
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("counter", torch.zeros((), dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # [B, T, D]
        h = (h.to(torch.complex64) @ self.mix).abs()
        return self.head(h) * self.scale  # [B, T, V]


def _bump(model: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)
        model.scale.add_(by)
        model.counter.add_(7)


def test_one_update_moves_teacher_by_one_minus_decay_of_the_gap():
    torch.manual_seed(0)
    student = Tiny()
    teacher = Tiny()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for name, s in student.state_dict().items():
        t = teacher.state_dict()[name]
        if name == "counter":
            assert torch.equal(t, s)  # integer buffers are copied
        else:
            torch.testing.assert_close(t, before[name] + 0.1 * (s - before[name]))


def test_ema_update_rejects_mismatched_models():
    with pytest.raises(ValueError, match="shape"):
        ema_update(Tiny(dim=4), Tiny(dim=5), 0.9)
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.9)


def test_decay_ramp_and_half_life():
    assert decay_at(0, 0.9, 0.99, 100) == 0.9
    assert decay_at(50, 0.9, 0.99, 100) == pytest.approx(0.945)
    assert decay_at(100, 0.9, 0.99, 100) == decay_at(10**6, 0.9, 0.99, 100) == 0.99
    assert decay_at(0, 0.9, 0.99, 0) == 0.99
    assert half_life(0.5) == pytest.approx(1.0)
    d = decay_for_half_life(693.0)
    assert d**693 == pytest.approx(0.5) and half_life(d) == pytest.approx(693.0)
    assert half_life(0.999) == pytest.approx(math.log(2) / -math.log(0.999))
    with pytest.raises(ValueError):
        half_life(1.0)


def test_teacher_shares_no_storage_and_takes_no_gradients():
    student = Tiny()
    ema = EMATeacher(student, max_steps=2000)
    _bump(student, 1.0)
    assert not torch.equal(ema.module.head.weight, student.head.weight)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_activation_reinitialises_from_student_then_averages_once_per_step():
    student = Tiny()
    ema = EMATeacher(student, decay_start=0.5, decay_end=0.5, ramp_steps=0, start_step=10)
    assert not ema.active(9, "main") and ema.active(10, "main") and not ema.ready
    _bump(student, 3.0)  # the construction-time copy is now stale
    assert ema.update(student, 10)
    assert ema.ready and ema.activated_step == 10
    torch.testing.assert_close(ema.module.state_dict(), student.state_dict())  # copy, not average

    ref = ema.module.head.bias.clone()
    _bump(student, 1.0)
    assert ema.update(student, 11)
    torch.testing.assert_close(ema.module.head.bias, ref + 0.5)
    # a second call for the same optimizer step (e.g. per micro-batch) is ignored
    assert not ema.update(student, 11)
    torch.testing.assert_close(ema.module.head.bias, ref + 0.5)
    assert ema.last_updated_step == 11


def test_start_stage_activates_and_stays_active():
    ema = EMATeacher(Tiny(), start_stage="long", max_steps=2000)
    assert not ema.active(5, "short") and ema.active(6, "long")
    ema.update(Tiny(), 6)
    assert ema.active(7, "another")  # sticky once activated


def test_forward_requires_activation_and_gives_no_grad_logits():
    student = Tiny()
    ema = EMATeacher(student, max_steps=2000)
    ids = torch.randint(0, 11, (2, 5))
    with pytest.raises(RuntimeError):
        ema(ids)
    ema.update(student, 0)
    logits = ema(ids)
    assert logits.shape == (2, 5, 11) and not logits.requires_grad
    torch.testing.assert_close(logits, student(ids).detach())


def test_teacher_state_round_trip():
    student = Tiny()
    ema = EMATeacher(student, decay_start=0.9, decay_end=0.99, ramp_steps=10)
    for step in range(5):
        _bump(student, 0.1)
        ema.update(student, step)
    state = ema.state_dict()
    other = EMATeacher(Tiny(), decay_start=0.9, decay_end=0.99, ramp_steps=10)
    other.load_state_dict(state)
    assert other.activated_step == 0 and other.last_updated_step == 4
    torch.testing.assert_close(other.module.state_dict(), ema.module.state_dict())
    assert other.decay(5) == ema.decay(5) and not other.update(student, 4)


def test_kl_of_identical_logits_is_zero_and_loss_is_alpha_ce():
    logits = torch.randn(2, 7, 13)
    out = DistillationLoss(alpha=0.3, temperature=2.0)(logits, logits.clone(), torch.tensor(2.0))
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.6, abs=1e-6)
    assert out["ce"].item() == 2.0


def test_kl_is_per_token_and_does_not_grow_with_sequence_length():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 13), torch.randn(2, 5, 13)
    loss = DistillationLoss(alpha=0.0, temperature=1.0)
    short = loss(s, t, torch.tensor(0.0))["kl"]
    long = loss(s.repeat(1, 8, 1), t.repeat(1, 8, 1), torch.tensor(0.0))["kl"]  # T x 8, same tokens
    torch.testing.assert_close(long, short)
    # and it is the KL of one token's distribution, averaged
    p = t.softmax(-1)
    manual = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(short, manual)


def test_mask_excludes_tokens():
    s, t = torch.randn(1, 4, 9), torch.randn(1, 4, 9)
    loss = DistillationLoss(alpha=0.0, temperature=1.0)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(loss(s, t, torch.tensor(0.0), mask)["kl"], loss(s[:, :2], t[:, :2], torch.tensor(0.0))["kl"])


def test_temperature_squared_factor():
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    out = DistillationLoss(alpha=0.25, temperature=3.0)(s, t, torch.tensor(1.0))
    assert out["loss"].item() == pytest.approx(0.25 + 0.75 * 9.0 * out["kl"].item(), rel=1e-6)
    # kl is measured on the softened distributions
    soft = DistillationLoss(alpha=0.0, temperature=1.0)(s / 3.0, t / 3.0, torch.tensor(0.0))["kl"]
    torch.testing.assert_close(out["kl"], soft)


def test_gradient_flows_to_student_only():
    s = torch.randn(1, 3, 5, requires_grad=True)
    t = torch.randn(1, 3, 5, requires_grad=True)
    DistillationLoss(alpha=0.5)(s, t, torch.tensor(0.0))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_distill_problems():
    assert distill_problems(alpha=0.5, temperature=2.0, decay_start=0.99, decay_end=0.999, ramp_steps=0) == []
    lines = distill_problems(alpha=1.5, temperature=0.0, decay_start=0.999, decay_end=0.99, ramp_steps=-1,
                             start_stage="nope", stage_names=["a", "b"])
    for needle in ("alpha=1.5", "temperature=0.0", "decay_start=0.999 is above", "ramp_steps=-1", "start_stage='nope'"):
        assert any(needle in ln for ln in lines), (needle, lines)
    assert any("decay_end=1.0" in ln for ln in distill_problems(decay_end=1.0))
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="decay_start"):
        EMATeacher(Tiny(), decay_start=0.0, max_steps=2000)
