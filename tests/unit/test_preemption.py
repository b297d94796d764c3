"""StopSignals: the first stop signal is a flag, and submitit's SIGUSR2 is saved first, then handed back."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from sem.training.preemption import StopSignals

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")


class FakeSubmititHandler:
    """Stands in for submitit.core.job_environment.SignalHandler (matched by its module)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def checkpoint_and_try_requeue(self, signum: int, frame: Any = None) -> None:
        self.calls.append(signum)


FakeSubmititHandler.__module__ = "submitit.core.job_environment"


@pytest.fixture
def usr2_handler():
    previous = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, previous)


def test_first_signal_is_a_flag() -> None:
    signals = StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == "SIGUSR1"
        signals.hand_over()  # nothing to hand over: not submitit's signal
    finally:
        signals.restore()


def test_submitit_sigusr2_is_saved_then_handed_over(usr2_handler: None) -> None:
    fake = FakeSubmititHandler()
    signal.signal(signal.SIGUSR2, fake.checkpoint_and_try_requeue)
    signals = StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert signals.received == "SIGUSR2" and fake.calls == []  # the engine saves first
        signals.install()  # a re-install (after a library's) keeps submitit's handler to hand over to
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGUSR2) == fake.checkpoint_and_try_requeue
    signals.hand_over()
    assert fake.calls == [signal.SIGUSR2]
    signals.hand_over()  # once only
    assert fake.calls == [signal.SIGUSR2]


def test_sigusr2_without_submitit_is_left_alone(usr2_handler: None) -> None:
    def own(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGUSR2, own)
    signals = StopSignals()
    signals.install()
    try:
        assert signal.getsignal(signal.SIGUSR2) is own
        os.kill(os.getpid(), signal.SIGUSR2)
        assert signals.received is None
    finally:
        signals.restore()
