"""Stop requests from the outside: SIGTERM (schedulers, ``kill``), SIGINT (Ctrl-C), SIGUSR1 (SLURM's
warning before preemption, with ``--signal=USR1@<seconds>``), and SIGUSR2 where submitit handles it.

The first signal only sets a flag: the engine finishes the current optimizer step, saves a checkpoint,
writes ``summary.json`` with ``status: preempted`` and exits with ``EXIT_PREEMPTED``. A second signal
exits at once (a checkpoint is never half-written: saves are atomic).

SIGUSR2 is submitit's: SLURM sends it before a job's time limit (or at preemption) and submitit's
handler requeues the job at once, wherever the job was. Inside a submitit job sem takes it over the
same way, and once the checkpoint of the current step is saved it hands the signal to submitit's
handler (``hand_over``), which requeues: the requeued job (``resume=auto``) goes on from that step,
not from the last periodic checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from sem.errors import EXIT_PREEMPTED

log = logging.getLogger("sem")

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)
REQUEUE_SIGNAL = getattr(signal, "SIGUSR2", None)  # submitit's, taken over only where submitit handles it


def _is_submitit_handler(handler: Any) -> bool:
    """True for the handler submitit installs in a job (a method of submitit's SignalHandler)."""
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.split(".")[0] == "submitit"


class StopSignals:
    """Turns the first SIGTERM/SIGINT/SIGUSR1 (or submitit's SIGUSR2) into ``received`` (its name); the
    second exits at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._requeue: Callable[[int, Any], Any] | None = None  # submitit's SIGUSR2 handler, once taken over
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
        if REQUEUE_SIGNAL is not None and _is_submitit_handler(signal.getsignal(REQUEUE_SIGNAL)):
            self._requeue = signal.signal(REQUEUE_SIGNAL, self._handle)
            self._previous.setdefault(REQUEUE_SIGNAL, self._requeue)

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
        if signum == REQUEUE_SIGNAL and self._requeue is not None:
            log.warning("%s received: finishing this step, saving a checkpoint, then handing over to submitit "
                        "to requeue the job (resume=auto goes on from that step)", name)
            return
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting with code %d "
                    "(send it again to exit at once)", name, EXIT_PREEMPTED)

    def hand_over(self) -> None:
        """After the stop's checkpoint is saved: pass a SIGUSR2 taken over from submitit on to its handler,
        which requeues the job and exits the process (SystemExit). Nothing to do otherwise."""
        if REQUEUE_SIGNAL is None or self._requeue is None or self.received != signal.Signals(REQUEUE_SIGNAL).name:
            return
        requeue, self._requeue = self._requeue, None  # once
        log.warning("checkpoint saved: submitit requeues the job")
        requeue(REQUEUE_SIGNAL, None)
