"""Streaming evaluation: every document of a token stream scored whole, in bits per byte overall and
by position in the document. Used by ``python -m sem.evaluate mode=stream`` and by a run's summary
(``stream_bpb``).

How a model sees a document:

- a model whose ``prefill(input_ids, state, all_logits=True)`` returns every position's logits and the
  state after them (``carries_state``: SEMModel) reads the document in consecutive chunks, its
  recurrent state carried from one to the next: each token is scored once, with the whole document
  before it as context, in memory bounded by the chunk whatever the document's length;
- any other model (the Transformer, a model of one's own) gets the standard sliding window: windows
  of ``context`` tokens every ``context // 2`` tokens; the first window scores all its targets, each
  later one only the targets no window scored before (its second half), so every token is scored
  once, with at least half a window of context.

``dynamic_score`` (dynamic evaluation) reads the documents the same way while the model learns as it reads:
see ``sem.models.dynamic``.

A document is what the token cache packs (``sem.data.cache``): BOS, its bytes, EOS, so documents
are found again by their BOS. Its targets are its bytes and its EOS; the BOS starts it (given, not
predicted, and the model starts from a fresh state: nothing crosses a document boundary). bpb = nats
over every target / ln 2 / byte targets, as the windows' ``val/bpb`` charges the end of a document to
its bytes. A target's position is its byte offset in the document (the EOS: the document's length);
``POSITION_EDGES`` buckets them.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sem.contracts import carries_training_state, model_output
from sem.data.tokenizer import ByteTokenizer
from sem.models.dynamic import OPTIMIZERS, DynamicSettings

_TOKENIZER = ByteTokenizer()
# Byte offsets in a document where a position bucket starts: [0, 128), [128, 512), [512, 2048), [2048, ...).
POSITION_EDGES: tuple[int, ...] = (0, 128, 512, 2048)

# The least a forward of a whole-document score reads by default. A small run's validation batch
# (debug=smoke: 4 x 64) would read the held-out set in thousands of tiny forwards, each paying the
# per-layer overhead: measured on 2 cores, 4.1 s at 256 tokens per forward vs 2.4 s at 8192 on an idle
# machine, 40 s vs 5.8 s beside two busy processes. The default run (16 x 128): 14.9 s vs 16.1 s.
MIN_TOKENS_PER_FORWARD = 8192


def stream_rows(batch_size: int, seq_len: int) -> int:
    """The default ``batch_size`` of ``stream_score`` for a run validated ``batch_size`` x ``seq_len``."""
    return max(batch_size, MIN_TOKENS_PER_FORWARD // seq_len)


def _size(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def position_labels(edges: tuple[int, ...] = POSITION_EDGES) -> list[str]:
    """``["0-128", "128-512", "512-2k", "2k+"]`` for the default edges."""
    return [f"{_size(a)}-{_size(b)}" for a, b in zip(edges, edges[1:])] + [f"{_size(edges[-1])}+"]


def carries_state(model: nn.Module) -> bool:
    """Does ``model`` score a chunk from a carried state: ``prefill(input_ids, state, all_logits=True)``?"""
    prefill = getattr(model, "prefill", None)
    if not callable(prefill):
        return False
    try:
        return "all_logits" in inspect.signature(prefill).parameters
    except (TypeError, ValueError):
        return False


def documents(tokens: np.ndarray) -> list[np.ndarray]:
    """The documents of a packed stream, each ``BOS bytes EOS`` (int64 views): split before every BOS.
    Tokens before the first BOS (a stream that does not start with one) are a document too."""
    starts = np.flatnonzero(np.asarray(tokens) == _TOKENIZER.bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    bounds = [*starts.tolist(), int(tokens.size)]
    return [np.asarray(tokens[a:b], dtype=np.int64) for a, b in zip(bounds, bounds[1:]) if b - a >= 2]


@dataclass
class StreamScore:
    """Sums over every target of every document, per position bucket (``POSITION_EDGES``)."""

    nats: list[float]  # cross-entropy, per bucket
    tokens: list[int]  # targets (bytes and EOS), per bucket
    byte_targets: list[int]  # targets that are bytes (the bpb denominator), per bucket
    documents: int
    method: Literal["recurrent", "sliding_window", "dynamic"]  # dynamic: sem.training.evaluation
    chunk: int  # recurrent: the longest chunk of a document read in one prefill; sliding: the window;
    # dynamic: the tokens between two steps of the weights
    stride: int | None  # sliding: tokens between windows (context // 2); recurrent: None
    edges: tuple[int, ...] = POSITION_EDGES

    @property
    def loss(self) -> float:
        return sum(self.nats) / max(sum(self.tokens), 1)  # nats/token

    @property
    def bpb(self) -> float:
        n = sum(self.byte_targets)
        return sum(self.nats) / math.log(2) / n if n else float("nan")

    def by_position(self) -> list[dict[str, Any]]:
        """One row per bucket: ``position`` (label), ``from``/``to`` (byte offsets, ``to`` null for the
        last), ``bpb`` (null when no byte fell in it), ``byte_targets``, ``tokens``."""
        ends = [*self.edges[1:], None]
        return [{"position": label, "from": a, "to": b,
                 "bpb": nats / math.log(2) / n if n else None, "byte_targets": n, "tokens": t}
                for label, a, b, nats, n, t in zip(position_labels(self.edges), self.edges, ends, self.nats,
                                                   self.byte_targets, self.tokens)]


class PositionSums:
    """[nats, targets, byte targets] x bucket, float64 on the device (no host sync until the end)."""

    def __init__(self, edges: tuple[int, ...], device: torch.device) -> None:
        self.inner = torch.tensor(edges[1:], device=device)  # bucket b holds edges[b] <= position < edges[b+1]
        self.sums = torch.zeros(3, len(edges), dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, y: torch.Tensor, position: torch.Tensor) -> None:
        """logits [B, T, V], targets y [B, T] (-100: not scored), position [B, T] byte offsets of the targets."""
        kept = y != -100
        nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                               reduction="none").view_as(y)
        bucket = (position[..., None] >= self.inner).sum(-1)[kept]  # [n]
        y = y[kept]
        self.sums[0].index_add_(0, bucket, nats[kept].double())
        self.sums[1].index_add_(0, bucket, torch.ones_like(y, dtype=torch.float64))
        self.sums[2].index_add_(0, bucket, (y < 256).double())

    def values(self) -> tuple[list[float], list[int], list[int]]:
        nats, tokens, n_bytes = self.sums.cpu().tolist()
        return nats, [int(t) for t in tokens], [int(b) for b in n_bytes]


@torch.no_grad()
def stream_score(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                 device: torch.device | str = "cpu", advance: Callable[[int], None] | None = None,
                 method: Literal["auto", "recurrent", "sliding_window"] = "auto") -> StreamScore:
    """Score every document of ``tokens`` (a packed stream, uint16 or int) whole; see the module docstring.

    ``seq_len``: the sliding window's context (at most the model's ``max_seq_len``), and for a model that
    carries its state the shortest chunk it reads (a forward holds up to ``batch_size * seq_len`` tokens
    over the documents read side by side: the memory of ``batch_size`` windows). ``advance(n)`` is
    called as n more targets are scored (a progress bar). ``method``: auto = recurrent when the model
    carries its state (``carries_state``), else the sliding window.
    """
    if method == "auto":
        method = "recurrent" if carries_state(model) else "sliding_window"
    device = torch.device(device)
    docs = documents(tokens)
    sums = PositionSums(POSITION_EDGES, device)
    was_training = model.training
    model.eval()
    try:
        if method == "recurrent":
            chunk = _recurrent(model, docs, seq_len, batch_size, device, sums, advance)
            stride = None
        else:
            chunk, stride = seq_len, max(1, seq_len // 2)
            _sliding(model, docs, seq_len, stride, batch_size, device, sums, advance)
    finally:
        model.train(was_training)
    return StreamScore(*sums.values(), documents=len(docs), method=method, chunk=chunk, stride=stride)


def side_by_side(docs: list[np.ndarray], batch_size: int, budget: int) -> Iterator[list[np.ndarray]]:
    """Documents read side by side, longest first, each at least 3/4 as long as the group's first (a
    shorter one waits for the next group: padding stays under a quarter); up to ``batch_size`` of
    them, or more while they all fit in one forward of ``budget`` tokens (many short documents)."""
    order = sorted(docs, key=len, reverse=True)
    i = 0
    while i < len(order):
        group = [order[i]]
        i += 1
        rows = max(batch_size, budget // len(group[0]))
        while i < len(order) and len(group) < rows and 4 * len(order[i]) >= 3 * len(group[0]):
            group.append(order[i])
            i += 1
        yield group


def padded(group: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, length] (PAD after a document's end) and targets [B, length] (-100 there)."""
    x = torch.full((len(group), length), _TOKENIZER.pad_id, dtype=torch.long)
    y = torch.full((len(group), length), -100, dtype=torch.long)
    for row, doc in enumerate(group):
        t = torch.from_numpy(doc)
        x[row, :t.numel() - 1] = t[:-1]
        y[row, :t.numel() - 1] = t[1:]
    return x, y


