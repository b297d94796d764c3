"""StopSignals: the first stop signal is a flag during training and abandons a phase with nothing to save;
the second exits at once (not on an extra rank); a main thread held in native code still stops; submitit's
SIGUSR2 is saved first, then handed back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from sem.errors import EXIT_PREEMPTED
from sem.training.preemption import Stopped, StopSignals

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


# ------------------------------------------------------------------ phases with nothing to save


@pytest.fixture
def installed() -> Any:
    signals = StopSignals()
    signals.install()
    yield signals
    signals.restore()


def test_a_stop_abandons_a_phase_with_nothing_to_save(installed: StopSignals) -> None:
    installed.abandon("the set-up before training")
    with pytest.raises(Stopped) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # the handler raises at the next bytecode: never reached
    assert info.value.code == EXIT_PREEMPTED and installed.received == "SIGTERM"
    assert str(info.value) == "stopped by SIGTERM during the set-up before training"


def test_a_deferred_block_is_finished_before_the_stop(installed: StopSignals) -> None:
    installed.abandon("the final validation")
    written = []
    with pytest.raises(Stopped), installed.deferred():
        os.kill(os.getpid(), signal.SIGUSR1)
        written.append("summary.json")
    assert written == ["summary.json"]


def test_a_stop_received_already_abandons_the_next_phase(installed: StopSignals) -> None:
    os.kill(os.getpid(), signal.SIGUSR1)  # training: a flag
    assert installed.received == "SIGUSR1"
    with pytest.raises(Stopped, match="during sampling"), installed.abandonable("sampling"):
        pass
    assert installed.phase is None  # the phase before it


def test_a_stop_between_jobs_reaches_the_next_job_and_back() -> None:
    sweep = StopSignals()
    sweep.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        job = StopSignals()
        job.install()
        assert job.received == "SIGUSR1"  # taken over from the sweep's handlers
        job.restore()
        after = StopSignals()
        after.install()
        after.restore()
    finally:
        sweep.restore()
    first = StopSignals()
    first.install()
    try:
        inner = StopSignals()
        inner.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        inner.restore()
        assert first.received == "SIGUSR1"  # a second signal after the job stopped exits at once
    finally:
        first.restore()


# ----------------------------------------------------- in a process of its own: exits, the watcher


def _run_script(body: str, env: dict[str, str] | None = None, timeout: float = 60
                ) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - started


TWICE = """
    import os, signal, time
    from sem.training.preemption import StopSignals
    StopSignals().install()
    os.kill(os.getpid(), signal.SIGINT)
    print("first heard", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    print("still here", flush=True)
"""


def test_a_second_sigint_exits_130_at_once() -> None:
    proc, _ = _run_script(TWICE, env={"LOCAL_RANK": "0"})
    assert proc.returncode == 130, proc.stderr
    assert "first heard" in proc.stdout and "still here" not in proc.stdout
    assert "SIGINT again: exiting now" in proc.stderr


def test_an_extra_rank_leaves_exiting_at_once_to_rank_zero() -> None:
    """Ctrl-C reaches an extra rank twice (the terminal, rank zero): it stops once, it does not exit."""
    proc, _ = _run_script(TWICE, env={"LOCAL_RANK": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "still here" in proc.stdout


HELD = """
    import ctypes, os, signal, subprocess, sys
    from sem.training import preemption
    preemption.STUCK_S = 1.0
    signals = preemption.StopSignals()
    signals.install()
    signals.abandon("the rendezvous")
    signals.last_words = lambda why: print("last words:", why, flush=True)
    rank = subprocess.Popen(["sleep", "60"])
    preemption.forward_to([rank])
    print("rank", rank.pid, flush=True)
    # The main thread held in native code, as in gloo's rendezvous: SIGTERM is blocked on this thread,
    # so the kernel hands it to another (Python runs its handler on the main thread only, between bytecodes).
    # The signal is sent once the main thread is asleep in C: sent before, the main thread could run the
    # handler between the bytecodes leading to the call (a busy machine), which is not what is tested.
    import threading, time
    def kill_once_asleep():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                wchan = open(f"/proc/self/task/{os.getpid()}/wchan").read()
            except OSError:
                wchan = ""
            if "nanosleep" in wchan:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    sleep = ctypes.CDLL(None).sleep
    threading.Thread(target=kill_once_asleep, daemon=True).start()
    sleep(30)
    print("woke up", flush=True)
"""


def test_a_main_thread_held_in_native_code_still_stops() -> None:
    """The watcher thread passes the stop on to the ranks at once and exits 75 when the main thread
    has not heard it STUCK_S later, after the run's last words (summary.json)."""
    proc, seconds = _run_script(HELD)
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout + proc.stderr
    assert seconds < 15  # STUCK_S 1 s here, Python's start-up, and up to 5 s waiting for the sleep
    assert "last words: stopped by SIGTERM during the rendezvous" in proc.stdout
    assert "woke up" not in proc.stdout and "held in native code" in proc.stderr
    rank = int(proc.stdout.split("rank ")[1].split()[0])
    deadline = time.monotonic() + 5
    while _alive(rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(rank)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
