"""Score a trained model in bits per byte, beside gzip -9, bz2 -9 and xz -9e of the same bytes::

    python -m sem.evaluate ckpt=outputs/base/checkpoints/last.ckpt          # its own held-out split
    python -m sem.evaluate ckpt=... data=text_files 'data.corpus.paths=[notes/*.md]'   # any text
    python -m sem.evaluate ckpt=... data.val_seq_len=512 device=cuda out=eval_512.json
    python -m sem.evaluate ckpt=... mode=stream        # every held-out document whole, by position

Without a ``data`` option it rebuilds the checkpoint's own corpus and train/val split from the config
inside the checkpoint and scores every held-out window, exactly as the training run's final
validation does (same windows, same batches, same sums): with ``data.final_val_max_windows=null`` in
training (the default) it reproduces ``summary.json``'s ``val_bpb``. With a ``data`` option it scores
every window of the whole given corpus (all documents: a corpus of your own has no split to respect).

Windows tile the token stream (each document ``BOS bytes EOS``, concatenated) in non-overlapping
``val_seq_len`` pieces, each token predicted from the window's earlier tokens only; the last partial
window is left out, as in training. bpb = total cross-entropy in nats / ln 2 / byte targets (see
``sem.data.datamodule.byte_targets``). The console gets a table; ``eval.json`` gets the numbers.

``mode=stream`` scores every document whole instead (``sem.models.stream``): a model that carries its
recurrent state (SEM) reads each document in consecutive chunks, the state carried, so each token has
all of its document before it; any other model gets a sliding window of ``val_seq_len`` tokens, stride
half of it. Bits per byte overall and by position in the document (0-128, 128-512, 512-2k, 2k+ bytes)
go to ``eval.json`` (``by_position``) and to ``<out stem>_context.png`` beside it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from sem.config.components import corpus_node
from sem.config.schema import DynamicConf
from sem.config.store import expand_switches, register_configs
from sem.contracts import Corpus
from sem.data.anchors import LABELS as ANCHOR_LABELS
from sem.data.anchors import Alone
from sem.data.corpus import CorpusError
from sem.data.datamodule import SEMDataModule, tile_windows
from sem.data.tokenizer import ByteTokenizer
from sem.data.user_corpus import as_corpus
from sem.models.dynamic import DynamicSettings
from sem.models.stream import StreamScore, dynamic_score, stream_rows, stream_score
from sem.tools.context_plot import plot_context
from sem.tools.entries import CONF_DIR, device_of, load_checkpoint, start, usage_error
from sem.tools.entries import cli as _cli
from sem.training.evaluation import Score, score_windows

log = logging.getLogger("sem.evaluate")


@dataclass
class Text:
    """What is scored: windows of a token stream and the compressors' bpb of the same bytes."""

    x: torch.Tensor  # [n, T] int64 inputs
    y: torch.Tensor  # [n, T] int64 next-token targets
    compressor_bpb: dict[str, float]  # gzip_bpb, bz2_bpb, xz_bpb: the bytes alone
    what: str  # one line: which corpus, which part of it
    split: str  # "val" or "test" (a checkpoint's held-out splits) or "all" (every document)
    n_docs: int
    n_bytes: int  # bytes of the documents (what the compressors compress)
    n_tokens: int  # tokens in the stream (bytes + BOS/EOS per document)
    tokens: np.ndarray  # uint16 [n_tokens]: the stream itself (mode=stream reads its documents)
    # every anchor of sem.data.anchors (a held-out split: given the training set too), bits per byte
    anchors: dict[str, float | None] = field(default_factory=dict)


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
          device: torch.device | str = "cpu") -> Score:
    """``sem.training.evaluation.score_windows`` with a progress bar."""
    progress, task = _progress(len(x))
    with progress:
        return score_windows(model, x, y, batch_size, device, advance=lambda n: progress.update(task, advance=n))


