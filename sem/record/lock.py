"""One process per run directory: an exclusive ``fcntl.flock`` on ``<run dir>/run.lock``, held for the
life of the run. The kernel releases it when the process dies (a SIGKILLed run never blocks its own
resume). The file says who holds it (pid, host, start time, command), so a second process can name the
holder. Extra DDP ranks share rank zero's lock and take none of their own.

On NFS, ``flock`` is emulated with POSIX byte-range locks (Linux >= 2.6.12): it works between hosts
when the server supports NLM locking, and a client that loses its server's lease loses the lock; on a
file system without locking, taking the lock fails and the run says so (one line, exit 2)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory; the message names it."""


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``RunDirBusy`` naming the holder (nothing is written then)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirBusy(f"{self.path.parent} is in use by another run ({holder})") from None
        except OSError as exc:
            os.close(fd)
            raise RunDirBusy(f"{self.path.parent}: cannot lock {LOCK_NAME} ({exc.strerror or exc}); "
                             "a file system without locking?") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": [Path(sys.argv[0]).name, *sys.argv[1:]]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _holder(fd: int) -> str:
    try:
        info: dict[str, Any] = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    command = " ".join(info.get("command") or [])
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: {command}"


def busy(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir`` if another process does, else None; creates and writes nothing (a single
    run asks this first, so a second process leaves at once, before the seconds its validation takes)."""
    path = Path(run_dir) / LOCK_NAME
    if Path(run_dir).resolve() in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file yet (or unreadable: ``acquire`` says so)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (a read-only descriptor takes a shared lock)
    except BlockingIOError:
        return f"{path.parent} is in use by another run ({_holder(fd)})"
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


_held: dict[Path, RunLock] = {}  # the run dirs this process holds


def hold(run_dir: str | Path) -> RunLock:
    """This process's lock on ``run_dir``: taken now, or the one it holds already (a single run takes it
    before Hydra writes anything, and the run itself asks again)."""
    key = Path(run_dir).resolve()
    if key not in _held:
        _held[key] = RunLock(key).acquire()
    return _held[key]


def release(run_dir: str | Path) -> None:
    """Let go of ``run_dir`` (a sweep job ends; the next job of the process takes its own)."""
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()
