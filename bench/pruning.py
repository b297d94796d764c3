"""Sweeps that prune: the same 24-trial Optuna search (learning rate x warm-up x batch size on
``model=sem_tiny``, TPE from one seed) at 2 workers (joblib, one thread each), once with ``pruner=asha``
(successive halving) and once with ``pruner=none``; whole-command wall time, trials completed / pruned /
failed, the best val/bpb and its overrides, and the workers' idle time (2 x the span of the jobs minus the
time jobs ran, from each job's log).

    python -m bench.pruning [--trials 24] [--steps 400] [--every 50]

Needs the ``.[sweeps]`` extra. Writes ``bench/results/pruning.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, save

CONF = Path(__file__).parent / "conf"


def _span(run_dir: Path) -> tuple[float, float] | None:
    """When a job started and ended (the first and last timestamps of its log), unix seconds."""
    log = run_dir / "launch.log"
    if not log.exists():
        return None
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", log.read_text(), re.M)
    if not stamps:
        return None
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in (stamps[0], stamps[-1]))
    return first, last


def sweep(pruner: str, trials: int, steps: int, every: int, workers: int, root: Path) -> dict[str, Any]:
    sweep_dir = root / pruner
    args = [sys.executable, str(ROOT / "launch.py"), "-m", "model=sem_tiny", f"hydra.searchpath=[file://{CONF}]",
            "hparams_search=tiny_search", f"hydra/sweeper/pruner={pruner}", f"hydra.sweeper.n_trials={trials}",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}", "sample.n=0", "eval.stream=false",
            "threads=1", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}", f"hydra.sweeper.n_jobs={workers}",
            f"hydra.sweep.dir={sweep_dir}"]
    if pruner == "asha":
        args += [f"hydra.sweeper.pruner.min_resource={every}", "hydra.sweeper.pruner.reduction_factor=3"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{pruner}: exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    results = __import__("yaml").safe_load((sweep_dir / "optimization_results.yaml").read_text())
    records = [json.loads(line) for line in (sweep_dir / "ledger.jsonl").read_text().splitlines()]
    spans = [s for r in records if (s := _span(Path(r["run_dir"]))) is not None]
    busy = sum(end - start for start, end in spans)
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    counts = {s: sum(r["status"] == s for r in records) for s in ("completed", "pruned", "failed")}
    steps_run = sum(r.get("steps") or 0 for r in records)
    return {"pruner": pruner, "wall_s": round(wall, 1), **counts, "steps_trained": steps_run,
            "best_val_bpb": results.get("best_value"), "best_params": results.get("best_params"),
            "jobs_busy_s": round(busy, 1), "jobs_span_s": round(span, 1),
            "worker_idle_s": round(workers * span - busy, 1), "sweep_dir": str(sweep_dir)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50, help="trainer.val_check_interval: a report to the study")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", help="keep the sweep dirs under this folder")
    a = parser.parse_args(argv)
    from bench.peak import cpu_model, matmul_gflops

    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="sem_pruning_"))
    root.mkdir(parents=True, exist_ok=True)
    rows = [sweep(p, a.trials, a.steps, a.every, a.workers, root) for p in ("asha", "none")]
    for r in rows:
        print(json.dumps(r))
    asha, none = rows
    print(f"asha / none: wall {asha['wall_s'] / none['wall_s']:.2f}x, steps trained "
          f"{asha['steps_trained'] / max(1, none['steps_trained']):.2f}x; best val/bpb {asha['best_val_bpb']:.4f} "
          f"vs {none['best_val_bpb']:.4f}")
    peak = round(matmul_gflops(), 1)
    table = ["| pruner | wall | completed | pruned | failed | steps trained | best val/bpb | best overrides | worker idle |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (r["best_params"] or {}).items())
        table.append(f"| {r['pruner']} | {r['wall_s']:.0f} s | {r['completed']} | {r['pruned']} | {r['failed']} | "
                     f"{r['steps_trained']} | {r['best_val_bpb']:.4f} | `{params}` | {r['worker_idle_s']:.0f} s |")
    steps_ratio = asha["steps_trained"] / max(1, none["steps_trained"])
    body = (f"{a.trials} trials of `model=sem_tiny` ({a.steps} steps, val/bpb reported every {a.every}), Optuna TPE "
            f"(seed 1234) over optimizer.lr x scheduler.warmup_fraction x data.batch_size, joblib at {a.workers} "
            f"workers, one thread each; {cpu_model()}, fp32 peak {peak} GFLOP/s. asha / none: wall "
            f"{asha['wall_s'] / none['wall_s']:.2f}x, steps trained {steps_ratio:.2f}x. "
            "Worker idle: workers x (last job end - first job start) - the time jobs ran (job start-up included "
            "in the jobs).\n\n" + "\n".join(table) + "\n")
    save("pruning", {"cpu": cpu_model(), "fp32_gflops": peak, "args": vars(a), "rows": rows},
         "Sweeps that prune (bench.pruning)", body)


if __name__ == "__main__":
    main()
