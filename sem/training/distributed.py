"""Process-group facts shared by the composition root and the Lightning strategies: this process's
place in the run (``Ranks``, one notion for every layer), joining the process group within a bounded
time (``join``), a watch over the other ranks (``Heartbeat``) and the clean-up after a job.
Plain PyTorch (no Lightning): the cluster environment is read in ``sem.engines.lightning.cluster``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from sem.errors import EXIT_TRAINING_FAILED, RunFailed

log = logging.getLogger(__name__)

# Environment variables a DDP job sets in its own process; cleared after the job so the next job of
# a sweep in the same process starts clean (``end_distributed``).
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


def backend_for(device_type: str) -> str:
    """The process-group backend for a device: gloo (cpu), nccl (cuda), xccl or ccl (xpu)."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "xpu":
        xccl = getattr(torch.distributed, "is_xccl_available", None)
        return "xccl" if xccl is not None and xccl() else "ccl"
    return "gloo"


def device_count(device_type: str) -> int:
    if device_type == "cuda":
        return torch.cuda.device_count()
    xpu = getattr(torch, "xpu", None)
    if device_type == "xpu" and xpu is not None and xpu.is_available():
        return xpu.device_count()
    return 1


def world_size(devices: Any, num_nodes: int, device_type: str = "cpu") -> int:
    """Processes a run will have: ``trainer.devices`` (an int, "auto"/-1 = every GPU, one process on
    a CPU; or a list/"0,1" of indices) x ``trainer.num_nodes``."""
    if isinstance(devices, Sequence) and not isinstance(devices, str):  # a list or a ListConfig
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif devices in ("auto", -1, "-1"):
        n = device_count(device_type)
    else:
        n = int(devices)
    return n * int(num_nodes)


# The run's last words when a peer is lost (``lost``): the recipe writes summary.json ``failed`` there.
at_lost: list[Callable[[str], None]] = []


def lost(line: str) -> None:
    """A peer is gone while a collective may hold the main thread for ``strategy.timeout_s``: say so in one
    line, let the run write its summary (``at_lost``) and end this process with exit 1 now. Checkpoints
    are written atomically, so the newest complete one stays; the ranks this process started die with it."""
    log.error("training failed: %s", line)
    for hook in list(at_lost):
        with contextlib.suppress(Exception):
            hook(line)
    logging.shutdown()
    os._exit(EXIT_TRAINING_FAILED)


# Run by end_distributed: the launcher's clean-up (wait for this job's extra ranks, stop watching them).
at_job_end: list[Callable[[], None]] = []


