"""The Hydra plugin class (``hydra/sweeper=optuna``). Optuna is imported only when a sweep starts
(Hydra imports this module whenever it scans its plugins); the work is in ``_impl``."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """An Optuna study over ``params``: ``n_jobs`` trials in flight, a new one asked as soon as one
    ends (no batches); the study kept in the sweep dir (a journal file) unless ``storage`` says
    otherwise, continued when the same sweep dir is given again."""

    def __init__(self, **kwargs: Any) -> None:
        from ._impl import SweepSettings

        self.settings = SweepSettings(**kwargs)
        self._impl: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from ._impl import OptunaSweep

        self._impl = OptunaSweep(self.settings, hydra_context=hydra_context, task_function=task_function,
                                 config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self._impl is not None, "setup() first"
        return self._impl.sweep(arguments)
