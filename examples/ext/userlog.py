"""A Lightning logger of one's own: every logged metric as one JSON line (engine=lightning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only


class JsonlLogger(Logger):
    def __init__(self, save_dir: str = ".", filename: str = "user_metrics.jsonl") -> None:
        super().__init__()
        self.path = Path(save_dir) / filename

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
