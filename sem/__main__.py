"""``python -m sem [group=option ...] [key=value ...]``: the same as ``python launch.py`` (the configs in
the checkout's ``conf/``). Extra DDP ranks of a job are started this way (``sem.engines.lightning.strategy``)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sem.run import cli, main


CONF = Path(__file__).resolve().parents[1] / "conf"  # the checkout's configs (pip install -e .)


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float | None:
    return main(cfg)


if __name__ == "__main__":
    cli(app)
