"""Resource guards, checked with the other config problems: the CPU cores a run may use, and an
estimate of its peak memory against the memory available.

Cores: on CPU, ``trainer.devices`` (processes) is at most the cores this process may use
(``os.sched_getaffinity``), and so is ``devices x threads`` (torch threads per process).

Memory (``estimate_memory``): what one process holds at its peak, from the config alone and before
anything real is allocated. The model is built and run forward at the largest curriculum shape under
torch's ``FakeTensorMode`` (shapes and dtypes, no storage), so the count is exact for any model, ours or
a user's: parameters, gradients, the optimizer's state (its kind stepped once on fake parameters),
the tensors autograd saves for the backward pass, the backward's working set, the EMA teacher and its
logits, plus the framework's own footprint (Python, torch, Lightning, the data). Times the processes
this node runs. Compared with the memory available (``MemAvailable`` and the cgroup's limit; on a GPU,
the device's free memory), a run that cannot fit is a config problem naming the estimate, what is
available and the keys that drive it. ``dry_run=true`` prints the estimate.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sem.resources")

MiB = 2**20
# The resident memory of a training process before the model's own tensors: the interpreter, torch,
# Lightning, Hydra, the data loader and the touched pages of the token cache. Measured on this
# project's runs (peak RSS of sem_tiny/transformer_tiny at 8 x 64 tokens: 560-600 MiB, torch 2.13 CPU).
FRAMEWORK_BYTES = 600 * MiB
# The backward pass holds, besides what the forward saved, the gradients flowing through the layer it is
# in; measured over sem and transformer shapes (bench/memory.py), the peak is the saved tensors
# times this factor.
BACKWARD_FACTOR = 1.5
DRIVERS = ("data.batch_size", "data.seq_len", "curriculum.stages[*].batch_size/seq_len", "model.d_model",
           "model.n_layers", "trainer.devices")


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, as a job scheduler sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def device_of(cfg: DictConfig) -> str:
    """cpu, cuda or xpu: where the run's tensors live (``accelerator=auto`` resolved as Lightning does)."""
    from sem.training.precision import device_type_for

    return device_type_for(cfg.accelerator.name)


def ranks_here(cfg: DictConfig, device: str) -> int:
    """Processes of this run on this node."""
    from sem.training.distributed import world_size

    return world_size(cfg.trainer.devices, 1, device)


