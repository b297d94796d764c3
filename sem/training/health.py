"""HealthMonitor: checks each optimizer step, turns findings into events, and decides an action.

Plain Python, shared by both engines. After the backward pass and before the update, the engine calls
``monitor.check_step(step, loss, grad_norm)`` and obeys the returned decision:

- ``ok`` / ``warn``: apply the update (a warning was logged);
- ``skip``: do not apply this update (the step and its batch are still counted);
- ``rollback``: do not apply it, reload the last good checkpoint, carry on from the next step (the data
  windows since that checkpoint, the offending one included, are not seen again), LR scaled by
  ``rollback_lr_scale``; at most ``max_rollbacks`` times, then ``stop``;
- ``stop``: raise ``HealthStop`` (the run fails with a clear message, exit 1).

Checks: non-finite loss, non-finite gradients, grad-norm explosion (robust z-score over a window),
loss spike (robust z-score against the recent window), plateau (no progress over a window), throughput
stall (a step far slower than the recent median), and the model's own probes (for SEM: propagator
unitarity error, max |lambda|, pre-norm energy), each with its own action. The grad norm must be the
true one: after unscaling, before clipping. Repeated skips escalate to a rollback
(``escalate_after`` in a row). Events go to ``health.jsonl`` (one JSON object per line) and are logged.

``Faults`` injects the failures these checks exist for, so tests and users can rehearse each path.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger("sem.health")

Action = Literal["warn", "skip", "rollback", "stop"]
ACTIONS = ("warn", "skip", "rollback", "stop")
_SEVERITY = {"ok": 0, "warn": 1, "skip": 2, "rollback": 3, "stop": 4}


class HealthStop(RuntimeError):
    """The health policy stopped the run."""


@dataclass
class HealthEvent:
    step: int
    check: str
    action: str
    value: float | None
    limit: float | None
    message: str

    def row(self) -> dict[str, Any]:
        return {"step": self.step, "check": self.check, "action": self.action, "value": _json_number(self.value),
                "limit": _json_number(self.limit), "message": self.message}


@dataclass
class Decision:
    action: str = "ok"
    events: list[HealthEvent] = field(default_factory=list)

    @property
    def apply_update(self) -> bool:
        return self.action in ("ok", "warn")

    def add(self, event: HealthEvent) -> None:
        self.events.append(event)
        if _SEVERITY[event.action] > _SEVERITY[self.action]:
            self.action = event.action


def _json_number(x: float | None) -> float | str | None:
    """Strict JSON: NaN and infinities as strings."""
    return x if x is None or math.isfinite(x) else str(x)


def _robust_z(value: float, history: deque[float]) -> tuple[float, float]:
    """(z, median): distance of ``value`` above the window's median in robust standard deviations."""
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    scale = 1.4826 * mad + 1e-8 * max(abs(med), 1.0)
    return (value - med) / scale, med


