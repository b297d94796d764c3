"""The data group: the corpora's and the datamodule's schemas, and their checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from sem.config.components import locate
from sem.contracts import carries_training_state
from sem.data.user_corpus import corpus_contract_problems


@dataclass
class StdlibCorpusConf:
    _target_: str = "sem.data.corpus.StdlibCorpus"
    root: str | None = None
    exclude_dirs: list[str] | None = None


@dataclass
class TextFilesCorpusConf:
    _target_: str = "sem.data.corpus.TextFilesCorpus"
    paths: list[str] = MISSING


@dataclass
class JsonlCorpusConf:
    _target_: str = "sem.data.corpus.JsonlCorpus"
    paths: list[str] = MISSING
    text_field: str = "text"


@dataclass
class DataConf:
    _target_: str = "sem.data.datamodule.SEMDataModule"
    corpus: Any = MISSING
    batch_size: int = 16  # x seq_len 128 = 2048 tokens per step: the measured CPU default (docs/results.md)
    seq_len: int = 128
    val_seq_len: int | None = None
    val_fraction: float = 0.05  # documents held out for choosing: validation, checkpoint ranking, sweeps
    # documents held out for reporting (test_bpb, test_stream_bpb at the end of a run; never a choice),
    # taken from train by the same name hash; 0: no test split
    test_fraction: float = 0.05
    val_max_windows: int | None = 256
    final_val_max_windows: int | None = None  # null = every held-out window (the summary's val_bpb)
    val_batch_size: int | None = None
    cache_dir: str = "${oc.env:SEM_CACHE_DIR,'~/.cache/sem'}"
    seed: int = "${seed}"  # type: ignore[assignment]
    # Truncated BPTT: K >= 2 makes each batch row a lane of K consecutive windows, the model's recurrent
    # state carried from one to the next (gradients stop at the window); 0 (or 1): independent windows.
    tbptt: int = 0


def _corpus(conf: type) -> Any:
    """The corpus node of a data option as a plain dict of ``conf``'s fields: untyped, so an option
    of one's own can extend the option (``defaults: [stdlib, _self_]``) and swap in its own corpus
    class with other arguments. The constructor's signature checks them (``sem.config.components``)."""
    return field(default_factory=lambda: OmegaConf.to_container(OmegaConf.structured(conf)))


@dataclass
class StdlibDataConf(DataConf):
    corpus: Any = _corpus(StdlibCorpusConf)


@dataclass
class TextFilesDataConf(DataConf):
    corpus: Any = _corpus(TextFilesCorpusConf)


@dataclass
class JsonlDataConf(DataConf):
    corpus: Any = _corpus(JsonlCorpusConf)


def data_problems(cfg: DictConfig, corpus: Any, max_len: int | None) -> list[str]:
    from sem.data.datamodule import settings_problems

    d = cfg.data
    keys = ("batch_size", "seq_len", "val_seq_len", "val_fraction", "test_fraction", "val_max_windows",
            "final_val_max_windows", "val_batch_size")  # the datamodule's own numbers (tbptt: below, with the model)
    p = settings_problems("data.", **{k: d[k] for k in keys})
    for key in ("seq_len", "val_seq_len"):
        if max_len is not None and isinstance(d[key], int) and d[key] > max_len:
            p.append(f"data.{key}={d[key]}: longer than model.max_seq_len={max_len}")
    p += tbptt_problems(cfg)
    return (p + cache_dir_problems(d.cache_dir) + corpus_contract_problems("data.corpus", corpus)
            + list(getattr(corpus, "problems", list)()))


def tbptt_problems(cfg: DictConfig) -> list[str]:
    """data.tbptt K >= 2 carries the model's recurrent state across K consecutive windows: the model
    must take one (``carries_training_state``) and nothing else may read the windows without it."""
    k = cfg.data.get("tbptt", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        return [f"data.tbptt={k!r}: must be an integer >= 0 (K >= 2: lanes of K consecutive windows; 0: off)"]
    if k < 2:
        return []
    p = []
    cls, err = locate("model", cfg.model.get("_target_"))
    if not err and not carries_training_state(cls):
        p.append(f"data.tbptt={k}: model {cfg.model._target_} carries no recurrent state across windows "
                 "(its forward takes no `state`); use data.tbptt=0 or a model that does (model=sem_small)")
    if cfg.distillation.get("teacher"):
        p.append(f"data.tbptt={k}: the distillation teacher reads each window from nothing, the student from "
                 "its carried state; use one of data.tbptt and distillation")
    return p


def cache_dir_problems(value: Any) -> list[str]:
    """The token cache's folder can be made and written (checked without writing anything)."""
    if not isinstance(value, str) or not value.strip():
        return [f"data.cache_dir={value!r}: must name a folder (default: $SEM_CACHE_DIR or ~/.cache/sem)"]
    path = Path(os.path.expanduser(value))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"data.cache_dir={value!r}: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"data.cache_dir={value!r}: {existing} is not writable"]
    return []
