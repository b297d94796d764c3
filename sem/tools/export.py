"""Export a checkpoint as ``model.safetensors`` + ``config.yaml`` (no pickle at all)::

    python -m sem.export ckpt=outputs/base/checkpoints/best.ckpt out=exported/base     # or sem-export

``sem.load(out)`` reads the directory back, bit-exact (see ``sem.training.restore.export``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from sem.tools.entries import CONF_DIR, check_file, start, usage_error
from sem.tools.entries import cli as _cli

log = logging.getLogger("sem.export")


@dataclass
class ExportConf:
    ckpt: str = MISSING  # a checkpoint file (or an exported directory: re-exported as is)
    out: str = MISSING  # the directory to write (created; existing files of the same names replaced)


ConfigStore.instance().store(name="export_schema", node=ExportConf)


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def app(cfg: DictConfig) -> None:
    start(cfg)
    from sem.training.checkpoint import CheckpointError
    from sem.training.restore import export

    check_file(cfg.ckpt)
    try:
        out = export(cfg.ckpt, cfg.out)
    except CheckpointError as exc:
        usage_error(f"ckpt={cfg.ckpt}: {exc}")
    except OSError as exc:  # out is not writable, or is a file
        usage_error(f"out={cfg.out}: cannot write there: {exc.strerror or exc}")
    log.info("exported %s to %s (model.safetensors + config.yaml); load it with sem.load(%r)",
             cfg.ckpt, out, str(out))


def cli() -> None:
    """``sem-export``: see the module docstring."""
    _cli(app)


if __name__ == "__main__":
    cli()
