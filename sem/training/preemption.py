"""Stop requests from the outside: SIGTERM (schedulers, ``kill``), SIGINT (Ctrl-C), SIGUSR1 (SLURM's
warning before preemption, with ``--signal=USR1@<seconds>``).

The first signal only sets a flag: the engine finishes the current optimizer step, saves a checkpoint,
writes ``summary.json`` with ``status: preempted`` and exits with ``EXIT_PREEMPTED``. A second signal
exits at once (a checkpoint is never half-written: saves are atomic).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sem")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later": resume=auto continues the run
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)


class StopSignals:
    """Turns the first SIGTERM/SIGINT/SIGUSR1 into ``received`` (its name); the second exits at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        # Called with each signal received: a DDP launcher passes it on to the ranks it started, so
        # they stop at the same step as this one (the stop decision itself is collective).
        self.forward: list[Callable[[int], None]] = []

    def install(self) -> None:
        """(Re)install the handlers; safe to call again after a library replaced them."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: stop signals are not handled")
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        for forward in self.forward:
            forward(signum)
        if self.received is not None:
            log.error("%s again: exiting now (last complete checkpoint is kept)", name)
            logging.shutdown()
            os._exit(128 + signum)
        self.received = name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting with code %d "
                    "(send it again to exit at once)", name, EXIT_PREEMPTED)