def end_distributed(saved_env: dict[str, str | None]) -> None:
    """After a job: leave no process group, rank processes or DDP environment behind for the next job
    in this process (the basic launcher runs a sweep's jobs one after another in one process)."""
    while at_job_end:
        at_job_end.pop()()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def every_rank(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order: a collective (every rank must call it, as every rank builds
    a checkpoint's dict); ``[obj]`` without a process group. Tensors should be on the CPU (pickled)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def ddp_env() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in DDP_ENV}


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run, as the cluster environment says (``sem.engines.lightning.cluster``):
    ``environment`` names it (LightningEnvironment, TorchElasticEnvironment, SLURMEnvironment, ...)."""

    global_rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1
    environment: str = "a single process"
    external: bool = False  # the cluster started the processes (torchrun, srun, mpirun): its world size rules

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def __str__(self) -> str:
        return (f"global rank {self.global_rank} of {self.world_size} (node {self.node_rank}, local rank "
                f"{self.local_rank}; {self.environment})")


_ranks: list[Ranks] = []  # set once per job by the composition root (``sem.engines.cluster.bind_ranks``)


def set_ranks(ranks: Ranks | None) -> None:
    """This process's ranks for every layer from now on (None: forget them, a single process again)."""
    _ranks[:] = [ranks] if ranks is not None else []


def ranks() -> Ranks:
    """This process's ranks: those the composition root set; a single process where none did (a library
    call, a tool reading a checkpoint)."""
    return _ranks[0] if _ranks else Ranks()


class JoinFailed(RunFailed):
    """A peer never joined the process group, or this process never reached the rank hosting it, within
    ``strategy.join_timeout_s``; the message names who is missing, in sem's words."""


def _joined_key(rank: int) -> str:
    return f"sem/joined/{rank}"


def join(me: Ranks, address: str, port: int, backend: str, join_timeout_s: float, timeout_s: float,
         device_id: Any = None) -> None:
    """Join the default process group, or fail within ``join_timeout_s`` naming what is missing.

    Global rank 0 hosts the rendezvous store at ``address:port`` (torchrun's agent hosts it instead when
    it says so); each rank announces itself there (``sem/joined/<rank>``: its node and host) and waits
    for every other one. Joining is bounded by ``join_timeout_s``; the collectives afterwards by
    ``timeout_s``."""
    from torch.distributed import TCPStore

    join_timeout = timedelta(seconds=join_timeout_s)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    host = me.is_global_zero and not agent
    started = time.monotonic()
    log.info("joining the process group: %s, rendezvous %s:%d (within strategy.join_timeout_s=%g s)", me, address,
             port, join_timeout_s)
    try:
        if not host:
            _reachable(address, port, started + join_timeout_s)
        store = TCPStore(address, port, me.world_size, host, timeout=join_timeout, wait_for_workers=False,
                         multi_tenant=True)
    except (RuntimeError, OSError) as exc:  # DistNetworkError/DistStoreError are RuntimeErrors
        if host:
            raise JoinFailed(f"global rank 0 could not open the rendezvous at {address}:{port} "
                             f"({_first_line(exc)}): is the port in use? (MASTER_PORT)") from exc
        raise JoinFailed(f"{me.environment}: global rank {me.global_rank} (node {me.node_rank}) could not "
                         f"reach global rank 0's rendezvous at {address}:{port} within strategy.join_timeout_s="
                         f"{join_timeout_s:g} s: node 0 never started it, or MASTER_ADDR/MASTER_PORT point "
                         f"elsewhere") from exc
    store.set(_joined_key(me.global_rank), f"node {me.node_rank} on {socket.gethostname()}")
    keys = [_joined_key(r) for r in range(me.world_size)]
    while not store.check(keys):
        if time.monotonic() - started > join_timeout_s:
            missing = [r for r in range(me.world_size) if not store.check([_joined_key(r)])]
            came = [f"rank {r} from {store.get(_joined_key(r)).decode()}" for r in range(me.world_size)
                    if r not in missing]
            raise JoinFailed(f"global rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                             f"never joined within strategy.join_timeout_s={join_timeout_s:g} s: {len(came)} of "
                             f"{me.world_size} processes came ({'; '.join(came)}) to the rendezvous at "
                             f"{address}:{port} ({me.environment})")
        time.sleep(0.1)
    store.set_timeout(timedelta(seconds=timeout_s))
    kwargs = {"device_id": device_id} if device_id is not None else {}
    torch.distributed.init_process_group(backend, store=store, rank=me.global_rank, world_size=me.world_size,
                                         timeout=timedelta(seconds=timeout_s), **kwargs)
    log.info("joined the process group: %s (%.1f s)", me, time.monotonic() - started)


def _reachable(address: str, port: int, deadline: float) -> None:
    """Wait, quietly, until ``address:port`` accepts a connection (the store's own client retries for up to
    twice its timeout and logs each try); ``TimeoutError`` at ``deadline``."""
    while True:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{address}:{port} did not accept a connection") from exc
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def store_client(address: str, port: int, timeout_s: float) -> Any:
    """A connection of its own to the rendezvous store, whose calls give up after ``timeout_s`` (the
    heartbeat's: a node that vanished must not hold it for the collective timeout)."""
    from torch.distributed import TCPStore

    return TCPStore(address, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Heartbeat:
    """Every rank beats (a counter in the rendezvous store, ``sem/beat/<rank>``; ``store`` is a connection
    of its own, ``store_client``) from a thread of its own
    and watches the others': a rank whose counter stands still for ``silent_s`` (stopped, hung, its node
    gone) or a store that stops answering (global rank 0's node gone) is named in one line given to
    ``on_silent``, which must end this process (a collective may hold the main thread for
    ``strategy.timeout_s``). A rank that leaves (``stop``) says so first: it is not silent."""

    def __init__(self, store: Any, me: Ranks, silent_s: float, on_silent: Callable[[str], None],
                 period_s: float | None = None) -> None:
        self.store, self.me, self.silent_s, self.on_silent = store, me, float(silent_s), on_silent
        self.period_s = period_s if period_s is not None else min(2.0, self.silent_s / 10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sem-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        _beating.append(self)
        return self

    def gone(self) -> list[int]:
        """The other ranks whose heartbeat stands still over two periods without their having left: the
        ones a failed collective lost (killed, out of memory, their node down). Asked after a failure."""
        try:
            first = {r: self._beat(r) for r in range(self.me.world_size) if r != self.me.global_rank}
            time.sleep(2 * self.period_s + 0.5)
            return [r for r, beat in first.items() if beat is not None and self._beat(r) == beat]
        except Exception:
            return [0] if self.me.global_rank != 0 else []  # the store (rank 0's process) is gone

    def _beat(self, rank: int) -> int | None:
        """``rank``'s heartbeat counter; None once it has left."""
        if self.store.check([f"sem/left/{rank}"]):
            return None
        return int(self.store.add(f"sem/beat/{rank}", 0))

    def stop(self) -> None:
        """This rank leaves the run (done, failed or stopped): the others stop watching it."""
        self._stop.set()
        if self in _beating:
            _beating.remove(self)
        with contextlib.suppress(Exception):
            self.store.set(f"sem/left/{self.me.global_rank}", "1")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.period_s + 1)

    def _run(self) -> None:
        others = [r for r in range(self.me.world_size) if r != self.me.global_rank]
        seen: dict[int, tuple[int, float]] = {}  # rank -> (its counter, when it last moved, our clock)
        unreachable_since: float | None = None
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            try:
                self.store.add(f"sem/beat/{self.me.global_rank}", 1)
                for rank in others:
                    beat = self._beat(rank)
                    if beat is None:
                        seen[rank] = (-1, now)
                    elif seen.get(rank, (None, 0.0))[0] != beat:
                        seen[rank] = (beat, now)
                unreachable_since = None
            except Exception as exc:  # the store lives in global rank 0's process
                if self._stop.is_set():
                    return
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.silent_s:
                    self._silent(f"global rank 0 (node 0, which hosts the rendezvous) stopped answering "
                                 f"{now - unreachable_since:.0f} s ago ({_first_line(exc)})")
                    return
                continue
            for rank, (beat, moved) in seen.items():
                if beat != -1 and now - moved > self.silent_s:
                    self._silent(f"global rank {rank} went silent: no heartbeat for {now - moved:.0f} s "
                                 f"(strategy.join_timeout_s={self.silent_s:g}); its process is stopped, hung or "
                                 f"its node is gone")
                    return

    def _silent(self, line: str) -> None:
        if not self._stop.is_set():
            self.on_silent(line)


_beating: list[Heartbeat] = []  # this process's running heartbeat (one per job)


def peers_gone(exc: BaseException) -> str | None:
    """A training failure said in sem's words where it is a lost peer (a collective's connection reset
    because the other rank died): which global ranks are gone, then the backend's first line. None where
    no heartbeat runs or every peer still beats."""
    if not _beating:
        return None
    gone = _beating[-1].gone()
    if not gone:
        return None
    ranks_ = ", ".join(map(str, gone))
    return (f"global rank{'s' if len(gone) > 1 else ''} {ranks_} gone: no heartbeat and never left the run "
            f"(killed, out of memory, or the node went down; see rank_<n>.log) ({type(exc).__name__}: "
            f"{_first_line(exc)})")
