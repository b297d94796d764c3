"""Process-group facts and clean-up shared by the composition root and the Lightning strategies.
Plain PyTorch (no Lightning), so a standalone run does not pay for importing it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

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
