"""SEM recurrent decoding (sem/models/sem/model.py: decode_state, prefill, step) against the full forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sem.models.sem import DecodeState, SEMModel
from sem.models.sem.mixers import DiagonalBlock, RetentionBlock

T = 512


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(recurrence: str, readout: str, seed: int = 0, conv_width: int = 0, born_power: float = 1.0,
           born_offset: float = 0.0) -> SEMModel:
    torch.manual_seed(seed)
    # propagator_warmup_steps=10 at step 5: alpha = 0.5, so both the identity and the unitary part of
    # the blend (1 - alpha) I + alpha U are exercised.
    model = SEMModel(d_model=32, n_layers=2, recurrence=recurrence, readout=readout,
                     propagator_warmup_steps=10, conv_width=conv_width, born_power=born_power,
                     born_offset=born_offset).eval()
    if born_offset:  # a complex reference amplitude per token, as after training
        with torch.no_grad():
            model.readout_offset.add_(torch.randn(model.readout_offset.shape))
    model.set_step(5)
    return model


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("readout, power, offset", [("born", 1.0, 0.0), ("born", 4.0, 0.0), ("born", 4.0, 2.0),
                                                    ("linear", 1.0, 0.0)])
@pytest.mark.parametrize("recurrence", ["fft", "scan"])
def test_step_by_step_equals_full_forward(recurrence: str, readout: str, power: float, offset: float) -> None:
    model = _model(recurrence, readout, born_power=power, born_offset=offset)
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
    # probability: the two paths' softmax probabilities agree to ~1e-6 (relative ~3e-6 on CPUs whose
    # kernels sum in another order), checked below. (born_power b multiplies both by b.)
    torch.testing.assert_close(step, full, atol=1e-4 * power, rtol=4e-5)
    torch.testing.assert_close(step.softmax(-1), full.softmax(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("recurrence, power, offset", [("fft", 1.0, 0.0), ("scan", 1.0, 0.0), ("fft", 4.0, 0.0),
                                                       ("fft", 4.0, 2.0)])
def test_prefill_then_step_equals_forward(recurrence: str, power: float, offset: float) -> None:
    model = _model(recurrence, "born", seed=2, born_power=power, born_offset=offset)
    x = _tokens(3, 200, seed=3)
    with torch.no_grad():
        full = model(x).logits  # [3, 200, V]
    prompt = 150
    logits, state = model.prefill(x[:, :prompt])
    assert state.position == prompt
    torch.testing.assert_close(logits, full[:, prompt - 1], atol=1e-4 * power, rtol=2e-5)
    for t in range(prompt, x.shape[1]):
        logits, state = model.step(x[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4 * power, rtol=2e-5)
    # a prefill that continues a context (position > 0) goes on from the state (in parallel too)
    first, state = model.prefill(x[:, :100])
    rest, state = model.prefill(x[:, 100:], state)
    assert state.position == x.shape[1]
    torch.testing.assert_close(rest, full[:, -1], atol=1e-4 * power, rtol=2e-5)


def _state_bytes(state: object) -> int:
    """Bytes of every tensor a DecodeState holds (its states, rings and constants), however nested."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(x) for x in state)
    if isinstance(state, DecodeState):
        return sum(_state_bytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    return 0


@pytest.mark.parametrize("conv_width", [0, 4])
def test_decode_state_memory_is_constant_in_context_length(conv_width: int) -> None:
    model = _model("scan", "born", conv_width=conv_width)
    short_logits, short = model.prefill(_tokens(1, 8))
    long_logits, long = model.prefill(_tokens(1, 4096))  # twice the model's max_seq_len of the forward
    assert short.position == 8 and long.position == 4096
    assert _state_bytes(short) == _state_bytes(long) == _state_bytes(model.decode_state(1))
    for _ in range(100):  # and stepping further grows nothing
        long_logits, long = model.step(long_logits.argmax(-1), long)
    assert long.position == 4196
    assert _state_bytes(long) == _state_bytes(short)
    assert [h.shape for h in long.h] == [torch.Size([1, model.d_model, 2])] * len(model.blocks)  # (Re, Im) pairs


def test_step_has_no_max_seq_len() -> None:
    """The recurrence has no window: decoding goes past max_seq_len, where the forward refuses."""
    torch.manual_seed(0)
    model = SEMModel(d_model=16, n_layers=1, max_seq_len=32, max_steps=1000).eval()
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


# ------------------------------------------------------------- carried state and the convolution


@pytest.mark.parametrize("conv_width", [0, 4])
@pytest.mark.parametrize("recurrence", ["fft", "scan"])
def test_chunked_prefill_with_carried_state_equals_one_prefill(recurrence: str, conv_width: int) -> None:
    """Streaming evaluation's path: prefill chunk after chunk, the state carried, gives every position's
    logits as one prefill over the whole sequence (and as the forward), whatever the chunk lengths."""
    model = _model(recurrence, "born", seed=4, conv_width=conv_width)
    x = _tokens(2, 300, seed=5)
    whole, whole_state = model.prefill(x, all_logits=True)  # [2, 300, V]
    with torch.no_grad():
        torch.testing.assert_close(whole, model(x).logits, atol=1e-4, rtol=2e-5)
    for cuts in ([0, 128, 256, 300], [0, 1, 2, 3, 70, 299, 300]):  # chunks shorter than the conv too
        state, pieces = None, []
        for a, b in zip(cuts, cuts[1:]):
            logits, state = model.prefill(x[:, a:b], state, all_logits=True)
            pieces.append(logits)
        chunked = torch.cat(pieces, 1)
        assert state.position == 300
        torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=2e-5)
        torch.testing.assert_close(chunked.softmax(-1), whole.softmax(-1), atol=1e-6, rtol=0)
        for h, h_whole in zip(state.h, whole_state.h):
            torch.testing.assert_close(h, h_whole, atol=1e-5, rtol=1e-4)
        for tail, tail_whole in zip(state.conv, whole_state.conv):
            torch.testing.assert_close(tail, tail_whole)
    # the last-position logits (the default) are the last of all_logits
    last, _ = model.prefill(x)
    torch.testing.assert_close(last, whole[:, -1])


