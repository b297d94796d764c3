"""Sweep throughput: the same 4-job sweep run one job after another and with the joblib launcher at
2 workers (threads split per job), whole command wall time, alternating pairs, median.

    python -m bench.sweeps [--repeats 3] [--steps 300]

Needs the ``.[sweeps]`` extra (hydra-joblib-launcher). Writes ``bench/results/sweeps.json`` and a
BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, save


def sweep_seconds(steps: int, parallel: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, str(ROOT / "launch.py"), "-m", "debug=smoke", f"trainer.max_steps={steps}",
                "trainer.val_check_interval=100", "checkpoint.every_n_steps=100", "data.batch_size=16",
                "data.seq_len=128", "optimizer.lr=1e-3,3e-3", "model.unitary_lambda=0.0,0.01", "sample.n=0",
                f"hydra.sweep.dir={tmp}/sweep"]
        if parallel:
            args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    a = parser.parse_args(argv)
    serial, joblib = [], []
    for _ in range(a.repeats):  # alternating, so drift in the machine's speed hits both alike
        serial.append(sweep_seconds(a.steps, parallel=False))
        joblib.append(sweep_seconds(a.steps, parallel=True))
    s, j = statistics.median(serial), statistics.median(joblib)
    body = (f"A 2 x 2 sweep of {a.steps}-step `debug=smoke` jobs (batch 16 x 128), whole command, {a.repeats} "
            "alternating pairs.\n\n| launcher | wall (s) | runs | jobs per hour | vs serial |\n|---|---:|---|---:|---:|\n"
            f"| basic (one after another, all cores per job) | {s:.1f} | {', '.join(f'{x:.1f}' for x in serial)} | "
            f"{4 * 3600 / s:.0f} | 1.00x |\n"
            f"| joblib n_jobs=2 (cores split per job) | {j:.1f} | {', '.join(f'{x:.1f}' for x in joblib)} | "
            f"{4 * 3600 / j:.0f} | {s / j:.2f}x (target >= 1.6x) |")
    save("sweeps", {"steps": a.steps, "serial_s": serial, "joblib_s": joblib, "speedup": s / j},
         "Sweep throughput: serial vs joblib at 2 workers", body)
    print(body)


if __name__ == "__main__":
    main()
