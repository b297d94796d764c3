"""One checkpoint file: its format, atomic writes (temp file, fsync, rename, fsync of the directory),
the pointers, the sha256 and the sidecar, RNG state, and ``verify`` (``weights_only=True`` loading
checked against the sidecar, a sem payload, finite weights). ``checkpoint.CheckpointManager`` decides
which files exist; this module says what one is."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sem.training.preemption import at_exit_now

FORMAT = 1
# Temporaries being written (checkpoints, sidecars, links): a process that exits at once on a second stop
# signal removes them first (``sem.training.preemption.at_exit_now``), so no partial file is left behind.
IN_FLIGHT: set[Path] = set()


def remove_in_flight() -> None:
    for tmp in list(IN_FLIGHT):
        tmp.unlink(missing_ok=True)
    IN_FLIGHT.clear()


at_exit_now.append(remove_in_flight)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, foreign, unsafe or non-finite."""


def config_hash(config: Any) -> str:
    """A short stable hash of a resolved config (plain containers)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as weights-only-loadable values (tensors, ints, lists)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        state["xpu"] = [xpu.get_rng_state(i) for i in range(xpu.device_count())]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    xpu = getattr(torch, "xpu", None)
    if "xpu" in state and xpu is not None and xpu.is_available():
        for i, s in enumerate(state["xpu"]):
            xpu.set_rng_state(s, i)


def _py(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        out["sem"] = importlib.metadata.version("sem")
    except importlib.metadata.PackageNotFoundError:
        out["sem"] = "unknown"
    return out


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names of floating/complex tensors in ``tree`` holding NaN or inf."""
    bad: list[str] = []
    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and not bool(torch.isfinite(tree).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            bad += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            bad += nonfinite_tensors(v, f"{prefix}[{i}]")
    return bad


def _mkstemp(path: Path) -> tuple[int, Path]:
    """A temp file beside ``path`` with the permissions a plain ``open`` would give (mkstemp: 0600)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    IN_FLIGHT.add(Path(name))  # (the writer discards it once moved into place or removed)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = _mkstemp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        IN_FLIGHT.discard(tmp)


def _point(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to ``target`` (same directory), atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    IN_FLIGHT.add(tmp)
    try:
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
    finally:
        IN_FLIGHT.discard(tmp)


MODEL_PREFIX = "model."  # the model's keys inside a checkpoint's state_dict (the Lightning module's name)


def model_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own entries of a training checkpoint's state_dict."""
    return {k[len(MODEL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}


def sidecar_of(path: Path) -> Path:
    return path.with_suffix(".json")


def verify(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load ``path`` with ``weights_only=True`` and check it against its sidecar (when it has one),
    that it is a sem checkpoint and that its weights are finite."""
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    real = path.resolve()
    side_path = sidecar_of(real)
    sidecar = None
    if side_path.is_file():
        try:
            sidecar = json.loads(side_path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"unreadable sidecar {side_path.name}: {exc}") from None
        if sidecar.get("sha256") and file_sha256(real) != sidecar["sha256"]:
            raise CheckpointError(f"sha256 does not match its sidecar {side_path.name} (truncated or altered)")
    if not zipfile.is_zipfile(real):
        raise CheckpointError("not a torch checkpoint (not a zip archive: truncated, corrupt or another format)")
    try:
        payload = torch.load(real, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError (code in the file), RuntimeError (not a zip), EOFError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            first = "it holds Python objects, not only tensors and plain data (refused: loading could run code)"
        raise CheckpointError(f"cannot be loaded safely: {first}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "sem" not in payload:
        raise CheckpointError("not a sem checkpoint (no 'state_dict' and 'sem' entries)")
    bad = nonfinite_tensors(payload["state_dict"], "state_dict")
    if bad:
        raise CheckpointError(f"non-finite weights in {', '.join(bad[:3])}")
    return payload