@pytest.mark.parametrize("readout", ["born", "linear"])
@pytest.mark.parametrize("recurrence", ["fft", "scan"])
def test_step_and_prefill_equal_the_forward_with_a_convolution(recurrence: str, readout: str) -> None:
    model = _model(recurrence, readout, seed=6, conv_width=4)
    assert all(b.conv is not None and b.conv.weight.shape == (64, 1, 4) for b in model.blocks)
    x = _tokens(2, 160, seed=7)
    with torch.no_grad():
        full = model(x).logits
    state, steps = model.decode_state(2), []
    assert [t.shape for t in state.conv] == [torch.Size([2, 3, 64])] * 2  # the last k-1 inputs, zeros
    for t in range(x.shape[1]):
        logits, state = model.step(x[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=2e-5)
    # prefill a prompt, then step: the tail handed over from the parallel pass is the right one
    logits, state = model.prefill(x[:, :50])
    torch.testing.assert_close(logits, full[:, 49], atol=1e-4, rtol=2e-5)
    for t in range(50, x.shape[1]):
        logits, state = model.step(x[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=2e-5)


@pytest.mark.parametrize("conv_width", [1, 3, 4])
def test_the_convolution_is_causal(conv_width: int) -> None:
    """A change of the recurrence input at t changes the convolution's output at t .. t+k-1 and
    nowhere else; a change of token t changes no logit before t; the taps get gradients."""
    model = _model("scan", "born", seed=8, conv_width=conv_width)
    block = model.blocks[0]
    u = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    v = u.clone()
    v[0, 40] += 1.0
    with torch.no_grad():
        changed = (block.conv_input(u) - block.conv_input(v)).abs().amax(-1)[0]  # [T]
    assert changed[40:40 + conv_width].min() > 0
    assert changed[:40].max() == 0 and changed[40 + conv_width:].max() == 0
    x = _tokens(1, 64, seed=9)
    y = x.clone()
    y[0, 40] = (y[0, 40] + 1) % 256
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :40], b[:, :40], atol=0, rtol=0)
    model.train()
    model(x, x).loss.backward()
    for block in model.blocks:
        assert block.conv.weight.grad is not None and block.conv.weight.grad.abs().sum() > 0


