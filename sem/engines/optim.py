"""The optimizer and the LR schedule a run steps, built the same way for both engines from the
configured factories (``sem.engines.instantiate``; any torch class, see ``sem.contracts``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from sem.models.common import param_groups
from sem.training.scheduler import ScaledSchedule


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
