"""SEMDataModule: step-indexed training batches and fixed validation (and test) windows over the token cache.

A plain class (no Lightning): both engines drive it. A training batch is a pure function of
(seed, step, micro-batch, rank, world size, seq_len, batch size), so exact resume, DDP sharding and
curriculum seq_len changes need no loader state and no loader rebuild.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from sem.contracts import Corpus
from sem.data.cache import TokenCache, load_or_build_cache
from sem.data.corpus import CorpusError
from sem.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)


def byte_targets(y: torch.Tensor | np.ndarray) -> int:
    """Number of targets that are bytes (id < 256): the denominator of bits per byte.

    BOS/EOS targets are not bytes, but their loss is still summed into the numerator: predicting where a
    document ends is part of coding it (gzip pays for the end of its stream too), so it is charged to the
    document's bytes rather than dropped.
    """
    return int(((y >= 0) & (y < 256)).sum())  # -100: an ignored target (padding), not a byte


def settings_problems(prefix: str = "data.", **s: Any) -> list[str]:
    """Every problem with the datamodule's numbers ``s`` (its constructor's names), one line each naming
    ``<prefix><key>``: run by its constructor and by the config's validation (``sem.config.groups.data``)."""
    p = []

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in ("batch_size", "seq_len", "val_seq_len", "val_max_windows", "final_val_max_windows", "val_batch_size"):
        value = s.get(key)
        required = key in ("batch_size", "seq_len")
        if key in s and not (value is None and not required) and not (whole(value) and value > 0):
            p.append(f"{prefix}{key}={value!r}: must be an integer > 0" + ("" if required else " or null"))
    val, test = s.get("val_fraction", 0.05), s.get("test_fraction", 0.0)
    if not (isinstance(val, (int, float)) and not isinstance(val, bool) and 0.0 < val < 1.0):
        p.append(f"{prefix}val_fraction={val!r}: must be in (0, 1)")
    elif not (isinstance(test, (int, float)) and not isinstance(test, bool) and 0.0 <= test < 1.0 - val):
        p.append(f"{prefix}test_fraction={test!r}: must be in [0, 1 - {prefix}val_fraction = {1 - val:g})")
    tbptt = s.get("tbptt", 0)
    if not (whole(tbptt) and tbptt >= 0):
        p.append(f"{prefix}tbptt={tbptt!r}: must be an integer >= 0 (K >= 2: lanes of K consecutive windows; 0: off)")
    seed = s.get("seed", 0)
    if "seed" in s and not (whole(seed) and seed >= 0):
        p.append(f"seed={seed!r}: must be an integer >= 0")
    return p


