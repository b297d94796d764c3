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

import bz2
import json
import logging
import lzma
import math
import sys
import time
import zlib
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
from sem.config.store import register_configs
from sem.data.corpus import Corpus, CorpusError
from sem.data.datamodule import SEMDataModule
from sem.data.tokenizer import ByteTokenizer
from sem.data.user_corpus import as_corpus
from sem.models.stream import StreamScore, stream_rows, stream_score
from sem.tools.context_plot import COMPRESSORS, plot_context
from sem.tools.entries import CONF_DIR, device_of, load_checkpoint, start, usage_error
from sem.tools.entries import cli as _cli
from sem.training.step import val_sums

log = logging.getLogger("sem.evaluate")


@dataclass
class Score:
    """Sums over scored windows."""

    nats: float  # total cross-entropy over every target
    tokens: int  # targets
    bytes: int  # targets that are bytes (the bpb denominator)
    windows: int

    @property
    def loss(self) -> float:
        return self.nats / self.tokens  # nats/token

    @property
    def bpb(self) -> float:
        return self.nats / math.log(2) / self.bytes


@dataclass
class Text:
    """What is scored: windows of a token stream and the compressors' bpb of the same bytes."""

    x: torch.Tensor  # [n, T] int64 inputs
    y: torch.Tensor  # [n, T] int64 next-token targets
    compressor_bpb: dict[str, float]
    what: str  # one line: which corpus, which part of it
    split: str  # "val" (a checkpoint's held-out split) or "all" (every document)
    n_docs: int
    n_bytes: int  # bytes of the documents (what the compressors compress)
    n_tokens: int  # tokens in the stream (bytes + BOS/EOS per document)
    tokens: np.ndarray  # uint16 [n_tokens]: the stream itself (mode=stream reads its documents)


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
          device: torch.device | str = "cpu") -> Score:
    """Cross-entropy sums of ``model`` over windows x, y [n, T], ``batch_size`` windows at a time.

    The sums are the training run's validation sums (``sem.training.step.val_sums``: a batch's mean
    loss times its targets, accumulated in float64), so the same windows in the same batches on the
    same device give the same bpb.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, byte targets, windows
    progress, task = _progress(len(x))
    with progress:
        for i in range(0, len(x), batch_size):
            sums += val_sums(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
            progress.update(task, advance=min(batch_size, len(x) - i))
    nats, tokens, n_bytes, windows = (float(v) for v in sums)
    return Score(nats, int(tokens), int(n_bytes), int(windows))


def _progress(total: int, what: str = "windows") -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(f"scoring {what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())
    return progress, progress.add_task("score", total=total)


def tile(tokens: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every whole window of a token stream: window i holds tokens [i*T, i*T + T]; int64 [n, T] each.
    The same tiling as ``SEMDataModule.val_windows(None)``."""
    n = (tokens.size - 1) // seq_len
    w = torch.from_numpy(tokens[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int64))
    return w[:, :-1], w[:, 1:]


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
    compressors = {
        "gzip_bpb": zlib.compressobj(9, zlib.DEFLATED, 31),  # gzip container, as gzip -9
        "bz2_bpb": bz2.BZ2Compressor(9),
        "xz_bpb": lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME),  # xz -9e
    }
    packed = dict.fromkeys(compressors, 0)
    pieces, n_docs, n_bytes = [], 0, 0
    for doc in corpus.documents():
        pieces.append(tokenizer.encode(doc.data))
        n_docs += 1
        n_bytes += len(doc.data)
        for name, comp in compressors.items():
            packed[name] += len(comp.compress(doc.data))
    for name, comp in compressors.items():
        packed[name] += len(comp.flush())
    what = corpus.describe()
    if n_bytes == 0:
        raise CorpusError(f"the corpus holds no text ({n_docs} document{'s' * (n_docs != 1)}, 0 bytes): {what}")
    return Packed(np.concatenate(pieces), {name: 8.0 * size / n_bytes for name, size in packed.items()},
                  what, n_docs, n_bytes)


