"""sem/record/lock.py: one process per run directory (flock), the holder named, released on exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sem.record.lock import LOCK_NAME, RunDirBusy, RunLock, busy, hold, release


def test_a_second_lock_on_the_same_dir_names_the_holder(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirBusy, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()  # free again


def test_hold_is_once_per_process_and_release_lets_go(tmp_path: Path) -> None:
    assert hold(tmp_path) is hold(tmp_path)
    with pytest.raises(RunDirBusy):
        RunLock(tmp_path).acquire()
    release(tmp_path)
    RunLock(tmp_path).acquire().release()


def test_a_killed_holder_leaves_the_dir_free(tmp_path: Path) -> None:
    code = (f"import os, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            "from sem.record.lock import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "held" and proc.returncode == -9
    assert (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()  # the kernel released the dead holder's lock


def test_busy_names_another_holder_and_writes_nothing(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert busy(fresh) is None and not fresh.exists()  # nothing created to ask
    other = RunLock(tmp_path).acquire()  # as another process would hold it (a second descriptor)
    before = (tmp_path / LOCK_NAME).read_bytes()
    assert (busy(tmp_path) or "").startswith(f"{tmp_path} is in use by another run (pid {os.getpid()} on ")
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    with pytest.raises(RunDirBusy):  # asking did not take or weaken the holder's lock
        RunLock(tmp_path).acquire()
    other.release()
    assert busy(tmp_path) is None
    hold(tmp_path)
    assert busy(tmp_path) is None  # this process's own lock is not "another run"
    release(tmp_path)
