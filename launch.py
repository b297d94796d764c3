"""Train SEM: `python launch.py [group=option ...] [key=value ...]` (add -m to sweep). See README.md."""

import hydra
from omegaconf import DictConfig

from sem.run import cli, main


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float | None:
    return main(cfg)


if __name__ == "__main__":
    cli(app)