def _recurrent(model: nn.Module, docs: list[np.ndarray], seq_len: int, batch_size: int, device: torch.device,
               sums: PositionSums, advance: Callable[[int], None] | None) -> int:
    """Each group of documents in chunks, the state carried; returns the longest chunk read."""
    budget, longest_chunk = batch_size * seq_len, 0
    for group in side_by_side(docs, batch_size, budget):
        n = len(group[0]) - 1  # targets of the group's longest document
        chunk = max(seq_len, budget // len(group))
        x, y = padded(group, n)
        x, y = x.to(device), y.to(device)
        state = None
        for start in range(0, n, chunk):
            piece = slice(start, start + chunk)
            logits, state = model.prefill(x[:, piece], state, all_logits=True)  # [B, t, V]
            position = torch.arange(start, start + logits.shape[1], device=device).expand(len(group), -1)
            sums.add(logits, y[:, piece], position)
            longest_chunk = max(longest_chunk, logits.shape[1])
        if advance is not None:
            advance(sum(len(d) - 1 for d in group))
    return longest_chunk


def _sliding(model: nn.Module, docs: list[np.ndarray], context: int, stride: int, batch_size: int,
             device: torch.device, sums: PositionSums, advance: Callable[[int], None] | None) -> None:
    """Windows of ``context`` tokens every ``stride``, ``batch_size`` windows per forward."""
    windows = []  # (document, first input, first target scored, end): targets [scored, end) of the document
    for d, doc in enumerate(docs):
        n, begin, scored = len(doc) - 1, 0, 0
        while True:
            end = min(begin + context, n)
            windows.append((d, begin, scored, end))
            if end == n:
                break
            begin, scored = begin + stride, end
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        x = torch.full((len(batch), context), _TOKENIZER.pad_id, dtype=torch.long)
        y = torch.full((len(batch), context), -100, dtype=torch.long)
        for row, (d, begin, scored, end) in enumerate(batch):
            doc = torch.from_numpy(docs[d])
            x[row, :end - begin] = doc[begin:end]
            y[row, scored - begin:end - begin] = doc[scored + 1:end + 1]
        begins = torch.tensor([w[1] for w in batch])
        position = begins[:, None] + torch.arange(context)[None]  # [B, context] byte offset of each target
        logits = model_output(model, x.to(device)).logits
        sums.add(logits, y.to(device), position.to(device))
        if advance is not None:
            advance(sum(end - scored for _, _, scored, end in batch))


# ------------------------------------------------------------------------------ dynamic evaluation

def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """``dynamic.optimizer`` (a name of ``OPTIMIZERS`` or a dotted class path) over ``params`` at ``lr``.
    Adam and AdamW by name take torch's fused kernel, as training's AdamW does: a step over sem_small's
    2.5M parameters took 2.1-2.5 ms fused against 9.7-10.7 ms per tensor on one EPYC thread (2026-12-07),
    ~15% of a dynamic evaluation's step at chunks of 32."""
    path = OPTIMIZERS.get(name, name)
    module, _, cls = path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"dynamic.optimizer={name!r}: cannot import {path!r} ({exc})") from None
    if name in ("adam", "adamw"):
        params = list(params)
        if all(p.device.type in ("cpu", "cuda") for p in params):
            return factory(params, lr=lr, fused=True)
    return factory(params, lr=lr)


