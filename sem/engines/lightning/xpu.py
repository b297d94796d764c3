"""XPUAccelerator: Intel GPUs through native ``torch.xpu``, registered with Lightning.

Lightning 2.6 has no XPU accelerator. This one follows Lightning's custom-accelerator API; IPEX is
optional (its last release refuses to import with current torch, raising AttributeError, so the
optional import catches every Exception).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pytorch_lightning.accelerators import Accelerator, AcceleratorRegistry, CPUAccelerator, CUDAAccelerator

log = logging.getLogger(__name__)


def xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _try_ipex() -> None:
    try:
        import intel_extension_for_pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or AttributeError from a version mismatch
        log.debug("intel_extension_for_pytorch not used: %s", exc)


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
        if isinstance(devices, list):
            return [int(d) for d in devices]
        if devices in ("auto", -1, "-1"):
            return list(range(XPUAccelerator.auto_device_count()))
        if isinstance(devices, str) and "," in devices:
            return [int(d) for d in devices.split(",") if d.strip()]
        return list(range(int(devices)))

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("xpu", i) for i in XPUAccelerator.parse_devices(devices)]

    @staticmethod
    def auto_device_count() -> int:
        return torch.xpu.device_count() if xpu_available() else 0

    @staticmethod
    def is_available() -> bool:
        return xpu_available()

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        if not xpu_available():
            return {}
        return {"allocated_bytes": torch.xpu.memory_allocated(device),
                "reserved_bytes": torch.xpu.memory_reserved(device)}

    @classmethod
    def register_accelerators(cls, accelerator_registry: Any) -> None:
        accelerator_registry.register("xpu", cls, description=cls.__name__, override=True)


def register() -> None:
    """Make ``Trainer(accelerator="xpu")`` (the string) resolve to XPUAccelerator (idempotent).
    The config passes the class itself, so the launcher does not need this."""
    AcceleratorRegistry.register("xpu", XPUAccelerator, description="XPUAccelerator", override=True)


def auto_accelerator() -> Accelerator:
    """The best device present: CUDA, then XPU, then CPU (Lightning's "auto" never picks XPU)."""
    if torch.cuda.is_available():
        return CUDAAccelerator()
    if xpu_available():
        return XPUAccelerator()
    return CPUAccelerator()
