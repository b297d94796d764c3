"""The deterministic train/val/test split and the packed, memory-mapped token cache.

Documents are split by a hash of their stable relative name, so the split never depends on file order,
machine or absolute location. The cache holds each split's tokens (``train.bin``, ``val.bin``,
``test.bin``) and ``meta.json`` (sizes, the compressor anchors of both held-out splits); it is keyed by
the corpus's fingerprint, the tokenizer's and the fractions, and built once by one process at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sem.contracts import Corpus
from sem.data import anchors
from sem.data.corpus import CorpusError
from sem.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

_CACHE_VERSION = 3  # 3: the test split (test.bin) and the anchors of both held-out splits
_STALE_TMP_S = 6 * 3600  # a build dir this old was left by a killed builder


def _check_fraction(val_fraction: float, test_fraction: float = 0.0) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise ValueError(f"data.test_fraction must be in [0, 1 - data.val_fraction = {1 - val_fraction:g}), "
                         f"got {test_fraction}")


Split = Literal["train", "val", "test"]


def split_of(name: str, val_fraction: float, test_fraction: float = 0.0) -> Split:
    """The split of a document, a pure function of its name: "val" where the name's hash position in
    [0, 1) is below val_fraction, "test" where it is in [val_fraction, val_fraction + test_fraction),
    "train" above. The test split is taken from what would be train without it: val is the same at any
    test_fraction, so val figures stay comparable with those measured before the test split existed.

    With h = int(sha1(name).hexdigest(), 16), the position is (h mod 100 + fine) / 100, fine being the next
    six decimal digits of h as a fraction. For a whole percentage this is exactly ``h % 100 < percent``: the
    split the reference figures in DESIGN.md were measured on (5% of CPython 3.11's stdlib: 29 files,
    0.29 MB, gzip -9 2.04 bpb); the fine part only gives sub-percent fractions a meaning.
    """
    _check_fraction(val_fraction, test_fraction)
    h = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16)
    position = (h % 100 + (h // 100 % 10**6) / 10**6) / 100
    return "val" if position < val_fraction else "test" if position < val_fraction + test_fraction else "train"


@dataclass
class TokenCache:
    train: np.ndarray  # memmap uint16 [N_train]: training documents concatenated, each BOS ... EOS
    val: np.ndarray  # memmap uint16 [N_val]: held-out documents for choosing (validation), same packing
    test: np.ndarray  # memmap uint16 [N_test]: held-out documents for reporting, same packing (empty: none)
    val_bytes: int  # raw bytes of the held-out documents (the bpb denominator)
    test_bytes: int
    train_bytes: int
    n_train_docs: int
    n_val_docs: int
    n_test_docs: int
    # {"val": {...}, "test": {...}}: each held-out split's bytes under every anchor (sem.data.anchors.KEYS),
    # bits per byte; None where not measured
    anchors: dict[str, dict[str, float | None]]
    path: Path

    @property
    def gzip_bpb(self) -> float:
        return self.anchors["val"]["gzip"]  # type: ignore[return-value]

    @property
    def bz2_bpb(self) -> float:
        return self.anchors["val"]["bz2"]  # type: ignore[return-value]

    @property
    def xz_bpb(self) -> float:
        return self.anchors["val"]["xz"]  # type: ignore[return-value]


def cache_key(corpus: Corpus, tokenizer: ByteTokenizer, val_fraction: float, test_fraction: float = 0.0) -> str:
    spec = f"v{_CACHE_VERSION}|{corpus.fingerprint()}|{tokenizer.fingerprint()}|{val_fraction!r}|{test_fraction!r}"
    return hashlib.sha1(spec.encode()).hexdigest()[:20]


def _try_load(path: Path) -> TokenCache | None:
    """The cache at path, or None when absent or not a complete cache of this format."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != _CACHE_VERSION:
            return None
        arrays = {s: _memmap(path / f"{s}.bin") for s in ("train", "val", "test")}
        if any(arrays[s].size != meta[f"n_{s}_tokens"] for s in arrays):
            return None
        return TokenCache(arrays["train"], arrays["val"], arrays["test"], meta["val_bytes"], meta["test_bytes"],
                          meta["train_bytes"], meta["n_train_docs"], meta["n_val_docs"], meta["n_test_docs"],
                          meta["anchors"], path)
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unusable token cache %s: %s", path, e)
        return None


