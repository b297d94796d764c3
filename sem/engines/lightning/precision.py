"""SEMPrecisionPlugin: mixed precision that autocasts for the device actually in use.

Lightning's ``precision="bf16-mixed"`` builds ``MixedPrecision(device="cuda")`` for any accelerator
other than cpu/mps, so on XPU autocast would silently be off (PLATFORM.md). A plugin instance given
in ``plugins=[...]`` takes priority over the flag, so we always pass one, built for the real device.
Autocast never covers complex math: SEM's complex regions run in complex64 with fp32 parts while
real matmuls follow this policy; ``describe()`` says what is in effect.
"""

from __future__ import annotations

import torch
from pytorch_lightning.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator
from pytorch_lightning.plugins.precision import HalfPrecision, MixedPrecision, Precision

from sem.training.precision import PRECISIONS, precision_problems, resolve_precision  # noqa: F401


def device_type_of(accelerator: Accelerator) -> str:
    if isinstance(accelerator, CUDAAccelerator):
        return "cuda"
    if isinstance(accelerator, CPUAccelerator):
        return "cpu"
    from sem.engines.lightning.xpu import XPUAccelerator

    if isinstance(accelerator, XPUAccelerator):
        return "xpu"
    raise ValueError(f"accelerator: unsupported accelerator type {type(accelerator).__name__}")


class SEMPrecisionPlugin(MixedPrecision):
    """MixedPrecision with autocast for ``device_type`` and an explicit dtype (XPU defaults to fp16)."""

    def __init__(self, precision: str, device_type: str) -> None:
        scaler = torch.amp.GradScaler(device_type) if precision == "16-mixed" else None
        super().__init__(precision=precision, device=device_type, scaler=scaler)  # type: ignore[arg-type]
        self.device_type = device_type

    def describe(self) -> str:
        dtype = "bf16" if self.precision == "bf16-mixed" else "fp16 + GradScaler"
        return (f"{self.precision}: autocast({self.device_type}, {dtype}) for real matmuls; "
                "complex regions in complex64")


class SEMFullPrecision(Precision):
    """fp32 everywhere (Lightning's default precision), saying so."""

    def describe(self) -> str:
        return "32-true: fp32 everywhere, complex64 for complex regions"


class SEMHalfPrecision(HalfPrecision):
    """Weights and activations in bf16 (``bf16-true``), saying so."""

    def describe(self) -> str:
        return "bf16-true: weights and activations in bf16; complex regions in complex64 from fp32 parts"


def make_precision_plugin(precision: str, device_type: str) -> Precision:
    resolved = resolve_precision(precision, device_type)
    if resolved == "32-true":
        return SEMFullPrecision()
    if resolved in ("bf16-mixed", "16-mixed"):
        return SEMPrecisionPlugin(resolved, device_type)
    if resolved == "bf16-true":
        return SEMHalfPrecision("bf16-true")
    raise ValueError(f"precision.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
