"""One notion of rank (``sem.engines.lightning.cluster``: the cluster environment Lightning selects, for
the Lightning env, torchrun, SLURM), the checks of a cluster against the config, and the bounded join and
heartbeat of ``sem.training.distributed`` (a peer that never comes, one that goes silent, one that dies).
The launchers themselves, on one host standing in for two nodes: tests/integration/test_clusters.py."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from sem.engines.cluster import bind_ranks
from sem.engines.lightning.cluster import cluster_ranks
from sem.training.distributed import Heartbeat, JoinFailed, Ranks, join, ranks, set_ranks
from tests.conftest import compose_cfg

# Every variable a launcher may have left in this process: each case starts from none of them.
CLUSTER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "GROUP_RANK",
               "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
               "SLURM_NODEID", "SLURM_JOB_NAME", "SLURM_JOB_ID", "SLURM_NODELIST", "OMPI_COMM_WORLD_SIZE",
               "LSB_JOBID", "JSM_NAMESPACE_RANK", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SRUN = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
        "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "1234", "SLURM_NODELIST": "node[1-2]",
        "SLURM_TASKS_PER_NODE": "2(x2)"}  # what srun --ntasks=4 --nodes=2 sets (no SLURM_NTASKS_PER_NODE)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in CLUSTER_ENV:
        monkeypatch.delenv(key, raising=False)

    def set_(values: dict[str, str]) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
    yield set_
    set_ranks(None)


@pytest.mark.parametrize("values, per_node, nodes, expected", [
    ({}, 1, 1, (0, 0, 0, 1, "LightningEnvironment", False)),
    ({"NODE_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, 1, 2, (1, 0, 1, 2, "LightningEnvironment", False)),
    ({"NODE_RANK": "1", "LOCAL_RANK": "1"}, 2, 2, (3, 1, 1, 4, "LightningEnvironment", False)),  # a rank sem started
    (TORCHRUN, 2, 2, (3, 1, 1, 4, "TorchElasticEnvironment", True)),
    (SRUN, 2, 2, (2, 0, 1, 4, "SLURMEnvironment", True)),
    ({**SRUN, "SLURM_JOB_NAME": "bash"}, 1, 1, (0, 0, 0, 1, "LightningEnvironment", False)),  # salloc shell
])
def test_ranks_come_from_the_environment_lightning_selects(env: Any, values: dict[str, str], per_node: int,
                                                          nodes: int, expected: tuple[Any, ...]) -> None:
    env(values)
    r = cluster_ranks(per_node, nodes)
    assert (r.global_rank, r.local_rank, r.node_rank, r.world_size, r.environment, r.external) == expected


def test_node_one_of_a_hand_started_run_is_not_global_zero(env: Any) -> None:
    """The case that locked node 1 out (RANK, SLURM_PROCID and LOCAL_RANK unset, NODE_RANK=1): it is
    global rank 1, so it neither takes the run-dir lock nor writes the run's files."""
    env({"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    set_ranks(cluster_ranks(1, 2))
    from sem.record.summary import is_global_zero

    assert not is_global_zero() and ranks().global_rank == 1
    set_ranks(None)
    assert is_global_zero()  # nothing bound: a single process


def test_a_cluster_of_another_size_than_the_config_is_a_config_problem(env: Any) -> None:
    env(SRUN)
    cfg = compose_cfg(["debug=smoke", "strategy=ddp", "trainer.num_nodes=2"])  # 1 x 2 = 2, srun started 4
    problems = bind_ranks(cfg)[1]
    assert len(problems) == 1 and "trainer.num_nodes=2" in problems[0] and "started 4" in problems[0]


def test_an_uneven_slurm_layout_is_a_config_problem(env: Any) -> None:
    env({**SRUN, "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"})
    problems = bind_ranks(compose_cfg(["debug=smoke"]))[1]
    assert len(problems) == 1 and "--ntasks-per-node" in problems[0] and ranks() == Ranks()


def test_several_nodes_by_hand_need_the_lightning_variables(env: Any) -> None:
    cfg = compose_cfg(["debug=smoke", "strategy=ddp", "trainer.num_nodes=2"])
    env({"NODE_RANK": "0"})
    problems = bind_ranks(cfg)[1]
    assert len(problems) == 1 and "MASTER_ADDR, MASTER_PORT not set here" in problems[0]
    env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert bind_ranks(cfg)[1] == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_that_never_comes_is_named_within_the_join_timeout() -> None:
    me = Ranks(0, 0, 0, 3, "LightningEnvironment")
    started = time.monotonic()
    with pytest.raises(JoinFailed, match=r"global ranks 1, 2 never joined within strategy.join_timeout_s=1 s: "
                                         r"1 of 3 processes came \(rank 0 from node 0"):
        join(me, "127.0.0.1", free_port(), "gloo", join_timeout_s=1, timeout_s=60)
    assert time.monotonic() - started < 5


def test_rank_zero_that_never_comes_is_named_within_the_join_timeout() -> None:
    me = Ranks(1, 0, 1, 2, "LightningEnvironment")
    started = time.monotonic()
    with pytest.raises(JoinFailed, match=r"global rank 1 \(node 1\) could not reach global rank 0's rendezvous"):
        join(me, "127.0.0.1", free_port(), "gloo", join_timeout_s=1, timeout_s=60)
    assert time.monotonic() - started < 5


class FakeStore:
    """The three store calls the heartbeat makes, in memory; ``fail`` makes every call raise."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.fail = False
        self.lock = threading.Lock()

    def _check(self) -> None:
        if self.fail:
            raise RuntimeError("Connection reset by peer")

    def add(self, key: str, n: int) -> int:
        self._check()
        with self.lock:
            self.values[key] = self.values.get(key, 0) + n
            return self.values[key]

    def check(self, keys: list[str]) -> bool:
        self._check()
        return all(k in self.values for k in keys)

    def set(self, key: str, value: str) -> None:
        self._check()
        self.values[key] = 1


def watch(store: FakeStore, me: Ranks, silent_s: float = 0.3) -> tuple[Heartbeat, list[str]]:
    said: list[str] = []
    return Heartbeat(store, me, silent_s, said.append, period_s=0.02).start(), said


def test_a_rank_that_stops_beating_is_named() -> None:
    store = FakeStore()
    beat, said = watch(store, Ranks(0, 0, 0, 3))
    other = Heartbeat(store, Ranks(1, 0, 1, 3), 0.3, lambda line: None, period_s=0.02).start()  # rank 1 beats
    time.sleep(0.6)  # rank 2 never beat
    beat.stop(), other.stop()
    assert len(said) == 1 and said[0].startswith("global rank 2 went silent"), said


def test_a_rank_that_left_is_not_silent() -> None:
    store = FakeStore()
    store.set("sem/left/1", "1")
    beat, said = watch(store, Ranks(0, 0, 0, 2))
    time.sleep(0.6)
    beat.stop()
    assert said == []


def test_a_store_that_stops_answering_names_rank_zero() -> None:
    store = FakeStore()
    beat, said = watch(store, Ranks(1, 0, 1, 2))
    store.fail = True
    time.sleep(0.6)
    beat.stop()
    assert len(said) == 1 and "global rank 0" in said[0] and "stopped answering" in said[0], said


def test_gone_names_the_ranks_whose_heartbeat_stood_still() -> None:
    store = FakeStore()
    beat, _ = watch(store, Ranks(0, 0, 0, 3), silent_s=60)
    alive = Heartbeat(store, Ranks(1, 0, 1, 3), 60, lambda line: None, period_s=0.02).start()
    store.add("sem/beat/2", 5)  # rank 2 beat, then died
    assert beat.gone() == [2]
    beat.stop(), alive.stop()
