"""Helpers every group's checks use."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def positive(problems: list[str], key: str, value: Any, *, allow_none: bool = False,
              strict: bool = True) -> None:
    if value is None and allow_none:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if strict else value >= 0))
    if not ok:
        problems.append(f"{key}={value!r}: must be {'> 0' if strict else '>= 0'}")


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