def dynamic_score(model: nn.Module, tokens: np.ndarray, settings: DynamicSettings, context: int,
                  device: torch.device | str = "cpu", advance: Callable[[int], None] | None = None) -> StreamScore:
    """Score every document of ``tokens`` (a packed stream) whole while adapting ``model``'s weights
    (see the module docstring); ``model`` is changed in place: pass a copy to keep the original.
    ``context``: the longest input a forward reads (at most the model's ``max_seq_len``; sem passes
    ``val_seq_len``, the static stream's window): the longest chunk, and for a model without a carried
    state the chunk and its context together."""
    device = torch.device(device)
    carry = carries_training_state(model)
    chunk = min(settings.chunk, context)  # a forward reads at most the model's max_seq_len
    opt = make_optimizer(settings.optimizer, [p for p in model.parameters() if p.requires_grad], settings.lr)
    sums = PositionSums(POSITION_EDGES, device)
    docs = documents(tokens)
    was_training = model.training
    model.eval()  # no dropout; the weights still learn
    try:
        with torch.enable_grad():
            _adapt(model, opt, lanes(docs, settings.rows), chunk, context, carry, device, sums, advance)
    finally:
        model.train(was_training)
    return StreamScore(*sums.values(), documents=len(docs), method="dynamic", chunk=chunk, stride=None)