def _memmap(path: Path) -> np.ndarray:
    """The uint16 tokens of a split file; an empty file (a split with no documents) as an empty array
    (numpy cannot map zero bytes)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_or_build_cache(corpus: Corpus, tokenizer: ByteTokenizer, val_fraction: float,
                        cache_dir: str | Path, test_fraction: float = 0.0) -> TokenCache:
    """Load the packed token cache for (corpus, tokenizer, val_fraction, test_fraction), building it
    first if missing; its meta.json holds the counts and the anchors of both held-out splits.

    Built in a private temporary directory and moved into place with one ``os.replace``: a killed build
    never leaves a half cache, and concurrent builders (e.g. DDP ranks) each build and the first rename
    wins; the others discard their copy and load the winner's.
    """
    _check_fraction(val_fraction, test_fraction)
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    key = cache_key(corpus, tokenizer, val_fraction, test_fraction)
    final = cache_dir / f"tokens-{key}"
    cache = _try_load(final)
    if cache is not None:
        log.debug("token cache hit: %s", final)
        return cache
    if final.exists():  # incomplete or old-format leftovers under the final name
        shutil.rmtree(final, ignore_errors=True)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(cache_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-tokens-{key}-{_builder()}-", dir=cache_dir))
    except OSError as exc:  # validation finds most of these; a file system can still refuse (/proc, quota)
        raise CorpusError(f"data.cache_dir={str(cache_dir)!r}: cannot hold the token cache "
                          f"({exc.strerror or exc}); set data.cache_dir or $SEM_CACHE_DIR") from exc
    try:
        t0 = time.perf_counter()
        meta = _build(corpus, tokenizer, val_fraction, test_fraction, tmp)
        meta.update(version=_CACHE_VERSION, key=key, corpus=corpus.describe(), val_fraction=val_fraction,
                    test_fraction=test_fraction, tokenizer=tokenizer.fingerprint(),
                    build_s=round(time.perf_counter() - t0, 3))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks the dir complete
        try:
            os.replace(tmp, final)
        except OSError:
            if _try_load(final) is None:
                raise
            log.debug("another process built %s first; using theirs", final)
        else:
            log.info("built token cache %s in %.1f s (anchors %.1f s): %d train / %d val / %d test docs, "
                     "%d / %d / %d bytes; anchors (bpb) val %s, test %s", final, meta["build_s"],
                     meta["anchors_s"], meta["n_train_docs"], meta["n_val_docs"], meta["n_test_docs"],
                     meta["train_bytes"], meta["val_bytes"], meta["test_bytes"],
                     _anchor_line(meta["anchors"]["val"]), _anchor_line(meta["anchors"]["test"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = _try_load(final)
    assert cache is not None, f"token cache {final} unreadable right after building it"
    return cache


def _builder() -> str:
    """This process, as build dirs name their builder: ``<host>.<pid>``."""
    return f"{socket.gethostname().replace('-', '_')}.{os.getpid()}"


def _remove_stale_tmp(cache_dir: Path) -> None:
    """Build dirs left by a killed builder (a second Ctrl-C, SIGKILL): at once when it was a process of
    this host that is gone, else when older than ``_STALE_TMP_S``."""
    now, host = time.time(), socket.gethostname().replace("-", "_")
    for p in cache_dir.glob(".tmp-tokens-*"):
        try:
            owner = p.name.split("-")[3] if p.name.count("-") >= 4 else ""
            gone = owner.rpartition(".")[0] == host and not _alive(int(owner.rpartition(".")[2]))
            if gone or now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except (OSError, ValueError):
            pass  # another process removed it first, or not a name of ours


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _anchor_line(values: dict[str, float | None]) -> str:
    return ", ".join(f"{anchors.LABELS[k]} {v:.3f}" for k, v in values.items() if v is not None) or "none"


def _build(corpus: Corpus, tokenizer: ByteTokenizer, val_fraction: float, test_fraction: float, out: Path) -> dict:
    """Tokenize every document into out/{train,val,test}.bin and measure the anchors; the counts and
    anchors for meta.json."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    sides: tuple[Split, ...] = ("train", "val", "test")
    n = dict.fromkeys(sides, 0)
    nbytes = dict.fromkeys(sides, 0)
    ntok = dict.fromkeys(sides, 0)
    alone = {"val": anchors.Alone(), "test": anchors.Alone()}  # streamed as the documents go by
    held: dict[str, list[bytes]] = {"val": [], "test": []}  # kept for the prior anchors
    train: list[bytes] | None = []  # None once over anchors.PRIOR_MAX_BYTES
    columns = (SpinnerColumn(), TimeElapsedColumn(),
               TextColumn("tokenizing corpus: {task.fields[docs]} docs, {task.fields[mb]:.1f} MB"))
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val, \
            open(out / "test.bin", "wb") as f_test, \
            Progress(*columns, console=Console(stderr=True), transient=True,
                     disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("tokenize", total=None, docs=0, mb=0.0)
        files = {"train": f_train, "val": f_val, "test": f_test}
        anchor_s = 0.0
        for doc in corpus.documents():
            side = split_of(doc.name, val_fraction, test_fraction)
            ids = tokenizer.encode(doc.data)
            files[side].write(ids.tobytes())
            n[side] += 1
            nbytes[side] += len(doc.data)
            ntok[side] += ids.size
            began = time.perf_counter()
            if side == "train":
                if train is not None and nbytes["train"] <= anchors.PRIOR_MAX_BYTES:
                    train.append(doc.data)
                else:
                    train = None
            else:
                alone[side].add(doc.data)
                held[side].append(doc.data)
            anchor_s += time.perf_counter() - began
            if sum(n.values()) % 64 == 0:
                progress.update(task, docs=sum(n.values()), mb=sum(nbytes.values()) / 1e6)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    total = sum(n.values())
    what = corpus.describe()
    if total == 0:
        raise CorpusError(f"the corpus has no documents: {what}")
    if n["train"] == 0:
        raise CorpusError(f"no training documents: all {total} documents fell in the held-out splits "
                          f"(data.val_fraction={val_fraction}, data.test_fraction={test_fraction}); add more documents")
    if n["val"] == 0 or nbytes["val"] == 0:
        raise CorpusError(f"no held-out bytes: none of the {total} documents (the split is per document) fell "
                          f"in the val split at data.val_fraction={val_fraction}; add more documents or raise it")
    if test_fraction > 0 and nbytes["test"] == 0:
        raise CorpusError(f"no test bytes: none of the {total} documents (the split is per document) fell in the "
                          f"test split at data.test_fraction={test_fraction}; add more documents, raise it, "
                          f"or set data.test_fraction=0 (no test figures)")
    began = time.perf_counter()
    if train is None:
        log.info("no prior anchors: the training set is over %d MB (sem.data.anchors.PRIOR_MAX_BYTES)",
                 anchors.PRIOR_MAX_BYTES >> 20)
    log.info("measuring the anchors of the held-out bytes (gzip, bz2, xz; xz and PPMd given the training set)")
    prior = anchors.given_prior(None if train is None else b"".join(train),
                                {s: b"".join(held[s]) for s in held})
    measured = {s: {**alone[s].bpb(), **prior[s]} for s in held}
    anchor_s += time.perf_counter() - began
    return {"n_train_docs": n["train"], "n_val_docs": n["val"], "n_test_docs": n["test"],
            "train_bytes": nbytes["train"], "val_bytes": nbytes["val"], "test_bytes": nbytes["test"],
            "n_train_tokens": ntok["train"], "n_val_tokens": ntok["val"], "n_test_tokens": ntok["test"],
            "anchors": measured, "anchors_s": round(anchor_s, 3),
            "ppmd": {"variant": "H (7-Zip PPMd7, pyppmd)", "order": anchors.PPMD_ORDER,
                     "memory_mb": anchors.PPMD_MEMORY_MB},
            # the val anchors alone under their earlier names, for readers of older caches' meta.json
            **{f"{k}_bpb": measured["val"][k] for k in anchors.ALONE}}
