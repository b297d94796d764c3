"""CheckpointManager (sem/training/checkpoint.py): retention as a property of any sequence of saves and
metrics, atomic saves (a real kill mid-save, a full disk), and verified loading that skips corrupt,
truncated, foreign, unsafe and non-finite files in favour of the previous valid one."""

from __future__ import annotations

import errno
import functools
import io
import json
import logging
import os
import pathlib
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sem.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    file_sha256,
    nonfinite_tensors,
    rng_state,
    set_rng_state,
    sidecar_of,
    verify,
)
from tests.conftest import ROOT

LOGGER = "sem.training.checkpoint"


def payload(step: int, w: torch.Tensor | None = None) -> dict[str, Any]:
    return {"state_dict": {"w": torch.randn(2) if w is None else w}, "sem": {}, "global_step": step}


def files(d: Path) -> list[str]:
    """Everything in the directory, hidden temp files included."""
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def flip_middle(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def assert_one_line(text: str) -> None:
    assert text and "\n" not in text, repr(text)


# ------------------------------------------------------------------------------------ retention

VALUES = st.sampled_from([0.5, 1.0, 1.25, 2.0, 3.5])  # few values: ties between checkpoints happen
SAVE = st.tuples(st.just("save"), st.integers(1, 3), st.none() | st.sampled_from(["short", "long"]),
                 st.none() | VALUES)
RECORD = st.tuples(st.just("metrics"), st.integers(0, 50), VALUES)  # for the n-th step saved so far
RESTART = st.tuples(st.just("restart"))
OPS = st.lists(st.sampled_from([SAVE, SAVE, SAVE, RECORD, RECORD, RESTART]).flatmap(lambda op: op),
               min_size=1, max_size=20)


def expected_on_disk(saved: dict[int, str | None], scored: dict[int, float], keep_last: int,
                     keep_best: int, mode: str) -> tuple[set[int], int | None]:
    """From the whole history (not the directory): the steps that must remain, and the best step."""
    newest = max(saved)
    periodic = sorted(s for s, m in saved.items() if m is None)
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted(scored, key=lambda s: (sign * scored[s], -s))  # ties: the newer ranks first
    must = {newest} | {s for s, m in saved.items() if m is not None} | set(periodic[-keep_last:])
    must |= set(ranked[:max(keep_best, 1)])
    return must, ranked[0] if ranked else None


def check_directory(d: Path, saved: dict[int, str | None], scored: dict[int, float], keep_last: int,
                    keep_best: int, mode: str) -> set[int]:
    must, best = expected_on_disk(saved, scored, keep_last, keep_best, mode)
    ckpts = {p.name for p in d.glob("*.ckpt") if not p.is_symlink()}
    on_disk = {int(name.rsplit("_", 1)[1].split(".")[0]) for name in ckpts}
    # the newest, the best, every milestone and the newest keep_last periodic ones are there ...
    assert must <= on_disk, (sorted(must - on_disk), sorted(on_disk))
    # ... and nothing else: at most keep_last periodic + keep_best best + milestones + the newest
    assert on_disk == must, (sorted(on_disk - must), sorted(must))
    assert len(on_disk) <= keep_last + max(keep_best, 1) + sum(m is not None for m in saved.values()) + 1
    for name in ckpts:  # each under the name its kind gives it, with a sidecar that matches
        step = int(name.rsplit("_", 1)[1].split(".")[0])
        milestone = saved[step]
        assert name == (f"step_{step:07d}.ckpt" if milestone is None else f"stage_{milestone}_step_{step:07d}.ckpt")
        side = strict_json((d / name).with_suffix(".json").read_text())
        assert side["step"] == step and side["file"] == name
        assert side["sha256"] == file_sha256(d / name)
        assert side["metrics"].get("val/bpb") == scored.get(step)
    assert {p.stem for p in d.glob("*.json")} == {Path(n).stem for n in ckpts}  # no orphan sidecars
    assert not [n for n in files(d) if n.endswith(".tmp")]
    newest = max(saved)
    assert os.readlink(d / "last.ckpt") == CheckpointManager(d).path_for(newest, saved[newest]).name
    if best is None:
        assert not (d / "best.ckpt").is_symlink()
    else:
        assert os.readlink(d / "best.ckpt") == CheckpointManager(d).path_for(best, saved[best]).name
    return on_disk


@settings(max_examples=30, deadline=None)
@given(ops=OPS, keep_last=st.integers(1, 4), keep_best=st.integers(0, 3), mode=st.sampled_from(["min", "max"]))
def test_retention_keeps_newest_best_milestones_and_the_last_n(ops: list[tuple], keep_last: int, keep_best: int,
                                                               mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "checkpoints"
        make = functools.partial(CheckpointManager, d, keep_last=keep_last, keep_best=keep_best, mode=mode)
        manager = make()
        saved: dict[int, str | None] = {}  # every step ever saved -> its milestone
        scored: dict[int, float] = {}  # val/bpb given to a checkpoint while it existed (never overwritten)
        on_disk: set[int] = set()
        step = 0
        for op in ops:
            if op[0] == "restart":  # a new process on the same directory
                manager = make()
                continue
            if op[0] == "save":
                _, gap, milestone, value = op
                step += gap
                metrics = {"val/bpb": value, "train/loss": 9.0} if value is not None else {"train/loss": 9.0}
                path = manager.save(payload(step), step=step, metrics=metrics, milestone=milestone)
                assert path == manager.path_for(step, milestone) and path.is_file()
                saved[step] = milestone
                if value is not None:
                    scored[step] = value
            else:
                if not saved:
                    continue
                _, index, value = op
                target = sorted(saved)[index % len(saved)]
                if target in scored:
                    continue
                manager.record_metrics(target, {"val/bpb": value, "val/loss": float("nan")})
                if target in on_disk:  # measured too late for a deleted checkpoint: nothing to rank
                    scored[target] = value
            on_disk = check_directory(d, saved, scored, keep_last, keep_best, mode)
        if saved:
            found = CheckpointManager(d).newest_valid()
            assert found is not None and found[1]["global_step"] == max(saved)


def test_a_new_manager_on_an_existing_directory_applies_the_same_retention(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path, keep_last=3, keep_best=1)
    for step, bpb in ((1, 1.0), (2, 3.0), (3, 2.0)):
        first.save(payload(step), step=step, metrics={"val/bpb": bpb})
    first.save(payload(4), step=4, milestone="long")
    assert len(list(tmp_path.glob("*step_*.ckpt"))) == 4
    # a restart with a tighter policy: the first save applies it to what the old process left
    second = CheckpointManager(tmp_path, keep_last=1, keep_best=1)
    assert second.last() == tmp_path / "stage_long_step_0000004.ckpt"
    assert second.best() == tmp_path / "step_0000001.ckpt"
    second.save(payload(5), step=5, metrics={"val/bpb": 2.5})
    assert sorted(p.name for p in tmp_path.glob("*step_*.ckpt")) == [
        "stage_long_step_0000004.ckpt", "step_0000001.ckpt", "step_0000005.ckpt"]
    assert os.readlink(tmp_path / "best.ckpt") == "step_0000001.ckpt"
    assert os.readlink(tmp_path / "last.ckpt") == "step_0000005.ckpt"
    # metrics measured after the restart rank the old checkpoints too
    second.record_metrics(5, {"val/bpb": 0.5})
    assert os.readlink(tmp_path / "best.ckpt") == "step_0000005.ckpt"
    assert not (tmp_path / "step_0000001.ckpt").exists() and not (tmp_path / "step_0000001.json").exists()


def test_the_best_is_kept_even_with_keep_best_zero(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1, keep_best=0, mode="max")
    manager.save(payload(1), step=1, metrics={"val/bpb": 2.0})
    manager.save(payload(2), step=2, metrics={"val/bpb": 1.0})
    manager.save(payload(3), step=3)
    assert sorted(p.name for p in tmp_path.glob("step_*.ckpt")) == ["step_0000001.ckpt", "step_0000003.ckpt"]
    assert os.readlink(tmp_path / "best.ckpt") == "step_0000001.ckpt"


def test_a_checkpoint_deleted_by_hand_leaves_no_dangling_pointer(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(payload(1), step=1, metrics={"val/bpb": 2.0})
    second = manager.save(payload(2), step=2, metrics={"val/bpb": 1.0})
    second.unlink(), sidecar_of(second).unlink()
    manager.record_metrics(1, {"val/bpb": 1.5})
    assert os.readlink(tmp_path / "best.ckpt") == "step_0000001.ckpt"
    assert not (tmp_path / "last.ckpt").is_symlink() or (tmp_path / "last.ckpt").exists()
    assert CheckpointManager(tmp_path).newest_valid()[1]["global_step"] == 1


@pytest.mark.parametrize(("kwargs", "key"), [({"keep_last": 0}, "checkpoint.keep_last=0"),
                                             ({"keep_best": -1}, "checkpoint.keep_best=-1"),
                                             ({"every_n_steps": -1}, "checkpoint.every_n_steps=-1"),
                                             ({"mode": "avg"}, "checkpoint.mode='avg'")])
def test_bad_settings_name_the_key(tmp_path: Path, kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        CheckpointManager(tmp_path, **kwargs)


def test_due_counts_optimizer_steps(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, every_n_steps=5)
    assert [n for n in range(0, 16) if manager.due(n)] == [5, 10, 15]
    assert not any(CheckpointManager(tmp_path, every_n_steps=0).due(n) for n in range(20))


# ---------------------------------------------------------------------------------- atomic save

KILLED_SAVE = r"""
import io, os, sys
import torch
from sem.training.checkpoint import CheckpointManager

directory, where = sys.argv[1], sys.argv[2]
real_save, real_replace = torch.save, os.replace

def dying_save(obj, f, *args, **kwargs):  # half the bytes reach the file, then the process is gone
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os._exit(1)

def dying_replace(src, dst):  # the payload is complete and its sidecar written, the rename never happens
    if str(dst).endswith("step_0000002.ckpt"):
        os._exit(1)
    return real_replace(src, dst)

if where == "write":
    torch.save = dying_save
else:
    os.replace = dying_replace
CheckpointManager(directory).save({"state_dict": {"w": torch.ones(2)}, "sem": {}, "global_step": 2}, step=2)
sys.exit(0)  # not reached: the save was killed
"""


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path: Path, where: str) -> None:
    first = CheckpointManager(tmp_path).save(payload(1), step=1)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), where], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # killed where intended
    leftovers = [n for n in files(tmp_path) if n.endswith(".tmp")]
    assert leftovers and all(n.startswith(".step_0000002.ckpt.") for n in leftovers)  # it died mid-save
    assert not (tmp_path / "step_0000002.ckpt").exists()  # no partial file under a final name
    assert os.readlink(tmp_path / "last.ckpt") == first.name
    found = CheckpointManager(tmp_path).newest_valid()
    assert found is not None and found[0] == first and found[1]["global_step"] == 1
    # the next run saves the same step normally; the leftover temp file is never taken for a checkpoint
    manager = CheckpointManager(tmp_path)
    second = manager.save(payload(2), step=2)
    assert second is not None and verify(second)["global_step"] == 2
    assert CheckpointManager(tmp_path).newest_valid()[0] == second


@pytest.mark.parametrize("where", ["payload", "sidecar"])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture, where: str) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save(payload(1), step=1)
    before = files(tmp_path)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "payload":
        real_save = torch.save

        def save_until_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[:100])
            raise full

        monkeypatch.setattr(torch, "save", save_until_full)
    else:
        real_mkstemp, real_fsync = tempfile.mkstemp, os.fsync
        sidecar_fds: set[int] = set()

        def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, name = real_mkstemp(*args, **kwargs)
            if ".json." in Path(name).name:
                sidecar_fds.add(fd)
            return fd, name

        def fsync(fd: int) -> None:  # the sidecar's temp file cannot be flushed to disk
            if fd in sidecar_fds:
                raise full
            real_fsync(fd)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fsync", fsync)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert manager.save(payload(2), step=2) is None
    assert files(tmp_path) == before  # no temp file, no sidecar, nothing under step 2
    assert verify(first)["global_step"] == 1
    assert os.readlink(tmp_path / "last.ckpt") == first.name
    assert any("step 2" in r.getMessage() and os.strerror(errno.ENOSPC) in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    monkeypatch.undo()  # space again: the same manager saves and retention moves on
    assert manager.save(payload(3), step=3) is not None
    assert CheckpointManager(tmp_path).newest_valid()[1]["global_step"] == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_never_saved(tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: float) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(payload(1), step=1)
    before = files(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = manager.save({"state_dict": {"layer": {"w": torch.tensor([1.0, bad])}}, "sem": {}}, step=2)
    assert result is None and files(tmp_path) == before and manager.last_saved_step == 1
    assert "state_dict.layer.w" in caplog.text


def test_nonfinite_tensors_names_float_and_complex_entries_only() -> None:
    tree = {"a": torch.tensor([1.0, float("nan")]), "b": [torch.ones(2), torch.tensor([complex(float("inf"), 0)])],
            "c": torch.tensor([1, 2]), "d": {"e": torch.tensor(float("-inf"))}, "f": 3.0}
    assert nonfinite_tensors(tree) == ["a", "b[1]", "d.e"]
    assert nonfinite_tensors({"w": torch.ones(3)}) == []


def test_a_non_finite_metric_does_not_stop_a_save(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    path = manager.save(payload(1), step=1, metrics={"train/loss": float("nan"), "val/bpb": 1.5})
    assert path is not None and verify(path)["global_step"] == 1
    side = strict_json(sidecar_of(path).read_text())
    assert side["metrics"].get("train/loss") is None and side["metrics"]["val/bpb"] == 1.5


# ------------------------------------------------------------------------------- verified loading


class Touch:
    """Unpickling this runs ``Path.touch(marker)``: code execution hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def _malicious(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "sem": {}, "evil": Touch(marker)}, path)


def _with_forged_sidecar(path: Path, marker: Path) -> None:
    """Malicious, with a sidecar an attacker wrote to match: the checksum cannot save us, weights_only must."""
    _malicious(path, marker)
    side = json.loads((path.parent / "step_0000001.json").read_text())
    side.update(file=path.name, step=2, sha256=file_sha256(path), bytes=path.stat().st_size)
    sidecar_of(path).write_text(json.dumps(side))


def _saved_then(alter: Any) -> Any:
    def make(path: Path, marker: Path) -> None:
        CheckpointManager(path.parent, keep_last=5).save(payload(2), step=2)
        alter(path)
    return make


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_sha(path: Path) -> None:
    side = json.loads(sidecar_of(path).read_text())
    side["sha256"] = "0" * 64
    sidecar_of(path).write_text(json.dumps(side))


BAD_FILES = {
    "corrupt": _saved_then(flip_middle),
    "truncated": _saved_then(_truncate),
    "truncated, no sidecar": _saved_then(lambda p: (_truncate(p), sidecar_of(p).unlink())),
    "sha256 mismatch": _saved_then(_wrong_sha),
    "empty": lambda path, marker: path.write_bytes(b""),
    "foreign torch file": lambda path, marker: torch.save({"a": 1}, path),
    "random bytes": lambda path, marker: path.write_bytes(random.Random(0).randbytes(4096)),
    "non-finite weights": lambda path, marker: torch.save(
        {"state_dict": {"w": torch.tensor([0.0, float("nan")])}, "sem": {}, "global_step": 2}, path),
    "malicious": _malicious,
    "malicious, forged sidecar": _with_forged_sidecar,
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_newest_file_is_skipped_for_the_previous_valid_one(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 kind: str) -> None:
    d = tmp_path / "checkpoints"
    marker = tmp_path / "MARKER"
    first = CheckpointManager(d, keep_last=5).save(payload(1), step=1)
    bad = d / "step_0000002.ckpt"
    BAD_FILES[kind](bad, marker)
    assert bad.is_file()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = CheckpointManager(d).newest_valid()
    assert found is not None and found[0] == first and found[1]["global_step"] == 1
    skipped = [r.getMessage() for r in caplog.records if bad.name in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint: skipping")
    assert_one_line(skipped[0])
    with pytest.raises(CheckpointError) as exc:
        verify(bad)
    assert_one_line(str(exc.value))
    with pytest.raises(CheckpointError):
        CheckpointManager(d).load(bad)
    assert not marker.exists()  # the code in a malicious file never ran


def test_the_malicious_file_would_run_code_if_loaded_unsafely(tmp_path: Path) -> None:
    """The control for the test above: the payload really does execute on a plain unpickle."""
    marker = tmp_path / "MARKER"
    _malicious(tmp_path / "evil.ckpt", marker)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_a_checkpoint_without_its_sidecar_is_still_found(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(payload(1), step=1)
    second = manager.save(payload(2, torch.tensor([4.0, 5.0])), step=2)
    sidecar_of(second).unlink()  # the sidecar is lost: the payload alone still loads
    found = CheckpointManager(tmp_path).newest_valid()
    assert found is not None and found[0] == second
    assert torch.equal(found[1]["state_dict"]["w"], torch.tensor([4.0, 5.0]))


def test_nothing_to_resume_from(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "missing").newest_valid() is None
    assert CheckpointManager(tmp_path).newest_valid() is None
    with pytest.raises(CheckpointError, match="no such file"):
        verify(tmp_path / "step_0000001.ckpt")


def test_a_loaded_payload_is_reused_once_not_forever(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    first = manager.save(payload(1), step=1)
    second = manager.save(payload(2), step=2)
    assert manager.load(second)["global_step"] == 2  # resume: read and verified
    manager.load(second)  # Lightning's CheckpointIO asks again: the one reuse
    flip_middle(second)
    found = manager.newest_valid()  # e.g. a health rollback later in the same run
    assert found is not None and found[0] == first


# ------------------------------------------------------------------------------------------ RNG


def _draw() -> list[float]:
    # gauss and standard_normal first: they return the values cached in the saved states
    return [random.gauss(0, 1), *np.random.standard_normal(3).tolist(), *torch.rand(4).tolist(), random.random()]


def test_rng_state_round_trips_through_a_weights_only_file() -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both states
    buf = io.BytesIO()
    torch.save({"rng": rng_state()}, buf)
    expected = _draw()
    assert _draw() != expected  # the generators moved on
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True)["rng"])
    assert _draw() == expected


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path: Path) -> None:
    """A run resumed from its own step-2 checkpoint is a new branch: its old steps 3 and 4 must not win
    `last`, retention or a later resume=auto, and must not be deleted either."""
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3, 4):
        manager.save({"state_dict": {"w": torch.full((2,), float(step))}, "sem": {}, "global_step": step}, step=step)
    aside = CheckpointManager(tmp_path, keep_last=3).set_aside_after(2)
    assert aside is not None and sorted(p.name for p in aside.glob("*.ckpt")) == ["step_0000003.ckpt",
                                                                               "step_0000004.ckpt"]
    fresh = CheckpointManager(tmp_path, keep_last=3)
    assert [s.step for s in fresh.scan()] == [2]  # (step 1 had aged out under keep_last=3)
    assert (tmp_path / "last.ckpt").resolve().name == "step_0000002.ckpt"
    found = fresh.newest_valid()
    assert found is not None and found[1]["global_step"] == 2
    assert CheckpointManager(tmp_path).set_aside_after(2) is None  # nothing newer: nothing moved


def test_a_payload_is_handed_on_only_when_kept(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    path = manager.save({"state_dict": {"w": torch.ones(2)}, "sem": {}, "global_step": 1}, step=1)
    assert path is not None
    first = manager.load(path)
    assert manager.load(path) is not first  # not kept: read and verified afresh
    kept = manager.load(path, keep=True)
    assert manager.load(path) is kept  # the engine's restore gets the resolved payload, once
    assert manager.load(path) is not kept


def test_a_process_exiting_at_once_leaves_no_temporary(tmp_path):
    """A second stop signal exits at once (os._exit): the temporaries being written are removed first."""
    from sem.training import checkpoint_file
    from sem.training.preemption import at_exit_now

    assert checkpoint_file.remove_in_flight in at_exit_now
    checkpoint_file._write_atomic(tmp_path / "done.json", b"{}")
    assert not checkpoint_file.IN_FLIGHT  # moved into place: nothing to remove
    fd, tmp = checkpoint_file._mkstemp(tmp_path / "step_0000001.ckpt")  # a save cut short mid-write
    os.write(fd, b"half a checkpoint")
    for clean_up in at_exit_now:
        clean_up()
    os.close(fd)
    assert not tmp.exists() and (tmp_path / "done.json").exists()