class HealthMonitor:
    """Per-check settings are dicts: ``{"action": ..., <thresholds>}``; an action of ``null``
    switches a check off. ``enabled=false`` switches every check off (``conf/health/off.yaml``)."""

    def __init__(
        self,
        enabled: bool = True,
        nonfinite_loss: str | None = "skip",
        nonfinite_grad: str | None = "skip",
        grad_explosion: dict[str, Any] | None = None,
        loss_spike: dict[str, Any] | None = None,
        plateau: dict[str, Any] | None = None,
        stall: dict[str, Any] | None = None,
        probes: dict[str, Any] | None = None,
        escalate_after: int = 3,
        max_rollbacks: int = 3,
        rollback_lr_scale: float = 1.0,
    ) -> None:
        bad = settings_problems(nonfinite_loss=nonfinite_loss, nonfinite_grad=nonfinite_grad,
                                grad_explosion=grad_explosion, loss_spike=loss_spike, plateau=plateau, stall=stall,
                                probes=probes, escalate_after=escalate_after, max_rollbacks=max_rollbacks,
                                rollback_lr_scale=rollback_lr_scale)
        if bad:
            raise ValueError("; ".join(bad))
        self.enabled = enabled
        self.nonfinite_loss, self.nonfinite_grad = nonfinite_loss, nonfinite_grad
        self.grad_explosion = _settings("grad_explosion", grad_explosion)
        # extreme_ratio: before min_history steps are seen, a loss this many times the median of the
        # steps so far (from the 3rd step on) is a spike already (null: wait for min_history)
        self.loss_spike = _settings("loss_spike", loss_spike)
        self.plateau = _settings("plateau", plateau)
        self.stall = _settings("stall", stall)
        self.probes = _settings("probes", probes)
        self.escalate_after = escalate_after
        self.max_rollbacks = max_rollbacks
        self.rollback_lr_scale = rollback_lr_scale
        self.events_path: Path | None = None
        # state (saved in checkpoints)
        self._losses: deque[float] = deque(maxlen=int(self.loss_spike.get("window", 100)))
        self._norms: deque[float] = deque(maxlen=int(self.grad_explosion.get("window", 100)))
        self._seconds: deque[float] = deque(maxlen=int(self.stall.get("window", 50)))
        self._plateau: deque[float] = deque(maxlen=int(self.plateau.get("window", 500)))
        self.consecutive_bad = 0
        self.skipped = 0
        self.rollbacks = 0
        self.events = 0
        self.lr_factor = 1.0

    @classmethod
    def off(cls) -> HealthMonitor:
        return cls(enabled=False)

    # ------------------------------------------------------------------------------ checks

    # ------------------------------------------------------------------ judged on the device

    def device_checkable(self) -> bool:
        """Whether every check that can hold back an update can be judged on the device, from limits
        fixed between logging steps (``limits``): the non-finite checks and the two outliers. A stall
        that skips or rolls back needs the host's clock before the update: judged on the host."""
        return not self.enabled or self.stall.get("action") not in ("skip", "rollback")

    def warming_up(self) -> bool:
        """True while the loss window is shorter than ``loss_spike.min_history`` and the early extreme
        check is on: the engines then judge each step on the host, so the window is there to compare."""
        cfg = self.loss_spike
        return bool(self.enabled and cfg.get("action") and cfg.get("extreme_ratio")
                    and len(self._losses) < int(cfg["min_history"]))

    def limits(self) -> tuple[float, float, bool, bool]:
        """(loss limit, grad-norm limit, skip a non-finite loss, skip a non-finite norm): what the device
        holds an update back for until the next logging step. A limit is where ``_outlier`` fires for
        the current window (inf while the window is short, or when the check only warns)."""
        if not self.enabled:
            return math.inf, math.inf, False, False
        holds = ("skip", "rollback", "stop")
        return (self._limit(self.loss_spike, self._losses) if self.loss_spike.get("action") in holds else math.inf,
                self._limit(self.grad_explosion, self._norms) if self.grad_explosion.get("action") in holds
                else math.inf,
                self.nonfinite_loss in holds, self.nonfinite_grad in holds)

    @staticmethod
    def _limit(cfg: dict[str, Any], history: deque[float]) -> float:
        if not cfg.get("action"):
            return math.inf
        if len(history) < int(cfg["min_history"]):
            return _early_limit(cfg, history)
        med = statistics.median(history)
        mad = statistics.median(abs(h - med) for h in history)
        above = med + cfg["z"] * (1.4826 * mad + 1e-8 * max(abs(med), 1.0))
        return max(above, cfg["min_ratio"] * med) if med > 0 else above

    # ------------------------------------------------------------------------------ checks

    def check_step(self, step: int, loss: float, grad_norm: float, seconds: float | None = None,
                   limits: tuple[float, float] | None = None) -> Decision:
        """Judge optimizer step ``step`` before its update is applied (loss: the step's training
        loss; grad_norm: the true norm, unscaled and unclipped; seconds: its wall time). With
        ``limits`` (loss, grad norm) the outlier checks compare against them (the limits the device
        used for this step, see ``limits()``) instead of this step's window."""
        d = Decision()
        if not self.enabled:
            return d
        if not math.isfinite(loss) and self.nonfinite_loss:
            d.add(HealthEvent(step, "nonfinite_loss", self.nonfinite_loss, loss, None,
                              f"training loss is {loss}"))
        elif not math.isfinite(grad_norm) and self.nonfinite_grad:
            d.add(HealthEvent(step, "nonfinite_grad", self.nonfinite_grad, grad_norm, None,
                              f"gradient norm is {grad_norm}"))
        else:
            fixed = limits or (None, None)
            self._outlier(d, step, "loss_spike", self.loss_spike, loss, self._losses, "loss", fixed[0])
            self._outlier(d, step, "grad_explosion", self.grad_explosion, grad_norm, self._norms, "grad norm",
                          fixed[1])
        if seconds is not None and self.stall.get("action"):
            self._stall(d, step, seconds)
        if d.apply_update:
            self.consecutive_bad = 0
            self._remember(loss, grad_norm)
            self._check_plateau(d, step, loss)
        else:
            self.consecutive_bad += 1
            if d.action == "skip" and self.consecutive_bad >= self.escalate_after:
                d.add(HealthEvent(step, "repeated", "rollback", float(self.consecutive_bad),
                                  float(self.escalate_after),
                                  f"{self.consecutive_bad} bad steps in a row: rolling back"))
        if d.action == "rollback" and self.rollbacks >= self.max_rollbacks:
            d.add(HealthEvent(step, "max_rollbacks", "stop", float(self.rollbacks), float(self.max_rollbacks),
                              f"already rolled back {self.rollbacks} times (health.max_rollbacks)"))
        if d.action == "skip":
            self.skipped += 1
        self._emit(d)
        return d

    def check_probes(self, step: int, probes: dict[str, Any]) -> Decision:
        """Judge the model's own diagnostics (after the update, on logging steps): each probe named in
        ``probes.limits`` above its limit (or non-finite) is an event with the probes' action."""
        d = Decision()
        if not self.enabled or not self.probes.get("action"):
            return d
        for key, limit in (self.probes.get("limits") or {}).items():
            value = probes.get(key)
            if isinstance(value, torch.Tensor):
                value = float(value)
            if value is not None and (not math.isfinite(value) or value > limit):
                d.add(HealthEvent(step, f"probe:{key}", self.probes["action"], value, float(limit),
                                  f"{key} = {value:.4g} > {limit:g}"))
        _after_update(d)
        self._emit(d)
        return d

    def _outlier(self, d: Decision, step: int, name: str, cfg: dict[str, Any], value: float,
                 history: deque[float], what: str, limit: float | None = None) -> None:
        if not cfg.get("action"):
            return
        if len(history) < int(cfg["min_history"]):
            early = _early_limit(cfg, history)
            if value >= early if limit is None or cfg["action"] == "warn" else value > limit:
                med = statistics.median(history)
                d.add(HealthEvent(step, name, cfg["action"], value, early,
                                  f"{what} {value:.4g} is {value / med:.0f}x the median {med:.4g} of the "
                                  f"{len(history)} steps so far (extreme_ratio {cfg['extreme_ratio']:g})"))
            return
        z, med = _robust_z(value, history)
        ratio = value / med if med > 0 else math.inf
        fires = value > limit if limit is not None and cfg["action"] != "warn" else (
            z > cfg["z"] and ratio > cfg["min_ratio"])
        if fires:
            d.add(HealthEvent(step, name, cfg["action"], value, cfg["z"],
                              f"{what} {value:.4g} is {ratio:.1f}x the recent median {med:.4g} "
                              f"(robust z {z:.1f} > {cfg['z']:g})"))

    def _stall(self, d: Decision, step: int, seconds: float) -> None:
        cfg = self.stall
        if len(self._seconds) >= int(cfg["min_history"]):
            med = statistics.median(self._seconds)
            if med > 0 and seconds > cfg["factor"] * med:
                d.add(HealthEvent(step, "stall", cfg["action"], seconds, cfg["factor"] * med,
                                  f"step took {seconds:.2f}s, {seconds / med:.0f}x the recent median {med:.3f}s"))
                return  # an outlier does not enter the baseline
        self._seconds.append(seconds)

    def _check_plateau(self, d: Decision, step: int, loss: float) -> None:
        cfg = self.plateau
        if not cfg.get("action"):
            return
        self._plateau.append(loss)
        window = self._plateau.maxlen or 0
        if len(self._plateau) < window:
            return
        half = window // 2
        values = list(self._plateau)
        before, after = sum(values[:half]) / half, sum(values[half:]) / (window - half)
        improvement = (before - after) / max(abs(before), 1e-12)
        if improvement <= cfg["min_improvement"]:
            found = Decision(events=[HealthEvent(step, "plateau", cfg["action"], improvement, cfg["min_improvement"],
                                          f"loss improved {improvement:.2%} over the last {window} steps")])
            _after_update(found)  # a trend, not this step's fault: warn or stop, never skip this update
            d.add(found.events[0])
        self._plateau.clear()  # judge the next window afresh: one warning per window at most

    def _remember(self, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss):
            self._losses.append(loss)
        if math.isfinite(grad_norm):
            self._norms.append(grad_norm)

    # ------------------------------------------------------------------------------ actions

    def rolled_back(self, step: int, to_step: int | None) -> None:
        """The engine reloaded the checkpoint of ``to_step``: count it and lower the LR factor."""
        self.rollbacks += 1
        self.consecutive_bad = 0
        self.lr_factor *= self.rollback_lr_scale
        self._emit(Decision(events=[HealthEvent(
            step, "rollback", "rollback", float(to_step) if to_step is not None else None, None,
            f"reloaded the checkpoint of step {to_step}; continuing at step {step + 1} "
            f"(rollback {self.rollbacks} of at most {self.max_rollbacks}, LR x{self.lr_factor:g})")]))

    def _emit(self, d: Decision) -> None:
        for e in d.events:
            self.events += 1
            level = logging.WARNING if e.action in ("warn", "skip", "rollback") else logging.ERROR
            log.log(level, "health: step %d %s -> %s: %s", e.step, e.check, e.action, e.message)
            if self.events_path is not None:
                with self.events_path.open("a") as f:
                    f.write(json.dumps(e.row()) + "\n")

    def metrics(self) -> dict[str, float]:
        return {"health/skipped": self.skipped, "health/rollbacks": self.rollbacks,
                "health/events": self.events, "health/lr_factor": self.lr_factor}

    # --------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses), "norms": list(self._norms), "seconds": list(self._seconds),
                "plateau": list(self._plateau), "consecutive_bad": self.consecutive_bad,
                "skipped": self.skipped, "rollbacks": self.rollbacks, "events": self.events,
                "lr_factor": self.lr_factor}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._losses.clear(), self._losses.extend(d["losses"])
        self._norms.clear(), self._norms.extend(d["norms"])
        self._seconds.clear(), self._seconds.extend(d.get("seconds", []))
        self._plateau.clear(), self._plateau.extend(d.get("plateau", []))
        self.consecutive_bad = int(d["consecutive_bad"])
        self.skipped, self.rollbacks = int(d["skipped"]), int(d["rollbacks"])
        self.events, self.lr_factor = int(d["events"]), float(d["lr_factor"])


