"""sem.training.allocator: glibc told to keep freed blocks (the step's page faults and time it saves are
measured in bench/, BENCHMARKS.md), said in the log, off with SEM_MALLOC_TUNING=0, a no-op elsewhere."""

from __future__ import annotations

import platform

import pytest

from sem.training.allocator import ENV, keep_freed_memory

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt's thresholds are glibc's")


@glibc
def test_the_note_names_the_setting_and_how_to_turn_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    note = keep_freed_memory()
    assert note is not None and "32 MiB" in note and f"{ENV}=0" in note
    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is None


def test_elsewhere_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert keep_freed_memory() is None
