"""The figures of a completed run, the same for both engines: ``summarise`` runs the final validation
and completes ``summary.json`` with it and with ``final_scores``, the figures scored from the final
checkpoint (rebuilt from the file alone): ``stream_bpb`` and, once, the test split's."""

from __future__ import annotations

import logging
import math
import time

from omegaconf import OmegaConf

from sem.data.anchors import describe as describe_anchors
from sem.engines.build import Built
from sem.engines.fit import checkpoint_fields
from sem.models.dynamic import DynamicSettings
from sem.models.stream import carries_state, dynamic_score, stream_rows, stream_score
from sem.record.summary import RunSummary, is_global_zero
from sem.training.evaluation import score_windows
from sem.training.preemption import abandonable

log = logging.getLogger("sem.final")


def summarise(built: Built, summary: RunSummary, started: float) -> float:
    """Validate the final model on the held-out windows, score the test split once (the report: no
    choice of the run ever read it), complete ``summary.json``; the final val/bpb (the objective)."""
    engine, dm, checkpoints = built.engine, built.datamodule, built.checkpoints
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
        **checkpoint_fields(checkpoints),
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
    last = built.checkpoints.last()
    if built.quick or last is None or not is_global_zero():
        return out
    from sem.training.restore import load

    device = engine.device
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