def core_problems(cfg: DictConfig) -> list[str]:
    """On CPU, one process per core at most, and ``devices x threads`` within the cores."""
    device = device_of(cfg)
    if device != "cpu":
        return []
    try:
        ranks = ranks_here(cfg, device)
    except (TypeError, ValueError):  # trainer.devices itself is wrong: hardware_problems names it
        return []
    cores, p = cpu_cores(), []
    if ranks > cores:
        p.append(f"trainer.devices={cfg.trainer.devices}: {ranks} processes on CPU, but this process may use "
                 f"{cores} core(s) (os.sched_getaffinity); use trainer.devices<={cores}")
    threads = cfg.get("threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1 and threads * min(ranks, cores) > cores:
        what = f"{ranks} processes x threads={threads}" if ranks > 1 else f"threads={threads}"
        p.append(f"threads={threads}: {what} is more than the {cores} core(s) this process may use "
                 f"(os.sched_getaffinity); use threads<={max(1, cores // max(1, ranks))} or null")
    return p


@dataclass
class MemoryEstimate:
    """Peak bytes of one process, by part; ``ranks`` processes on this node; ``available`` bytes where
    they must fit (None: unknown)."""

    parts: dict[str, int] = field(default_factory=dict)
    ranks: int = 1
    device: str = "cpu"
    available: int | None = None
    where: str = "host memory"
    shape: tuple[int, int] = (0, 0)

    @property
    def per_process(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        on_device = self.per_process - (self.parts.get("framework", 0) if self.device != "cpu" else 0)
        return on_device * self.ranks

    def line(self) -> str:
        parts = ", ".join(f"{k} {v / MiB:,.0f}" for k, v in self.parts.items() if v)
        ranks = f" x {self.ranks} processes" if self.ranks > 1 else ""
        avail = f" of {self.available / MiB:,.0f} MiB available ({self.where})" if self.available else ""
        return (f"peak memory estimate: {self.total / MiB:,.0f} MiB{ranks}{avail}; per process (MiB): {parts}; "
                f"largest shape {self.shape[0]} x {self.shape[1]} tokens")

    def as_dict(self) -> dict[str, Any]:
        return {"estimate_mb": round(self.total / MiB, 1), "per_process_mb": round(self.per_process / MiB, 1),
                "ranks": self.ranks, "available_mb": None if self.available is None else round(self.available / MiB, 1),
                "parts_mb": {k: round(v / MiB, 1) for k, v in self.parts.items()}, "shape": list(self.shape)}


def largest_shape(cfg: dict[str, Any]) -> tuple[int, int]:
    """(batch, seq_len) of the stage with the most tokens per step (``data.*`` without a curriculum)."""
    shapes = [(int(st.get("batch_size") or cfg["data"]["batch_size"]), int(st.get("seq_len") or cfg["data"]["seq_len"]))
              for st in (cfg.get("curriculum") or {}).get("stages") or []]
    shapes.append((int(cfg["data"]["batch_size"]), int(cfg["data"]["seq_len"])))
    return max(shapes, key=lambda s: (s[0] * s[1], s[1]))


def _nbytes(t: Any) -> int:
    return int(t.numel()) * int(t.element_size())


def _optimizer_state_bytes(node: dict[str, Any], model: Any) -> int:
    """Bytes of optimizer state for ``model``'s parameters: the configured optimizer stepped once on
    fake gradients (its state tensors counted, scalars included)."""
    import torch

    from sem.config.components import PERF_KEYS, locate, partial_of, takes
    from sem.models.common import param_groups

    cls, _ = locate("optimizer", node.get("_target_"))
    drop = [k for k in PERF_KEYS if k in node and not (cls is not None and takes(cls, k))]
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt = partial_of(node, drop)(params=param_groups(model, float(node.get("weight_decay") or 0.0)))
    opt.step()
    return sum(_nbytes(t) for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))


def _autocast(cfg: DictConfig, device: str) -> Any:
    import torch

    precision = str(cfg.precision.get("precision", ""))
    if "bf16" in precision and "mixed" in precision:
        return torch.autocast(device_type="cpu" if device == "cpu" else device, dtype=torch.bfloat16)
    if "16-mixed" in precision and device != "cpu":
        return torch.autocast(device_type=device, dtype=torch.float16)
    return contextlib.nullcontext()


# A model config with an integer ``n_layers`` above this is measured at 1 and 2 layers and extrapolated
# (each layer adds the same parameters, state and saved tensors): building 10**12 layers, even of fake
# tensors, would hang the config check.
MEASURED_LAYERS = 8


def estimate_memory(cfg: DictConfig) -> MemoryEstimate:
    """The peak memory of one process of this run, and of the run on this node (see the module)."""
    from sem.training.budget import resolve_budget

    plain, _ = resolve_budget(OmegaConf.to_container(cfg, resolve=True))
    batch, seq_len = largest_shape(plain)
    device = device_of(cfg)
    est = MemoryEstimate(ranks=ranks_here(cfg, device), device=device, shape=(batch, seq_len))
    layers = plain["model"].get("n_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > MEASURED_LAYERS:
        one = _measure(plain, {**plain["model"], "n_layers": 1}, cfg, device, batch, seq_len)
        two = _measure(plain, {**plain["model"], "n_layers": 2}, cfg, device, batch, seq_len)
        model = {k: one[k] + (layers - 1) * (two[k] - one[k]) for k in one}
    else:
        model = _measure(plain, plain["model"], cfg, device, batch, seq_len)
    teacher = (plain.get("distillation") or {}).get("teacher")
    est.parts = {
        "framework": FRAMEWORK_BYTES,
        "params": model["params"],
        "grads": model["trainable"],
        "optimizer": model["optimizer"],
        "activations": int(model["activations"] * BACKWARD_FACTOR),
        "teacher": model["params"] + 2 * model["logits"] if teacher else 0,
    }
    est.available, est.where = memory_available(device)
    return est


def _measure(plain: dict[str, Any], node: dict[str, Any], cfg: DictConfig, device: str, batch: int,
             seq_len: int) -> dict[str, int]:
    """Bytes of the model ``node`` builds, run forward once at ``batch x seq_len`` under fake tensors:
    params, trainable params, optimizer state, saved activations, fp32 logits."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sem.config.components import locate
    from sem.contracts import model_kwargs, model_output

    cls, _ = locate("model", node["_target_"])
    saved: dict[int, int] = {}
    weights: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights and id(getattr(t, "_base", None)) not in weights:  # (counted as params)
            saved[id(t)] = _nbytes(t)  # by identity: a tensor saved by two ops is held once
        return t

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = cls(**model_kwargs(cls, node))
        model.train()
        weights.update(id(p) for p in model.parameters())
        params = sum(_nbytes(p) for p in model.parameters())
        trainable = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        with _autocast(cfg, device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model_output(model, ids, ids)
        logits = batch * seq_len * int(out.logits.shape[-1]) * 4
        try:
            optimizer = _optimizer_state_bytes(plain["optimizer"], model)
        except Exception as exc:  # an optimizer fake tensors cannot step: assume Adam's two moments
            log.debug("optimizer state by rule (fake step failed: %s)", exc)
            optimizer = 2 * trainable
    return {"params": params, "trainable": trainable, "optimizer": optimizer, "activations": sum(saved.values()),
            "logits": logits}


def _cgroup_room() -> int | None:
    """Bytes the cgroup (v2, or v1) still allows this process, where a limit is set."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:
                return None
            return max(0, int(text) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def memory_available(device: str) -> tuple[int | None, str]:
    """(bytes available to a new run, where): host ``MemAvailable`` (within the cgroup's limit) for a
    CPU run; a GPU's free memory for a run on it."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0]), "cuda:0 free memory"
    xpu = getattr(torch, "xpu", None)
    if device == "xpu" and xpu is not None and xpu.is_available() and hasattr(xpu, "mem_get_info"):
        return int(xpu.mem_get_info()[0]), "xpu:0 free memory"
    host = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room()
    if host is None or (room is not None and room < host):
        return room, "the cgroup's memory limit"
    return host, "MemAvailable, /proc/meminfo"


def memory_problems(cfg: DictConfig) -> tuple[list[str], MemoryEstimate | None]:
    """A run whose estimated peak does not fit the memory available: one line naming both and the keys
    that drive it. An estimate that cannot be made (a model fake tensors cannot run) is no problem: the
    run goes on, unguarded, and the debug log says why."""
    try:
        est = estimate_memory(cfg)
    except Exception as exc:
        log.debug("no memory estimate: %s: %s", type(exc).__name__, exc)
        return [], None
    if est.available is None or est.total <= est.available:
        return [], est
    plain = OmegaConf.to_container(cfg, resolve=True)
    batch, seq_len = est.shape
    model = plain.get("model", {})
    width = ", ".join(f"model.{k}={model[k]}" for k in ("d_model", "n_layers") if k in model)
    return [f"data.batch_size={batch} data.seq_len={seq_len}: the run needs about {est.total / MiB:,.0f} MiB "
            f"at its peak ({est.ranks} process(es) x {est.per_process / MiB:,.0f} MiB: activations "
            f"{est.parts['activations'] / MiB:,.0f}, weights+grads+optimizer "
            f"{(est.parts['params'] + est.parts['grads'] + est.parts['optimizer']) / MiB:,.0f}) but "
            f"{est.available / MiB:,.0f} MiB are available ({est.where}); lower data.batch_size, data.seq_len "
            f"(or the curriculum's largest stage), {width or 'the model size'} or trainer.devices"], est
