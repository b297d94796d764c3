"""The last stages of a run, the same for both engines: fit (a stop signal ends it saved, exit 75),
the final validation written to ``summary.json`` (with the final checkpoint's figures: ``stream_bpb`` and,
once, the test split's), and ``samples.txt`` from the final checkpoint."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sem.data.anchors import describe as describe_anchors
from sem.engines.build import Built
from sem.errors import EXIT_PREEMPTED
from sem.models.dynamic import DynamicSettings
from sem.models.stream import carries_state, dynamic_score, stream_rows, stream_score
from sem.record.summary import RunSummary, Status, is_global_zero
from sem.training.evaluation import score_windows
from sem.training.preemption import Stopped, StopSignals, abandonable
from sem.training.pruning import Pruned

log = logging.getLogger("sem.fit")


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def fit(built: Built, summary: RunSummary, started: float) -> Pruned | None:
    """Train to ``trainer.max_steps``. Stopped by a signal before that: ``summary.json`` says
    preempted, and ``SystemExit(75)`` (a sweep job records it and launches no more jobs here). Stopped by
    the sweeper's judge at a validation (``sem.training.pruning``): ``summary.json`` says pruned, with
    that step and val/bpb, and the verdict is returned (no final validation, test scores or samples)."""
    engine, checkpoints = built.engine, built.checkpoint
    engine.fit(built.resume_from)
    pruned = built.trial.pruned if built.trial is not None else None
    if pruned is not None:
        _ended_early(built, summary, started, "pruned", val_bpb=pruned.value,
                     pruned_at={"step": pruned.step, "val_bpb": pruned.value},
                     error=f"pruned by the sweeper at step {pruned.step} (val/bpb {pruned.value:.4f})")
        log.warning("pruned at step %d (val/bpb %.4f): checkpoint %s", pruned.step, pruned.value, checkpoints.last())
        return pruned
    stopped_by = built.signals.received if built.signals is not None else None
    if stopped_by is None or engine.global_step >= engine.max_steps:
        return None
    last = checkpoints.last()
    _ended_early(built, summary, started, "preempted", error=f"stopped by {stopped_by} at step {engine.global_step}")
    log.warning("preempted by %s at step %d: checkpoint %s; `resume=auto` (same run dir) continues",
                stopped_by, engine.global_step, last)
    log.warning("exit code %d (preempted)", EXIT_PREEMPTED)
    raise SystemExit(EXIT_PREEMPTED)


def _ended_early(built: Built, summary: RunSummary, started: float, status: Status, **extra: Any) -> None:
    """``summary.json`` of a fit that ended before ``trainer.max_steps``, at the engine's step, saved."""
    engine, checkpoints = built.engine, built.checkpoint
    summary.finish(status, wall_s=time.time() - started, steps=engine.global_step, tokens_per_s=engine.tokens_per_s,
                   **built.datamodule.compressor_bpb, best_checkpoint=_str(checkpoints.best()),
                   last_checkpoint=_str(checkpoints.last()), **extra)


def summarise(built: Built, summary: RunSummary, started: float) -> float:
    """Validate the final model on the held-out windows, score the test split once (the report: no
    choice of the run ever read it), complete ``summary.json``; the final val/bpb (the objective)."""
    engine, dm, checkpoints = built.engine, built.datamodule, built.checkpoint
    final_windows = dm.val_batch_size if built.quick else dm.final_val_max_windows
    n_windows = len(dm.val_windows(final_windows)[0])
    log.info("final validation on %s %d held-out windows",
             "all" if final_windows is None or n_windows < final_windows else "a fixed subset of", n_windows)
    with abandonable(built.signals, "the final validation"):  # a stop: summary.json says preempted, exit 75
        val = engine.validate(dm.val_loader(max_windows=final_windows), final=True)
        extra = final_scores(built)
    val_anchors = dm.anchors("val")
    test_anchors = dm.anchors("test") if dm.has_test else None
    summary.finish(
        "completed",
        wall_s=time.time() - started,
        steps=engine.global_step,
        val_loss=val["val/loss"],
        val_bpb=val["val/bpb"],
        **extra,
        **dm.compressor_bpb,
        val_anchors_bpb=val_anchors,
        test_anchors_bpb=test_anchors,
        tokens_per_s=engine.tokens_per_s,
        best_checkpoint=_str(checkpoints.best()),
        last_checkpoint=_str(checkpoints.last()),
    )
    bpb, stream = val["val/bpb"], extra["stream_bpb"]
    line = (f"final: val/bpb {bpb:.4f}" + (f", stream {stream:.4f}" if stream is not None else "")
            + f" ({describe_anchors(stream if stream is not None else bpb, val_anchors)} on val)")
    test = [(name, extra[key]) for name, key in (("windows", "test_bpb"), ("stream", "test_stream_bpb"),
                                                 ("dynamic", "test_dynamic_bpb")) if extra[key] is not None]
    if test and test_anchors is not None:
        codes = [v for name, v in test if name != "windows"]  # code lengths: what compares with a compressor
        line += ("; test " + ", ".join(f"{name} {v:.4f}" for name, v in test)
                 + f" ({describe_anchors(min(codes) if codes else test[0][1], test_anchors)})")
    log.info("%s; %d steps", line, engine.global_step)
    return float(bpb) if math.isfinite(bpb) else float("inf")


