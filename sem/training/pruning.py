"""A sweep's judge of its trial: each validation's val/bpb goes to it, and where it says stop the run
stops at that validation, saved, with ``summary.json`` status ``pruned`` (``sem.engines.fit``). The judge
is a sweeper's (Optuna's pruner, ``sem.sweeps.trial``), set around a job by the sweep's job guard; both
engines call the same ``Reports``. Plain Python: no Lightning, no Hydra, no Optuna."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)


class Judge(Protocol):
    """A sweeper's view of one trial: ``report`` records the value at ``step`` and says whether to stop."""

    def report(self, step: int, value: float) -> bool: ...


class Pruned(NamedTuple):
    """Where a trial was stopped: the step and the val/bpb the judge saw there (what a pruned job returns
    to its sweeper instead of a final val/bpb)."""

    step: int
    value: float

    @property
    def pruned(self) -> bool:
        return True


class Reports:
    """A run's validations as its judge sees them. Every rank of a trial holds one (the stop is decided
    together); only global rank 0's has the judge (``judge`` None elsewhere: it reports nothing)."""

    def __init__(self, judge: Judge | None, metric: str = "val/bpb") -> None:
        self.judge, self.metric = judge, metric
        self.pruned: Pruned | None = None

    def validated(self, step: int, metrics: Mapping[str, Any]) -> Pruned | None:
        """Report this validation; the verdict (where the trial stops, kept as ``pruned``) or None to go on."""
        value = metrics.get(self.metric)
        if self.judge is None or value is None:
            return None
        value = float(value)
        if not math.isfinite(value):
            return None  # the health policy owns non-finite losses
        if self.judge.report(step, value):
            log.warning("pruned by the sweeper at step %d (%s %.4f): stopping this trial, saved", step,
                        self.metric, value)
            self.pruned = Pruned(step, value)
            return self.pruned
        return None


_current: list[Reports] = []


@contextlib.contextmanager
def judged(reports: Reports | None) -> Iterator[None]:
    """The runs built inside the block report to ``reports`` (``sem.engines.build`` reads ``current``)."""
    _current[:] = [reports] if reports is not None else []
    try:
        yield
    finally:
        _current.clear()


def current() -> Reports | None:
    """The reports of the trial this process is running, if a sweeper judges it."""
    return _current[0] if _current else None
