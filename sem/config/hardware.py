"""Checks of a config against the machine it runs on: the accelerator and its precision, the device
list, the strategy and its backend, what needs more than one process."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def hardware_problems(cfg: DictConfig) -> list[str]:
    import torch

    from sem.training.precision import device_type_for, precision_problems

    name = cfg.accelerator.name
    if name not in ("auto", "cpu", "cuda", "xpu"):
        return [f"accelerator.name={name!r}: must be one of auto, cpu, cuda, xpu"]
    xpu = getattr(torch, "xpu", None)
    has_xpu = bool(xpu is not None and xpu.is_available())
    if name == "cuda" and not torch.cuda.is_available():
        return [f"accelerator=cuda: no CUDA device on this machine (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use accelerator=cpu or auto"]
    if name == "xpu" and not has_xpu:
        return [f"accelerator=xpu: no Intel XPU on this machine (torch {torch.__version__}, "
                "torch.xpu.is_available() is False); use accelerator=cpu or auto"]
    device = device_type_for(name)
    problems = precision_problems(cfg.precision.precision, device)
    setting = cfg.get("compile", "auto")
    problems += compile_setting_problems(setting)
    missing = compile_missing(device) if setting is True else None
    if missing:
        problems.append(f"compile=true: torch.compile's default backend (inductor) needs {missing} on {device}; "
                        "use compile=false (or auto: compile where it can)")
    return problems


def compile_setting_problems(setting: Any) -> list[str]:
    """A ``compile`` setting (a run's, ``sem.sample``'s) that is not true, false or auto, as one line."""
    return [] if isinstance(setting, bool) or setting == "auto" else [f"compile={setting!r}: must be true, false or auto"]


# ``compile``: true, false, or auto (the default): compile where inductor can build the device's kernels
# and the run is long enough to pay the cold compile back. Measured 2026-12-07 (sem_small, 16 x 128, 2-core
# Xeon, BENCHMARKS.md): 1.12x the eager step in fp32 side by side (quartiles 1.01-1.20), 1.54x under bf16
# autocast; the compile 42 s with an empty inductor cache, 17 s with the cache an earlier run left. At
# ~0.21 s a step, 1.12-1.17x saves ~0.025-0.03 s a step: a first compile is paid back from ~1,500-2,000
# steps, a cached one from ~600. Under bf16 autocast the compiled step gains more (1.2x on a 2-core EPYC with
# AVX512-BF16, 1.3-1.5x on the Xeon) but a cold compile took ~60 s there: the default's 1400 steps compiled
# trained in 354 s against 329 s eager (2026-12-07, docs/results.md#compile-by-precision), so the same
# threshold holds for every precision.
COMPILE_AUTO_MIN_STEPS = 2000


def compile_choice(setting: Any, max_steps: int, device_type: str, model: Any = None) -> tuple[bool, str]:
    """Whether a run compiles its training step, and why, for ``compile``=``setting`` (validated). Under
    auto only a model that says compiling pays (a class attribute ``compile_pays = True``: sem's SEM; the
    Transformer baseline measured no faster compiled) is compiled: for another, compile=true asks for it."""
    if isinstance(setting, bool):
        return setting, f"compile={str(setting).lower()}"
    if getattr(model, "compile_pays", False) is not True:
        return False, (f"compile=auto: eager ({type(model).__name__} does not say compiling pays: "
                       "compile_pays = True; compile=true compiles it anyway)")
    if max_steps < COMPILE_AUTO_MIN_STEPS:
        return False, (f"compile=auto: eager (trainer.max_steps={max_steps} < {COMPILE_AUTO_MIN_STEPS}: "
                       "too short to pay a cold compile back)")
    missing = compile_missing(device_type)
    if missing:
        return False, f"compile=auto: eager (torch.compile's inductor needs {missing} on {device_type})"
    return True, f"compile=auto: compiled (trainer.max_steps={max_steps} >= {COMPILE_AUTO_MIN_STEPS}, inductor ready)"


def compile_missing(device_type: str) -> str | None:
    """What torch.compile's inductor lacks on this machine to build ``device_type``'s kernels, or None:
    on CPU a C++ compiler, on CUDA and XPU Triton for the device and a C compiler (Triton builds its
    launcher with one), and Python's headers for both (the kernels' wrappers include Python.h)."""
    import os
    import shutil
    import sysconfig
    from pathlib import Path

    if device_type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception:
            return "a C++ compiler (g++ or $CXX; none found)"
    else:
        from torch.utils._triton import has_triton

        if not has_triton():
            return f"Triton for {device_type} (not installed, or not for this device)"
        if not any(shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c):
            return "a C compiler for Triton's launcher ($CC, cc, gcc or clang; none found)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return None if headers.exists() else f"Python's C headers ({headers} is missing: python3-dev)"


def _devices_problems(devices: Any) -> list[str]:
    """``trainer.devices``: a positive count, "auto" or -1 (every device), or device indices (a list or "0,1")."""
    key = f"trainer.devices={devices!r}"
    if isinstance(devices, bool):
        return [f"{key}: must be a positive count, auto, -1, or a list of device indices"]
    if devices in ("auto", -1, "-1"):
        return []
    if isinstance(devices, str) and "," in devices:
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        items = list(devices)
        if not items or not all(str(d).isdigit() for d in items):
            return [f"{key}: a list of devices must hold device indices >= 0, e.g. [0, 1] or '0,1'"]
        if len(set(map(int, items))) != len(items):
            return [f"{key}: a device index is listed twice"]
        return []
    try:
        n = int(devices)
    except (TypeError, ValueError):
        return [f"{key}: must be a positive count, auto, -1, or a list of device indices"]
    return [] if n >= 1 else [f"{key}: must be >= 1 (a count), auto, -1, or a list of device indices"]


def strategy_problems(cfg: DictConfig) -> list[str]:
    import torch

    from sem.training.distributed import world_size
    from sem.training.precision import device_type_for

    s, t = cfg.strategy, cfg.trainer
    p = _devices_problems(t.devices)
    if s.name not in ("auto", "ddp", "fsdp"):
        p.append(f"strategy.name={s.name!r}: must be one of auto, ddp, fsdp")
    if p:
        return p
    device = device_type_for(cfg.accelerator.name)
    if s.name == "fsdp" and device == "cpu":
        p.append("strategy=fsdp: FSDP shards a model over GPUs; it is not supported on the CPU "
                 "(use strategy=ddp accelerator=cpu trainer.devices=N)")
    backend = s.get("backend")
    if backend is not None and backend not in ("gloo", "nccl", "xccl", "ccl", "mpi"):
        p.append(f"strategy.backend={backend!r}: must be null (the device's), gloo, nccl, xccl, ccl or mpi")
    elif backend == "nccl" and device != "cuda":
        p.append(f"strategy.backend=nccl: needs CUDA devices, this run is on {device} (use gloo or null)")
    if device in ("cuda", "xpu") and isinstance(t.devices, int) and not isinstance(t.devices, bool):
        have = torch.cuda.device_count() if device == "cuda" else torch.xpu.device_count()
        if 0 < have < t.devices:  # none at all: already said by the accelerator check
            p.append(f"trainer.devices={t.devices}: this machine has {have} {device} device(s)")
    stall = (cfg.health.get("stall") or {}).get("action")
    if world_size(t.devices, t.num_nodes, device) > 1 and cfg.health.enabled and stall not in (None, "warn"):
        p.append(f"health.stall.action={stall}: each rank times its own steps, so ranks could disagree and "
                 "leave each other waiting; with more than one process use warn (or null)")
    if cfg.engine == "standalone" and (s.name != "auto" or world_size(t.devices, t.num_nodes, device) > 1):
        p.append(f"engine=standalone: runs one process on one device; strategy={s.name} "
                 f"trainer.devices={t.devices} trainer.num_nodes={t.num_nodes} need engine=lightning")
    return p
