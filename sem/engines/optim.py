"""The optimizer and the LR schedule a run steps: their factories from the config (any torch class,
see ``sem.contracts``), and the objects built the same way for both engines."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from sem.engines.instantiate import make, without
from sem.models.common import param_groups
from sem.training.scheduler import ScaledSchedule

log = logging.getLogger("sem.build")


def build_optimizer(factory: Callable[..., Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameter groups (no weight decay on norms, gains,
    biases and per-channel parameters); it must be a ``torch.optim.Optimizer``."""
    wd = float(getattr(factory, "keywords", {}).get("weight_decay", 0.0) or 0.0)
    optimizer = factory(params=param_groups(model, wd))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"the optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
    return optimizer


def build_scheduler(factory: Callable[..., Any] | None, optimizer: torch.optim.Optimizer,
                    lr_scale: Callable[[int], float]) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The configured schedule on ``optimizer``: sem's WSD takes ``lr_scale`` itself; any other
    ``LRScheduler`` is wrapped so that ``lr_scale`` multiplies what it computes (``ScaledSchedule``)."""
    if factory is None:
        return None
    target = getattr(factory, "func", factory)
    try:
        takes_scale = "lr_scale" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        takes_scale = False
    if takes_scale:
        return factory(optimizer=optimizer, lr_scale=lr_scale)
    scheduler = factory(optimizer=optimizer)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(f"the scheduler factory returned {type(scheduler).__name__}, not a torch LRScheduler")
    return ScaledSchedule(scheduler, lr_scale)


def optimizer_factory(node: DictConfig) -> Any:
    """``factory(params=...)``: the configured optimizer class with the keys it takes. The speed flags
    ``fused``/``foreach`` are passed only where the class takes them (validation named any other key)."""
    from sem.config.components import PERF_KEYS, locate, takes

    cls, _ = locate("optimizer", node._target_)
    drop = [k for k in PERF_KEYS if k in node and cls is not None and not takes(cls, k)]
    return make(without(node, *drop) if drop else node, _partial_=True, _convert_="all")


def scheduler_factory(node: DictConfig) -> Any:
    """``factory(optimizer=...)``: the configured schedule. A torch scheduler swapped in for sem's WSD
    (``scheduler._target_=...``) inherits keys of the default option it does not take: they are not
    passed, and a warning names them."""
    from sem.config.components import inherited_schedule_keys, locate

    cls, _ = locate("scheduler", node._target_)
    drop = inherited_schedule_keys(cls, node) if cls is not None else []
    if drop:
        log.warning("scheduler: %s does not take %s (sem's schedule settings, from the default option): "
                    "not used", node._target_, ", ".join(f"{k}={node[k]}" for k in drop))
    return make(without(node, *drop) if drop else node, _partial_=True, _convert_="all")