def _positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size: (0, 1) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SEMDataModule:
    def __init__(self, corpus: Corpus, batch_size: int = 16, seq_len: int = 128, val_seq_len: int | None = None,
                 val_fraction: float = 0.05, val_max_windows: int | None = 256,
                 final_val_max_windows: int | None = None, val_batch_size: int | None = None,
                 cache_dir: str = "~/.cache/sem", seed: int = 0, tokenizer: ByteTokenizer | None = None,
                 tbptt: int = 0, test_fraction: float = 0.05) -> None:
        bad = settings_problems(batch_size=batch_size, seq_len=seq_len, val_seq_len=val_seq_len,
                                val_fraction=val_fraction, val_max_windows=val_max_windows,
                                final_val_max_windows=final_val_max_windows, val_batch_size=val_batch_size,
                                seed=seed, tbptt=tbptt, test_fraction=test_fraction)
        if bad:
            raise ValueError("; ".join(bad))
        self.corpus = corpus
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.val_seq_len = val_seq_len or seq_len
        self.val_fraction = float(val_fraction)
        # The report set: scored once at the end of a run, never read for a choice (0: no test split)
        self.test_fraction = float(test_fraction)
        self.val_max_windows = val_max_windows
        self.final_val_max_windows = final_val_max_windows  # None: every held-out window
        self.val_batch_size = val_batch_size or batch_size
        self.cache_dir = str(cache_dir)
        self.seed = seed
        self.tbptt = tbptt  # >= 2: lanes of that many consecutive windows (truncated BPTT); 0 or 1: off
        self.tokenizer = tokenizer or ByteTokenizer()
        self._cache: TokenCache | None = None
        self._val_windows: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self._test_windows: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load (or build once) the token cache and check every split holds at least one window. Idempotent."""
        if self._cache is not None:
            return
        cache = load_or_build_cache(self.corpus, self.tokenizer, self.val_fraction, self.cache_dir,
                                    test_fraction=self.test_fraction)
        splits = [("train", cache.train.size, self.seq_len, "data.seq_len"),
                  ("val", cache.val.size, self.val_seq_len, "data.val_seq_len")]
        if self.test_fraction > 0:
            splits.append(("test", cache.test.size, self.val_seq_len, "data.val_seq_len"))
        for split, n, t, field in splits:
            if n < t + 1:
                raise CorpusError(f"{split} split has {n} tokens, fewer than one window of seq_len+1 = {t + 1} "
                                  f"({field}); use a bigger corpus or a shorter {field}"
                                  + (" or set data.test_fraction=0" if split == "test" else ""))
        self._cache = cache

    @property
    def cache(self) -> TokenCache:
        if self._cache is None:
            raise RuntimeError("SEMDataModule.setup() must be called before using the data")
        return self._cache

    @property
    def gzip_bpb(self) -> float:
        """gzip -9 bits per byte of the held-out bytes: the reference point for val/bpb."""
        return self.cache.gzip_bpb

    @property
    def compressor_bpb(self) -> dict[str, float]:
        """Bits per byte of the val bytes under gzip -9, bz2 -9 and xz -9e (summary.json's flat keys)."""
        c = self.cache
        return {"gzip_bpb": c.gzip_bpb, "bz2_bpb": c.bz2_bpb, "xz_bpb": c.xz_bpb}

    def anchors(self, split: Literal["val", "test"]) -> dict[str, float | None]:
        """A held-out split's bytes under every anchor (``sem.data.anchors.KEYS``), bits per byte."""
        return dict(self.cache.anchors[split])

    @property
    def has_test(self) -> bool:
        """Is there a test split (``data.test_fraction`` > 0)?"""
        return self.test_fraction > 0 and self.cache.test.size > 0

    def tokens(self, split: Literal["val", "test"]) -> np.ndarray:
        """A held-out split's packed token stream (what mode=stream reads)."""
        return self.cache.val if split == "val" else self.cache.test

    byte_targets = staticmethod(byte_targets)

    def describe(self) -> str:
        """One line for the run log: the corpus, the split and the batch shape."""
        if self._cache is None:
            return f"{self.corpus.describe()} (not set up)"
        c = self._cache
        test = (f"test {c.n_test_docs} docs / {c.test_bytes / 1e6:.3f} MB (reported once, at the end), "
                if self.test_fraction > 0 else "no test split (data.test_fraction=0), ")
        return (f"{self.corpus.describe()}: train {c.n_train_docs} docs / {c.train_bytes / 1e6:.2f} MB, "
                f"val {c.n_val_docs} docs / {c.val_bytes / 1e6:.3f} MB (gzip -9 {c.gzip_bpb:.3f}, bz2 -9 {c.bz2_bpb:.3f}, "
                f"xz -9e {c.xz_bpb:.3f} bpb), {test}"
                f"batch {self.batch_size} x {self.seq_len}, val_seq_len {self.val_seq_len}"
                f"{f', lanes of {self.tbptt} consecutive windows (data.tbptt)' if self.tbptt >= 2 else ''}; "
                f"cache {c.path}")

    # ------------------------------------------------------------------------------------------ train

    def train_batch(self, step: int, seq_len: int | None = None, batch_size: int | None = None, rank: int = 0,
                    world_size: int = 1, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, int64 [batch_size, seq_len] each, for this rank at this step.

        The global batch of batch_size * world_size window starts is drawn from an rng seeded with
        (seed, step, micro); this rank takes rows [rank * batch_size, (rank + 1) * batch_size). Windows
        are uniform over every start whose seq_len + 1 tokens fit in the train array.

        With ``tbptt`` K >= 2 each row is a lane reading K consecutive windows: the starts are drawn
        once per segment of K steps, from (seed, step // K, micro), and step s reads the lane's window
        s % K, right after the one step s - 1 read (``continues``). A lane that runs past the end of
        the array wraps to its start (one more document boundary).
        """
        t = self.seq_len if seq_len is None else seq_len
        b = self.batch_size if batch_size is None else batch_size
        _positive("seq_len", t)
        _positive("batch_size", b)
        _positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if step < 0 or micro < 0:
            raise ValueError(f"step and micro must be >= 0, got step={step}, micro={micro}")
        train = self.cache.train
        n_starts = train.size - t  # starts 0 .. N-T-1: the window [s, s+T] stays inside the array
        if n_starts < 1:
            raise CorpusError(f"train split has {train.size} tokens, fewer than one window of seq_len+1 = {t + 1}")
        if self.tbptt >= 2:
            rng = np.random.default_rng([self.seed, step // self.tbptt, micro, self.tbptt])
            starts = rng.integers(0, train.size, size=b * world_size)[rank * b:(rank + 1) * b]  # [B]
            positions = (starts[:, None] + (step % self.tbptt) * t + np.arange(t + 1)) % train.size
            window = train[positions]  # [B, T+1]
        else:
            rng = np.random.default_rng([self.seed, step, micro])
            starts = rng.integers(0, n_starts, size=b * world_size)[rank * b:(rank + 1) * b]  # [B]
            window = train[starts[:, None] + np.arange(t + 1)]  # [B, T+1] uint16, a copy out of the memmap
        w = torch.from_numpy(window.astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def continues(self, step: int) -> bool:
        """Does the batch of ``step`` continue the lanes of ``step - 1`` (the next window of each row, at
        the same shape)? Then a model's recurrent state after step - 1 is the context of step's windows
        (truncated BPTT, ``data.tbptt``); False at a segment's first step and whenever tbptt is off."""
        return self.tbptt >= 2 and step % self.tbptt != 0

    def train_loader(self, start_step: Callable[[], int],
                     shape_at: Callable[[int], tuple[int, int]] | None = None, accumulate: int = 1) -> DataLoader:
        """Infinite loader of train_batch(step), step = start_step(), start_step() + 1, ... (k micro-batches each).

        ``start_step`` is called on every iter(), so a resumed run continues at the restored step. The loader
        counts steps itself, so a trainer fetching one batch ahead still gets the right batch for each step.
        ``shape_at(step) -> (seq_len, batch_size)`` lets a curriculum change shape at a step, no rebuild.
        num_workers=0 on purpose: a batch is one fancy-index into a memmap (tens of microseconds, no
        worth in worker processes), and shape_at must run in the main process to see the live curriculum.
        """
        _positive("accumulate", accumulate)
        return DataLoader(_StepStream(self, start_step, shape_at, accumulate), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------------------------------ val

    def val_windows(self, max_windows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed held-out windows, int64 [n, val_seq_len] inputs and targets.

        Window i holds tokens [i*T, i*T + T] of the val array (consecutive, non-overlapping targets that tile
        it). When max_windows is smaller than the number available, an evenly spaced fixed subset.
        """
        _positive("max_windows", max_windows, allow_none=True)
        if max_windows not in self._val_windows:
            self._val_windows[max_windows] = tile_windows(self.cache.val, self.val_seq_len, max_windows)
        return self._val_windows[max_windows]

    def test_windows(self, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of the test split, int64 [n, val_seq_len]: the same tiling as ``val_windows`` (every
        window, or an evenly spaced fixed subset of ``max_windows``). Only the end of a run reads it
        (``sem.engines.final``), never a choice made during one."""
        if not self.has_test:
            raise CorpusError("no test split: data.test_fraction is 0")
        if max_windows not in self._test_windows:
            self._test_windows[max_windows] = tile_windows(self.cache.test, self.val_seq_len, max_windows)
        return self._test_windows[max_windows]

    def val_loader(self, max_windows: int | None | Literal["default"] = "default") -> DataLoader:
        """(x, y) int64 [b, val_seq_len] batches over val_windows; "default" = val_max_windows, None = all."""
        m = self.val_max_windows if max_windows == "default" else max_windows
        return DataLoader(_ValShard(*self.val_windows(m), self.val_batch_size), batch_size=None, num_workers=0)

    def val_bpb(self, sum_nats: float, n_byte_targets: int) -> float:
        """Bits per byte: total loss in nats over all targets, per byte target (see byte_targets)."""
        if n_byte_targets <= 0:
            raise ValueError(f"n_byte_targets must be positive, got {n_byte_targets}")
        return float(sum_nats) / math.log(2) / n_byte_targets

    def __repr__(self) -> str:
        return (f"SEMDataModule(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"val_seq_len={self.val_seq_len}, val_fraction={self.val_fraction}, "
                f"test_fraction={self.test_fraction}, seed={self.seed})")


def tile_windows(tokens: np.ndarray, t: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of a packed stream: window i holds tokens [i*t, i*t + t] (consecutive targets that tile
    it), or an evenly spaced fixed subset of ``max_windows`` of them."""
    n = (tokens.size - 1) // t
    m = n if max_windows is None else min(max_windows, n)
    idx = (np.arange(m) * n) // m  # evenly spaced, distinct, window 0 first; all windows when m == n
    w = torch.from_numpy(tokens[idx[:, None] * t + np.arange(t + 1)].astype(np.int64))  # [n, T+1]
    return w[:, :-1], w[:, 1:]


class _StepStream(IterableDataset):
    """Step-indexed stream: no state but the step counter restarted from start_step() on every iter()."""

    def __init__(self, dm: SEMDataModule, start_step: Callable[[], int],
                 shape_at: Callable[[int], tuple[int, int]] | None, accumulate: int) -> None:
        self.dm, self.start_step, self.shape_at, self.accumulate = dm, start_step, shape_at, accumulate

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = rank_world()
        step = int(self.start_step())
        while True:
            t, b = self.shape_at(step) if self.shape_at is not None else (self.dm.seq_len, self.dm.batch_size)
            for j in range(self.accumulate):
                yield self.dm.train_batch(step, t, b, rank, world, micro=j)
            step += 1


class _ValShard(IterableDataset):
    """This rank's share of the validation windows, each window counted once across ranks.

    Rank r takes windows r, r + world, ...; ranks that come up one short get a padding window whose
    targets are all -100 (ignored: no loss, no tokens, no bytes), so every rank runs the same number of
    batches (collectives stay in step) and nothing is counted twice (Lightning's DistributedSampler
    would repeat windows instead). The rank is read when iterated: the loader is built before the
    process group exists."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = rank_world()
        x, y = self.x[rank::world], self.y[rank::world]
        share = -(-len(self.x) // world)
        if len(x) < share:
            x = torch.cat([x, self.x[:1]])
            y = torch.cat([y, torch.full_like(self.y[:1], -100)])
        for i in range(0, share, self.batch_size):
            yield x[i:i + self.batch_size], y[i:i + self.batch_size]