def lanes(docs: list[np.ndarray], rows: int) -> list[list[np.ndarray]]:
    """The documents dealt into ``rows`` lanes of about equal length (each document whole, longest first
    to the shortest lane), each lane read in order: one row of every step."""
    out: list[list[np.ndarray]] = [[] for _ in range(min(rows, len(docs)))]
    length = [0] * len(out)
    for doc in sorted(docs, key=len, reverse=True):
        i = length.index(min(length))
        out[i].append(doc)
        length[i] += len(doc)
    return out


def _adapt(model: nn.Module, opt: torch.optim.Optimizer, lanes: list[list[np.ndarray]], chunk: int, context: int,
           carry: bool, device: torch.device, sums: PositionSums, advance: Callable[[int], None] | None) -> None:
    """Every lane chunk by chunk, one row each: score the chunk, then one step on what was just scored.
    A row's chunk never crosses a document's end (its tail is padding); the next document's first chunk
    starts with its BOS, where a model that carries its state starts afresh (``forward(..., state)``)."""
    cursor = [[0, 0] for _ in lanes]  # per lane: document index, first target of its next chunk
    state = None
    pad = _TOKENIZER.pad_id
    while any(d < len(lane) for (d, _), lane in zip(cursor, lanes)):
        spans = []  # per row: (document, first input, first target scored, end)
        for (d, start), lane in zip(cursor, lanes):
            if d >= len(lane):
                spans.append(None)
                continue
            n = len(lane[d]) - 1
            end = min(start + chunk, n)
            spans.append((lane[d], start if carry else max(0, end - context), start, end))
        width = max(e - b for _, b, _, e in filter(None, spans))
        x = torch.full((len(lanes), width), pad, dtype=torch.long)
        y = torch.full((len(lanes), width), -100, dtype=torch.long)
        position = torch.zeros(len(lanes), width, dtype=torch.long)
        for row, span in enumerate(spans):
            if span is None:
                continue
            doc, begin, start, end = span
            t = torch.from_numpy(doc)
            x[row, :end - begin] = t[begin:end]
            y[row, start - begin:end - begin] = t[start + 1:end + 1]
            position[row, :end - begin] = torch.arange(begin, end)
        x, y, position = x.to(device), y.to(device), position.to(device)
        out = model_output(model, x, state=state) if carry else model_output(model, x)
        state = out.state if carry else None
        sums.add(out.logits.detach(), y, position)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for row, span in enumerate(spans):
            if span is not None:
                cursor[row][1] = span[3]
                if span[3] >= len(span[0]) - 1:
                    cursor[row] = [cursor[row][0] + 1, 0]
        if advance is not None:
            advance(sum(s[3] - s[2] for s in spans if s is not None))
