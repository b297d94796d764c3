"""The composition root's one reading of this process's ranks (``bind_ranks``), before anything is
written: the run-dir lock, ``summary.json``, the ledger and the final scores are global rank 0's."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

# At import, with the other imports of start-up: a stop signal during an import in a Hydra callback
# would leave a module half-imported (sem.training.preemption abandons start-up at once).
from sem.engines.lightning.cluster import cluster_ranks
from sem.training.distributed import Ranks, set_ranks

# What the Lightning environment needs on every node of a multi-node run started by hand (Lightning's
# docs: the same command on each node); a cluster launcher (torchrun, srun, mpirun) sets its own.
BY_HAND = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def bind_ranks(cfg: DictConfig) -> tuple[Ranks, list[str]]:
    """Read this process's ranks from the cluster environment (``sem.engines.lightning.cluster``) for the
    run ``cfg`` describes and set them for every layer (``sem.training.distributed.ranks``); with the
    problems of that environment against the config (one line each; a single process's ranks where the
    environment itself is refused)."""
    per_node, num_nodes = _shape(cfg)
    try:
        ranks = cluster_ranks(per_node, num_nodes)
    except (RuntimeError, ValueError) as exc:  # Lightning refuses a SLURM layout it cannot read
        set_ranks(None)
        return Ranks(), [f"the cluster environment: {exc}"]
    set_ranks(ranks)
    return ranks, _problems(cfg, ranks, per_node, num_nodes)


def _problems(cfg: DictConfig, ranks: Ranks, per_node: int, num_nodes: int) -> list[str]:
    """The cluster's processes against the config's: their count, and the variables a multi-node run
    started by hand needs on each node."""
    shape = f"trainer.devices={cfg.trainer.devices} x trainer.num_nodes={cfg.trainer.num_nodes}"
    if ranks.external and ranks.world_size != per_node * num_nodes:
        return [f"{shape}: {per_node * num_nodes} processes, but {ranks.environment} started "
                f"{ranks.world_size}: make them agree (srun --ntasks / torchrun --nnodes x --nproc-per-node)"]
    missing = [k for k in BY_HAND if k not in os.environ]
    if not ranks.external and num_nodes > 1 and missing:
        return [f"{shape}: a run on several nodes started by hand needs {', '.join(BY_HAND)} on every node "
                f"({', '.join(missing)} not set here), or a cluster launcher (torchrun, srun); see docs/clusters.md"]
    return []


def _shape(cfg: DictConfig) -> tuple[int, int]:
    """(processes per node, nodes) as the config asks; (1, 1) where a value is wrong (validation says so)."""
    from sem.config.resources import device_of, ranks_here

    try:
        num_nodes: Any = cfg.trainer.num_nodes
        return max(1, ranks_here(cfg, device_of(cfg))), max(1, int(num_nodes))
    except Exception:
        return 1, 1
