"""A user's corpus (``sem.contracts.Corpus``: anything with ``documents()``) made into what the token
cache reads, with sem's defaults for the optional parts, and its contract check."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from sem.contracts import Corpus, documents_of
from sem.data.corpus import Document, StdlibCorpus, TextFilesCorpus


class UserCorpus:
    """A corpus of the user's (anything with ``documents()``, ``sem.contracts.Corpus``) with sem's
    defaults for what it leaves out: documents as ``Document``s (a ``(name, str)`` pair is UTF-8
    encoded), ``fingerprint()`` = a hash of the class, its config arguments and the documents' names
    and sizes (read once per run), ``describe()`` = the class name, ``problems()`` = none."""

    def __init__(self, inner: Corpus, target: str, args: dict[str, Any]) -> None:
        self.inner, self.target, self.args = inner, target, args

    def documents(self) -> Iterator[Document]:
        for name, data in documents_of(self.inner):
            yield Document(name, data)

    def fingerprint(self) -> str:
        own = getattr(self.inner, "fingerprint", None)
        if callable(own):
            return str(own())
        h = hashlib.sha1(json.dumps([self.target, self.args], sort_keys=True, default=str).encode())
        for doc in self.documents():
            h.update(f"{doc.name}\0{len(doc.data)}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        own = getattr(self.inner, "describe", None)
        return str(own()) if callable(own) else type(self.inner).__name__

    def problems(self) -> list[str]:
        own = getattr(self.inner, "problems", None)
        return list(own()) if callable(own) else []


def as_corpus(obj: Any, node: dict[str, Any] | None = None) -> Corpus:
    """``obj`` itself when it is one of sem's corpora, else a ``UserCorpus`` around it (``node``: its
    config, ``_target_`` and arguments, for the default fingerprint)."""
    if isinstance(obj, (StdlibCorpus, TextFilesCorpus, UserCorpus)):
        return obj
    node = dict(node or {})
    target = str(node.pop("_target_", f"{type(obj).__module__}.{type(obj).__qualname__}"))
    return UserCorpus(obj, target, {k: v for k, v in node.items() if not str(k).startswith("_")})


def corpus_contract_problems(key: str, corpus: Any) -> list[str]:
    """A user's corpus is a ``sem.contracts.Corpus`` whose ``documents()`` yields at least one
    well-formed document (the first is read)."""
    if isinstance(corpus, (StdlibCorpus, TextFilesCorpus)):
        return []
    inner = getattr(corpus, "inner", corpus)
    where = f"{type(inner).__module__}.{type(inner).__qualname__}"
    if not isinstance(inner, Corpus) or not callable(inner.documents):
        return [f"{key}: {where} has no documents() method (the corpus contract, sem.contracts.Corpus: "
                "documents() yields Document(name, data) or (name, bytes | str))"]
    try:
        first = next(iter(documents_of(inner)), None)
    except Exception as exc:
        return [f"{key}: {where}.documents() raised {type(exc).__name__}: {exc}"]
    if first is None:
        return [f"{key}: {where}.documents() yielded no document (the corpus contract wants at least one)"]
    return []
