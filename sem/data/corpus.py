"""Corpus sources: the Python standard library, text files, JSON lines.

A corpus is a ``sem.contracts.Corpus``: ``documents()`` (sorted, deterministic ``Document``s). The token
cache also reads its ``fingerprint()`` (names, sizes, mtimes and parameters: no file contents are read)
and ``describe()``: sem's corpora here have them, with ``problems()`` (cheap pre-flight checks for the
config validator); a user's gets sem's defaults through ``sem.data.user_corpus.as_corpus``. The split
and the token cache are ``sem.data.cache``'s.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

# Test folders: tests are not representative text and many are near-duplicates of one another.
# encodings/: generated code-page tables, near-identical on both sides of the split (they flatter the model
# against the compressors). Entries without "/" match a directory name at any depth, entries with "/" a
# path relative to the root.
DEFAULT_STDLIB_EXCLUDES: tuple[str, ...] = (
    "test", "tests", "idle_test", "encodings", "site-packages", "dist-packages", "__pycache__",
)


class CorpusError(ValueError):
    """A corpus that cannot be used; the message is one clear line."""


class Document(NamedTuple):
    name: str  # stable relative name (posix); the train/val/test split hashes it
    data: bytes


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