def test_conv_width_zero_is_the_model_without_one() -> None:
    """Off by default: no convolution parameters, the same weights and logits as before the option."""
    plain, off = _model("scan", "born", seed=10), _model("scan", "born", seed=10, conv_width=0)
    assert off.conv_width == 0 and all(b.conv is None for b in off.blocks)
    assert not any("conv" in name for name, _ in off.named_parameters())
    x = _tokens(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, off(x).logits, atol=0, rtol=0)
    assert off.decode_state(1).conv == []
    with_conv = _model("scan", "born", seed=10, conv_width=4)
    extra = sum(p.numel() for p in with_conv.parameters()) - sum(p.numel() for p in off.parameters())
    assert extra == 2 * (64 * 4 + 64)  # per block: [2D, 1, 4] taps + [2D] bias
    with pytest.raises(ValueError, match="conv_width"):
        SEMModel(d_model=8, n_layers=1, conv_width=-1, max_steps=1000)


def test_the_ring_initialisation_spans_its_moduli_and_decodes_exactly() -> None:
    """model.r_min/r_max/max_phase: the initial |lambda| run from r_min to r_max (timescales log-uniform),
    the phases lie in [0, max_phase]; the defaults are the spread the model had before the keys (the same
    weights for the same seed); decoding still equals the forward; bad values are refused by name."""
    torch.manual_seed(11)
    ring = SEMModel(d_model=32, n_layers=2, recurrence="scan", r_min=0.9, r_max=0.999, max_phase=0.314, max_steps=1000).eval()
    for block in ring.blocks:
        modulus = torch.exp(-block.decay_rate())
        torch.testing.assert_close(modulus.min(), torch.tensor(0.9), atol=1e-5, rtol=0)
        torch.testing.assert_close(modulus.max(), torch.tensor(0.999), atol=1e-5, rtol=0)
        tau = 1.0 / block.log_A_mag.exp()
        torch.testing.assert_close(tau.log().diff(), torch.full((31,), tau.log().diff()[0].item()))
        assert 0.0 <= block.theta.min() and block.theta.max() <= 0.314
    torch.manual_seed(12)
    spread = SEMModel(d_model=32, n_layers=2, max_steps=1000)
    moduli = torch.exp(-spread.blocks[0].decay_rate())
    torch.testing.assert_close(moduli.min(), torch.tensor(0.36788), atol=1e-5, rtol=0)
    torch.testing.assert_close(moduli.max(), torch.tensor(0.999), atol=1e-5, rtol=0)
    assert spread.blocks[0].theta.max() > 0.314  # phases over [0, pi]
    _decodes_as_the_forward(ring, _tokens(2, 96, seed=13), [37], 1e-4, 4e-5)  # logits ~13: fp32 round-off
    for bad, key in (({"r_min": 0.0}, "r_min"), ({"r_min": 0.99, "r_max": 0.9}, "r_max"),
                     ({"r_max": 1.0}, "r_max"), ({"max_phase": -1.0}, "max_phase")):
        with pytest.raises(ValueError, match=f"^{key}="):
            SEMModel(d_model=8, n_layers=1, **bad)


@pytest.mark.parametrize("conv_width", [0, 4])
def test_a_selective_model_decodes_as_it_runs_forward(conv_width: int) -> None:
    """model.selective: step() and chunked prefill() (a carried state) equal the parallel forward."""
    torch.manual_seed(14)
    model = SEMModel(d_model=32, n_layers=2, selective=True, conv_width=conv_width, propagator_warmup_steps=10).eval()
    model.set_step(5)
    _decodes_as_the_forward(model, _tokens(2, 100, seed=15), [37], 1e-4, 2e-5)


