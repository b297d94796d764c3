"""The dry-run plan (``dry_run=true``): what a run will do at every step, before it does it.

``build_calendar`` is pure: from the schedule's multiplier, the curriculum's stage lookup, the
checkpoint policy and the teacher's switch-on test (callables of the step, the very objects a run
uses) it lays out the run as segments of constant phase and stage, with the validation, checkpoint
and milestone steps. ``probe_seconds`` times 3 training steps of the built model at each stage's
shape; ``sem.plan.dry_run`` prints it all.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sem.contracts import model_output
from sem.engines.optim import build_scheduler

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sem.engines.build import Built
    from sem.training.checkpoint import CheckpointManager
    from sem.training.curriculum import CurriculumManager
    from sem.training.distillation import EMATeacher

log = logging.getLogger("sem.calendar")

PROBE_STEPS = 3  # per shape; the first is a warm-up (allocations, lazy init) and is not counted


@dataclass
class Segment:
    """Steps ``start .. end - 1`` share a schedule phase and a curriculum stage."""

    start: int
    end: int
    phase: str  # warmup | stable | decay | floor (after a decay that ends before max_steps)
    stage: str
    seq_len: int
    batch_size: int
    lr_start: float  # at step start
    lr_end: float  # at step end - 1
    gated: bool = False  # the stage may be held past its nominal end (plateau gate)

    @property
    def steps(self) -> int:
        return self.end - self.start


@dataclass
class Calendar:
    max_steps: int
    segments: list[Segment]
    val_steps: list[int]  # optimizer steps done when a periodic validation runs
    checkpoint_steps: list[int]
    milestones: list[tuple[int, str]]  # (step, stage) milestone checkpoints
    teacher_start: int | None
    propagator_ramp_steps: int | None
    tokens_per_step_factor: int  # micro-batches per step x ranks
    samples: list[tuple[int, float, int, int]] = field(default_factory=list)  # (step, lr, seq_len, batch)

    @property
    def tokens(self) -> int:
        return sum(s.steps * s.seq_len * s.batch_size for s in self.segments) * self.tokens_per_step_factor

    @property
    def stage_starts(self) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        for s in self.segments:
            if not out or out[-1][1] != s.stage:
                out.append((s.start, s.stage))
        return out


def phase_at(step: int, warmup_steps: int, decay_start: int, decay_steps: int) -> str:
    if step < warmup_steps:
        return "warmup"
    if step < decay_start:
        return "stable"
    return "decay" if step < decay_start + decay_steps else "floor"


def build_calendar(*, max_steps: int, base_lr: float, multiplier: Callable[[int], float],
                   warmup_steps: int, decay_start: int, decay_steps: int,
                   stage_at: Callable[[int], tuple[str, int, int, bool]], stage_starts: list[int],
                   val_every: int, checkpoint_due: Callable[[int], bool], save_on_exit: bool,
                   milestone_stages: set[str], teacher_active: Callable[[int], bool] | None = None,
                   propagator_ramp_steps: int | None = None, tokens_per_step_factor: int = 1,
                   n_samples: int = 2000) -> Calendar:
    """Lay the run out. ``stage_at(step) -> (name, seq_len, batch_size, gated)``; ``stage_starts``
    the nominal first step of each stage; ``multiplier(step)`` the LR factor on ``base_lr`` (WSD
    times the stage's scale)."""
    cuts = {0, max_steps, *(b for b in (warmup_steps, decay_start, decay_start + decay_steps) if 0 < b < max_steps),
            *(b for b in stage_starts if 0 < b < max_steps)}
    bounds = sorted(cuts)
    segments = []
    for a, b in zip(bounds, bounds[1:]):
        name, seq_len, batch, gated = stage_at(a)
        seg = Segment(a, b, phase_at(a, warmup_steps, decay_start, decay_steps), name, seq_len, batch,
                      base_lr * multiplier(a), base_lr * multiplier(b - 1), gated)
        last = segments[-1] if segments else None
        if last and (last.phase, last.stage) == (seg.phase, seg.stage) and last.end == a:
            last.end, last.lr_end = b, seg.lr_end  # a zero-length stage between them: one segment
        else:
            segments.append(seg)
    starts = {s.start: s.stage for s in segments}
    milestones = [(step, name) for step, name in sorted(starts.items()) if step > 0 and name in milestone_stages]
    checkpoints = [s for s in range(1, max_steps + 1) if checkpoint_due(s)]
    if save_on_exit and max_steps not in checkpoints:
        checkpoints.append(max_steps)
    teacher_start = None
    if teacher_active is not None:
        teacher_start = next((s for s in range(max_steps) if teacher_active(s)), None)
    # a bounded number of points for the plot, with both sides of every boundary
    n = min(n_samples, max_steps)
    picks = {round(i * (max_steps - 1) / max(n - 1, 1)) for i in range(n)}
    picks |= {b for b in bounds if b < max_steps} | {b - 1 for b in bounds if b > 0}
    samples = []
    for s in sorted(picks):
        _, seq_len, batch, _ = stage_at(s)
        samples.append((s, base_lr * multiplier(s), seq_len, batch))
    return Calendar(max_steps, segments, list(range(val_every, max_steps + 1, val_every)), checkpoints,
                    milestones, teacher_start, propagator_ramp_steps, tokens_per_step_factor, samples)


# --------------------------------------------------------------------------- from a built run


@dataclass
class RunParts:
    """What the plan needs from a built run, whichever engine built it."""

    model: nn.Module
    curriculum: CurriculumManager | None
    teacher: EMATeacher | None
    optimizer: Callable[..., torch.optim.Optimizer]  # factory: optimizer(params=...) -> a fresh optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # sem's WSD says multiplier(step), warmup_steps...
    device: torch.device
    autocast: Callable[[], Any]  # a context manager: the run's mixed precision
    world: int


def parts_of(built: Built, optimizer: Callable[..., torch.optim.Optimizer], base_lr: float = 1e-3) -> RunParts:
    """Find the parts in ``sem.engines.build.Built`` (the Lightning engine keeps the scheduler factory in its
    module, the standalone engine the built scheduler); ``optimizer`` is the configured factory."""
    import torch

    engine = built.engine
    module = getattr(engine, "module", None)
    train_step = engine.train_step
    curriculum = train_step.curriculum
    scale = curriculum.lr_scale if curriculum is not None else None
    trainer = getattr(engine, "trainer", None)
    if module is not None and hasattr(module, "scheduler_factory"):  # Lightning
        factory = module.scheduler_factory
        autocast = getattr(trainer.precision_plugin, "forward_context", nullcontext)
        try:
            device, world = trainer.strategy.root_device, int(trainer.world_size)
        except Exception:  # a strategy that knows its devices and ranks only once launched
            device, world = torch.device("cpu"), 1
    else:  # standalone
        factory = getattr(engine, "scheduler_factory", None)
        device = engine.device
        autocast = getattr(getattr(engine, "precision", None), "autocast", nullcontext)
        world = 1
    # the schedule as the run builds it, on a stand-in optimizer (nothing of the run is stepped)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = build_scheduler(factory, dummy, scale or (lambda step: 1.0))
    return RunParts(model=engine.model, curriculum=curriculum, teacher=train_step.teacher,
                    optimizer=optimizer, scheduler=scheduler, device=device, autocast=autocast, world=world)


MAX_TRACED_STEPS = 1_000_000  # a torch schedule is traced step by step: longer runs show it flat


def base_lr_of(cfg: Any) -> float:
    """The optimizer's configured ``lr`` (1e-3 when the optimizer config sets none)."""
    return float(cfg.optimizer.get("lr", 1e-3) or 1e-3)


def multiplier_of(scheduler: Any, max_steps: int) -> Callable[[int], float]:
    """The schedule's LR factor per step: sem's WSD says it (a pure function of the step); any other
    ``LRScheduler`` is traced by stepping it (it is the calendar's own copy, on a stand-in optimizer)."""
    if scheduler is None:
        return lambda step: 1.0
    if hasattr(scheduler, "multiplier"):
        return scheduler.multiplier
    if max_steps > MAX_TRACED_STEPS:
        return lambda step: 1.0
    base = scheduler.optimizer.defaults["lr"]  # the stand-in's lr: the configured optimizer.lr
    lrs = []
    with warnings.catch_warnings():  # the stand-in optimizer never steps: torch's ordering warning is noise
        warnings.simplefilter("ignore")
        for _ in range(max_steps):
            lrs.append(scheduler.optimizer.param_groups[0]["lr"] / base)
            scheduler.step()
    return lambda step: lrs[min(step, len(lrs) - 1)] if lrs else 1.0


def calendar_of(cfg: Any, parts: RunParts, checkpoints: CheckpointManager) -> Calendar:
    """The calendar of a built run, from the objects the run itself uses."""
    curriculum, sched = parts.curriculum, parts.scheduler
    max_steps = int(cfg.trainer.max_steps)
    multiplier = multiplier_of(sched, max_steps)

    def stage_at(step: int) -> tuple[str, int, int, bool]:
        if curriculum is None:
            return "main", int(cfg.data.seq_len), int(cfg.data.batch_size), False
        _, st = curriculum.stage_at(step)
        return st.name, st.seq_len, st.batch_size, st.gate is not None

    teacher = parts.teacher
    return build_calendar(
        max_steps=max_steps, base_lr=base_lr_of(cfg), multiplier=multiplier,
        warmup_steps=int(getattr(sched, "warmup_steps", 0) or 0),
        decay_start=int(getattr(sched, "decay_start", max_steps)),
        decay_steps=int(getattr(sched, "decay_steps", 0) or 0), stage_at=stage_at,
        stage_starts=curriculum.boundaries() if curriculum is not None else [0],
        val_every=int(cfg.trainer.val_check_interval), checkpoint_due=checkpoints.due,
        save_on_exit=bool(checkpoints.save_on_exit),
        milestone_stages={s.name for s in curriculum.stages if s.checkpoint} if curriculum is not None else set(),
        teacher_active=(lambda s: teacher.active(s, stage_at(s)[0])) if teacher is not None else None,
        propagator_ramp_steps=getattr(parts.model, "propagator_warmup_steps", None),
        tokens_per_step_factor=int(cfg.trainer.accumulate_grad_batches) * parts.world)


# ------------------------------------------------------------------------------------- probe


def _sync(device: Any) -> None:
    import torch

    kind = getattr(device, "type", "cpu")
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "xpu":
        torch.xpu.synchronize(device)


def probe_seconds(model: Any, optimizer_factory: Callable[..., Any], shapes: list[tuple[int, int]],
                  val_shape: tuple[int, int], device: Any, context: Callable[[], Any] = nullcontext,
                  steps: int = PROBE_STEPS) -> tuple[dict[tuple[int, int], float], float]:
    """Seconds per training micro-step at each (seq_len, batch) shape (mean of steps 2..``steps`` of
    forward, backward and optimizer step on a copy of the model), and seconds per validation window
    (a forward of one ``val_shape`` batch, divided by its batch size)."""
    import torch

    from sem.models.common import param_groups

    m = copy.deepcopy(model).to(device).train()
    wd = float(getattr(optimizer_factory, "keywords", {}).get("weight_decay", 0.0))
    opt = optimizer_factory(params=param_groups(m, wd))
    vocab = int(getattr(m, "vocab_size", 256))
    per_step: dict[tuple[int, int], float] = {}
    for seq_len, batch in shapes:
        x = torch.randint(0, min(vocab, 256), (batch, seq_len + 1), device=device)
        times = []
        for _ in range(max(steps, 2)):
            t0 = time.perf_counter()
            with context():
                out = model_output(m, x[:, :-1], x[:, 1:])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
        per_step[(seq_len, batch)] = statistics.fmean(times[1:])
    m.eval()
    seq_len, batch = val_shape
    x = torch.randint(0, min(vocab, 256), (batch, seq_len + 1), device=device)
    times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            with context():
                model_output(m, x[:, :-1], x[:, 1:])
            _sync(device)
            times.append(time.perf_counter() - t0)
    return per_step, times[-1] / batch


def flops_per_token(model: Any, seq_len: int) -> float | None:
    """Training FLOPs per token (forward + backward) of one [1, seq_len] batch as torch's
    FlopCounterMode counts them: matmuls and convolutions; FFTs and elementwise work are not counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).train()
    x = torch.randint(0, 256, (1, seq_len + 1))
    try:
        with FlopCounterMode(display=False) as counter:
            model_output(m, x[:, :-1], x[:, 1:]).loss.backward()
    except Exception as exc:  # an op the counter cannot trace: the plan goes on without the figure
        log.warning("FLOPs per token not counted: %s: %s", type(exc).__name__, exc)
        return None
    return counter.get_total_flops() / seq_len


# ------------------------------------------------------------------------------ the dry run


def estimate_seconds(cal: Calendar, per_step: dict[tuple[int, int], float], per_window: float,
                     periodic_windows: int, final_windows: int) -> tuple[float, float]:
    """(training, validation) seconds: each segment's steps at its shape's probed time (times the
    micro-batches per step), every periodic validation, and the final one."""
    micro = cal.tokens_per_step_factor  # micro-batches per step x ranks; ranks run in parallel
    train = sum(s.steps * per_step[(s.seq_len, s.batch_size)] for s in cal.segments) * micro
    val = (len(cal.val_steps) * periodic_windows + final_windows) * per_window
    return train, val


def _steps_text(steps: list[int], every: int | None = None) -> str:
    if not steps:
        return "none"
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    lead = f"every {every} steps: " if every else ""
    return f"{lead}{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} in all)"


def calendar_lines(cal: Calendar, *, val_every: int, ckpt_every: int, periodic_windows: int,
                   final_windows: int) -> list[str]:
    """The calendar as text: one row per segment, then validations, checkpoints, teacher, ramps."""
    first = cal.segments[0]
    lines = [f"calendar: {cal.max_steps} optimizer steps, {cal.tokens / 1e6:.3g}M training tokens "
             f"({first.seq_len * first.batch_size * cal.tokens_per_step_factor} per step at the start)",
             f"  {'steps':<15} {'phase':<7} {'stage':<12} {'seq_len x batch':<16} lr"]
    for s in cal.segments:
        lr = f"{s.lr_start:.3g}" if f"{s.lr_start:.3g}" == f"{s.lr_end:.3g}" else f"{s.lr_start:.3g} -> {s.lr_end:.3g}"
        stage = s.stage + (" (gated)" if s.gated else "")
        lines.append(f"  {f'{s.start} .. {s.end - 1}':<15} {s.phase:<7} {stage:<12} "
                     f"{f'{s.seq_len} x {s.batch_size}':<16} {lr}")
    lines.append(f"validation ({periodic_windows} windows) after steps {_steps_text(cal.val_steps, val_every)}; "
                 f"final validation on {final_windows} windows after step {cal.max_steps}")
    lines.append(f"checkpoints after steps {_steps_text(cal.checkpoint_steps, ckpt_every or None)}"
                 + ("; milestones: " + ", ".join(f"{n} at {s}" for s, n in cal.milestones) if cal.milestones else ""))
    if cal.teacher_start is not None:
        lines.append(f"EMA teacher switches on at step {cal.teacher_start}")
    if cal.propagator_ramp_steps:
        lines.append(f"propagator alpha ramps 0 -> 1 over steps 0 .. {cal.propagator_ramp_steps}")
    if any(s.gated for s in cal.segments):
        lines.append("gated stages may be held past their nominal end: later boundaries are the earliest possible")
    return lines
