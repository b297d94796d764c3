"""The precision policy, engine-agnostic: which ``precision`` values exist, what ``auto`` means on a
device, what a device cannot honour, and (for the standalone engine) the autocast dtype, the grad
scaler and the weight dtype. The Lightning engine turns the same decision into a precision plugin."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16: AMD Zen 4 on, Intel Cooper Lake and
    Sapphire Rapids on; torch's own check)? There bf16 autocast trains the default SEM 1.6x as fast
    as fp32 (README "Measured"); without it torch emulates bf16 and autocast is slower than fp32."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # a torch without the check, a platform it does not know: fp32
        return False


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` is bf16-mixed on CUDA/XPU and on a CPU with bf16 instructions (``cpu_has_bf16``),
    fp32 on any other CPU."""
    if precision == "auto":
        return "bf16-mixed" if device_type != "cpu" or cpu_has_bf16() else "32-true"
    return precision


def precision_problems(precision: str, device_type: str) -> list[str]:
    """Pre-flight check: what this device cannot honour (one line each)."""
    if precision not in PRECISIONS:
        return [f"precision.precision: {precision!r} is not one of {', '.join(PRECISIONS)}"]
    resolved = resolve_precision(precision, device_type)
    if resolved == "16-mixed" and device_type == "cpu":
        return ["precision.precision: '16-mixed' is not supported on cpu (Lightning would silently "
                "switch to bf16); use precision=bf16_mixed or fp32"]
    return []


def device_type_for(name: str) -> str:
    """The device an ``accelerator.name`` (auto, cpu, cuda, xpu) means on this machine."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    xpu = getattr(torch, "xpu", None)
    return "xpu" if xpu is not None and xpu.is_available() else "cpu"


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a plain loop does for a resolved precision on a device."""

    precision: str
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)

    @property
    def weights_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16-true" else torch.float32

    def autocast(self) -> torch.autocast:
        dtype = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.precision == "16-mixed" else None

    @classmethod
    def of(cls, precision: str, device_type: str) -> PrecisionPolicy:
        return cls(resolve_precision(precision, device_type), device_type)
