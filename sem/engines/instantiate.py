"""``make(node)``: ``hydra.utils.instantiate`` with a log line per object ("Instantiating <target>"),
for the composition root (``sem.recipe`` and the engine builders) only; the optimizer and scheduler
factories of a config node (any torch class, the keys it takes)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import torch

log = logging.getLogger("sem.build")


def make(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``, logged as "Instantiating <target>"."""
    log.info("Instantiating <%s>", node._target_)
    return instantiate(node, **kwargs)


def without(node: DictConfig, *keys: str) -> DictConfig:
    """An untyped copy of ``node`` without ``keys`` (built separately or not constructor args)."""
    resolved = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in resolved.items() if k not in keys})


def optimizer_factory(node: DictConfig) -> Callable[..., torch.optim.Optimizer]:
    """``factory(params=...)``: the configured optimizer class with the keys it takes. The speed flags
    ``fused``/``foreach`` are passed only where the class takes them (validation named any other key)."""
    from sem.config.components import PERF_KEYS, locate, takes

    cls, _ = locate("optimizer", node._target_)
    drop = [k for k in PERF_KEYS if k in node and cls is not None and not takes(cls, k)]
    return make(without(node, *drop) if drop else node, _partial_=True, _convert_="all")


def scheduler_factory(node: DictConfig) -> Callable[..., torch.optim.lr_scheduler.LRScheduler]:
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
