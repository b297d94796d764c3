"""Dynamic evaluation (sem/models/stream.py ``dynamic_score``, sem/models/dynamic.py): every
document scored whole while the weights learn from what was just scored; its settings' check, and the
command-line shorthand ``eval.dynamic=true`` (sem/config/store.py ``expand_switches``)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sem.config.store import expand_switches
from sem.data.tokenizer import ByteTokenizer
from sem.models.dynamic import DynamicSettings
from sem.models.sem import SEMModel
from sem.models.stream import POSITION_EDGES, documents, dynamic_score, lanes, stream_score
from sem.models.transformer import TransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = ByteTokenizer()
LENGTHS = (2100, 600, 130, 45, 0, 3, 260)  # bytes per document: every bucket, an empty document


def _stream(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([TOK.encode(bytes(rng.integers(97, 110, n, dtype=np.uint8))) for n in lengths])


def _sem(seed: int = 0, **kw) -> SEMModel:
    torch.manual_seed(seed)
    # max_seq_len 256: the SEM's forward (what dynamic evaluation calls, a chunk at a time) refuses longer inputs
    return SEMModel(**{"vocab_size": 259, "d_model": 16, "n_layers": 1, "max_seq_len": 256, "max_steps": 1000, **kw}).eval()


def _transformer(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(vocab_size=259, d_model=16, n_layers=1, n_heads=2, max_seq_len=64).eval()


def _expected_counts(lengths: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(byte targets, targets) per position bucket: byte i of a document at position i, its EOS at its length."""
    edges = [*POSITION_EDGES, math.inf]
    n_bytes = [sum(max(0, min(n, b) - a) for n in lengths) for a, b in zip(edges, edges[1:])]
    eos = [sum(a <= n < b for n in lengths) for a, b in zip(edges, edges[1:])]
    return n_bytes, [x + e for x, e in zip(n_bytes, eos)]


# ---------------------------------------------------------------------------------------- scores


# the state a lane carries into its next document: the recurrence, the convolution tail, the attention ring
CARRIED = {"n_layers": 2, "conv_width": 4, "attention_every": 2, "attention_window": 32}


@pytest.mark.parametrize("kw,chunk,rows", [({}, 64, 3), ({}, 100, 1), (CARRIED, 64, 3)])
def test_lr_0_is_the_stream_score(kw: dict, chunk: int, rows: int) -> None:
    """Weights that never move: each document scored whole with its state carried, as stream_score
    scores it (a chunk never crosses a document, the next one starts afresh at its BOS)."""
    tokens = _stream()
    model = _sem(**kw)
    reference = stream_score(model, tokens, 32, 4)
    result = dynamic_score(model, tokens, DynamicSettings(lr=0.0, chunk=chunk, rows=rows), context=256)
    assert result.method == "dynamic" and result.chunk == chunk and result.documents == len(LENGTHS)
    assert result.tokens == reference.tokens and result.byte_targets == reference.byte_targets
    n_bytes, n_targets = _expected_counts(LENGTHS)
    assert result.byte_targets == n_bytes and result.tokens == n_targets  # every target once
    assert result.bpb == pytest.approx(reference.bpb, rel=1e-5)
    for a, b in zip(result.nats, reference.nats):
        assert a == pytest.approx(b, rel=1e-5)


def test_learning_as_it_reads_pays_on_repetitive_text() -> None:
    text = b"for item in items:\n    total += item.price * item.count\n" * 12  # ~680 bytes
    tokens = np.concatenate([TOK.encode(text)] * 3)
    still = dynamic_score(_sem(), tokens, DynamicSettings(lr=0.0, chunk=32, rows=1), context=64)
    learning = dynamic_score(_sem(), tokens, DynamicSettings(lr=1e-2, chunk=32, rows=1), context=64)
    assert math.isfinite(learning.bpb)
    assert learning.bpb < 0.7 * still.bpb, (learning.bpb, still.bpb)
    assert learning.tokens == still.tokens


