"""Corpus sources, the deterministic train/val split and the packed, memory-mapped token cache.

A corpus is anything with ``documents()`` (sorted, deterministic ``Document``s), a cheap ``fingerprint()``
(names, sizes, mtimes and parameters: no file contents are read), ``describe()`` and ``problems()`` (cheap
pre-flight checks for the config validator). Documents are split into train/val by a hash of their
stable relative name, so the split never depends on file order, machine or absolute location.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import json
import logging
import lzma
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np

from sem.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

# Test folders: tests are not representative text and many are near-duplicates of one another.
# encodings/: generated code-page tables, near-identical on both sides of the split (they flatter the model
# against the compressors). Entries without "/" match a directory name at any depth, entries with "/" a
# path relative to the root.
DEFAULT_STDLIB_EXCLUDES: tuple[str, ...] = (
    "test", "tests", "idle_test", "encodings", "site-packages", "dist-packages", "__pycache__",
)
_CACHE_VERSION = 2  # 2: bz2 -9 and xz -9e anchors beside gzip -9
_STALE_TMP_S = 6 * 3600  # a build dir this old was left by a killed builder


class CorpusError(ValueError):
    """A corpus that cannot be used; the message is one clear line."""


class Document(NamedTuple):
    name: str  # stable relative name (posix); the train/val split hashes it
    data: bytes


class Corpus(Protocol):
    """What the token cache reads: sem's corpora, or a user's through ``as_corpus``."""

    def documents(self) -> Iterator[Document]: ...
    def fingerprint(self) -> str: ...
    def describe(self) -> str: ...


def _read_bytes(path: Path) -> bytes:
    # An unreadable file is an error, not a skip: the cache key is built from names/sizes/mtimes, so a
    # silently skipped file would leave a cache that still looks valid once the file becomes readable.
    try:
        return path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus file '{path}': {e.strerror or e}") from e


def _stat_fingerprint(kind: str, params: dict, files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha1(json.dumps([kind, params], sort_keys=True, default=str).encode())
    for name, path in files:
        try:
            st = path.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0missing\n".encode())
    return h.hexdigest()[:16]


def _walk_files(root: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Regular files under root, recursively, skipping hidden entries and __pycache__ (sorted)."""
    out: list[Path] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__" and x not in skip)
        out.extend(Path(d) / f for f in sorted(files) if not f.startswith("."))
    return [p for p in out if p.is_file()]


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def _glob_root(pattern: str) -> Path:
    """The static prefix of a glob pattern: names are relative to it, so moving the data moves nothing."""
    parts = Path(pattern).parts
    static = parts[: next(i for i, x in enumerate(parts) if _has_magic(x))]
    return Path(*static) if static else Path(".")


