"""Strategies (``strategy=auto|ddp|fsdp``): how ranks are made and how gradients meet.

- ``auto``: one device -> a single-device strategy on that device (on XPU too: Lightning would put
  it on the CPU, PLATFORM.md); more than one device or node -> ``ddp``.
- ``ddp``: Lightning's DDPStrategy with the backend for the device (gloo on CPU, nccl on CUDA, xccl
  on XPU) and a launcher that is safe under Hydra multirun (below).
- ``fsdp``: Lightning's FSDPStrategy, FULL_SHARD, its mixed-precision policy taken from the precision
  group. For GPUs; ``sem.config.validate`` refuses it on the CPU.

Lightning starts the extra ranks of a DDP run by re-running the script with ``sys.argv``. Inside a
Hydra sweep that re-runs the whole sweep (basic launcher) or a loky worker (joblib), and the ranks
scatter into directories of their own (PLATFORM.md). ``JobScriptLauncher`` starts each extra rank as
a *single run of this job*: ``python -m sem <the job's own overrides> hydra.run.dir=<the job's dir>``,
so a DDP job inside ``-m`` has one directory, whatever launcher runs the sweep.

Joining is bounded (``BoundedJoin``): a peer that never comes ends every process that is up within
``strategy.join_timeout_s`` with a line naming the missing ranks; once joined, a heartbeat names a rank
that goes silent within the same time (``sem.training.distributed``), apart from the collective
``strategy.timeout_s``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import torch
from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from sem.training.distributed import Heartbeat, Ranks, at_job_end, backend_for, join, lost, store_client, world_size
from sem.training.preemption import forward_to

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp")
def make_strategy(name: str, device_type: str, devices: Any = 1, num_nodes: int = 1, precision: str = "32-true",
                  backend: str | None = None, find_unused_parameters: bool = False,
                  timeout_s: int = 1800, join_timeout_s: int = 300,
                  sharding_strategy: str = "FULL_SHARD") -> Strategy | str:
    """The Lightning strategy for ``strategy=<name>`` on ``device_type`` (see the module docstring)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name={name!r}: must be one of {', '.join(STRATEGIES)}")
    many = world_size(devices, num_nodes, device_type) > 1
    if name == "auto" and not many:
        if device_type == "xpu":  # Lightning's connector would give it a SingleDeviceStrategy on cpu
            from sem.engines.lightning.xpu import XPUAccelerator

            return SingleDeviceStrategy(device=torch.device("xpu", XPUAccelerator.parse_devices(devices)[0]))
        return "auto"
    if name == "fsdp":
        from torch.distributed.fsdp import MixedPrecision

        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        mixed = MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype) if dtype else None
        return SEMFSDPStrategy(sharding_strategy=sharding_strategy, mixed_precision=mixed,
                               process_group_backend=backend or backend_for(device_type),
                               timeout=timedelta(seconds=timeout_s), join_timeout_s=join_timeout_s)
    return SEMDDPStrategy(process_group_backend=backend or backend_for(device_type),
                          find_unused_parameters=find_unused_parameters, timeout=timedelta(seconds=timeout_s),
                          join_timeout_s=join_timeout_s)


