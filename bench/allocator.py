"""The default model's training step with glibc's own malloc thresholds and with the ones a run sets
(``sem.training.allocator.keep_freed_memory``), side by side::

    python -m bench.allocator [--pairs 4] [--steps 8] [--threads N]

mallopt's thresholds are per process and set before the first large allocation, so each figure is a
fresh process (``--child``); the two settings alternate ``--pairs`` times and the speed-up is the median
of the per-pair ratios (on a shared machine only figures taken side by side compare). Each child builds
sem_small with the run's optimizer on a fixed batch at the default 16 x 128 (``bench.profile_sem``), takes
three warm-up steps, then reports the median step time, the page faults and the kernel (system) time per
step. Writes bench/results/allocator.json and appends a section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.common import save
from bench.peak import matmul_gflops

SETTINGS = {"glibc defaults": "0", "keep_freed_memory": "1"}


def child(steps: int, threads: int | None) -> dict[str, float]:
    import torch

    from sem.training.allocator import keep_freed_memory

    keep_freed_memory()  # a no-op under SEM_MALLOC_TUNING=0
    if threads:
        torch.set_num_threads(threads)
    from bench.profile_sem import Trainer, defaults
    from sem.models.common import param_groups
    from sem.models.sem import SEMModel

    sem_node, _, batch, seq_len, opt_cfg = defaults()
    torch.manual_seed(0)
    trainer = Trainer(SEMModel(**{k: v for k, v in sem_node.items() if not k.startswith("_")}), batch, seq_len,
                      opt_cfg, param_groups)
    for _ in range(3):
        trainer.step()
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_ms": 1e3 * statistics.median(times), "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "sys_ms_per_step": 1e3 * (after.ru_stime - before.ru_stime) / steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.steps, a.threads)))
        return
    peak = matmul_gflops()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for _ in range(a.pairs):
        for name, value in SETTINGS.items():
            cmd = [sys.executable, "-m", "bench.allocator", "--child", "--steps", str(a.steps)]
            cmd += ["--threads", str(a.threads)] if a.threads else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "SEM_MALLOC_TUNING": value}).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    base, tuned = runs["glibc defaults"], runs["keep_freed_memory"]
    ratios = sorted(b["step_ms"] / t["step_ms"] for b, t in zip(base, tuned))
    speedup = statistics.median(ratios)
    rows = []
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        each = ", ".join(f"{r['step_ms']:.0f}" for r in rs)
        rows.append(f"| {name} | {med['step_ms']:.0f} | {each} | "
                    f"{med['faults_per_step']:,.0f} | {med['sys_ms_per_step']:.1f} |")
    body = (f"sem_small, 16 x 128, fp32, the run's optimizer; {a.pairs} alternating pairs of fresh processes, "
            f"median of {a.steps} steps each; fp32 matmul peak {peak:.0f} GFLOP/s before the pairs.\n\n"
            "| malloc | step ms (median) | per process | page faults / step | kernel ms / step |\n"
            "|---|---:|---|---:|---:|\n" + "\n".join(rows) +
            f"\n\nkeep_freed_memory / glibc defaults: **{speedup:.3f}x** the speed (per-pair ratios "
            f"{', '.join(f'{r:.3f}' for r in ratios)}).\n")
    print(body)
    save("allocator", {"peak_gflops": peak, "runs": runs, "speedup_median": speedup, "ratios": ratios},
         "Allocator: glibc's malloc thresholds and keep_freed_memory", body)


if __name__ == "__main__":
    main()