def test_a_model_without_a_state_reads_each_chunk_after_its_context() -> None:
    """The Transformer (no carried state): each chunk read after up to context - chunk tokens of its
    document; every target still scored once, as the sliding window scores it."""
    tokens = _stream()
    model = _transformer()
    reference = stream_score(model, tokens, 64, 8)
    for chunk in (16, 100):  # a chunk over the context is cut to it (the model reads at most max_seq_len)
        result = dynamic_score(copy.deepcopy(model), tokens, DynamicSettings(lr=1e-3, chunk=chunk, rows=2),
                               context=64)
        assert result.chunk == min(chunk, 64)
        assert math.isfinite(result.bpb) and 0 < result.bpb < 20
        assert result.tokens == reference.tokens and result.byte_targets == reference.byte_targets


def test_the_model_is_changed_in_place() -> None:
    """Documented behaviour: dynamic_score adapts the weights of the model it is given (pass a copy to
    keep the original); it leaves the train/eval mode as it found it."""
    tokens = _stream((300, 80))
    model = _sem()
    before = copy.deepcopy(model.state_dict())
    dynamic_score(model, tokens, DynamicSettings(lr=0.0, chunk=32), context=64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # lr=0: nothing moves
    model.train()
    dynamic_score(model, tokens, DynamicSettings(lr=1e-3, chunk=32), context=64)
    assert model.training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed  # the caller's model learned
    # and it scores differently afterwards
    again = stream_score(model, tokens, 32, 2).bpb
    assert again != pytest.approx(stream_score(_sem(), tokens, 32, 2).bpb, rel=1e-6)


def test_a_chunk_is_scored_before_the_step_that_learns_it() -> None:
    """Causality (the total is a code length): the first chunk of the first lane is scored by the
    untouched weights, and no score depends on text after it."""
    rng = np.random.default_rng(1)
    text = bytes(rng.integers(97, 110, 600, dtype=np.uint8))
    late = text[:400] + bytes(rng.integers(97, 110, 200, dtype=np.uint8))  # bytes 400.. changed
    settings = DynamicSettings(lr=1e-2, chunk=128, rows=1)  # the first chunk: bucket 0 (bytes 0-128)
    a = dynamic_score(_sem(), TOK.encode(text), settings, context=256)
    b = dynamic_score(_sem(), TOK.encode(late), settings, context=256)
    still = dynamic_score(_sem(), TOK.encode(text), DynamicSettings(lr=0.0, chunk=128, rows=1), context=256)
    assert a.nats[0] == pytest.approx(still.nats[0], rel=1e-6)  # scored before any step
    assert a.nats[0] == pytest.approx(b.nats[0], rel=1e-6)  # later text changes nothing before it
    assert a.nats[1] != pytest.approx(b.nats[1], rel=1e-6)  # (it does change the bucket it is in)
    assert a.nats[1] != pytest.approx(still.nats[1], rel=1e-6)  # (and the weights did learn)


# ---------------------------------------------------------------------------------------- lanes


def test_lanes_deal_every_document_once_and_balance_lengths() -> None:
    rng = np.random.default_rng(0)
    docs = [np.arange(n) for n in rng.integers(2, 500, 40)]
    dealt = lanes(docs, 5)
    assert len(dealt) == 5
    flat = [id(d) for lane in dealt for d in lane]
    assert sorted(flat) == sorted(id(d) for d in docs)  # each exactly once
    sizes = [sum(len(d) for d in lane) for lane in dealt]
    assert max(sizes) - min(sizes) <= max(len(d) for d in docs)  # longest first to the shortest lane
    assert max(sizes) < 1.15 * sum(sizes) / len(sizes)
    for lane in dealt:  # each lane read longest first
        assert [len(d) for d in lane] == sorted((len(d) for d in lane), reverse=True)


def test_lanes_never_more_than_documents() -> None:
    docs = documents(_stream((10, 20, 30)))
    dealt = lanes(docs, 16)
    assert len(dealt) == 3 and sorted(len(lane) for lane in dealt) == [1, 1, 1]
    assert lanes([], 4) == []
    assert [len(d) for d in lanes(docs, 1)[0]] == [32, 22, 12]


# ---------------------------------------------------------------------------------------- settings


def test_default_settings_have_no_problems() -> None:
    assert DynamicSettings().problems() == []
    assert DynamicSettings(lr=0, optimizer="torch.optim.RMSprop").problems() == []  # a dotted class path


@pytest.mark.parametrize("kw,named", [
    ({"lr": -1}, "dynamic.lr=-1"),
    ({"lr": True}, "dynamic.lr=True"),
    ({"chunk": 0}, "dynamic.chunk=0"),
    ({"chunk": 2.5}, "dynamic.chunk=2.5"),
    ({"rows": 0}, "dynamic.rows=0"),
    ({"optimizer": "nope"}, "dynamic.optimizer='nope'"),
])
def test_each_bad_setting_is_named(kw: dict, named: str) -> None:
    (problem,) = DynamicSettings(**kw).problems()
    assert problem.startswith(named), problem
    (prefixed,) = DynamicSettings(**kw).problems("eval.dynamic")
    assert prefixed.startswith("eval." + named)


def test_every_bad_setting_is_reported_at_once() -> None:
    problems = DynamicSettings(lr=-1, chunk=0, optimizer="nope").problems()
    assert [p.split("=")[0] for p in problems] == ["dynamic.lr", "dynamic.chunk", "dynamic.optimizer"]


def test_an_optimizer_that_cannot_be_imported_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="dynamic.optimizer='no.such.Optimizer'"):
        dynamic_score(_sem(), _stream((20,)), DynamicSettings(optimizer="no.such.Optimizer"), context=64)