def _progress(total: int, what: str = "windows") -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(f"scoring {what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())
    return progress, progress.add_task("score", total=total)


@dataclass
class Packed:
    """A whole corpus as one token stream, and the compressors' bpb of its bytes."""

    tokens: np.ndarray  # uint16 [N]: every document as BOS bytes EOS, in corpus order
    compressor_bpb: dict[str, float]
    what: str
    n_docs: int
    n_bytes: int


def pack(corpus: Corpus, tokenizer: ByteTokenizer | None = None) -> Packed:
    """Every document of ``corpus`` packed as in the token cache; the compressors see the same
    document bytes, streamed in the same order (as for the cache's held-out anchors)."""
    tokenizer = tokenizer or ByteTokenizer()
    alone = Alone()
    pieces, n_docs = [], 0
    for doc in corpus.documents():
        pieces.append(tokenizer.encode(doc.data))
        n_docs += 1
        alone.add(doc.data)
    what = corpus.describe()
    n_bytes = alone.n_bytes
    if n_bytes == 0:
        raise CorpusError(f"the corpus holds no text ({n_docs} document{'s' * (n_docs != 1)}, 0 bytes): {what}")
    return Packed(np.concatenate(pieces), {f"{k}_bpb": v for k, v in alone.bpb().items()}, what, n_docs, n_bytes)


def whole_corpus(packed: Packed, seq_len: int, windows: bool = True) -> Text:
    """Every whole window of a packed corpus (``windows=False``: none, for mode=stream)."""
    if windows and packed.tokens.size < seq_len + 1:
        raise CorpusError(f"the corpus has {packed.tokens.size} tokens, fewer than one window of "
                          f"val_seq_len+1 = {seq_len + 1}; use a shorter data.val_seq_len or more text")
    x, y = tile_windows(packed.tokens, seq_len) if windows else (torch.empty(0, seq_len, dtype=torch.long),) * 2
    return Text(x, y, packed.compressor_bpb, f"{packed.what}, all documents", "all", packed.n_docs,
                packed.n_bytes, int(packed.tokens.size), packed.tokens)


def held_out(ckpt_data: dict[str, Any], seq_len: int, cache_dir: str, split: str = "val") -> Text:
    """Every window of a checkpoint's held-out split (``val``: what it was validated on; ``test``: what
    its run reported), its own corpus, split and packing rebuilt from the config inside it."""
    try:
        node = corpus_node(ckpt_data["corpus"])[0]
        corpus = as_corpus(instantiate(node), node)
    except Exception as exc:  # a corpus class or argument this version no longer has
        raise CorpusError(f"cannot rebuild the checkpoint's corpus {ckpt_data['corpus']}: {exc.__cause__ or exc}") from None
    problems = getattr(corpus, "problems", lambda: [])()
    if problems:
        raise CorpusError(f"the checkpoint's corpus is not available here: {problems[0]}")
    test_fraction = ckpt_data.get("test_fraction", 0.0)  # 0: trained before the test split existed
    if split == "test" and not test_fraction:
        raise CorpusError("split=test: the checkpoint was trained without a test split (its data.test_fraction "
                          "is 0 or absent): its training set holds those documents; use split=val")
    dm = SEMDataModule(corpus, batch_size=1, seq_len=seq_len, val_seq_len=seq_len,
                       val_fraction=ckpt_data.get("val_fraction", 0.05), cache_dir=cache_dir,
                       test_fraction=test_fraction)
    dm.setup()
    c = dm.cache
    x, y = dm.val_windows(None) if split == "val" else dm.test_windows()
    n_docs, n_bytes = (c.n_val_docs, c.val_bytes) if split == "val" else (c.n_test_docs, c.test_bytes)
    anchors = dm.anchors(split)
    tokens = dm.tokens(split)
    flat = {f"{k}_bpb": anchors[k] for k in ("gzip", "bz2", "xz")}
    return Text(x, y, flat, f"{corpus.describe()}, {split} split", split, n_docs, n_bytes, int(tokens.size),
                tokens, anchors)


def report(model_name: str, result: Score | StreamScore, text: Text, seq_len: int) -> None:
    """The console table: the model's bpb beside the compressors' on the same bytes (mode=stream: and
    a second table, the model's bpb by position in the document)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if isinstance(result, StreamScore):
        how = {"recurrent": f"recurrent state carried across chunks of up to {result.chunk} tokens",
               "dynamic": f"dynamic evaluation: the weights take a step after every {result.chunk} tokens scored",
               }.get(result.method, f"sliding window of {result.chunk} tokens, stride {result.stride}")
        console.print(f"{text.what}: {result.documents:,} documents scored whole ({how}; "
                      f"{text.n_bytes:,} bytes)", soft_wrap=True)
    else:
        console.print(f"{text.what}: {result.windows:,} windows x {seq_len} tokens "
                      f"({text.n_docs:,} documents, {text.n_bytes:,} bytes)", soft_wrap=True)
    table = Table()
    table.add_column("model / compressor")
    table.add_column("bits per byte", justify="right")
    table.add_row(model_name, f"{result.bpb:.4f}", style="bold")
    for key, value in (text.anchors or {k.removesuffix("_bpb"): v for k, v in text.compressor_bpb.items()}).items():
        if value is not None:
            table.add_row(ANCHOR_LABELS.get(key, key), f"{value:.4f}")
    console.print(table)
    if isinstance(result, StreamScore):
        by_position = Table()
        for column in ("bytes into the document", "byte targets", "bits per byte"):
            by_position.add_column(column, justify="right")
        for row in result.by_position():
            by_position.add_row(row["position"], f"{row['byte_targets']:,}",
                                "-" if row["bpb"] is None else f"{row['bpb']:.4f}")
        console.print(by_position)


# ---------------------------------------------------------------------------------------- entry


@dataclass
class EvaluateConf:
    ckpt: str = MISSING  # a checkpoint file or a directory written by sem-export
    # A data option (data=text_files ...) replaces this node; without one, the checkpoint's held-out split.
    data: Any = field(default_factory=lambda: {"val_seq_len": None,
                                               "cache_dir": "${oc.env:SEM_CACHE_DIR,'~/.cache/sem'}"})
    batch_size: int | None = None  # windows per forward; null: the training run's validation batch (mode=stream:
    # at least 8192 tokens per forward, the chunks of the run's stream_bpb)
    device: str = "auto"  # auto | cpu | cuda
    mode: str = "windows"  # windows (the training run's validation) | stream (every document whole)
    split: str = "val"  # the checkpoint's held-out split scored without a data option: val | test
    # mode=stream dynamic=true: the weights learn as they read (sem.models.stream.dynamic_score)
    dynamic: DynamicConf = field(default_factory=DynamicConf)
    out: str = "eval.json"
    seed: int = 0  # not used by an evaluation: the data options interpolate ${seed}


register_configs()  # the data options start from schemas in the ConfigStore
ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConf)


def _positive_or_none(name: str, value: Any) -> list[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return []
    return [f"{name}={value!r}: must be a positive integer or null"]


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def app(cfg: DictConfig) -> None:
    start(cfg)
    data = cfg.data
    problems = _positive_or_none("batch_size", cfg.batch_size) + _positive_or_none("data.val_seq_len",
                                                                                   data.get("val_seq_len"))
    if cfg.mode not in ("windows", "stream"):
        problems.append(f"mode={cfg.mode!r}: expected windows (fixed windows, as the training run "
                        "validates) or stream (every document whole)")
    if cfg.split != "val" and "corpus" in cfg.data:
        problems.append(f"split={cfg.split}: a data option is scored whole (all of its documents); split picks "
                        "a held-out split of the checkpoint's own corpus (leave the data option out)")
    elif cfg.split not in ("val", "test"):
        problems.append(f"split={cfg.split!r}: expected val (the checkpoint's validation split) or test (its "
                        "report split)")
    dynamic = cfg.dynamic.enabled
    settings = DynamicSettings.of(OmegaConf.to_container(cfg.dynamic))
    if dynamic:
        problems += settings.problems("dynamic")
        if cfg.mode != "stream":
            problems.append(f"dynamic=true: needs mode=stream (every document whole), not mode={cfg.mode}")
    if problems:
        usage_error(*problems)
    stream = cfg.mode == "stream"
    packed = None
    if "corpus" in data:  # a data option: its corpus, all of it (read before anything heavy is loaded)
        try:
            node = corpus_node(OmegaConf.to_container(data.corpus, resolve=True))[0]
            corpus = as_corpus(instantiate(node), node)
        except Exception as exc:  # the corpus constructor's own check of its arguments
            usage_error(f"data.corpus: cannot build {data.corpus.get('_target_')!r}: {exc.__cause__ or exc}")
        problems = getattr(corpus, "problems", lambda: [])()
        if problems:
            usage_error(*problems)
        try:
            packed = pack(corpus)
        except CorpusError as exc:
            usage_error(f"data.corpus: {exc}")
    device = device_of(cfg.device)
    model, ckpt_cfg = load_checkpoint(cfg.ckpt, device)
    ckpt_data = OmegaConf.to_container(ckpt_cfg.data, resolve=True)
    trained_at = ckpt_data.get("val_seq_len") or ckpt_data["seq_len"]
    seq_len = data.get("val_seq_len") or trained_at
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and seq_len > max_len:
        usage_error(f"data.val_seq_len={seq_len}: longer than the model's max_seq_len={max_len}")
    batch_size = cfg.batch_size or ckpt_data.get("val_batch_size") or ckpt_data["batch_size"]
    if stream and not cfg.batch_size:  # the run's summary reads the same chunks (its stream_bpb)
        batch_size = stream_rows(batch_size, seq_len)

    started = time.perf_counter()
    try:
        text = (whole_corpus(packed, seq_len, windows=not stream) if packed is not None
                else held_out(ckpt_data, seq_len, data.cache_dir, cfg.split))
    except CorpusError as exc:
        usage_error(f"data.corpus: {exc}")
    log.info("loaded %s: %s, %s parameters", cfg.ckpt, type(model).__name__,
             f"{sum(p.numel() for p in model.parameters()):,}")
    if stream and dynamic:
        log.info("dynamic evaluation of %s documents (%s tokens): %s lr %g, a step every %d tokens, up to %d "
                 "documents side by side, on %s", f"{text.n_docs:,}", f"{text.n_tokens:,}", settings.optimizer,
                 settings.lr, settings.chunk, settings.rows, device)
        progress, task = _progress(text.n_tokens - text.n_docs, "document tokens")
        context = seq_len  # as mode=stream's sliding window reads (a model without a state)
        with progress:
            result: Score | StreamScore = dynamic_score(model, text.tokens, settings, context, device,
                                                        advance=lambda n: progress.update(task, advance=n))
    elif stream:
        log.info("scoring %s documents whole (%s tokens), up to %s tokens per forward, on %s",
                 f"{text.n_docs:,}", f"{text.n_tokens:,}", f"{batch_size * seq_len:,}", device)
        progress, task = _progress(text.n_tokens - text.n_docs, "document tokens")
        with progress:
            result = stream_score(model, text.tokens, seq_len, batch_size, device,
                                  advance=lambda n: progress.update(task, advance=n))
    else:
        log.info("scoring %s windows of %d tokens (trained at %d), %d per batch, on %s",
                 f"{len(text.x):,}", seq_len, trained_at, batch_size, device)
        result = score(model, text.x, text.y, batch_size, device)
    wall = time.perf_counter() - started

    name = f"{type(model).__name__} ({ckpt_cfg.model.get('d_model')}d x {ckpt_cfg.model.get('n_layers')})"
    report(name, result, text, seq_len)
    record = {
        "checkpoint": str(cfg.ckpt),
        "model": ckpt_cfg.model["_target_"],
        "mode": cfg.mode,
        "data": text.what,
        "split": text.split,
        "val_seq_len": seq_len,
        "trained_seq_len": trained_at,
        **(_stream_fields(result) if isinstance(result, StreamScore) else
           {"windows": result.windows, "tokens": result.tokens, "byte_targets": result.bytes}),
        "documents": text.n_docs,
        "bytes": text.n_bytes,
        "stream_tokens": text.n_tokens,
        "loss": result.loss,
        "bpb": result.bpb,
        **text.compressor_bpb,
        "anchors_bpb": text.anchors or None,
        "batch_size": batch_size,
        "device": str(device),
        "wall_s": round(wall, 3),
        "s_per_mb": round(wall / (text.n_bytes / 1e6), 3),
    }
    if stream and dynamic:
        record["dynamic"] = {"lr": settings.lr, "chunk": settings.chunk, "optimizer": settings.optimizer,
                             "rows": settings.rows}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    log.info("wrote %s", out)
    if stream:
        try:
            log.info("wrote %s", plot_context(record, out.with_name(f"{out.stem}_context.png")))
        except Exception as exc:  # a plot never fails an evaluation whose numbers are written
            log.warning("could not draw %s_context.png: %s: %s", out.stem, type(exc).__name__, exc)


def _stream_fields(result: StreamScore) -> dict[str, Any]:
    """eval.json's mode=stream fields: how the documents were read, the sums, bpb by position."""
    how = ({"method": result.method, "chunk_tokens": result.chunk} if result.method in ("recurrent", "dynamic")
           else {"method": "sliding_window", "context": result.chunk, "stride": result.stride})
    return {**how, "tokens": sum(result.tokens), "byte_targets": sum(result.byte_targets),
            "by_position": result.by_position()}


def cli() -> None:
    """``sem-eval``: see the module docstring."""
    sys.argv[1:] = expand_switches(sys.argv[1:], {"dynamic": "dynamic.enabled"})  # dynamic=true: its defaults
    _cli(app)


if __name__ == "__main__":
    cli()
