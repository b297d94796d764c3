"""``make(node)``: ``hydra.utils.instantiate`` with a log line per object ("Instantiating <target>"),
for the composition root (``sem.recipe`` and the engine builders) only."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sem.build")


def make(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``, logged as "Instantiating <target>"."""
    log.info("Instantiating <%s>", node._target_)
    return instantiate(node, **kwargs)


def without(node: DictConfig, *keys: str) -> DictConfig:
    """An untyped copy of ``node`` without ``keys`` (built separately or not constructor args)."""
    resolved = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in resolved.items() if k not in keys})
