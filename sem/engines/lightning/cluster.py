"""Where this process stands in a run, read from the cluster environment Lightning itself selects
(``lightning_fabric.plugins.environments``: torchelastic/torchrun first, then SLURM, LSF, MPI, else the
Lightning environment: ``NODE_RANK``/``LOCAL_RANK`` or a process that starts its own ranks). Every layer
reads the result through ``sem.training.distributed.ranks()``; nothing else reads rank variables."""

from __future__ import annotations

import os
from types import SimpleNamespace

from lightning_fabric.connector import _Connector
from lightning_fabric.plugins.environments import ClusterEnvironment, LightningEnvironment

from sem.training.distributed import Ranks


def environment() -> ClusterEnvironment:
    """The cluster environment Lightning's connector picks for a Trainer given none (its own order)."""
    _slurm_tasks_per_node()
    return _Connector._choose_and_init_cluster_environment(SimpleNamespace(_cluster_environment_flag=None))


def _slurm_tasks_per_node() -> None:
    """``srun --ntasks=N --nodes=M`` sets ``SLURM_TASKS_PER_NODE`` (``2(x2)``, ``2,2``) but not
    ``SLURM_NTASKS_PER_NODE``, which Lightning's SLURM environment insists on: where SLURM's own count is
    the same on every node, it is that number. An uneven layout (``2,1``) stays refused by Lightning."""
    given = os.environ.get("SLURM_TASKS_PER_NODE")
    if given is None or "SLURM_NTASKS_PER_NODE" in os.environ:
        return
    counts = {part.split("(")[0] for part in given.split(",")}
    if len(counts) == 1 and counts.pop().isdigit():
        os.environ["SLURM_NTASKS_PER_NODE"] = given.split("(")[0].split(",")[0]


def cluster_ranks(per_node: int, num_nodes: int, env: ClusterEnvironment | None = None) -> Ranks:
    """This process's ranks in a run of ``per_node`` processes on each of ``num_nodes`` nodes, as Lightning's
    strategy sets them (global = node x per_node + local where the environment leaves it to Lightning)."""
    env = env if env is not None else environment()
    env.set_global_rank(env.node_rank() * per_node + env.local_rank())  # a no-op where the cluster says
    env.set_world_size(num_nodes * per_node)
    return Ranks(env.global_rank(), env.local_rank(), env.node_rank(), env.world_size(), type(env).__name__,
                 external=not isinstance(env, LightningEnvironment))
