"""Stop requests from the outside: SIGTERM (schedulers, ``kill``), SIGINT (Ctrl-C), SIGUSR1 (SLURM's
warning before preemption, with ``--signal=USR1@<seconds>``), and SIGUSR2 where submitit handles it.

What the first signal does depends on the phase the run is in:

- **training** (``defer``): it only sets a flag; the engine finishes the current optimizer step, saves a
  checkpoint, writes ``summary.json`` with ``status: preempted`` and exits with ``EXIT_PREEMPTED`` (75).
- **a phase with nothing to save** (``abandon``/``abandonable``: start-up and imports, the token cache,
  building, the DDP rendezvous, Lightning's sanity check, the final validation, sampling): it raises
  ``Stopped`` (a ``SystemExit`` with code 75) where the main thread is, so the phase is abandoned at
  once; what it was writing goes to a temporary name, moved into place only when complete.

A second signal exits at once with ``128 + signum`` (130 for SIGINT; a checkpoint is never half-written:
saves are atomic). A DDP rank started by rank zero (``LOCAL_RANK`` > 0) takes its orders from rank zero:
it stops on its first signal, ignores repeats (Ctrl-C reaches it twice: from the terminal and forwarded),
and is killed by rank zero when rank zero exits at once.

Python runs a handler only between bytecodes of the main thread, so a main thread held in native code
(the gloo rendezvous waits up to ``strategy.timeout_s`` for a rank that never comes) would hear nothing.
The interpreter also writes each signal to a pipe (``signal.set_wakeup_fd``), read by a daemon thread:
it passes the signal on to the ranks this process started at once, and ends the process when the
handler has not run ``STUCK_S`` later (exit 75 in a phase with nothing to save).

SIGUSR2 is submitit's: SLURM sends it before a job's time limit (or at preemption) and submitit's
handler requeues the job at once, wherever the job was. Inside a submitit job sem takes it over the
same way, and once the checkpoint of the current step is saved it hands the signal to submitit's
handler (``hand_over``), which requeues: the requeued job (``resume=auto``) goes on from that step,
not from the last periodic checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sem.errors import EXIT_PREEMPTED

log = logging.getLogger("sem")

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)
REQUEUE_SIGNAL = getattr(signal, "SIGUSR2", None)  # submitit's, taken over only where submitit handles it
STUCK_S = 5.0  # a phase with nothing to save: seconds the main thread may stay deaf to a signal
STUCK_TRAINING_S = 60.0  # training: a step or a checkpoint save may hold native code for a while
# Called just before the process exits at once (a second signal, a main thread held in native code): a
# writer registers here what it must not leave behind (``sem.training.checkpoint_file``: its temporaries).
at_exit_now: list[Callable[[], None]] = []


class Stopped(SystemExit):
    """A stop signal in a phase with nothing to save: raised where the main thread is; exit code 75."""

    def __init__(self, signal_name: str, phase: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.signal = signal_name
        self.phase = phase

    def __str__(self) -> str:
        return f"stopped by {self.signal} during {self.phase}"


def _is_submitit_handler(handler: Any) -> bool:
    """True for the handler submitit installs in a job (a method of submitit's SignalHandler)."""
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.split(".")[0] == "submitit"


def _is_follower() -> bool:
    """An extra DDP rank started by rank zero's launcher (Lightning sets its LOCAL_RANK)."""
    return os.environ.get("LOCAL_RANK", "0") not in ("", "0")


_active: list[StopSignals] = []  # installed, innermost last: the one the watcher reports to
_last_handled = [float("-inf")]  # monotonic time a StopSignals handler last ran (the main thread is responsive)


class StopSignals:
    """Turns the first SIGTERM/SIGINT/SIGUSR1 (or submitit's SIGUSR2) into ``received`` (its name), and
    into ``Stopped`` at once while ``phase`` names a phase with nothing to save; the second exits."""

    def __init__(self, phase: str | None = None, requeue: bool = True) -> None:
        self.received: str | None = None
        self.requeue = requeue  # take submitit's SIGUSR2 over (a run does; a sweep between its jobs does not)
        self.phase = phase  # set: a stop abandons this phase at once; None: it waits for the step boundary
        self.follower = _is_follower()
        self.on_stop = f"finishing this step, saving a checkpoint, then exiting with code {EXIT_PREEMPTED}"
        self._previous: dict[int, Any] = {}
        self._requeue: Callable[[int, Any], Any] | None = None  # submitit's SIGUSR2 handler, once taken over
        # Called with each stop signal this process gets (SIGKILL when it exits at once): a DDP launcher
        # passes it on to the ranks it started (``forward_to``), so they stop with this one.
        self.forward: list[Callable[[int], None]] = []
        self.ranks: list[Any] = []  # the processes ``forward_to`` passes stops on to
        self._forwarded = False
        self._pending: float | None = None  # when the watcher last saw a stop signal arrive
        self._lock = threading.Lock()
        # Called with a one-line reason when the process must exit without its clean-up (the main thread
        # held in native code): the run writes its summary.json there.
        self.last_words: Callable[[str], None] | None = None

    def install(self) -> None:
        """(Re)install the handlers; safe to call again after a library replaced them. A stop received
        by the handlers this one replaces (a sweep's, between two jobs) counts as received here."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: stop signals are not handled")
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            owner = getattr(previous, "__self__", None)
            if isinstance(owner, StopSignals) and owner is not self:
                self.received = self.received or owner.received
            self._previous.setdefault(sig, previous)
        if self.requeue and REQUEUE_SIGNAL is not None and _is_submitit_handler(signal.getsignal(REQUEUE_SIGNAL)):
            self._requeue = signal.signal(REQUEUE_SIGNAL, self._handle)
            self._previous.setdefault(REQUEUE_SIGNAL, self._requeue)
        if self not in _active:
            _active.append(self)
        _Watcher.start()

    def restore(self) -> None:
        """Put back the handlers this one replaced; a stop received here counts as received there (a
        second signal after the run stopped still exits at once)."""
        for sig, handler in self._previous.items():
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, StopSignals) and owner is not self:
                owner.received = owner.received or self.received
            if handler is not None:
                signal.signal(sig, handler)
        self._previous.clear()
        if self in _active:
            _active.remove(self)

    # ------------------------------------------------------------------------------ phases

    def abandon(self, phase: str) -> None:
        """From now on a stop abandons ``phase`` at once (``Stopped``); one received already does now."""
        self.phase = phase
        if self.received is not None:
            raise Stopped(self.received, phase)

    def defer(self) -> None:
        """From now on a stop waits for the engine's step boundary (training: the step is saved)."""
        self.phase = None

    @contextlib.contextmanager
    def abandonable(self, phase: str) -> Iterator[None]:
        """``phase`` inside the block; the phase before it after."""
        before = self.phase
        try:
            self.abandon(phase)
            yield
        finally:
            self.phase = before

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that must not be cut short (files written whole); a stop in it is raised after it."""
        before, self.phase = self.phase, None
        try:
            yield
        finally:
            self.phase = before
        if before is not None and self.received is not None:
            raise Stopped(self.received, before)

    # ---------------------------------------------------------------------------- handling

    def _handle(self, signum: int, frame: Any) -> None:
        """The Python-level handler (main thread, between bytecodes)."""
        _last_handled[0] = time.monotonic()
        name = signal.Signals(signum).name
        self._pass_on(signum)  # (the watcher thread has, unless the main thread was quicker)
        if self.received is not None:
            if not self.follower:
                _say(logging.ERROR, "%s again: exiting now (last complete checkpoint is kept)", name, wait=True)
                self._exit_now(128 + signum)
            return  # an extra rank: rank zero decides, and kills this one if it exits at once
        self.received = name
        if signum == REQUEUE_SIGNAL and self._requeue is not None:
            _say(logging.WARNING, "%s received: finishing this step, saving a checkpoint, then handing over to "
                 "submitit to requeue the job (resume=auto goes on from that step)", name)
            return
        if self.phase is not None:
            _say(logging.WARNING, "%s received during %s: nothing to save, stopping now (exit %d)", name,
                 self.phase, EXIT_PREEMPTED)
            raise Stopped(name, self.phase)
        _say(logging.WARNING, "%s received: %s (send it again to exit at once)", name, self.on_stop)

    def _pass_on(self, signum: int) -> None:
        """The first stop signal goes on to the ranks this process started (once)."""
        with self._lock:
            if self._forwarded:
                return
            self._forwarded = True
        for forward in self.forward:
            forward(signum)

    def _arrived(self, signum: int, at: float) -> None:
        """The watcher thread saw ``signum`` arrive at ``at``: pass it on, and watch that it is handled."""
        if signum == REQUEUE_SIGNAL and self._requeue is None:
            return  # SIGUSR2 not taken over from submitit: not a stop signal here
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler):
            return  # no handler of ours will run for it
        self._pass_on(signum)
        pending, self._pending = self._pending, at
        if pending is not None and _last_handled[0] < pending - 1.0 and not self.follower:
            # a second signal, and the main thread has not heard the first: exit at once from here
            log.error("%s again: exiting now (the main thread is held in native code)", signal.Signals(signum).name)
            self._exit_now(128 + signum)
        threading.Thread(target=self._watch, args=(signum, at), daemon=True).start()

    def _watch(self, signum: int, at: float) -> None:
        deadline = at + STUCK_S
        while True:
            time.sleep(max(0.0, deadline - time.monotonic()))
            if _last_handled[0] >= at - 1.0 or self not in _active:
                return  # the handler ran (or this run is over): the main thread is listening
            if self.phase is None and time.monotonic() < at + STUCK_TRAINING_S:
                deadline = at + STUCK_TRAINING_S
                continue
            code = EXIT_PREEMPTED if self.phase is not None else 128 + signum
            name = signal.Signals(signum).name
            log.error("%s: the main thread is held in native code (%s) and cannot stop cleanly: exiting now "
                      "with code %d", name, self.phase or "training", code)
            if self.last_words is not None:
                with contextlib.suppress(Exception):
                    self.last_words(f"stopped by {name} during {self.phase or 'training'} (held in native "
                                    f"code: exited without clean-up)")
            self._exit_now(code)

    def release_ranks(self, grace_s: float = 2.0) -> None:
        """After a stop with nothing to save: the ranks this process started (they heard the stop too) get
        ``grace_s`` to exit, then are killed. A rank held in a collective this one has left would otherwise
        wait for it until the process group's timeout (and this process for the rank)."""
        deadline = time.monotonic() + grace_s
        for proc in self.ranks:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    proc.kill()

    def _exit_now(self, code: int) -> None:
        for forward in self.forward:
            forward(signal.SIGKILL)  # no rank outlives its launcher
        for clean_up in at_exit_now:
            with contextlib.suppress(Exception):
                clean_up()
        logging.shutdown()
        os._exit(code)

    def hand_over(self) -> None:
        """After the stop's checkpoint is saved: pass a SIGUSR2 taken over from submitit on to its handler,
        which requeues the job and exits the process (SystemExit). Nothing to do otherwise."""
        if REQUEUE_SIGNAL is None or self._requeue is None or self.received != signal.Signals(REQUEUE_SIGNAL).name:
            return
        requeue, self._requeue = self._requeue, None  # once
        log.warning("checkpoint saved: submitit requeues the job")
        requeue(REQUEUE_SIGNAL, None)


def _say(level: int, msg: str, *args: Any, wait: bool = False) -> None:
    """Log from a thread of its own: a handler runs between two bytecodes of the main thread, which may be
    inside a write to the same stream (a reentrant write raises, and logging prints a traceback)."""
    thread = threading.Thread(target=log.log, args=(level, msg, *args), daemon=True)
    thread.start()
    if wait:
        thread.join(timeout=1.0)  # (the main thread may hold the logging lock: then say nothing)


def abandonable(signals: StopSignals | None, phase: str) -> contextlib.AbstractContextManager[None]:
    """``signals.abandonable(phase)``, or nothing to do without stop signals."""
    return signals.abandonable(phase) if signals is not None else contextlib.nullcontext()


def forward_to(processes: list[Any]) -> None:
    """Pass the stop signals of this process on to ``processes`` it started (``subprocess.Popen``: the
    extra ranks of a DDP run), from the moment they exist (the rendezvous is not over yet)."""
    if not _active:
        return

    def send(signum: int) -> None:
        # A stop goes on as SIGTERM whatever it was: a rank still starting its interpreter dies of it
        # quietly, where SIGINT would print a KeyboardInterrupt traceback. SIGKILL: this process exits now.
        sent = signal.SIGKILL if signum == signal.SIGKILL else signal.SIGTERM
        for proc in processes:
            with contextlib.suppress(OSError):
                proc.send_signal(sent)

    _active[-1].forward.append(send)
    _active[-1].ranks.extend(processes)


def stop_during_startup() -> StopSignals:
    """Called first by ``launch.py`` and ``python -m sem``: until a run's own stop signals take over, a
    stop signal ends the process at once with exit 75 (imports, composing and validating the config:
    nothing to save), with no traceback."""
    signals = StopSignals(phase="start-up")
    signals.install()
    if signals.follower:
        _die_with_parent()
    return signals


def _die_with_parent() -> None:
    """An extra DDP rank runs in a session of its own (rank zero passes signals on to it): the kernel
    kills it if rank zero dies without doing so (SIGKILL, out of memory). Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # rank zero is gone already
        os._exit(EXIT_PREEMPTED)


def after_run() -> None:
    """The run is over (``sem.app.cli``): a stop signal from now on only sets a flag while the process
    exits, instead of raising into its clean-up."""
    for signals in _active:
        signals.phase = None


class _Watcher:
    """The daemon thread reading the pipe the interpreter writes each signal's number to."""

    running: _Watcher | None = None

    def __init__(self, read_fd: int) -> None:
        self.read_fd = read_fd

    @classmethod
    def start(cls) -> None:
        if cls.running is not None or threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            if signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False) != -1:
                signal.set_wakeup_fd(-1)  # another user of the wakeup fd (an event loop): leave it theirs
                raise ValueError("wakeup fd in use")
        except ValueError:
            os.close(read_fd)
            os.close(write_fd)
            return
        cls.running = cls(read_fd)
        threading.Thread(target=cls.running._run, name="sem-stop-signals", daemon=True).start()

    def _run(self) -> None:
        ours = {int(s) for s in SIGNALS} | ({int(REQUEUE_SIGNAL)} if REQUEUE_SIGNAL is not None else set())
        while True:
            try:
                data = os.read(self.read_fd, 64)
            except OSError:
                return
            at = time.monotonic()
            for signum in data:
                try:
                    top = _active[-1]  # (the main thread may restore the last one meanwhile)
                except IndexError:
                    continue
                if signum in ours:
                    top._arrived(signum, at)


def _after_fork_in_child() -> None:
    """A forked child has no watcher thread: it must not write into its parent's pipe."""
    if _Watcher.running is not None:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        _Watcher.running = None


os.register_at_fork(after_in_child=_after_fork_in_child)
