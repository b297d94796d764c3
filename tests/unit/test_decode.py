"""SEM recurrent decoding (sem/models/sem/model.py: decode_state, prefill, step) against the full forward."""

from __future__ import annotations

import pytest
import torch

from sem.models.sem import DecodeState, SEMModel

T = 512


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(recurrence: str, readout: str, seed: int = 0) -> SEMModel:
    torch.manual_seed(seed)
    # propagator_warmup_steps=10 at step 5: alpha = 0.5, so both the identity and the unitary part of
    # the blend (1 - alpha) I + alpha U are exercised.
    model = SEMModel(d_model=32, n_layers=2, recurrence=recurrence, readout=readout,
                     propagator_warmup_steps=10).eval()
    model.set_step(5)
    return model


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("readout", ["born", "linear"])
@pytest.mark.parametrize("recurrence", ["fft", "scan"])
def test_step_by_step_equals_full_forward(recurrence: str, readout: str) -> None:
    model = _model(recurrence, readout)
    x = _tokens(2, T)
    with torch.no_grad():
        full = model(x).logits  # [2, T, V]
    state = model.decode_state(2)
    steps = []
    for t in range(T):
        logits, state = model.step(x[:, t], state)
        steps.append(logits)
    step = torch.stack(steps, 1)  # [2, T, V]
    assert state.position == T
    # The Born readout's logits are log(|z|^2 + born_eps): for an improbable token |z|^2 is ~born_eps
    # and its logit sits near log(born_eps) ~ -13.8, where the log amplifies fp32 round-off of |z|^2
    # (~1e-4 absolute at worst over 512 tokens, hence rtol on top of atol). Those tokens carry no
    # probability: the two paths' softmax probabilities agree to ~3e-8, checked below.
    torch.testing.assert_close(step, full, atol=1e-4, rtol=2e-5)
    torch.testing.assert_close(step.softmax(-1), full.softmax(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("recurrence", ["fft", "scan"])
def test_prefill_then_step_equals_forward(recurrence: str) -> None:
    model = _model(recurrence, "born", seed=2)
    x = _tokens(3, 200, seed=3)
    with torch.no_grad():
        full = model(x).logits  # [3, 200, V]
    prompt = 150
    logits, state = model.prefill(x[:, :prompt])
    assert state.position == prompt
    torch.testing.assert_close(logits, full[:, prompt - 1], atol=1e-4, rtol=2e-5)
    for t in range(prompt, x.shape[1]):
        logits, state = model.step(x[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=2e-5)
    # a prefill that continues a context (position > 0) goes on from the state, token by token
    first, state = model.prefill(x[:, :100])
    rest, state = model.prefill(x[:, 100:], state)
    assert state.position == x.shape[1]
    torch.testing.assert_close(rest, full[:, -1], atol=1e-4, rtol=2e-5)


def _state_bytes(state: DecodeState) -> int:
    tensors = [*state.h, *(t for pair in state.decay for t in pair), state.readout]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_decode_state_memory_is_constant_in_context_length() -> None:
    model = _model("scan", "born")
    short_logits, short = model.prefill(_tokens(1, 8))
    long_logits, long = model.prefill(_tokens(1, 4096))  # twice the model's max_seq_len of the forward
    assert short.position == 8 and long.position == 4096
    assert _state_bytes(short) == _state_bytes(long) == _state_bytes(model.decode_state(1))
    for _ in range(100):  # and stepping further grows nothing
        long_logits, long = model.step(long_logits.argmax(-1), long)
    assert long.position == 4196
    assert _state_bytes(long) == _state_bytes(short)
    assert [h.shape for h in long.h] == [torch.Size([1, model.d_model])] * len(model.blocks)


def test_step_has_no_max_seq_len() -> None:
    """The recurrence has no window: decoding goes past max_seq_len, where the forward refuses."""
    torch.manual_seed(0)
    model = SEMModel(d_model=16, n_layers=1, max_seq_len=32).eval()
    x = _tokens(1, 64)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(x)
    logits, state = model.prefill(x[:, :32])
    for t in range(32, 64):
        logits, state = model.step(x[:, t], state)
    assert state.position == 64 and torch.isfinite(logits).all()


def test_step_without_a_state_starts_a_fresh_one() -> None:
    model = _model("scan", "born")
    token = _tokens(2, 1)[:, 0]
    fresh, _ = model.step(token, model.decode_state(2))
    logits, state = model.step(token, None)
    torch.testing.assert_close(logits, fresh)
    assert state.position == 1
