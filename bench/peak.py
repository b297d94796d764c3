"""This machine's fp32 (and bf16) matmul peak, the yardstick for every speed figure we report.

    python -m bench.peak            # prints GFLOP/s and the CPU model

Run it in the same session as any timing: 2-core machines here differ by up to 1.7x.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_gflops(n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 20,
                  device: str = "cpu") -> float:
    """Best-of-5 rate of ``repeats`` [n, n] @ [n, n] products, in GFLOP/s (2 n^3 flops each)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * repeats / best / 1e9


def main() -> None:
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"fp32 matmul peak: {matmul_gflops():.0f} GFLOP/s")
    print(f"bf16 matmul peak: {matmul_gflops(dtype=torch.bfloat16, repeats=5):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