# ---------------------------------------------------------------------------------------- switches


def test_expand_switches_rewrites_only_the_switch_itself() -> None:
    switches = {"eval.dynamic": "eval.dynamic.enabled"}
    argv = ["eval.dynamic=true", "+eval.dynamic=true,false", "eval.dynamic.lr=1", "eval.stream=false",
            "model=sem_tiny", "eval.dynamic", "~eval.dynamic", "++eval.dynamic=false", "x.eval.dynamic=true"]
    assert expand_switches(argv, switches) == [
        "eval.dynamic.enabled=true", "+eval.dynamic.enabled=true,false", "eval.dynamic.lr=1", "eval.stream=false",
        "model=sem_tiny", "eval.dynamic", "~eval.dynamic", "++eval.dynamic.enabled=false", "x.eval.dynamic=true"]
    # sem.evaluate's shorthand: dynamic=true
    assert expand_switches(["dynamic=true", "dynamic.lr=0", "mode=stream"], {"dynamic": "dynamic.enabled"}) == [
        "dynamic.enabled=true", "dynamic.lr=0", "mode=stream"]
    assert expand_switches([], switches) == []


def test_a_chunk_longer_than_the_model_reads_is_cut_to_its_max_seq_len() -> None:
    """dynamic.chunk over the SEM's max_seq_len: chunks of max_seq_len (its forward refuses longer ones)."""
    model = _sem(max_seq_len=64)
    result = dynamic_score(model, _stream(), DynamicSettings(lr=1e-3, chunk=128), context=64)
    assert result.chunk == 64 and math.isfinite(result.bpb)


def test_adam_by_name_takes_the_fused_kernel_a_dotted_class_its_own_defaults() -> None:
    from sem.models.stream import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer("adam", params, 1e-3).defaults["fused"] is True
    assert make_optimizer("adamw", params, 1e-3).defaults["fused"] is True
    assert not make_optimizer("torch.optim.Adam", params, 1e-3).defaults["fused"]
    assert isinstance(make_optimizer("sgd", params, 1e-3), torch.optim.SGD)
