"""The precision policy, engine-agnostic: which ``precision`` values exist, what ``auto`` means on a
device, what a device cannot honour, and (for the standalone engine) the autocast dtype, the grad
scaler and the weight dtype. The Lightning engine turns the same decision into a precision plugin."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16: AMD Zen 4 on, Intel Cooper Lake and
    Sapphire Rapids on; torch's own check)? There bf16 autocast trains the default SEM 1.6x as fast
    as fp32 (docs/results.md); without it torch emulates bf16 and autocast is slower than fp32."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # a torch without the check, a platform it does not know: fp32
        return False


# precision=auto takes bf16 on a CPU only where its bf16 matmuls run at least this much faster than fp32
# ones (2026-12-07: 4.1x on a 2-core Xeon with AMX; where bf16 is emulated it runs at ~1/100 of fp32, 1
# against 152 GFLOP/s on a 2-core EPYC without bf16 instructions).
BF16_MIN_SPEEDUP = 1.5
_SPEEDUP_ENV = "SEM_CPU_BF16_SPEEDUP"  # the measurement, handed to the processes a run starts (DDP ranks)


def cpu_bf16_speedup() -> float:
    """This CPU's bf16 matmul rate over its fp32 rate, measured once per run: [512, 512] products, best of
    5 each (~10 ms). A process a run starts (a DDP rank) reads its parent's figure from the environment, so
    every rank of a run takes the same precision."""
    if (known := os.environ.get(_SPEEDUP_ENV)) is not None:
        return float(known)
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.ones(512, 512, dtype=dtype), torch.ones(512, 512, dtype=dtype)
        a @ b  # warm-up
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates.append(1.0 / max(best, 1e-9))
    speedup = rates[1] / rates[0]
    os.environ[_SPEEDUP_ENV] = f"{speedup:.3f}"
    return speedup


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` is bf16-mixed on CUDA/XPU, and on a CPU with bf16 instructions (``cpu_has_bf16``) whose
    bf16 matmuls measure at least ``BF16_MIN_SPEEDUP`` x its fp32 ones (``cpu_bf16_speedup``: a flag
    says what the CPU has, not how fast it runs it, in a VM or a throttled part); fp32 on any other CPU."""
    if precision == "auto":
        if device_type != "cpu":
            return "bf16-mixed"
        return "bf16-mixed" if cpu_has_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "32-true"
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
