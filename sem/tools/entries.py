"""What the checkpoint entries (``sem-eval``, ``sem-sample``, ``sem-export``) share: usage errors that
exit 2 with one line each and no traceback, console logging on stderr, the device, and loading a
checkpoint as a user's input (a missing or corrupt file is a usage error, not a crash).

Each entry is a ``@hydra.main`` app over its own ``conf/<entry>.yaml``; those configs set
``hydra.run.dir=.`` and ``hydra.output_subdir=null`` and leave logging to us, so an entry writes
nothing but what it is asked for (no ``outputs/`` folder, no log file).
"""

from __future__ import annotations

import logging
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:
    import torch
    from torch import nn

EXIT_USAGE = 2
# The repository's conf/ (as a file path: the console scripts import sem.* as modules, and Hydra would
# take a relative config_path as a Python package then).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

_started = False  # set once the app's own function runs: a SystemExit(1) after that is not Hydra's


def cli(app: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` app. Hydra exits 1 when the config does not compose (unknown key, wrong
    type, no such option); that is a usage error, so it leaves with exit code 2 instead (as ``launch.py``)."""
    try:
        app()
    except SystemExit as exc:
        if exc.code == 1 and not _started:
            raise SystemExit(EXIT_USAGE) from None
        raise


def start(cfg: DictConfig) -> None:
    """First call of every entry's main: console logging, then the config's missing values."""
    global _started
    _started = True
    _console_logging()
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as exc:  # e.g. an interpolation that does not resolve
        usage_error(f"the config does not resolve: {str(exc).splitlines()[0]}")
    if missing:
        usage_error(*(f"{key}: missing value (set it on the command line: {key}=...)" for key in missing))


def usage_error(*lines: str) -> NoReturn:
    """One ``error: ...`` line per problem on stderr, exit 2, no traceback."""
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(EXIT_USAGE)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _console_logging() -> None:
    """Messages to stderr (stdout carries the product: sampled text, the results table)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("pytorch_lightning", "lightning", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def device_of(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:i]``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name.startswith("cuda"):
        if name.startswith("cuda") and not torch.cuda.is_available():
            usage_error(f"device={name}: CUDA is not available on this machine (use device=cpu or device=auto)")
        try:
            return torch.device(name)
        except RuntimeError:
            pass
    usage_error(f"device={name!r}: expected auto, cpu or cuda")


def check_file(path: str) -> None:
    """A file that is not a zip archive is no checkpoint (every one torch.save writes is a zip): say so
    plainly, before torch.load's own message (about weights_only) could suggest otherwise."""
    file = Path(path).expanduser()
    if file.is_file() and not zipfile.is_zipfile(file):
        usage_error(f"ckpt={path}: not a checkpoint (not a torch zip archive: truncated, corrupt or "
                    "another kind of file)")


def _unreadable_export(exc: Exception) -> bool:
    """A truncated model.safetensors or a config.yaml that is not YAML (sem.training.restore lets them through)."""
    import yaml
    from safetensors import SafetensorError

    return isinstance(exc, (SafetensorError, yaml.YAMLError))


def load_checkpoint(path: str, device: torch.device) -> tuple[nn.Module, DictConfig]:
    """``sem.load(path)``; a checkpoint that is missing, corrupt or not ours is a usage error (exit 2)."""
    from sem.training.checkpoint import CheckpointError
    from sem.training.restore import load

    check_file(path)
    try:
        model, cfg = load(path, device)
    except CheckpointError as exc:
        usage_error(f"ckpt={path}: {exc}")
    except (KeyError, TypeError, ValueError, ImportError, AttributeError) as exc:
        # a config inside the file that no longer builds a model (renamed class, removed argument)
        usage_error(f"ckpt={path}: cannot rebuild the model from the config it holds: "
                    f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        if not _unreadable_export(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        usage_error(f"ckpt={path}: an exported directory that cannot be read ({type(exc).__name__}: {first})")
    return model, cfg
