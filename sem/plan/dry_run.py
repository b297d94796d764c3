"""``dry_run=true``: validate and build the run exactly as training would, then print the plan (config
tree, parameters, FLOPs per token, the calendar, a timing probe, the estimated wall time), write
``plan.json`` and ``plots/schedule.png``, and train nothing."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sem.engines.build import optimizer_factory
from sem.engines.resume import find_resume
from sem.models.common import count_parameters
from sem.plan.calendar import (
    PROBE_STEPS,
    base_lr_of,
    calendar_lines,
    calendar_of,
    estimate_seconds,
    flops_per_token,
    parts_of,
    probe_seconds,
)
from sem.plan.schedule import plot_schedule
from sem.recipe import prepare, run_guard
from sem.record.units import fmt_duration

log = logging.getLogger("sem.calendar")


def plan(cfg: DictConfig) -> None:
    """The ``dry_run=true`` job: validate, resolve the budget, build (as ``sem.recipe.train``), then
    print the plan. The timing probe trains a copy of the model with a fresh optimizer of the
    configured kind; nothing of the run itself is trained or saved."""
    with run_guard(cfg) as run:
        built = prepare(run, find_resume(cfg, run.checkpoints))
        dry_run(run.cfg, built, run.dir, optimizer=optimizer_factory(run.cfg.optimizer),
                one_line=HydraConfig.get().mode == RunMode.MULTIRUN)


def print_config_tree(cfg: Any) -> None:
    """The resolved config as a rich tree, one branch per top-level key."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(f"[bold]{key}[/bold]")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else str(value)
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    Console(soft_wrap=True).print(tree)


def dry_run(cfg: Any, built: Any, run_dir: Path, *, optimizer: Callable[..., Any],
            one_line: bool = False) -> dict[str, Any]:
    """Print the plan of a built run, write ``plan.json`` and ``plots/schedule.png``; train nothing.
    ``optimizer``: the configured optimizer factory (``optimizer(params=...)``) for the timing probe.
    ``one_line``: a sweep job's dry run prints a single line (the sweep prints the totals)."""
    dm = built.datamodule
    parts = parts_of(built, optimizer, base_lr_of(cfg))
    n_params = count_parameters(parts.model)
    cal = calendar_of(cfg, parts, built.checkpoints)
    shapes = sorted({(s.seq_len, s.batch_size) for s in cal.segments})
    t0 = time.perf_counter()
    per_step, per_window = probe_seconds(parts.model, parts.optimizer, shapes,
                                         (dm.val_seq_len, dm.val_batch_size), parts.device, parts.autocast)
    probe_s = time.perf_counter() - t0
    periodic_windows = len(dm.val_windows(dm.val_max_windows)[0])
    final_windows = len(dm.val_windows(dm.final_val_max_windows)[0])
    train_s, val_s = estimate_seconds(cal, per_step, per_window, periodic_windows, final_windows)
    flops = flops_per_token(parts.model, cal.segments[0].seq_len)
    first = cal.segments[0]
    tok_s = first.seq_len * first.batch_size / per_step[(first.seq_len, first.batch_size)]
    overrides = [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []
    plan = {
        "overrides": overrides, "model": type(parts.model).__name__, "params": n_params,
        "flops_per_token": flops, "flops_seq_len": first.seq_len, "max_steps": cal.max_steps,
        "tokens": cal.tokens, "segments": [asdict(s) for s in cal.segments], "val_steps": cal.val_steps,
        "checkpoint_steps": cal.checkpoint_steps, "milestones": cal.milestones,
        "teacher_start": cal.teacher_start, "propagator_ramp_steps": cal.propagator_ramp_steps,
        "probe": {"device": str(parts.device), "steps_per_shape": PROBE_STEPS,
                  "seconds_per_step": {f"{t}x{b}": v for (t, b), v in per_step.items()},
                  "seconds_per_val_window": per_window, "probe_s": probe_s},
        "estimated_train_s": train_s, "estimated_val_s": val_s, "estimated_s": train_s + val_s,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    title = (f"{type(parts.model).__name__} {n_params / 1e6:.2f}M params, {cal.max_steps} steps, "
             f"{cal.tokens / 1e6:.3g}M tokens, est. {fmt_duration(train_s + val_s)}")
    plot = plot_schedule(cal, run_dir / "plots" / "schedule.png", title)
    gflop = f"{flops / 1e9:.4g} GFLOP/token" if flops else "FLOPs n/a"
    if one_line:
        stages = " ".join(f"{n}@{s}" for s, n in cal.stage_starts)
        log.info("dry run | %s | %.2fM params | %s | %d steps, %.3gM tokens | stages %s | est. %s",
                 " ".join(overrides) or "(no overrides)", n_params / 1e6, gflop,
                 cal.max_steps, cal.tokens / 1e6, stages, fmt_duration(train_s + val_s))
        return plan
    print_config_tree(cfg)
    built.describe()
    log.info("parameters: %s; training FLOPs per token (fwd+bwd, seq_len %d, matmuls as torch's "
             "FlopCounterMode counts them): %s; 6 x params: %.4g GFLOP/token", f"{n_params:,}",
             first.seq_len, gflop, 6 * n_params / 1e9)
    for line in calendar_lines(cal, val_every=int(cfg.trainer.val_check_interval),
                               ckpt_every=int(cfg.checkpoint.every_n_steps),
                               periodic_windows=periodic_windows, final_windows=final_windows):
        log.info("%s", line)
    probed = ", ".join(f"{t}x{b} {v:.3g} s/step" for (t, b), v in per_step.items())
    log.info("timing probe (%d steps per shape on %s, first one not counted): %s; validation %.3g s/window; "
             "%.3gk tokens/s at the start%s", PROBE_STEPS, parts.device, probed, per_window, tok_s / 1e3,
             f" ({flops * tok_s / 1e9:.3g} GFLOP/s counted)" if flops else "")
    log.info("estimated wall time: %s (training %s + validation %s; start-up, token cache build and "
             "checkpoint writes not included)", fmt_duration(train_s + val_s), fmt_duration(train_s), fmt_duration(val_s))
    log.info("schedule plot: %s; plan: %s", plot, run_dir / "plan.json")
    return plan