def _decodes_as_the_forward(model: SEMModel, x: torch.Tensor, cuts: list[int], atol: float, rtol: float,
                            state_atol: float | None = None, state_rtol: float | None = None) -> DecodeState:
    """Token-by-token step() and prefill() in chunks cut at ``cuts`` give the forward's logits, and (with
    ``state_atol``) the two paths end in the same recurrent state; returns step()'s final state."""
    with torch.no_grad():
        full = model(x).logits
    state, steps = model.decode_state(x.shape[0]), []
    for t in range(x.shape[1]):
        logits, state = model.step(x[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=atol, rtol=rtol)
    pieces, chunk_state = [], None
    for a, b in zip([0, *cuts], [*cuts, x.shape[1]]):
        logits, chunk_state = model.prefill(x[:, a:b], chunk_state, all_logits=True)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=atol, rtol=rtol)
    for h, h_steps in zip(chunk_state.h, state.h) if state_atol is not None else ():
        torch.testing.assert_close(h, h_steps, atol=state_atol, rtol=state_rtol)
    return state


# ------------------------------------------------------------- several timescales per channel (modes)


@pytest.mark.parametrize("conv_width", [0, 4])
@pytest.mark.parametrize("recurrence", ["fft", "scan"])
def test_modes_decode_and_chunked_prefill_equal_the_forward(recurrence: str, conv_width: int) -> None:
    """model.modes N: each channel's N modes are carried by step() and prefill() ([B, D, N] per block)
    and give the forward's logits, token by token and chunk by chunk."""
    torch.manual_seed(11)
    model = SEMModel(d_model=32, n_layers=2, recurrence=recurrence, propagator_warmup_steps=10,
                     conv_width=conv_width, modes=4).eval()
    model.set_step(5)
    for block in model.blocks:  # a readout away from its init, so each mode's share matters
        block.mode_c.data.normal_()
    assert [h.shape for h in model.decode_state(2).h] == [torch.Size([2, 32, 4, 2])] * 2  # (Re, Im) pairs
    _decodes_as_the_forward(model, _tokens(2, 200, seed=12), [3, 90], 1e-4, 2e-5, 1e-5, 1e-4)


# ------------------------------------------------------------- a matrix state per head (heads)


