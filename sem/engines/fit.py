"""The last stages of a run, the same for both engines: fit (a stop signal ends it saved, exit 75),
the final validation written to ``summary.json`` (with ``stream_bpb``: the final checkpoint scoring
every held-out document whole), and ``samples.txt`` from the final checkpoint."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sem.engines.build import Built
from sem.errors import EXIT_PREEMPTED
from sem.models.stream import carries_state, stream_rows, stream_score
from sem.record.summary import RunSummary, is_global_zero
from sem.training.preemption import Stopped, StopSignals, abandonable

log = logging.getLogger("sem.fit")


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def fit(built: Built, summary: RunSummary, started: float) -> None:
    """Train to ``trainer.max_steps``. Stopped by a signal before that: ``summary.json`` says
    preempted, and ``SystemExit(75)`` (a sweep job records it and launches no more jobs here)."""
    engine, checkpoints = built.engine, built.checkpoint
    engine.fit(built.resume_from)
    stopped_by = built.signals.received if built.signals is not None else None
    if stopped_by is None or engine.global_step >= engine.max_steps:
        return
    last = checkpoints.last()
    summary.finish("preempted", wall_s=time.time() - started, steps=engine.global_step,
                   **built.datamodule.compressor_bpb, tokens_per_s=engine.tokens_per_s,
                   best_checkpoint=_str(checkpoints.best()), last_checkpoint=_str(last),
                   error=f"stopped by {stopped_by} at step {engine.global_step}")
    log.warning("preempted by %s at step %d: checkpoint %s; `resume=auto` (same run dir) continues",
                stopped_by, engine.global_step, last)
    log.warning("exit code %d (preempted)", EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)


def summarise(built: Built, summary: RunSummary, started: float) -> float:
    """Validate the final model on the held-out windows, complete ``summary.json``; the final val/bpb."""
    engine, dm, checkpoints = built.engine, built.datamodule, built.checkpoint
    final_windows = dm.val_batch_size if built.quick else dm.final_val_max_windows
    n_windows = len(dm.val_windows(final_windows)[0])
    log.info("final validation on %s %d held-out windows",
             "all" if final_windows is None or n_windows < final_windows else "a fixed subset of", n_windows)
    with abandonable(built.signals, "the final validation"):  # a stop: summary.json says preempted, exit 75
        val = engine.validate(dm.val_loader(max_windows=final_windows), final=True)
        stream = stream_bpb(built)
    summary.finish(
        "completed",
        wall_s=time.time() - started,
        steps=engine.global_step,
        val_loss=val["val/loss"],
        val_bpb=val["val/bpb"],
        stream_bpb=stream,
        **dm.compressor_bpb,
        tokens_per_s=engine.tokens_per_s,
        best_checkpoint=_str(checkpoints.best()),
        last_checkpoint=_str(checkpoints.last()),
    )
    bpb = val["val/bpb"]
    anchors = ", ".join(f"{name} {dm.compressor_bpb[key]:.4f}" for name, key in
                        (("gzip -9", "gzip_bpb"), ("bz2 -9", "bz2_bpb"), ("xz -9e", "xz_bpb")))
    beaten = sum(bpb < v for v in dm.compressor_bpb.values())
    log.info("final: val/bpb %.4f vs %s on the same held-out bytes (below %d of 3); val/loss %.4f "
             "nats/token, %d steps%s", bpb, anchors, beaten, val["val/loss"], engine.global_step,
             f"; stream_bpb {stream:.4f}" if stream is not None else "")
    return float(bpb) if math.isfinite(bpb) else float("inf")


def stream_bpb(built: Built) -> float | None:
    """``summary.json``'s ``stream_bpb``: the final checkpoint scores every held-out document whole, its
    recurrent state carried across chunks (``sem.models.stream``), in fp32 on the run's device. Only
    for a model that carries its state (about the cost of the final validation: the same tokens, once
    each) and with the run's ``eval.stream`` on; None otherwise, or when it fails (it never fails the
    run). A model without a state would need a sliding window, twice the work:
    ``python -m sem.evaluate ckpt=... mode=stream`` does it."""
    engine, dm = built.engine, built.datamodule
    last = built.checkpoint.last()
    if built.quick or last is None or not is_global_zero() or not carries_state(engine.model):
        return None
    try:
        from sem.training.restore import load

        device = getattr(engine, "device", "cpu")
        model, cfg = load(last, device)
        if not OmegaConf.select(cfg, "eval.stream", default=True):
            return None
        began = time.perf_counter()
        rows = stream_rows(dm.val_batch_size, dm.val_seq_len)  # what sem.evaluate mode=stream reads too
        result = stream_score(model, dm.cache.val, dm.val_seq_len, rows, device)
        log.info("stream_bpb %.4f (%s): %d held-out documents scored whole, the recurrent state carried "
                 "across chunks of up to %d tokens, in %.1f s (eval.stream=false skips it)", result.bpb,
                 last.name, result.documents, result.chunk, time.perf_counter() - began)
        return result.bpb if math.isfinite(result.bpb) else None
    except Exception as exc:  # an extra figure: it never turns a finished run into a failure
        log.warning("could not compute stream_bpb: %s: %s", type(exc).__name__, exc)
        return None


def write_samples(cfg: DictConfig, checkpoints: Any, run_dir: Path, signals: StopSignals | None = None) -> None:
    """``samples.txt``: what the final checkpoint writes (rebuilt from the file alone, as a user would).
    A stop signal abandons it: the run is complete (``summary.json``), no samples, exit 75."""
    last = checkpoints.last()
    if cfg.sample.n == 0 or last is None or not is_global_zero():
        return
    try:
        with abandonable(signals, "sampling"):
            _write_samples(cfg, last, run_dir)
    except Stopped as stop:
        (run_dir / "samples.txt.tmp").unlink(missing_ok=True)
        log.warning("%s: samples.txt not written (the run is complete: summary.json); exit code %d",
                    stop, EXIT_PREEMPTED)
        raise SystemExit(EXIT_PREEMPTED) from None


def _write_samples(cfg: DictConfig, last: Path, run_dir: Path) -> None:
    try:
        from sem.models.generate import write_samples as generate_samples
        from sem.training.restore import load

        model, _ = load(last)
        s = cfg.sample
        path = generate_samples(model, run_dir / "samples.txt", prompts=list(s.prompts), n=s.n,
                                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, seed=s.seed)
        log.info("samples from %s: %s", last.name, path)
    except Exception as exc:  # samples are a courtesy: they never turn a finished run into a failure
        log.warning("could not write samples.txt: %s: %s", type(exc).__name__, exc)