def final_scores(built: Built) -> dict[str, float | None]:
    """``summary.json``'s figures from the final checkpoint, besides the final validation (null where not
    measured; a failure never fails the run):

    - ``stream_bpb``: every val document scored whole, the recurrent state carried across chunks
      (``sem.models.stream``); only for a model that carries its state, with ``eval.stream`` on;
    - ``test_bpb``: the test windows, as the final validation scores val's (every window, or as many as
      ``data.final_val_max_windows``);
    - ``test_stream_bpb``: every test document scored whole (a model without a state: the sliding
      window), with ``eval.stream`` on;
    - ``test_dynamic_bpb``: the same while the weights learn from what they scored
      (``sem.models.stream.dynamic_score``), with ``eval.dynamic.enabled`` on.

    The test split is read here only, once, at the end of the run: val chose everything before it."""
    engine, dm = built.engine, built.datamodule
    out: dict[str, float | None] = dict.fromkeys(("stream_bpb", "test_bpb", "test_stream_bpb", "test_dynamic_bpb"))
    last = built.checkpoint.last()
    if built.quick or last is None or not is_global_zero():
        return out
    from sem.training.restore import load

    device = getattr(engine, "device", "cpu")
    try:
        model, cfg = load(last, device)
    except Exception as exc:
        log.warning("could not load %s for the final scores: %s: %s", last, type(exc).__name__, exc)
        return out
    stream_on = bool(OmegaConf.select(cfg, "eval.stream", default=True))
    rows = stream_rows(dm.val_batch_size, dm.val_seq_len)  # what sem.evaluate mode=stream reads too
    dynamic = OmegaConf.select(cfg, "eval.dynamic", default=None)

    def val_stream() -> float:
        result = stream_score(model, dm.tokens("val"), dm.val_seq_len, rows, device)
        log.info("stream_bpb %.4f (%s): %d val documents scored whole, the recurrent state carried across "
                 "chunks of up to %d tokens (eval.stream=false skips it)", result.bpb, last.name,
                 result.documents, result.chunk)
        return result.bpb

    def test_windows() -> float:
        x, y = dm.test_windows(dm.final_val_max_windows)  # as many as the final validation reads of val
        return score_windows(model, x, y, dm.val_batch_size, device).bpb

    def test_stream() -> float:
        return stream_score(model, dm.tokens("test"), dm.val_seq_len, rows, device).bpb

    def test_dynamic() -> float:
        settings = DynamicSettings.of(OmegaConf.to_container(dynamic))
        context = dm.val_seq_len  # the static stream's window too (a model without a state)
        result = dynamic_score(model, dm.tokens("test"), settings, context, device)  # changes the weights: last
        log.info("test_dynamic_bpb %.4f: %d test documents scored whole while the weights learn (%s lr %g, a "
                 "step every %d tokens)", result.bpb, result.documents, settings.optimizer, settings.lr,
                 result.chunk)
        return result.bpb

    jobs = [("stream_bpb", val_stream, stream_on and carries_state(model))]
    if dm.has_test:
        jobs += [("test_bpb", test_windows, True), ("test_stream_bpb", test_stream, stream_on),
                 ("test_dynamic_bpb", test_dynamic, bool(dynamic is not None and dynamic.get("enabled")))]
    for key, job, wanted in jobs:
        if not wanted:
            continue
        began = time.perf_counter()
        try:
            value = job()
        except Exception as exc:  # an extra figure: it never turns a finished run into a failure
            log.warning("could not compute %s: %s: %s", key, type(exc).__name__, exc)
            continue
        out[key] = value if math.isfinite(value) else None
        log.info("%s %.4f in %.1f s", key, value, time.perf_counter() - began)
    return out


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
