"""What produced a run: code version, packages, hardware, command line (``env.json``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "pytorch-lightning", "hydra-core", "omegaconf", "numpy", "rich", "matplotlib", "wandb")


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    xpu = getattr(torch, "xpu", None)
    hw["xpu"] = ([xpu.get_device_name(i) for i in range(xpu.device_count())]
                 if xpu is not None and xpu.is_available() else [])
    return hw


def environment(parent_checkpoint: str | None = None) -> dict[str, Any]:
    """The ``env.json`` record; ``parent_checkpoint`` is what the run resumed or branched from."""
    repo = Path(__file__).resolve().parent.parent
    sha = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {
        "git_sha": sha,
        "git_dirty": bool(status) if status is not None else None,
        "packages": _versions(),
        "hardware": _hardware(),
        "command_line": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "parent_checkpoint": parent_checkpoint,
    }
