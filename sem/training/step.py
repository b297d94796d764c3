"""TrainStep: one optimizer step's training semantics, whichever engine drives it.

Both engines (the Lightning adapter and the standalone loop) call, per optimizer step::

    train_step.start(step, rank)                      # seed the step's random draws, set the model's step
    loss = train_step.micro_loss(x, y, step)          # per micro-batch: forward, distillation, faults
    ... backward (scaled, accumulated) ...
    decision = train_step.judge(step, params, loss, clip)   # true grad norm, health verdict, skip or clip
    ... optimizer.step() (a skipped update has no gradients: the optimizer leaves it alone) ...
    row = train_step.finish(step, means, decision, logging)  # teacher, curriculum gate, probes, rollback/stop

so the training semantics (the loss, the distillation mix, fault injection, per-step seeding, health
actions, the gate's input, probes) are written once. Its state (``state_dict``: ``checkpoint["sem"]``)
is everything of a run that is not model, optimizer or scheduler; ``rollback`` puts a run back to its
newest valid checkpoint. The forward it runs may be compiled (``sem.training.compiled``); under truncated
BPTT each micro-batch starts from the state its lanes carried (``sem.training.lanes``). Plain PyTorch:
no Lightning, no Hydra.

**No host syncs between logging steps.** With an optimizer that can skip an update on the device
(torch's fused AdamW/SGD: ``found_inf``) and no fp16 loss scaler, ``judge`` reads nothing back: the
health verdict that can hold an update back (non-finite loss or norm, a loss spike or norm explosion
beyond the limits of the window as of the last logging step) is a tensor on the device, clipping is
done on the device (a factor of 1 below the limit), and each step's [loss, norm, held back, ce] stays
on the device until ``finish`` of a *flush* step (logging, checkpoint, last step) reads them all at once
and replays them, in order, through the health monitor (events, escalation, rollback, stop) and the
curriculum gate (the same values as a per-step read; a gate's decision lands at the flush). Any other
optimizer, or fp16, is judged on the host each step, as before.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sem.contracts import model_output, set_step
from sem.training.checkpoint import CheckpointManager, rng_state, set_rng_state
from sem.training.curriculum import CurriculumManager, StageEvent
from sem.training.distillation import DistillationLoss, EMATeacher
from sem.training.health import _SEVERITY, Decision, Faults, HealthMonitor, HealthStop
from sem.training.lanes import Lanes

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of optimizer step ``step``'s random draws (dropout): a function of the step alone,
    so a resumed run, a prefetching loader or an extra validation cannot shift the stream."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


class TrainStep:
    """The per-step training semantics shared by both engines (see the module docstring).

    ``forward``: what the training step calls in place of ``model`` (``compiled_forward(model)``);
    None: the model itself. ``continues``: truncated BPTT's ``SEMDataModule.continues`` (None: off)."""

    def __init__(self, model: nn.Module, curriculum: CurriculumManager | None = None,
                 teacher: EMATeacher | None = None, distill_loss: DistillationLoss | None = None,
                 faults: Faults | None = None, health: HealthMonitor | None = None, seed: int = 0,
                 budget: dict[str, int] | None = None, config: dict[str, Any] | None = None,
                 continues: Callable[[int], bool] | None = None,
                 forward: Callable[..., Any] | None = None) -> None:
        self.model = model
        self.forward = forward  # the model's parameters and state_dict either way
        self.curriculum = curriculum
        self.teacher = teacher
        self.distill_loss = distill_loss
        self.faults = faults or Faults()
        self.health = health or HealthMonitor.off()
        self.seed = seed
        self.budget: dict[str, int] = dict(budget or {})  # lengths resolved from fractions of max_steps (sem.training.budget)
        self.config = config  # the resolved run config, stored in every checkpoint
        self.micro: list[torch.Tensor] = []  # [loss, ce, unitary_div] per micro-batch of this step
        self.tokens = 0
        self.grad_norm: float | torch.Tensor = float("nan")  # a tensor on device-judged steps
        self._started: float | None = None
        # device-judged steps not yet read back: (step, [loss, norm, held, ce] on the device, seconds)
        self._pending: list[tuple[int, torch.Tensor, float | None]] = []
        self._held: torch.Tensor | None = None  # this step's verdict on the device
        self._limits: tuple[float, float, bool, bool] | None = None  # fixed at the last flush
        self._limits_t: torch.Tensor | None = None
        self._unobserved = False  # a pending step the curriculum has not seen yet
        # Truncated BPTT (data.tbptt): each micro-batch's forward starts from the state its lanes ended
        # step - 1 with, when step's batch continues them.
        self.lanes = Lanes(continues)

    def lr_scale(self, step: int) -> float:
        """The factor on the schedule's LR at ``step``: the curriculum stage's ``lr_scale`` times the
        health policy's (a rollback may lower it). Both engines give it to the scheduler."""
        stage = self.curriculum.lr_scale(step) if self.curriculum is not None else 1.0
        return stage * self.health.lr_factor

    # ------------------------------------------------------------------------------ a step

    def start(self, step: int, rank: int = 0) -> None:
        """Before the first micro-batch of optimizer step ``step``."""
        self.micro, self.tokens = [], 0
        self._started = time.perf_counter()
        torch.manual_seed(step_seed(self.seed, step, rank))
        set_step(self.model, step)

    def micro_loss(self, x: torch.Tensor, y: torch.Tensor, step: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The training loss of one micro-batch (x, y [B, T]) and its extra metrics (distillation)."""
        micro, shape = len(self.micro), tuple(x.shape)
        out = model_output(self.model, x, y, state=self.lanes.state_in(micro, step, shape), call=self.forward)
        self.lanes.keep(micro, step, shape, out.state)
        loss = out.loss
        metrics: dict[str, torch.Tensor | float] = {}
        # The teacher distils once ready: its first update (at activation) copies the student.
        if self.teacher is not None and self.distill_loss is not None and self.teacher.ready:
            set_step(self.teacher.module, step)  # step-driven blends (propagator alpha) match the student's
            parts = self.distill_loss(out.logits, self.teacher(x), out.ce_loss)
            # keep the model's own loss terms (aux_losses); replace plain CE by the distillation mix
            loss = parts["loss"] + (out.loss - out.ce_loss)
            metrics.update({"distill/kl": parts["kl"].detach(), "distill/loss": parts["loss"].detach(),
                            "distill/teacher_decay": self.teacher.decay(step)})
        # Fault rehearsal (faults.nan_at_step / spike_at_step). A non-finite loss is judged with the
        # gradients (judge): the health policy skips the update, rolls back or stops before anything
        # reaches the weights.
        loss = self.faults.loss(step, loss)
        logged = out.logged()  # the model's loss terms and metrics by name (SEM: unitary_penalty, unitary_div)
        udiv = logged.get("unitary_div", out.ce_loss.new_zeros(()))  # train/unitary_div: 0 for other models
        self.micro.append(torch.stack([loss.detach(), out.ce_loss.detach(), udiv]))
        self.tokens += x.numel()
        metrics.update({**{f"train/{k}": v for k, v in logged.items()}, "train/ce_loss": out.ce_loss.detach(),
                        "train/unitary_div": udiv})
        return loss, metrics

    def step_means(self) -> torch.Tensor:
        """[loss, ce, unitary_div] averaged over this step's micro-batches (this rank)."""
        return torch.stack(self.micro).mean(0)

    @staticmethod
    def on_device(optimizer: torch.optim.Optimizer | None, scaler_active: bool) -> bool:
        """Whether an update can be held back without reading anything on the host: the optimizer
        skips on a ``found_inf`` flag (torch's fused optimizers) and no GradScaler owns that flag."""
        return (optimizer is not None and not scaler_active
                and bool(getattr(optimizer, "_step_supports_amp_scaling", False)))

    def judge(self, step: int, params: list[torch.Tensor], loss: torch.Tensor | float, clip: float | None,
              scaler_active: bool = False, optimizer: torch.optim.Optimizer | None = None,
              sharded: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Decision:
        """After backward (gradients unscaled), before the update: the true grad norm, the health
        verdict, and then either clipping (update applied) or dropping the gradients (not applied).
        ``loss``: the step's mean loss (over micro-batches and ranks). With an ``optimizer`` that can
        skip on the device (``on_device``) nothing is read back: see the module docstring.
        ``sharded``: sums a per-rank square over ranks, where each rank holds a shard of the gradients
        (FSDP): the norm is then of the whole gradient, the same on every rank."""
        params = [p for p in params if p.grad is not None]
        self.faults.grads(step, params)
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        if sharded is not None:
            total = sharded(total.square()).sqrt()
        seconds = time.perf_counter() - self._started if self._started is not None else None
        if self.on_device(optimizer, scaler_active) and self.health.device_checkable():
            return self._judge_on_device(step, params, torch.as_tensor(loss, device=total.device),
                                         total, clip, seconds, optimizer)
        self._held = None
        loss = float(loss)
        norm = self.grad_norm = float(total)
        if scaler_active and math.isfinite(loss) and not math.isfinite(norm):
            return Decision()  # fp16 loss-scale overflow: routine, the GradScaler skips the step itself
        decision = self.health.check_step(step, loss, norm, seconds)
        if not decision.apply_update:
            for p in params:
                p.grad = None  # optimizers leave parameters without a gradient untouched
        elif clip and math.isfinite(norm) and norm > clip:
            torch.nn.utils.clip_grads_with_norm_(params, clip, total)
        if optimizer is not None and getattr(optimizer, "found_inf", None) is not None:
            optimizer.found_inf = None  # a flag left from device-judged steps (before a resume/rollback)
        return decision

    def _judge_on_device(self, step: int, params: list[torch.Tensor], loss: torch.Tensor, total: torch.Tensor,
                         clip: float | None, seconds: float | None, optimizer: torch.optim.Optimizer) -> Decision:
        if self._limits is None or self._limits_t is None or self._limits_t.device != total.device:
            self._limits = self.health.limits()
            self._limits_t = torch.tensor(self._limits[:2], dtype=torch.float32, device=total.device)
        loss_max, norm_max = self._limits_t.unbind()
        _, _, loss_nonfinite, norm_nonfinite = self._limits
        loss32, norm32 = loss.detach().float(), total.detach().float()
        held = (loss32 > loss_max) | (norm32 > norm_max)
        if loss_nonfinite:
            held = held | ~torch.isfinite(loss32)
        if norm_nonfinite:
            held = held | ~torch.isfinite(norm32)
        optimizer.found_inf = held.float()  # the fused step leaves everything untouched when 1
        if clip:
            torch.nn.utils.clip_grads_with_norm_(params, clip, total)  # factor 1 below the limit
        self.grad_norm, self._held = total, held
        self._pending.append((step, torch.stack([loss32, norm32, held.float()]), seconds))
        return Decision(action="pending")

    def finish(self, step: int, means: torch.Tensor, decision: Decision, logging: bool,
               rollback: Callable[[int], None]) -> dict[str, Any]:
        """After the optimizer step: act on the verdict (stop raises HealthStop; rollback calls
        ``rollback(step)``), update the teacher, feed the gate the cross-entropy, and on logging steps
        take the model's probes. Returns the step's row additions (events, probes, health metrics)."""
        if decision.action == "pending":  # judged on the device: read back and replayed on flush steps
            # (every step while the health monitor's loss window fills: an extreme early spike is
            # judged from the 3rd step on, against the steps so far; a host sync on those steps only)
            return self._finish_on_device(step, means, logging or self.health.warming_up(), rollback)
        row: dict[str, Any] = {"health": decision.action}
        if decision.action == "stop":
            raise HealthStop("; ".join(f"step {e.step}: {e.check}: {e.message}" for e in decision.events))
        stage = self.stage(step)[1]
        if decision.action == "rollback":
            rollback(step)
        elif decision.apply_update and self.teacher is not None and self.teacher.active(step, stage):
            self.teacher.update(self.model, step)
        if self.curriculum is not None:
            # The gate watches the cross-entropy: the training loss also holds the distillation mix
            # (it roughly halves when a teacher switches on) and the unitary penalty.
            row["events"] = self.curriculum.observe(step, float(means[1]))
        return self._logging_row(step, row, logging)

    def _finish_on_device(self, step: int, means: torch.Tensor, flush: bool,
                          rollback: Callable[[int], None]) -> dict[str, Any]:
        stage = self.stage(step)[1]
        if self.teacher is not None and self.teacher.active(step, stage):
            self.teacher.update(self.model, step, held=self._held)
        step_, values, seconds = self._pending[-1]
        self._pending[-1] = (step_, torch.cat([values, means[1:2].detach().float()]), seconds)
        events: list[StageEvent] = []
        if self.curriculum is not None:
            if not self._unobserved and not self.curriculum.needs_loss(step):
                events = self.curriculum.observe(step, None)  # a boundary fixed in advance: on time
            else:
                self._unobserved = True  # a gate is deciding: it gets this step's loss at the flush
        if not flush:
            return {"health": "pending", "events": events}
        rows = torch.stack([v for _, v, _ in self._pending]).tolist()  # the one read-back: [n, 4]
        pending, self._pending, self._unobserved = self._pending, [], False
        limits, self._limits = self._limits, None  # fresh limits from the updated window next step
        worst, act = Decision(), None
        for (s, _, seconds), (loss, norm, held, ce) in zip(pending, rows):
            d = self.health.check_step(s, loss, norm, seconds, limits=limits[:2] if limits else None)
            if d.apply_update == bool(held):  # cannot happen with the same limits; never silently
                log.warning("health: step %d judged %s on the host but %s on the device", s, d.action,
                            "held back" if held else "applied")
            if _SEVERITY[d.action] > _SEVERITY[worst.action]:
                worst = d
            if d.action in ("rollback", "stop") and act is None:
                act = d
            if self.curriculum is not None:  # (a step observed already is ignored: no event twice)
                events += self.curriculum.observe(s, ce)
        if act is not None and act.action == "stop":
            raise HealthStop("; ".join(f"step {e.step}: {e.check}: {e.message}" for e in act.events))
        if act is not None:
            rollback(step)
        return self._logging_row(step, {"health": worst.action, "events": events}, True)

    def _logging_row(self, step: int, row: dict[str, Any], logging: bool) -> dict[str, Any]:
        if logging:
            probes = getattr(self.model, "probes", None)
            if probes is not None:
                with torch.no_grad():
                    values = probes()  # cheap diagnostics of the SEM state (sem/*), logging steps only
                row.update(values)
                if values and self.health.check_probes(step, values).action == "stop":
                    raise HealthStop(f"step {step}: model probes out of bounds (health.probes)")
            row.update(self.health.metrics())
        return row

    def stage(self, step: int) -> tuple[int, str]:
        if self.curriculum is None:
            return 0, "main"
        index, st = self.curriculum.stage_at(step)
        return index, st.name

    # --------------------------------------------------------------------------- rollback

    def rollback(self, step: int, checkpoints: CheckpointManager | None,
                 load_model: Callable[[dict[str, torch.Tensor]], object],
                 optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Put the model, optimizer and teacher back to the newest valid checkpoint's; the step, the data
        position and the schedule carry on (the windows since that checkpoint are skipped).
        ``load_model`` takes a checkpoint's state_dict (the engine's own key layout)."""
        found = checkpoints.newest_valid() if checkpoints is not None else None
        if found is None:
            raise HealthStop(f"step {step}: rollback needed but no valid checkpoint exists yet "
                             "(save earlier with checkpoint.every_n_steps, or use action skip)")
        payload = found[1]
        load_model(payload["state_dict"])
        for optimizer, state in zip(optimizers, payload["optimizer_states"]):
            optimizer.load_state_dict(state)
        teacher_state = (payload.get("sem") or {}).get("teacher")
        if self.teacher is not None and teacher_state is not None:
            self.teacher.load_state_dict(teacher_state)
            self.teacher.to(next(self.model.parameters()).device)
        self.health.rolled_back(step, int(payload.get("global_step", -1)))

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self, steps_done: int) -> dict[str, Any]:
        """``checkpoint["sem"]``: everything of a run's state that is not model/optimizer/scheduler."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": steps_done,
            "stage": self.stage(max(steps_done - 1, 0))[1],
            "config": self.config,
            "rng": rng_state(),
            "health": self.health.state_dict(),
            "budget": self.budget,
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else None,
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            # truncated BPTT: each micro-batch's lane state after the last step, of every rank (each
            # reads its own lanes) and the world size they were read at
            **self.lanes.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.curriculum is not None and state.get("curriculum") is not None:
            self.curriculum.load_state_dict(state["curriculum"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
        if state.get("health") is not None:
            self.health.load_state_dict(state["health"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        self.lanes.load_state_dict(state, next(self.model.parameters()).device)


# ------------------------------------------------------------------------------------ validation


def val_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[nats, tokens, byte targets, windows] of one validation batch, float64, on the batch's device
    (summed over batches and ranks, then turned into metrics by ``val_metrics``; no host sync)."""
    logits = model_output(model, x).logits.detach()
    kept = y != -100  # padding windows of a rank's validation share (all -100) count for nothing
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                             reduction="sum")
    return torch.stack([nats.double(), kept.sum().double(), (kept & (y < 256)).sum().double(),
                        kept.any(1).sum().double()])


def val_metrics(sums: torch.Tensor, bpb: Callable[[float, int], float], final: bool) -> dict[str, float]:
    nats, tokens, n_bytes, windows = (float(v) for v in sums)
    return {"val/loss": nats / max(tokens, 1.0), "val/bpb": bpb(nats, int(n_bytes)), "final": final,
            "val/windows": int(windows)}
