"""The curriculum group: the stages' schema and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class StageConf:
    name: str = MISSING
    seq_len: int = MISSING
    batch_size: int = MISSING
    lr_scale: float = 1.0
    steps: int | None = None
    fraction: float | None = None
    # {min_steps, window, threshold}: typed Any because OmegaConf cannot merge a dict into a null
    # structured node; sem.training.curriculum checks its keys and values.
    gate: Any = None
    checkpoint: bool = False


@dataclass
class CurriculumConf:
    _target_: str = "sem.training.curriculum.CurriculumManager"
    _convert_: str = "all"
    max_steps: int = "${trainer.max_steps}"  # type: ignore[assignment]
    stages: list[StageConf] = MISSING


def curriculum_problems(cfg: DictConfig, max_len: int | None) -> list[str]:
    from sem.training.curriculum import stage_problems

    stages = cfg.curriculum.stages
    lines = stage_problems(OmegaConf.to_container(stages, resolve=True), cfg.trainer.max_steps,
                           max_len, prefix="curriculum")
    # A stage field copied from elsewhere (curriculum=none takes ${data.seq_len}) is reported
    # under its source key already: say it once.
    copied = tuple(f"curriculum.stages[{i}]({st.name}).{key}=" for i, st in enumerate(stages)
                   for key in ("seq_len", "batch_size") if OmegaConf.is_interpolation(st, key))
    return [line for line in lines if not line.startswith(copied)]
