"""XPUAccelerator: Intel GPUs through native ``torch.xpu``, registered with Lightning.

Lightning 2.6 has no XPU accelerator. This one follows Lightning's custom-accelerator API; IPEX is
optional (its last release refuses to import with current torch, raising AttributeError, so the
optional import catches every Exception). The strategy that puts a run on the XPU (Lightning's
connector would pick a SingleDeviceStrategy on cpu) comes from ``sem.engines.lightning.strategy``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning.accelerators import Accelerator, AcceleratorRegistry, CPUAccelerator, CUDAAccelerator

log = logging.getLogger(__name__)

_ipex_note: str | None = None  # what _try_ipex found, said once per process


def xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _ipex_status() -> str:
    try:
        import intel_extension_for_pytorch as ipex
    except ModuleNotFoundError as exc:
        if exc.name != "intel_extension_for_pytorch":  # installed, but one of its imports is missing
            return f"intel_extension_for_pytorch not used: import failed: ModuleNotFoundError: {exc}"
        return f"intel_extension_for_pytorch not used: not installed (XPU is native in torch {torch.__version__})"
    except Exception as exc:  # IPEX 2.8 with torch 2.13 raises AttributeError, not ImportError
        reason = " ".join(str(exc).split())  # one log line, whatever the message
        return f"intel_extension_for_pytorch not used: import failed: {type(exc).__name__}: {reason}"
    return f"intel_extension_for_pytorch {getattr(ipex, '__version__', '(unknown version)')} used"


def _try_ipex() -> str:
    """Import IPEX if it imports (optional); say once per process, at INFO, whether it is used and why not."""
    global _ipex_note
    if _ipex_note is None:
        _ipex_note = _ipex_status()
        log.info("%s", _ipex_note)
    return _ipex_note


class XPUAccelerator(Accelerator):
    """Accelerator for Intel XPU devices (``accelerator=xpu``)."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "xpu":
            raise ValueError(f"accelerator: device should be xpu, got {device}")
        _try_ipex()
        torch.xpu.set_device(device)

    def teardown(self) -> None:
        if xpu_available():
            torch.xpu.empty_cache()

    @staticmethod
    def parse_devices(devices: Any) -> list[int]:
        """``trainer.devices`` as XPU indices: a count (1, 2, "2"), "auto" or -1 (all), indices
        ("0,1", "1,", [1]). Indices must exist on this machine (a ValueError naming the key otherwise)."""
        if isinstance(devices, Sequence) and not isinstance(devices, str):  # a list, or Hydra's ListConfig
            ids = [int(d) for d in devices]
        elif devices in ("auto", -1, "-1"):
            ids = list(range(XPUAccelerator.auto_device_count()))
        elif isinstance(devices, str) and "," in devices:
            ids = [int(d) for d in devices.split(",") if d.strip()]
        else:
            ids = list(range(int(devices)))
        count = XPUAccelerator.auto_device_count()
        if not ids or any(not 0 <= i < count for i in ids):
            raise ValueError(f"trainer.devices={devices!r}: this machine has {count} XPU device(s)")
        return ids

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("xpu", i) for i in XPUAccelerator.parse_devices(devices)]

    @staticmethod
    def auto_device_count() -> int:
        return torch.xpu.device_count() if xpu_available() else 0

    @staticmethod
    def is_available() -> bool:
        return xpu_available()

    @staticmethod
    def name() -> str:
        return "xpu"

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        if not xpu_available():
            return {}
        return {"allocated_bytes": torch.xpu.memory_allocated(device),
                "reserved_bytes": torch.xpu.memory_reserved(device)}

    @classmethod
    def register_accelerators(cls, accelerator_registry: Any) -> None:
        accelerator_registry.register(cls.name(), cls, description=cls.__name__, override=True)


def register() -> None:
    """Make ``Trainer(accelerator="xpu")`` (the string) resolve to XPUAccelerator (idempotent).
    The config passes the class itself, so the launcher does not need this."""
    XPUAccelerator.register_accelerators(AcceleratorRegistry)


def accelerator(name: str = "auto") -> Accelerator:
    """The accelerator ``accelerator.name`` names: auto (``auto_accelerator``), cpu, cuda or xpu. The
    config group's target, so ``hydra.utils.instantiate(cfg.accelerator)`` builds it."""
    makers = {"auto": auto_accelerator, "cpu": CPUAccelerator, "cuda": CUDAAccelerator, "xpu": XPUAccelerator}
    if name not in makers:
        raise ValueError(f"accelerator.name={name!r}: must be one of {', '.join(makers)}")
    return makers[name]()


def auto_accelerator() -> Accelerator:
    """The best device present: CUDA, then XPU, then CPU (Lightning's "auto" never picks XPU)."""
    if torch.cuda.is_available():
        return CUDAAccelerator()
    if xpu_available():
        return XPUAccelerator()
    return CPUAccelerator()