def _expand_paths(paths: list[str], field: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """Resolve files / directories (recursive) / globs to sorted (name, path); also the problems found."""
    found: dict[Path, str] = {}
    problems: list[str] = []
    if not paths:
        problems.append(f"{field}: the list of paths is empty")
    for i, raw in enumerate(paths):
        where = f"{field}[{i}]: '{raw}'"
        p = os.path.expanduser(raw)
        if _has_magic(p):
            root = _glob_root(p)
            hits = sorted(Path(h) for h in glob.glob(p, recursive=True))
            files = [h for h in hits if h.is_file()] + [f for h in hits if h.is_dir() for f in _walk_files(h)]
            if not files:
                problems.append(f"{where} matches no files")
            named = [(f.relative_to(root).as_posix(), f) for f in files]
        elif not os.path.lexists(p):
            problems.append(f"{where} does not exist")
            continue
        elif os.path.isdir(p):
            files = _walk_files(Path(p))
            if not files:
                problems.append(f"{where} is a directory with no files")
            base = Path(p).resolve().name
            named = [(f"{base}/{f.relative_to(p).as_posix()}", f) for f in files]
        elif os.path.isfile(p):
            named = [(Path(p).name, Path(p))]
        else:
            problems.append(f"{where} is not a regular file or directory")
            continue
        for name, f in named:
            if not os.access(f, os.R_OK):
                problems.append(f"{where}: '{f}' is not readable")
            found.setdefault(f.resolve(), name)  # the same file reached twice is read once
    files_sorted = sorted(((n, f) for f, n in found.items()), key=lambda t: (t[0], str(t[1])))
    return files_sorted, problems


def _as_str_list(paths: list[str] | str, field: str) -> list[str]:
    if isinstance(paths, str):  # a single path is accepted as a one-element list
        return [paths]
    if not isinstance(paths, Sequence):  # None, a number, a mapping (ListConfig is a Sequence)
        raise ValueError(f"{field}={paths!r}: must be a list of paths (or one path)")
    return [str(p) for p in paths]  # also turns an OmegaConf ListConfig into plain str


class StdlibCorpus:
    """The running interpreter's standard-library ``.py`` sources (about 10 MB), tests and code pages left out."""

    def __init__(self, root: str | None = None, exclude_dirs: list[str] | None = None) -> None:
        self.root = Path(os.path.expanduser(root or sysconfig.get_paths()["stdlib"]))
        self.exclude_dirs = list(DEFAULT_STDLIB_EXCLUDES if exclude_dirs is None else exclude_dirs)

    def _excluded(self, rel_dir: str) -> bool:
        parts = rel_dir.split("/")
        for ex in self.exclude_dirs:
            ex = ex.strip("/")
            if ("/" in ex and (rel_dir == ex or rel_dir.startswith(ex + "/"))) or ex in parts:
                return True
        return False

    def _files(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        for d, dirs, files in os.walk(self.root):
            rel = Path(d).relative_to(self.root).as_posix()
            dirs[:] = sorted(x for x in dirs if not self._excluded(x if rel == "." else f"{rel}/{x}"))
            for f in files:
                if f.endswith(".py"):
                    out.append(((f if rel == "." else f"{rel}/{f}"), Path(d) / f))
        return sorted(out)

    def documents(self) -> Iterator[Document]:
        for name, path in self._files():
            yield Document(name, _read_bytes(path))

    def fingerprint(self) -> str:
        params = {"root": str(self.root), "exclude": sorted(self.exclude_dirs)}
        return _stat_fingerprint("stdlib", params, self._files())

    def describe(self) -> str:
        return f"Python {sys.version.split()[0]} stdlib .py sources at {self.root} ({len(self._files())} files)"

    def problems(self) -> list[str]:
        if not self.root.is_dir():
            return [f"data.corpus.root: '{self.root}' is not an existing directory"]
        if not self._files():
            return [f"data.corpus.root: '{self.root}' holds no .py files outside {self.exclude_dirs}"]
        return []


class TextFilesCorpus:
    """One document per file; ``paths`` are files, directories (recursive, hidden entries skipped) or globs."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = _as_str_list(paths, "data.corpus.paths")

    def _files(self) -> list[tuple[str, Path]]:
        return _expand_paths(self.paths, "data.corpus.paths")[0]

    def _checked_files(self) -> list[tuple[str, Path]]:
        files, problems = _expand_paths(self.paths, "data.corpus.paths")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise CorpusError(problems[0] + more)
        return files

    def documents(self) -> Iterator[Document]:
        for name, path in self._checked_files():
            yield Document(name, _read_bytes(path))

    def fingerprint(self) -> str:
        return _stat_fingerprint(type(self).__name__, {"paths": self.paths}, self._files())

    def describe(self) -> str:
        return f"text files {self.paths} ({len(self._files())} files)"

    def problems(self) -> list[str]:
        return _expand_paths(self.paths, "data.corpus.paths")[1]


class JsonlCorpus(TextFilesCorpus):
    """One document per non-blank line of JSON Lines files: the string in ``text_field``. Name = file:line."""

    def __init__(self, paths: list[str], text_field: str = "text") -> None:
        super().__init__(paths)
        if not text_field:
            raise ValueError(f"data.corpus.text_field must be a non-empty string, got {text_field!r}")
        self.text_field = str(text_field)

    def documents(self) -> Iterator[Document]:
        for name, path in self._checked_files():
            for lineno, line in enumerate(_read_bytes(path).splitlines(), start=1):
                if line.strip():
                    yield Document(f"{name}:{lineno}", self._text(line, path, lineno).encode("utf-8"))

    def _text(self, line: bytes, path: Path, lineno: int) -> str:
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise CorpusError(f"{where}: invalid JSON ({e})") from e
        if not isinstance(obj, dict) or self.text_field not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CorpusError(f"{where}: no '{self.text_field}' field (data.corpus.text_field); found {keys}")
        text = obj[self.text_field]
        if not isinstance(text, str):
            raise CorpusError(f"{where}: field '{self.text_field}' is {type(text).__name__}, expected a string")
        return text

    def fingerprint(self) -> str:
        params = {"paths": self.paths, "text_field": self.text_field}
        return _stat_fingerprint(type(self).__name__, params, self._files())

    def describe(self) -> str:
        return f"JSONL files {self.paths} field '{self.text_field}' ({len(self._files())} files)"


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")


def split_of(name: str, val_fraction: float) -> Literal["train", "val"]:
    """"val" iff the name's hash position in [0, 1) is below val_fraction; a pure function of the name.

    With h = int(sha1(name).hexdigest(), 16), the position is (h mod 100 + fine) / 100, fine being the next
    six decimal digits of h as a fraction. For a whole percentage this is exactly ``h % 100 < percent``: the
    split the reference figures in DESIGN.md were measured on (5% of CPython 3.11's stdlib: 29 files,
    0.29 MB, gzip -9 2.04 bpb); the fine part only gives sub-percent fractions a meaning.
    """
    _check_fraction(val_fraction)
    h = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16)
    position = (h % 100 + (h // 100 % 10**6) / 10**6) / 100
    return "val" if position < val_fraction else "train"


@dataclass
class TokenCache:
    train: np.ndarray  # memmap uint16 [N_train]: training documents concatenated, each BOS ... EOS
    val: np.ndarray  # memmap uint16 [N_val]: held-out documents, same packing
    val_bytes: int  # raw bytes of the held-out documents (the bpb denominator)
    train_bytes: int
    n_train_docs: int
    n_val_docs: int
    gzip_bpb: float  # gzip -9 bits per byte of the concatenated held-out document bytes
    bz2_bpb: float  # bz2 -9 of the same bytes
    xz_bpb: float  # xz -9e of the same bytes
    path: Path


def cache_key(corpus: Corpus, tokenizer: ByteTokenizer, val_fraction: float) -> str:
    spec = f"v{_CACHE_VERSION}|{corpus.fingerprint()}|{tokenizer.fingerprint()}|{val_fraction!r}"
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
        train = np.memmap(path / "train.bin", dtype=np.uint16, mode="r")
        val = np.memmap(path / "val.bin", dtype=np.uint16, mode="r")
        if train.size != meta["n_train_tokens"] or val.size != meta["n_val_tokens"]:
            return None
        return TokenCache(train, val, meta["val_bytes"], meta["train_bytes"], meta["n_train_docs"],
                          meta["n_val_docs"], meta["gzip_bpb"], meta["bz2_bpb"], meta["xz_bpb"], path)
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unusable token cache %s: %s", path, e)
        return None


def load_or_build_cache(corpus: Corpus, tokenizer: ByteTokenizer, val_fraction: float,
                        cache_dir: str | Path) -> TokenCache:
    """Load the packed token cache for (corpus, tokenizer, val_fraction), building it first if missing.

    Built in a private temporary directory and moved into place with one ``os.replace``: a killed build
    never leaves a half cache, and concurrent builders (e.g. DDP ranks) each build and the first rename
    wins; the others discard their copy and load the winner's.
    """
    _check_fraction(val_fraction)
    cache_dir = Path(os.path.expanduser(str(cache_dir)))
    key = cache_key(corpus, tokenizer, val_fraction)
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
        meta = _build(corpus, tokenizer, val_fraction, tmp)
        meta.update(version=_CACHE_VERSION, key=key, corpus=corpus.describe(), val_fraction=val_fraction,
                    tokenizer=tokenizer.fingerprint(), build_s=round(time.perf_counter() - t0, 3))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks the dir complete
        try:
            os.replace(tmp, final)
        except OSError:
            if _try_load(final) is None:
                raise
            log.debug("another process built %s first; using theirs", final)
        else:
            log.info("built token cache %s in %.1f s: %d train / %d val docs, %d / %d bytes; held-out bytes "
                     "compress to gzip -9 %.3f, bz2 -9 %.3f, xz -9e %.3f bpb", final, meta["build_s"],
                     meta["n_train_docs"], meta["n_val_docs"], meta["train_bytes"], meta["val_bytes"],
                     meta["gzip_bpb"], meta["bz2_bpb"], meta["xz_bpb"])
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


def _build(corpus: Corpus, tokenizer: ByteTokenizer, val_fraction: float, out: Path) -> dict:
    """Tokenize every document into out/train.bin and out/val.bin; return the counts for meta.json."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    n = {"train": 0, "val": 0}
    nbytes = {"train": 0, "val": 0}
    ntok = {"train": 0, "val": 0}
    # The held-out bytes, streamed through three standard compressors: the reference points for val/bpb.
    compressors = {
        "gzip_bpb": zlib.compressobj(9, zlib.DEFLATED, 31),  # 31 = gzip container, as gzip.compress(data, 9)
        "bz2_bpb": bz2.BZ2Compressor(9),
        "xz_bpb": lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME),  # xz -9e
    }
    packed = dict.fromkeys(compressors, 0)  # compressed bytes so far
    columns = (SpinnerColumn(), TimeElapsedColumn(),
               TextColumn("tokenizing corpus: {task.fields[docs]} docs, {task.fields[mb]:.1f} MB"))
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val, \
            Progress(*columns, console=Console(stderr=True), transient=True,
                     disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("tokenize", total=None, docs=0, mb=0.0)
        files = {"train": f_train, "val": f_val}
        for doc in corpus.documents():
            side = split_of(doc.name, val_fraction)
            ids = tokenizer.encode(doc.data)
            files[side].write(ids.tobytes())
            n[side] += 1
            nbytes[side] += len(doc.data)
            ntok[side] += ids.size
            if side == "val":
                for name, comp in compressors.items():
                    packed[name] += len(comp.compress(doc.data))
            if (n["train"] + n["val"]) % 64 == 0:
                progress.update(task, docs=n["train"] + n["val"], mb=(nbytes["train"] + nbytes["val"]) / 1e6)
        for name, comp in compressors.items():
            packed[name] += len(comp.flush())
        for f in (f_train, f_val):
            f.flush()
            os.fsync(f.fileno())
    total = n["train"] + n["val"]
    what = corpus.describe()
    if total == 0:
        raise CorpusError(f"the corpus has no documents: {what}")
    if n["train"] == 0:
        raise CorpusError(f"no training documents: all {total} documents fell in the held-out split "
                          f"(data.val_fraction={val_fraction}); add more documents")
    if n["val"] == 0 or nbytes["val"] == 0:
        raise CorpusError(f"no held-out bytes: none of the {total} documents (the split is per document) fell "
                          f"in the val split at data.val_fraction={val_fraction}; add more documents or raise it")
    return {"n_train_docs": n["train"], "n_val_docs": n["val"], "train_bytes": nbytes["train"],
            "val_bytes": nbytes["val"], "n_train_tokens": ntok["train"], "n_val_tokens": ntok["val"],
            **{name: 8.0 * size / nbytes["val"] for name, size in packed.items()}}
