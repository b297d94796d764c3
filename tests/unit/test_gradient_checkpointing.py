"""``model.gradient_checkpointing=true`` (SEMModel and TransformerLM): the same losses and gradients as
without it (dropout included: the recompute replays the forward's masks), across curriculum-like
changes of sequence length, and only in a training forward that records a graph.

The memory side (peak RSS of a training step with and without) is measured by ``python -m bench.memory``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from sem.engines.build import resolve_lengths
from sem.models.sem import SEMModel
from sem.models.transformer import TransformerLM
from tests.conftest import compose_cfg

VOCAB = 259
MAX_T = 64

# sem_tiny / transformer_tiny dimensions (conf/model), built directly so each test controls dropout.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "sem_fft": lambda **kw: SEMModel(d_model=32, n_layers=2, max_seq_len=MAX_T, recurrence="fft",
                                     propagator_warmup_steps=0, **kw),
    "sem_scan": lambda **kw: SEMModel(d_model=32, n_layers=2, max_seq_len=MAX_T, recurrence="scan",
                                      propagator_warmup_steps=0, **kw),
    "transformer": lambda **kw: TransformerLM(d_model=32, n_layers=2, n_heads=2, max_seq_len=MAX_T, **kw),
}
# Recomputing the same ops on the same inputs is bit-exact on CPU today; a hair of slack for other
# kernels. A replayed dropout mask that differed would move gradients by O(1), not 1e-6.
TIGHT = {"rtol": 1e-6, "atol": 1e-8}


def _pair(name: str, dropout: float) -> tuple[nn.Module, nn.Module]:
    """(plain, checkpointed) with the same weights, both in training mode."""
    torch.manual_seed(0)
    plain = MODELS[name](dropout=dropout)
    ckpt = MODELS[name](dropout=dropout, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


def _loss_and_grads(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks of this forward
    loss = model(x[:, :-1], x[:, 1:]).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@contextmanager
def _block_calls(model: nn.Module) -> Iterator[list[int]]:
    """Counts calls of each block's forward (a recompute during backward is a second call). A pre-hook:
    the non-reentrant recompute stops as soon as it has what backward needs, before the forward returns."""
    calls = [0] * len(model.blocks)
    handles = [block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(model.blocks)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_same_loss_and_gradients(name: str, dropout: float) -> None:
    plain, ckpt = _pair(name, dropout)
    x = torch.randint(0, VOCAB, (4, 33))
    loss_p, grads_p = _loss_and_grads(plain, x, seed=7)
    loss_c, grads_c = _loss_and_grads(ckpt, x, seed=7)
    torch.testing.assert_close(loss_c, loss_p, **TIGHT)
    for (n, _), gp, gc in zip(plain.named_parameters(), grads_p, grads_c):
        assert gp.abs().sum() > 0, f"{n}: no gradient, the comparison would prove nothing"
        torch.testing.assert_close(gc, gp, **TIGHT, msg=lambda m, n=n: f"{n}: {m}")
    if dropout:  # the masks are live: another seed gives another loss, so equal losses above mean equal masks
        assert not torch.equal(_loss_and_grads(plain, x, seed=8)[0], loss_p)


def _trajectory(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Losses of one AdamW step per batch (the model's weights end where the run ends)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, x in enumerate(batches):
        losses.append(_loss_and_grads(model, x, seed=100 + step)[0])
        opt.step()
    return losses


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_training_trajectory_across_sequence_lengths(name: str) -> None:
    """A curriculum-like run: (seq_len, batch) changes every step, dropout on, AdamW between steps."""
    plain, ckpt = _pair(name, dropout=0.1)
    stages = [(16, 8), (32, 4), (MAX_T, 2), (16, 8)]  # 128 tokens a step, back to short at the end
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, VOCAB, (b, t + 1), generator=gen) for t, b in stages]
    torch.testing.assert_close(_trajectory(ckpt, batches), _trajectory(plain, batches), **TIGHT)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q, p, **TIGHT, msg=lambda m, n=n: f"{n} after {len(stages)} steps: {m}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoints_only_a_training_forward_with_grad(name: str) -> None:
    _, model = _pair(name, dropout=0.0)
    x = torch.randint(0, VOCAB, (2, 17))
    n_blocks = len(model.blocks)

    with _block_calls(model) as calls:  # train + grad: each block runs again during backward
        model(x[:, :-1], x[:, 1:]).loss.backward()
    assert calls == [2] * n_blocks

    model.eval()  # eval with grad enabled: a plain graph, no recompute
    with _block_calls(model) as calls:
        model(x[:, :-1], x[:, 1:]).loss.backward()
    assert calls == [1] * n_blocks

    model.train()
    with _block_calls(model) as calls, torch.no_grad():  # no graph, nothing to recompute
        out = model(x[:, :-1], x[:, 1:])
    assert calls == [1] * n_blocks and not out.loss.requires_grad


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fewer_activation_bytes_held_for_backward(name: str) -> None:
    """What checkpointing is for: the graph keeps block inputs, not every intermediate."""
    held = []
    for model in _pair(name, dropout=0.1):
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        x = torch.randint(0, VOCAB, (4, MAX_T + 1))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        held.append(sum(sizes))
    plain, ckpt = held
    assert ckpt < 0.6 * plain, f"checkpointed graph holds {ckpt} B vs {plain} B without"


@pytest.mark.parametrize("option", ["sem_tiny", "transformer_tiny"])
def test_config_key_reaches_the_model(option: str) -> None:
    """Composed and built as a run builds it (sem.engines.build: resolve_lengths, then instantiate cfg.model)."""
    built = {}
    for flag in ("true", "false"):
        cfg, _ = resolve_lengths(compose_cfg([f"model={option}", f"model.gradient_checkpointing={flag}"]))
        built[flag] = instantiate(cfg.model)
    assert built["true"].gradient_checkpointing is True
    assert built["false"].gradient_checkpointing is False
    assert compose_cfg([f"model={option}"]).model.gradient_checkpointing is False  # off unless asked

    model = built["true"].train()
    x = torch.randint(0, VOCAB, (2, 17))
    with _block_calls(model) as calls:
        model(x[:, :-1], x[:, 1:]).loss.backward()
    assert calls == [2] * len(model.blocks), "the key must switch checkpointing on, not just be stored"