def _after_update(d: Decision) -> None:
    """Checks judged after the update is applied can only warn or stop: skip and rollback become warn."""
    for e in d.events:
        if e.action in ("skip", "rollback"):
            e.action = "warn"
            e.message += " (skip/rollback do not apply to this check: warned)"
    d.action = max((e.action for e in d.events), key=_SEVERITY.__getitem__, default="ok")


def _action_problems(name: str, value: Any) -> list[str]:
    if value is not None and value not in ACTIONS:
        return [f"health.{name}={value!r}: must be one of {', '.join(ACTIONS)} or null"]
    return []


def _early_limit(cfg: dict[str, Any], history: deque[float]) -> float:
    """Before ``min_history`` steps: ``extreme_ratio`` x the median of the steps so far, from the 3rd
    step on (two steps seen); inf when the check has no ``extreme_ratio`` or fewer steps are seen."""
    ratio = cfg.get("extreme_ratio")
    if not ratio or len(history) < 2:
        return math.inf
    med = statistics.median(history)
    return ratio * med if med > 0 else math.inf


DEFAULTS: dict[str, dict[str, Any]] = {  # each check's settings; a config sets some of them
    "grad_explosion": {"action": "warn", "z": 10.0, "min_ratio": 20.0, "window": 100, "min_history": 20},
    "loss_spike": {"action": "skip", "z": 8.0, "min_ratio": 1.5, "window": 100, "min_history": 20,
                   "extreme_ratio": 20.0},
    "plateau": {"action": "warn", "window": 500, "min_improvement": 0.0},
    "stall": {"action": "warn", "factor": 10.0, "window": 50, "min_history": 10},
    "probes": {"action": "warn", "limits": {}},
}
_STEP_COUNTS = ("window", "min_history")  # whole numbers of steps; every other threshold is a number


