"""The compressors a model's bits per byte are compared with, on the same bytes.

Alone, a compressor sees only the held-out bytes: gzip -9, bz2 -9, xz -9e. Given the training set as a
prior (what the model saw), it compresses train + held-out and is charged the difference with train
alone: ``xz_prior`` (xz -9e) and ``ppmd_prior`` (PPMd variant H, 7-Zip's PPMd7, through ``pyppmd``, of
order ``PPMD_ORDER`` with a ``PPMD_MEMORY_MB`` model). PPMd adapts to the text as it codes it: the anchor
that dynamic evaluation (``sem.models.dynamic``) is measured against.

Costs on 2 cores (CPython 3.11's stdlib, 9.9 MB of training bytes): xz -9e about 8 s per pass over the
training set (its three passes run in threads: lzma releases the GIL), PPMd about 5 s per pass (three
passes, in this thread: pyppmd holds the GIL); about 25 s in all, paid once per token cache.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import zlib
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

ALONE: tuple[str, ...] = ("gzip", "bz2", "xz")
PRIOR: tuple[str, ...] = ("xz_prior", "ppmd_prior")
KEYS: tuple[str, ...] = ALONE + PRIOR
# How a report names each anchor.
LABELS: dict[str, str] = {"gzip": "gzip -9", "bz2": "bz2 -9", "xz": "xz -9e", "xz_prior": "xz -9e | train",
                          "ppmd_prior": "PPMd | train"}
PPMD_ORDER = 64
PPMD_MEMORY_MB = 1024
# A training set larger than this gets no prior anchors (null): xz -9e codes about 1.3 MB/s, so a
# 256 MB training set already costs minutes per pass.
PRIOR_MAX_BYTES = 256 * 2**20
_XZ = {"preset": 9 | lzma.PRESET_EXTREME}


class Alone:
    """gzip -9, bz2 -9 and xz -9e of a byte stream fed piece by piece (``add``), in bits per byte."""

    def __init__(self) -> None:
        self._compressors = {
            "gzip": zlib.compressobj(9, zlib.DEFLATED, 31),  # 31 = the gzip container, as gzip -9
            "bz2": bz2.BZ2Compressor(9),
            "xz": lzma.LZMACompressor(**_XZ),
        }
        self._packed = dict.fromkeys(self._compressors, 0)
        self.n_bytes = 0

    def add(self, data: bytes) -> None:
        self.n_bytes += len(data)
        for name, comp in self._compressors.items():
            self._packed[name] += len(comp.compress(data))

    def bpb(self) -> dict[str, float | None]:
        """Bits per byte of everything added (flushes: call once); None for no bytes."""
        for name, comp in self._compressors.items():
            self._packed[name] += len(comp.flush())
        return {name: 8.0 * size / self.n_bytes if self.n_bytes else None for name, size in self._packed.items()}


def _xz_size(*pieces: bytes) -> int:
    comp = lzma.LZMACompressor(**_XZ)
    return sum(len(comp.compress(p)) for p in pieces) + len(comp.flush())


def _ppmd_size(*pieces: bytes) -> int:
    import pyppmd

    enc = pyppmd.Ppmd7Encoder(PPMD_ORDER, PPMD_MEMORY_MB * 2**20)
    return sum(len(enc.encode(p)) for p in pieces) + len(enc.flush())


def given_prior(train: bytes | None, held_out: dict[str, bytes]) -> dict[str, dict[str, float | None]]:
    """``{split: {"xz_prior": bpb, "ppmd_prior": bpb}}`` for each held-out split: its bytes coded after
    the training set's (the size of both minus the size of train alone). None where it cannot be
    measured: no training bytes given (over ``PRIOR_MAX_BYTES``), no held-out bytes, or no pyppmd."""
    out: dict[str, dict[str, float | None]] = {s: dict.fromkeys(PRIOR) for s in held_out}
    if train is None:
        return out
    splits = [s for s, b in held_out.items() if b]
    with ThreadPoolExecutor(max_workers=1 + len(splits)) as pool:  # lzma releases the GIL
        xz_train = pool.submit(_xz_size, train)
        xz_both = {s: pool.submit(_xz_size, train, held_out[s]) for s in splits}
        try:  # PPMd in this thread meanwhile (pyppmd holds the GIL: threads would not help it)
            ppmd_train = _ppmd_size(train)
            ppmd_both = {s: _ppmd_size(train, held_out[s]) for s in splits}
        except ImportError:
            log.warning("pyppmd is not installed: no ppmd_prior anchor (pip install pyppmd)")
            ppmd_train, ppmd_both = None, {}
        for s in splits:
            n = len(held_out[s])
            out[s]["xz_prior"] = 8.0 * (xz_both[s].result() - xz_train.result()) / n
            if ppmd_train is not None:
                out[s]["ppmd_prior"] = 8.0 * (ppmd_both[s] - ppmd_train) / n
    return out


def strongest_beaten(bpb: float, anchors: dict[str, float | None]) -> tuple[str | None, str | None]:
    """(the lowest anchor above ``bpb``: the strongest it beats; the highest anchor at or below it: the
    nearest it does not beat), by key; None where there is none."""
    known = {k: v for k, v in anchors.items() if v is not None}
    beaten = [k for k, v in known.items() if bpb < v]
    not_beaten = [k for k, v in known.items() if bpb >= v]
    return (min(beaten, key=known.__getitem__) if beaten else None,
            max(not_beaten, key=known.__getitem__) if not_beaten else None)


def describe(bpb: float, anchors: dict[str, float | None]) -> str:
    """``"beats xz -9e | train 1.4406, behind PPMd | train 1.2384 by 0.0812"``: the strongest anchor
    ``bpb`` beats and the nearest it does not."""
    best, nearest = strongest_beaten(bpb, anchors)
    parts = []
    if best is not None:
        parts.append(f"beats {LABELS.get(best, best)} {anchors[best]:.4f}")
    if nearest is not None:
        parts.append(f"behind {LABELS.get(nearest, nearest)} {anchors[nearest]:.4f} by {bpb - anchors[nearest]:.4f}")
    return ", ".join(parts) if parts else "no anchors"
