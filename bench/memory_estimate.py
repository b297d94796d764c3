"""The peak-memory estimate of the config check (``sem.config.resources.estimate_memory``) against the
peak resident memory of real runs: ``python launch.py`` in a fresh process per shape, a few steps,
``summary.json``'s ``peak_rss_mb`` (the process's high-water mark, ``getrusage``).

    python -m bench.memory_estimate [--steps 3] [--quick]

Target (issue 24): the estimate within 2x of the measured peak and never under it by more than 25%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, save

# (model, batch, seq_len): sem and transformer, 64 to 2048 tokens per row
SHAPES = [
    ("sem_tiny", 8, 64),
    ("sem_small", 16, 128),
    ("transformer_small", 16, 256),
    ("sem_small", 8, 1024),
    ("transformer_small", 4, 2048),
    ("sem_small", 16, 2048),
    ("transformer_small", 32, 1024),
]
QUICK = SHAPES[:3]


def overrides(model: str, batch: int, seq_len: int, steps: int) -> list[str]:
    return [f"model={model}", f"data.batch_size={batch}", f"data.seq_len={seq_len}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", "data.val_max_windows=4", "data.final_val_max_windows=8",
            "sample.n=0", "accelerator=cpu"]


def estimate(ovr: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from sem.config.resources import estimate_memory
    from sem.config.store import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return estimate_memory(compose("config", ovr)).as_dict()


def measure(ovr: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SEM_CACHE_DIR": os.environ.get("SEM_CACHE_DIR", str(Path(tmp) / "cache"))}
        subprocess.run([sys.executable, "launch.py", *ovr, f"hydra.run.dir={tmp}/run"], cwd=ROOT, env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads((Path(tmp) / "run" / "summary.json").read_text())["peak_rss_mb"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the three smallest shapes only")
    args = ap.parse_args(argv)
    rows = []
    for model, batch, seq_len in QUICK if args.quick else SHAPES:
        ovr = overrides(model, batch, seq_len, args.steps)
        est = estimate(ovr)
        peak = measure(ovr)
        ratio = est["estimate_mb"] / peak
        rows.append({"model": model, "batch": batch, "seq_len": seq_len, "estimate_mb": est["estimate_mb"],
                     "parts_mb": est["parts_mb"], "peak_rss_mb": peak, "ratio": round(ratio, 3)})
        print(f"{model:18s} {batch:3d} x {seq_len:5d}: estimate {est['estimate_mb']:8.0f} MiB, "
              f"peak RSS {peak:8.0f} MiB, ratio {ratio:.2f}", flush=True)
    ok = all(0.75 <= r["ratio"] <= 2.0 for r in rows)
    body = ["| model | batch x seq_len | estimate MiB | activations, weights+grads+optimizer MiB | peak RSS MiB "
            "| estimate / peak |",
            "|---|---|---:|---|---:|---:|"]
    for r in rows:
        p = r["parts_mb"]
        body.append(f"| {r['model']} | {r['batch']} x {r['seq_len']} | {r['estimate_mb']:,.0f} | "
                    f"{p['activations']:,.0f}, {p['params'] + p['grads'] + p['optimizer']:,.0f} | "
                    f"{r['peak_rss_mb']:,.0f} | {r['ratio']:.2f} |")
    body.append(f"\nTarget: every ratio in [0.75, 2]: {'met' if ok else 'NOT met'}.")
    save("memory_estimate", {"rows": rows, "target_met": ok}, "Peak-memory estimate vs peak RSS", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