def _settings(name: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``name``'s settings: its defaults, then what the config sets."""
    return {**DEFAULTS[name], **(dict(given) if given else {})}


def _is_number(value: Any) -> bool:
    """A number, not NaN (an infinite threshold is one that never fires)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_problems(name: str, given: Any) -> list[str]:
    """One line per bad setting of check ``name`` (``given``: the config's dict, or None)."""
    if given is not None and not isinstance(given, Mapping):
        return [f"health.{name}={given!r}: must be a mapping of settings ({', '.join(DEFAULTS[name])})"]
    cfg = _settings(name, given)
    unknown = set(cfg) - set(DEFAULTS[name])
    if unknown:
        return [f"health.{name}: unknown keys {sorted(unknown)} (known: {sorted(DEFAULTS[name])})"]
    out = _action_problems(f"{name}.action", cfg["action"])
    for key, value in cfg.items():
        if key in ("action", "limits") or (key == "extreme_ratio" and value is None):
            continue
        if key in _STEP_COUNTS:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                out.append(f"health.{name}.{key}={value!r}: must be a whole number of steps >= 0")
        elif not (_is_number(value) and value >= 0):
            out.append(f"health.{name}.{key}={value!r}: must be a number >= 0")
    limits = cfg.get("limits")
    if name == "probes":
        if not isinstance(limits, Mapping):
            out.append(f"health.probes.limits={limits!r}: must be a mapping of probe name to limit")
        else:
            out += [f"health.probes.limits.{k}={v!r}: must be a number" for k, v in limits.items()
                    if not _is_number(v)]
    return out


def settings_problems(*, nonfinite_loss: Any = "skip", nonfinite_grad: Any = "skip", grad_explosion: Any = None,
                      loss_spike: Any = None, plateau: Any = None, stall: Any = None, probes: Any = None,
                      escalate_after: Any = 3, max_rollbacks: Any = 3, rollback_lr_scale: Any = 1.0,
                      **_: Any) -> list[str]:
    """Every problem with the health settings, one line each naming the key and the value."""
    out = _action_problems("nonfinite_loss", nonfinite_loss) + _action_problems("nonfinite_grad", nonfinite_grad)
    checks = {"grad_explosion": grad_explosion, "loss_spike": loss_spike, "plateau": plateau, "stall": stall,
              "probes": probes}
    bad_check = set()
    for name, given in checks.items():
        lines = _check_problems(name, given)
        out += lines
        if lines:
            bad_check.add(name)
    if "loss_spike" not in bad_check:
        extreme = _settings("loss_spike", loss_spike)["extreme_ratio"]
        if extreme is not None and not extreme > 1:
            out.append(f"health.loss_spike.extreme_ratio={extreme!r}: must be > 1 (a multiple of the "
                       "median loss so far) or null")
    for name in ("loss_spike", "grad_explosion", "stall"):
        cfg = _settings(name, checks[name])
        if name not in bad_check and cfg["window"] < max(cfg["min_history"], 2):
            out.append(f"health.{name}.window={cfg['window']}: must be >= health.{name}.min_history="
                       f"{cfg['min_history']} (and >= 2), or the check can never fire")
    if "plateau" not in bad_check and (window := _settings("plateau", plateau)["window"]) < 2:
        out.append(f"health.plateau.window={window}: must be >= 2")
    if not (isinstance(escalate_after, int) and escalate_after >= 1):
        out.append(f"health.escalate_after={escalate_after!r}: must be >= 1")
    if not (isinstance(max_rollbacks, int) and max_rollbacks >= 0):
        out.append(f"health.max_rollbacks={max_rollbacks!r}: must be >= 0")
    if not (_is_number(rollback_lr_scale) and 0 < rollback_lr_scale <= 1):
        out.append(f"health.rollback_lr_scale={rollback_lr_scale!r}: must be in (0, 1]")
    return out


@dataclass
class Faults:
    """Fault injection (``faults.*``): make step N's loss NaN, its gradients inf, or its loss x100."""

    nan_at_step: int | None = None
    inf_grad_at_step: int | None = None
    spike_at_step: int | None = None
    # The loss faults only on this global rank (null: every rank), to rehearse a fault that one DDP rank
    # meets: its NaN reaches every rank through the loss average and the gradient all-reduce, so all
    # ranks take the same action. (inf_grad_at_step acts after the all-reduce: on every rank.)
    on_rank: int | None = None

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.on_rank is not None:
            dist = torch.distributed
            if (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0) != self.on_rank:
                return loss
        if step == self.nan_at_step:
            loss = loss * float("nan")
        if step == self.spike_at_step:
            loss = loss * 100.0
        return loss

    def grads(self, step: int, params: list[torch.Tensor]) -> None:
        if step == self.inf_grad_at_step:
            for p in params:
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("inf")
                    return