@pytest.mark.parametrize("conv_width", [0, 4])
def test_heads_decode_and_chunked_prefill_equal_the_forward(conv_width: int) -> None:
    """model.heads H: each block's [H, K, K] state is carried by step() and prefill() and gives the
    forward's logits, token by token and chunk by chunk, across more than one retention chunk."""
    torch.manual_seed(14)
    model = SEMModel(d_model=32, n_layers=2, heads=4, propagator_warmup_steps=10, conv_width=conv_width).eval()
    model.set_step(5)
    assert [h.shape for h in model.decode_state(2).h] == [torch.Size([2, 4, 8, 8, 2])] * 2  # (Re, Im) pairs
    # 300 tokens > RETENTION_CHUNK: the forward loops over chunks
    _decodes_as_the_forward(model, _tokens(2, 300, seed=15), [3, 140], 2e-4, 1e-4, 1e-4, 1e-4)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_retention_is_the_recurrence_it_states(chunk: int) -> None:
    """retention() against its definition, S_t = diag(lambda) S_{t-1} + k_t v_t^T, y_t = S_t^T conj(q_t),
    step by step from a carried S_0 that counts only where ``keep``; gradients reach every input."""
    from sem.models.sem.recurrence import retention

    torch.manual_seed(16)
    B, T, H, K, V = 2, 37, 3, 4, 5
    pair = lambda *shape: (torch.randn(*shape, requires_grad=True), torch.randn(*shape, requires_grad=True))  # noqa: E731
    q, k, v = pair(B, T, H, K), pair(B, T, H, K), pair(B, T, H, V)
    log_gamma = (-torch.rand(H) - 0.01).requires_grad_()
    theta = (torch.rand(H, K) * 3).requires_grad_()
    s0 = torch.randn(B, H, K, V, dtype=torch.complex64)
    keep = torch.arange(T)[None] < torch.tensor([[T], [20]])  # row 1: a document starts at 20
    (yr, yi), last = retention(q, k, v, log_gamma, theta, s0, keep, chunk=chunk)
    with torch.no_grad():
        lam = torch.exp(torch.complex(log_gamma[:, None].expand(H, K), theta))[..., None]
        qc, kc, vc = (torch.complex(*x) for x in (q, k, v))
        own, carried, ys = torch.zeros_like(s0), s0.clone(), []
        for t in range(T):
            own = lam * own + kc[:, t, :, :, None] * vc[:, t, :, None, :]
            carried = lam * carried
            ys.append((qc[:, t].conj()[..., None] * (own + carried * keep[:, t, None, None, None])).sum(-2))
        ref = torch.stack(ys, 1)
    torch.testing.assert_close(torch.complex(yr, yi).detach(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, own + carried * keep[:, -1, None, None, None], atol=1e-4, rtol=1e-4)
    (yr.sum() + yi.square().sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (*q, *k, *v, log_gamma, theta))


def test_heads_validation() -> None:
    for bad in ({"heads": 5}, {"heads": -1}, {"heads": 4, "modes": 2}, {"heads": 4, "selective": True}):
        with pytest.raises(ValueError, match="heads"):
            SEMModel(d_model=32, n_layers=1, **bad)


# ------------------------------------------------------------- local attention (attention_every)


@pytest.mark.parametrize(("window", "rope"), [(1, False), (16, False), (500, False), (16, True), (500, True)])
def test_local_attention_decode_and_chunked_prefill_equal_the_forward(window: int, rope: bool) -> None:
    """model.attention_every: the attention layers' last window - 1 keys and values are carried by step()
    and prefill() and give the forward's logits, token by token and chunk by chunk (with
    model.attention_rope too: the carried keys are turned by their place in each call's keys)."""
    torch.manual_seed(17)
    model = SEMModel(d_model=32, n_layers=2, conv_width=4, attention_every=1, attention_window=window,
                     propagator_warmup_steps=0, attention_rope=rope).eval()
    for layer in model.attention.values():  # away from the small init, so the attention matters
        layer.out.weight.data.normal_(0, 0.3)
    state = _decodes_as_the_forward(model, _tokens(2, 300, seed=18), [3, 140], 2e-4, 1e-4, 1e-4, 1e-4)
    # a ring of the last window keys and values per layer: [2, B, heads, window, dh], whatever the context
    assert [kv.shape for kv in state.kv] == [torch.Size([2, 2, 1, window, 64])] * 2  # keys | values, B, heads


@pytest.mark.parametrize("rope", [False, True])
def test_several_heads_decode_a_batch_as_the_forward(rope: bool) -> None:
    """2D / 64 > 1 heads (the default has 4) and more than one row: each row's query is its own slice of
    the qkv row, split per head (a view that merged rows and heads failed at B > 1)."""
    torch.manual_seed(20)
    model = SEMModel(d_model=64, n_layers=2, attention_every=1, attention_window=8, propagator_warmup_steps=0,
                     attention_rope=rope).eval()
    for layer in model.attention.values():
        layer.out.weight.data.normal_(0, 0.3)
    state = _decodes_as_the_forward(model, _tokens(3, 40, seed=21), [5, 17], 2e-4, 1e-4)
    assert [kv.shape for kv in state.kv] == [torch.Size([2, 3, 2, 8, 64])] * 2  # keys | values, B 3, 2 heads


def test_local_attention_sees_only_its_window() -> None:
    """A query at t reads keys t - window < s <= t: changing the input outside that band changes nothing."""
    from sem.models.sem.attention import LocalAttention

    torch.manual_seed(19)
    layer = LocalAttention(d_model=32, window=8, n_layers=1)
    layer.out.weight.data.normal_(0, 0.3)
    psi = torch.randn(1, 40, 64)
    moved = psi.clone()
    moved[:, 10] += 5.0  # seen by queries 10..17 only
    with torch.no_grad():
        diff = (layer(psi)[0] - layer(moved)[0]).abs().amax(-1)[0]
    assert diff[:10].max() == 0 and diff[18:].max() == 0 and diff[10:18].min() > 1e-3
    with torch.no_grad():  # a carried context is read where ``keep``, and only there
        _, kv = layer(psi[:, :20])
        fresh, whole = layer(psi[:, 20:])[0], layer(psi)[0][:, 20:]
        keep = torch.arange(20)[None] < 3  # a document starts at 3
        carried = layer(psi[:, 20:], kv, keep)[0]
    torch.testing.assert_close(carried[:, 3:], fresh[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(carried[:, :3], whole[:, :3], atol=1e-5, rtol=1e-5)
    assert (fresh[:, :3] - whole[:, :3]).abs().max() > 1e-3


def test_rope_scores_see_the_distance_only() -> None:
    """model.attention_rope: a query-key product depends on their distance, not on where the call
    started; the turn is a buffer (checkpoints of either setting load into the other) and it reaches
    the layer's output."""
    from sem.models.sem.attention import LocalAttention

    torch.manual_seed(23)
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    layer = LocalAttention(d_model=32, window=64, n_layers=1, rope=True)
    c2, s2 = layer._turns(50, x.dtype)
    turn = lambda z, start: layer._turn(z, c2[start:start + 5], s2[start:start + 5])  # noqa: E731
    reference = (turn(x, 0) * turn(y, 3)).sum(-1)
    for start in (1, 37):  # <turn(q, a), turn(k, a + 3)> is the same for any a
        torch.testing.assert_close((turn(x, start) * turn(y, start + 3)).sum(-1), reference,
                                   atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(turn(x, 0)[:, :1], x[:, :1])  # position 0: not turned
    assert (turn(x, 0)[:, 1:] - x[:, 1:]).abs().max() > 0.1
    plain = LocalAttention(d_model=32, window=64, n_layers=1)
    plain.out.weight.data.normal_(0, 0.3)
    layer.load_state_dict(plain.state_dict())  # the same weights: no saved rope entry
    psi = torch.randn(1, 20, 64)
    with torch.no_grad():
        assert (layer(psi)[0] - plain(psi)[0]).abs().max() > 1e-3
        torch.testing.assert_close(layer(psi)[0][:, :1], plain(psi)[0][:, :1])  # one token: nothing to turn


def test_modes_one_is_the_model_without_them() -> None:
    """modes=1 (the default): the parameters and logits of the model before the option."""
    torch.manual_seed(13)
    plain = SEMModel(d_model=32, n_layers=2, max_steps=1000)
    torch.manual_seed(13)
    one = SEMModel(d_model=32, n_layers=2, modes=1, max_steps=1000)
    assert not any("mode_c" in name for name, _ in one.named_parameters())
    assert one.blocks[0].log_A_mag.shape == (32,)
    x = _tokens(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, one(x).logits, atol=0, rtol=0)
    torch.manual_seed(13)
    four = SEMModel(d_model=32, n_layers=2, modes=4, max_steps=1000)
    tau = 1.0 / torch.exp(four.blocks[0].log_A_mag.detach())  # [D, N]: each channel spans the range
    assert tau.shape == (32, 4) and (tau[:, -1] / tau[:, 0]).min() > 100
    with pytest.raises(ValueError, match="modes"):
        SEMModel(d_model=32, n_layers=2, modes=2, selective=True, max_steps=1000)


def test_heads_and_attention_keys_reach_the_model() -> None:
    """model.heads / attention_every / attention_window, composed and built as a run builds them."""
    from hydra.utils import instantiate

    from sem.engines.build import resolve_lengths
    from tests.conftest import compose_cfg

    cfg, _ = resolve_lengths(compose_cfg(["model=sem_tiny", "model.heads=4", "model.attention_every=1",
                                          "model.attention_window=24", "model.attention_rope=true"]))
    model = instantiate(cfg.model)
    assert [b.theta.shape for b in model.blocks] == [torch.Size([4, 8])] * 2
    assert all(isinstance(b, RetentionBlock) for b in model.blocks)
    assert sorted(model.attention) == ["0", "1"] and {a.window for a in model.attention.values()} == {24}
    assert all(a.rope for a in model.attention.values())
    plain = instantiate(resolve_lengths(compose_cfg(["model=sem_tiny"]))[0].model)
    assert type(plain.blocks[0]) is DiagonalBlock and len(plain.attention) == 0
    small = instantiate(resolve_lengths(compose_cfg([]))[0].model)
    assert small.attention and not any(a.rope for a in small.attention.values())


def test_a_cloned_state_branches_without_disturbing_the_original() -> None:
    """step() writes the attention rings in place: a clone() decodes apart, and the original, stepped on
    after the branch, still gives the forward's logits."""
    torch.manual_seed(20)
    model = SEMModel(d_model=32, n_layers=2, conv_width=4, attention_every=1, attention_window=8, max_steps=1000).eval()
    x = _tokens(1, 30, seed=21)
    with torch.no_grad():
        full = model(x).logits
    _, state = model.prefill(x[:, :20])
    branch = state.clone()
    for t in range(20, 30):  # the branch reads other tokens over the whole window
        _, branch = model.step((x[:, t] + 1) % 256, branch)
    for t in range(20, 30):
        logits, state = model.step(x[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=2e-5)


# ------------------------------------------------------------- a compiled step (decode_state(compile=True))


def _compiled_decodes_as_eager(model: SEMModel, x: torch.Tensor) -> None:
    """step() with decode_state(compile=True) gives eager step()'s logits at every position, from a fresh
    state and after a prefill, across the attention ring's first wrap, without compiling per position."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        _, eager_state = model.prefill(x[:, :3])
        _, state = model.prefill(x[:, :3], model.decode_state(x.shape[0], compile=True))
    for t in range(3, x.shape[1]):
        want, eager_state = model.step(x[:, t], eager_state)
        got, state = model.step(x[:, t], state)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert state.position == eager_state.position == x.shape[1]
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} graphs: the step is compiled per position"


@pytest.mark.slow  # a compile: ~10 s alone, over 20 s beside other work
def test_a_compiled_step_decodes_as_the_eager_one() -> None:
    """The default's parts (convolution, local attention with a ring that wraps, Born power and offset);
    ``generate(..., compile=True)`` writes what the eager decoding writes."""
    from sem.models.generate import generate

    torch.manual_seed(22)  # d_model 64: two attention heads, read for a batch of two
    model = SEMModel(d_model=64, n_layers=2, conv_width=4, attention_every=1, attention_window=8,
                     born_power=4.0, born_offset=2.0, propagator_warmup_steps=0).eval()
    _compiled_decodes_as_eager(model, _tokens(2, 24, seed=23))
    assert generate(model, b"def ", 40, temperature=0, compile=True) == generate(model, b"def ", 40, temperature=0)


def test_when_sem_sample_compiles_its_decoding() -> None:
    """compile=auto compiles from DECODE_COMPILE_MIN_TOKENS tokens; true and false as said; a model
    without decode_state(compile=...) decodes eagerly whatever the setting."""
    from sem.config.hardware import compile_missing
    from sem.tools.sample import DECODE_COMPILE_MIN_TOKENS, decode_compile_choice

    model = SEMModel(d_model=32, n_layers=1, propagator_warmup_steps=0)
    many, few = DECODE_COMPILE_MIN_TOKENS, DECODE_COMPILE_MIN_TOKENS - 1
    ready = compile_missing("cpu") is None  # a C++ compiler: where inductor can build CPU kernels
    assert decode_compile_choice("auto", many, model, "cpu")[0] is ready
    assert decode_compile_choice("auto", few, model, "cpu") == (False, f"compile=auto: eager ({few:,} tokens < "
                                                                f"{many:,}: too few to pay a compile back)")
    assert decode_compile_choice(False, many, model, "cpu") == (False, "compile=false")
    assert decode_compile_choice(True, 1, model, "cpu")[0] is ready

    class Recurrent(torch.nn.Module):  # a user's model: prefill and step, no compiled decoding
        def decode_state(self, batch_size: int = 1) -> None: ...

    assert decode_compile_choice(True, many, Recurrent(), "cpu")[0] is False


@pytest.mark.slow
@pytest.mark.parametrize("keys", [{"attention_rope": True}, {"modes": 4}, {"heads": 2}, {"selective": True},
                                  {"readout": "linear"}])
def test_every_recurrence_compiles_its_step(keys: dict) -> None:
    torch.manual_seed(24)
    model = SEMModel(d_model=32, n_layers=2, conv_width=4, attention_every=1, attention_window=8,
                     propagator_warmup_steps=0, **keys).eval()
    _compiled_decodes_as_eager(model, _tokens(1, 20, seed=25))