def whole_corpus(packed: Packed, seq_len: int, windows: bool = True) -> Text:
    """Every whole window of a packed corpus (``windows=False``: none, for mode=stream)."""
    if windows and packed.tokens.size < seq_len + 1:
        raise CorpusError(f"the corpus has {packed.tokens.size} tokens, fewer than one window of "
                          f"val_seq_len+1 = {seq_len + 1}; use a shorter data.val_seq_len or more text")
    x, y = tile(packed.tokens, seq_len) if windows else (torch.empty(0, seq_len, dtype=torch.long),) * 2
    return Text(x, y, packed.compressor_bpb, f"{packed.what}, all documents", "all", packed.n_docs,
                packed.n_bytes, int(packed.tokens.size), packed.tokens)


def held_out(ckpt_data: dict[str, Any], seq_len: int, cache_dir: str) -> Text:
    """Every window of the held-out split a checkpoint was validated on (its own corpus, split and
    packing, rebuilt from the config inside it)."""
    try:
        node = corpus_node(ckpt_data["corpus"])[0]
        corpus = as_corpus(instantiate(node), node)
    except Exception as exc:  # a corpus class or argument this version no longer has
        raise CorpusError(f"cannot rebuild the checkpoint's corpus {ckpt_data['corpus']}: {exc.__cause__ or exc}") from None
    problems = getattr(corpus, "problems", lambda: [])()
    if problems:
        raise CorpusError(f"the checkpoint's corpus is not available here: {problems[0]}")
    dm = SEMDataModule(corpus, batch_size=1, seq_len=seq_len, val_seq_len=seq_len,
                       val_fraction=ckpt_data.get("val_fraction", 0.05), cache_dir=cache_dir)
    dm.setup()
    x, y = dm.val_windows(None)
    c = dm.cache
    return Text(x, y, dm.compressor_bpb, f"{corpus.describe()}, held-out split", "val", c.n_val_docs,
                c.val_bytes, int(c.val.size), c.val)


def report(model_name: str, result: Score | StreamScore, text: Text, seq_len: int) -> None:
    """The console table: the model's bpb beside the compressors' on the same bytes (mode=stream: and
    a second table, the model's bpb by position in the document)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if isinstance(result, StreamScore):
        how = (f"recurrent state carried across chunks of up to {result.chunk} tokens"
               if result.method == "recurrent" else f"sliding window of {result.chunk} tokens, stride {result.stride}")
        console.print(f"{text.what}: {result.documents:,} documents scored whole ({how}; "
                      f"{text.n_bytes:,} bytes)", soft_wrap=True)
    else:
        console.print(f"{text.what}: {result.windows:,} windows x {seq_len} tokens "
                      f"({text.n_docs:,} documents, {text.n_bytes:,} bytes)", soft_wrap=True)
    table = Table()
    table.add_column("model / compressor")
    table.add_column("bits per byte", justify="right")
    table.add_row(model_name, f"{result.bpb:.4f}", style="bold")
    for name, key in COMPRESSORS:
        table.add_row(name, f"{text.compressor_bpb[key]:.4f}")
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
                else held_out(ckpt_data, seq_len, data.cache_dir))
    except CorpusError as exc:
        usage_error(f"data.corpus: {exc}")
    log.info("loaded %s: %s, %s parameters", cfg.ckpt, type(model).__name__,
             f"{sum(p.numel() for p in model.parameters()):,}")
    if stream:
        log.info("scoring %s documents whole (%s tokens), up to %s tokens per forward, on %s",
                 f"{text.n_docs:,}", f"{text.n_tokens:,}", f"{batch_size * seq_len:,}", device)
        progress, task = _progress(text.n_tokens - text.n_docs, "document tokens")
        with progress:
            result: Score | StreamScore = stream_score(model, text.tokens, seq_len, batch_size, device,
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
        "batch_size": batch_size,
        "device": str(device),
        "wall_s": round(wall, 3),
    }
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
    how = ({"method": "recurrent", "chunk_tokens": result.chunk} if result.method == "recurrent"
           else {"method": "sliding_window", "context": result.chunk, "stride": result.stride})
    return {**how, "tokens": sum(result.tokens), "byte_targets": sum(result.byte_targets),
            "by_position": result.by_position()}


def cli() -> None:
    """``sem-eval``: see the module docstring."""
    _cli(app)


if __name__ == "__main__":
    cli()