class BoundedJoin:
    """Joins the process group with ``sem.training.distributed.join`` (bounded by ``join_timeout_s``, the
    missing ranks named) and starts the heartbeat, before Lightning's own set-up, which then finds the
    process group made. Mixed into a Lightning DDP/FSDP strategy."""

    def __init__(self, *args: Any, join_timeout_s: float = 300, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.join_timeout_s = join_timeout_s

    def setup_distributed(self) -> None:
        if not torch.distributed.is_initialized():
            strategy: Any = self
            strategy.set_world_ranks()
            env = strategy.cluster_environment
            me = Ranks(strategy.global_rank, strategy.local_rank, strategy.node_rank, strategy.world_size,
                       type(env).__name__)
            device = strategy.root_device
            join(me, env.main_address, env.main_port, strategy._get_process_group_backend(), self.join_timeout_s,
                 strategy._timeout.total_seconds(), device_id=device if device.type != "cpu" else None)
            client = store_client(env.main_address, env.main_port, min(30.0, self.join_timeout_s))
            at_job_end.append(Heartbeat(client, me, self.join_timeout_s, lost).start().stop)
        super().setup_distributed()  # type: ignore[misc]


class SEMFSDPStrategy(BoundedJoin, FSDPStrategy):
    """Lightning's FSDPStrategy with a bounded join."""


class SEMDDPStrategy(BoundedJoin, DDPStrategy):
    """DDPStrategy whose extra ranks are single runs of this job (``JobScriptLauncher``), and that builds
    the DDP wrapper without a CUDA stream on XPU (Lightning's would raise on a torch without CUDA), and
    that joins within ``join_timeout_s`` (``BoundedJoin``)."""

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = JobScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def _setup_model(self, model: torch.nn.Module) -> Any:
        if self.root_device.type != "xpu":
            return super()._setup_model(model)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)


class JobScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with each extra rank started as a single run of *this job*,
    watched by ``RankObserver``, and waited for at the end of the job."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            forward_to(self.procs)  # a stop signal reaches them from now on, even during the rendezvous
            observer = RankObserver(os.getpid(), self.procs)
            observer.start()
            at_job_end.append(observer.stop)
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            command, cwd = rank_command(env.node_rank() * self.num_processes + local_rank)
            log.info("starting rank %d: %s", local_rank, " ".join(command))
            # Its own session: a Ctrl-C at the terminal reaches rank zero only, which passes it on
            # (``forward_to``); the rank dies with rank zero (``sem.training.preemption``).
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd, start_new_session=True))


def rank_command(global_rank: int) -> tuple[list[str], str | None]:
    """The command line of extra rank ``global_rank``: this job as a single run in this job's directory,
    logging to ``rank_<global_rank>.log``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # a plain script (tests, notebooks): re-run it as Lightning does
        import __main__

        spec = getattr(__main__, "__spec__", None)
        head = [sys.executable, "-m", spec.name] if spec is not None else [sys.executable, os.path.abspath(sys.argv[0])]
        return head + sys.argv[1:], None
    hc = HydraConfig.get()
    dirs = [f"--config-dir={s.path}" for s in hc.runtime.config_sources
            if s.provider == "command-line" and s.schema == "file"]
    command = [sys.executable, "-m", "sem", f"--config-name={hc.job.config_name}", *dirs, *hc.overrides.task,
               f"hydra.run.dir={hc.runtime.output_dir}", "hydra.output_subdir=null",
               f"hydra.job.name=rank_{global_rank}"]
    return command, hc.runtime.cwd


class RankObserver(_ChildProcessObserver):
    """Lightning's watch over the extra ranks (a rank that dies takes the others down instead of leaving
    them hung in a collective), with a grace period: a rank that exits non-zero after a collective
    decision (75 when preempted, 1 when the health policy stops) is followed by this process within
    seconds, and must not SIGKILL it while it writes its summary."""

    def __init__(self, main_pid: int, child_processes: list[subprocess.Popen], grace_s: float = 60.0,
                 sleep_period: float = 1.0) -> None:
        super().__init__(main_pid, child_processes, sleep_period=sleep_period)  # type: ignore[arg-type]
        self.grace_s = grace_s
        self._failed_at: float | None = None

    def _run(self) -> bool:
        for proc in self._child_processes:
            proc.poll()
        codes = [proc.returncode for proc in self._child_processes]
        if all(code == 0 for code in codes):
            return True
        if any(codes):
            self._failed_at = self._failed_at or time.monotonic()
            if time.monotonic() - self._failed_at > self.grace_s:
                log.error("a rank exited with %s and this process did not follow within %.0f s: "
                          "terminating all ranks", codes, self.grace_s)
                self._terminate_all()
                return True
        return False

    def stop(self, timeout_s: float = 120.0) -> None:
        """End of the job: wait for the ranks to exit on their own, then stop watching."""
        for proc in self._child_processes:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("rank process %d still running after the job: killing it", proc.pid)
                proc.kill()
        self._finished = True
