"""Streaming evaluation (sem/models/stream.py): documents scored whole, by position in the document."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sem.data.tokenizer import ByteTokenizer
from sem.models.sem import SEMModel
from sem.models.stream import POSITION_EDGES, carries_state, documents, position_labels, stream_score
from sem.models.transformer import TransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOK = ByteTokenizer()
LENGTHS = (3000, 700, 650, 40, 0, 130, 1)  # bytes per document: every bucket, an empty document


def _stream(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> tuple[np.ndarray, list[bytes]]:
    rng = np.random.default_rng(seed)
    docs = [bytes(rng.integers(97, 110, n, dtype=np.uint8)) for n in lengths]  # a small alphabet
    return np.concatenate([TOK.encode(d) for d in docs]), docs


def _whole_document_nats(model: nn.Module, docs: list[bytes]) -> tuple[float, list[float]]:
    """Reference: each document in one forward over all of it (BOS bytes -> bytes EOS)."""
    total, per_target = 0.0, []
    for d in docs:
        t = torch.from_numpy(TOK.encode(d).astype(np.int64))[None]
        out = model(t[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        nats = F.cross_entropy(logits[0].float(), t[0, 1:], reduction="none")
        total += float(nats.double().sum())
        per_target.extend(nats.tolist())
    return total, per_target


def _expected_counts(lengths: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(byte targets, targets) per position bucket: byte i of a document at position i, its EOS at its length."""
    edges = [*POSITION_EDGES, math.inf]
    n_bytes = [sum(max(0, min(n, b) - a) for n in lengths) for a, b in zip(edges, edges[1:])]
    eos = [sum(a <= n < b for n in lengths) for a, b in zip(edges, edges[1:])]
    return n_bytes, [x + e for x, e in zip(n_bytes, eos)]


def test_documents_are_found_by_their_bos() -> None:
    stream, docs = _stream()
    found = documents(stream)
    assert [len(d) - 2 for d in found] == list(LENGTHS)
    assert all(d[0] == TOK.bos_id and d[-1] == TOK.eos_id for d in found)
    assert bytes(found[1][1:-1].astype(np.uint8)) == docs[1]
    # a stream cut mid-document: the piece before the first BOS is scored as a document of its own
    assert [len(d) for d in documents(stream[5:])] == [len(found[0]) - 5, *(len(d) for d in found[1:])]
    assert position_labels() == ["0-128", "128-512", "512-2k", "2k+"]


def test_which_models_carry_their_state() -> None:
    assert carries_state(SEMModel(d_model=8, n_layers=1, max_steps=1000))
    assert not carries_state(TransformerLM(d_model=16, n_layers=1, n_heads=2, max_seq_len=32))


@pytest.mark.parametrize("conv_width", [0, 4])
def test_recurrent_stream_equals_each_document_in_one_forward(conv_width: int) -> None:
    """Documents read in chunks (several side by side, the state carried) score as one forward over each
    whole document would, with every target once and in the right position bucket."""
    torch.manual_seed(0)
    model = SEMModel(d_model=16, n_layers=2, recurrence="scan", conv_width=conv_width, max_seq_len=4096, max_steps=1000).eval()
    stream, docs = _stream()
    score = stream_score(model, stream, seq_len=64, batch_size=3)  # chunks of 64..192 tokens
    assert score.method == "recurrent" and score.documents == len(LENGTHS)
    assert 64 <= score.chunk <= 192
    n_bytes, n_tokens = _expected_counts(LENGTHS)
    assert score.byte_targets == n_bytes and score.tokens == n_tokens
    with torch.no_grad():
        nats, _ = _whole_document_nats(model, docs)
    assert sum(score.nats) == pytest.approx(nats, rel=1e-5)
    assert score.bpb == pytest.approx(nats / math.log(2) / sum(LENGTHS), rel=1e-5)
    rows = score.by_position()
    assert [r["position"] for r in rows] == ["0-128", "128-512", "512-2k", "2k+"]
    assert [r["byte_targets"] for r in rows] == n_bytes and rows[-1]["to"] is None
    # the chunking changes nothing but round-off
    other = stream_score(model, stream, seq_len=16, batch_size=1)
    assert sum(other.nats) == pytest.approx(sum(score.nats), rel=1e-5)


class _CausalConvLM(nn.Module):
    """A model that sees exactly the last ``reach`` tokens: scored with at least that much context, a
    sliding window gives the same nats as one forward over the whole document."""

    def __init__(self, reach: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(259, 8)
        self.conv = nn.Conv1d(8, 8, reach)
        self.head = nn.Linear(8, 259)
        self.reach = reach

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.embed(input_ids).transpose(1, 2), (self.reach - 1, 0))
        return self.head(torch.tanh(self.conv(x)).transpose(1, 2))


def test_sliding_window_scores_each_token_once_with_half_a_window_of_context() -> None:
    torch.manual_seed(0)
    stream, docs = _stream()
    context = 64
    exact = _CausalConvLM(reach=context // 2 + 1)  # the current token and 32 before it
    assert not carries_state(exact)
    with torch.no_grad():
        nats, _ = _whole_document_nats(exact, docs)
    score = stream_score(exact, stream, seq_len=context, batch_size=5)
    assert score.method == "sliding_window" and (score.chunk, score.stride) == (64, 32)
    n_bytes, n_tokens = _expected_counts(LENGTHS)
    assert score.byte_targets == n_bytes and score.tokens == n_tokens
    assert sum(score.nats) == pytest.approx(nats, rel=1e-5)
    # a model that reaches further than half a window is cut short somewhere: the test can fail
    far = _CausalConvLM(reach=context)
    with torch.no_grad():
        far_nats, _ = _whole_document_nats(far, docs)
    assert abs(sum(stream_score(far, stream, seq_len=context, batch_size=5).nats) - far_nats) > 1e-3


def test_the_transformer_streams_by_sliding_window() -> None:
    torch.manual_seed(0)
    model = TransformerLM(d_model=16, n_layers=1, n_heads=2, max_seq_len=32).eval()
    stream, _ = _stream((100, 5))
    score = stream_score(model, stream, seq_len=32, batch_size=4)
    assert score.method == "sliding_window" and score.tokens == _expected_counts((100, 5))[1]
    assert math.isfinite(score.bpb) and model.training is False
