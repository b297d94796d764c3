"""Engine overhead and start-up, side by side in one run (issue: "the standalone engine ... benchmarks").

    python -m bench.engines [--steps 40] [--repeats 3] [model=sem_small ...]

a. Training tokens/s of ``launch.py`` with the Lightning engine, with the standalone engine, and of a
   minimal hand-written loop over the same model, data and optimizer (no health, no curriculum, no
   metrics), each in its own process, interleaved, ``--repeats`` times; steady state only (the first
   ``--warmup`` steps are dropped); the median of the repeats; ratios to the hand-written loop.
d. Start-up: seconds from process start to the end of the first optimizer step (token cache warm),
   against a bare ``import torch, pytorch_lightning, hydra``.

Extra arguments are Hydra overrides for all three (default: the default config). Writes
``bench/results/engines.json`` and a section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, save

TIMING = ["trainer.val_check_interval=1000000", "data.final_val_max_windows=1", "checkpoint.every_n_steps=0",
          "checkpoint.save_on_exit=false", "logger=none", "callbacks.console.every_n_steps=1000000"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _train_rows(metrics: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if "train/loss" in r]


def engine_rate(engine: str, steps: int, warmup: int, overrides: list[str]) -> float:
    """Steady-state training tokens/s of one launch.py run (rows after ``warmup`` steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, str(ROOT / "launch.py"), f"engine={engine}", f"trainer.max_steps={steps}",
                f"trainer.log_every_n_steps={warmup}", *TIMING, *overrides, f"hydra.run.dir={tmp}/run"]
        proc = subprocess.run(args, cwd=tmp, env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{engine}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        rows = _train_rows(Path(tmp) / "run" / "metrics.jsonl")
        # row k covers the steps since the previous row; the first row (step 0) and the first interval
        # hold the warm-up
        rates = [r["tokens_per_s"] for r in rows if r["step"] >= 2 * warmup and r["tokens_per_s"]]
        return statistics.median(rates)


LOOP = r'''
import sys, time, statistics, torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sem.config.store import register_configs
from sem.models.common import param_groups
from sem.engines.build import resolve_lengths
register_configs()
steps, warmup, overrides = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
with initialize_config_dir(config_dir="%s", version_base="1.3"):
    cfg = compose(config_name="config", overrides=overrides)
cfg, _ = resolve_lengths(cfg)
torch.manual_seed(cfg.seed)
corpus = instantiate(cfg.data.corpus)
dm = instantiate(OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                                   if k != "corpus"}), corpus=corpus)
dm.setup()
model = instantiate(cfg.model)
opt = instantiate(cfg.optimizer)(params=param_groups(model, cfg.optimizer.get("weight_decay", 0.0)))
sched = instantiate(cfg.scheduler)(optimizer=opt)
model.train()
times, tokens = [], 0
for step in range(steps):
    t0 = time.perf_counter()
    model.set_step(step)
    x, y = dm.train_batch(step)
    out = model(x, y)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
    opt.step(); opt.zero_grad(set_to_none=True); sched.step()
    float(out.loss)  # the engines read the loss every step too
    if step >= 2 * warmup:
        times.append(time.perf_counter() - t0); tokens = x.numel()
print(tokens * len(times) / sum(times))
'''


def loop_rate(steps: int, warmup: int, overrides: list[str]) -> float:
    code = LOOP % (ROOT / "conf")
    proc = subprocess.run([sys.executable, "-c", code, str(steps), str(warmup), *overrides], cwd=ROOT,
                          env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"hand-written loop: {proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def first_step_seconds(engine: str, overrides: list[str]) -> float:
    """Process start to the first train row in metrics.jsonl (written when step 0 ends)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        args = [sys.executable, str(ROOT / "launch.py"), f"engine={engine}", "trainer.max_steps=3",
                "trainer.log_every_n_steps=1", *TIMING, *overrides, f"hydra.run.dir={tmp}/run"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=tmp, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        while proc.poll() is None:
            if metrics.exists() and metrics.read_text().strip():
                elapsed = time.perf_counter() - t0
                proc.wait()
                return elapsed
            time.sleep(0.01)
        raise RuntimeError(f"{engine}: no step row; exit {proc.returncode}: {proc.stderr.read()[-2000:]}")


def bare_import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, pytorch_lightning, hydra"], check=True, env=_env())
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    a = parser.parse_args(argv)
    from bench.peak import matmul_gflops

    peak = matmul_gflops()
    rates: dict[str, list[float]] = {"lightning": [], "standalone": [], "hand-written": []}
    for _ in range(a.repeats):  # interleaved, so drift in the machine's speed hits all three alike
        rates["lightning"].append(engine_rate("lightning", a.steps, a.warmup, a.overrides))
        rates["standalone"].append(engine_rate("standalone", a.steps, a.warmup, a.overrides))
        rates["hand-written"].append(loop_rate(a.steps, a.warmup, a.overrides))
    median = {k: statistics.median(v) for k, v in rates.items()}
    base = median["hand-written"]
    startup = {e: statistics.median(first_step_seconds(e, a.overrides) for _ in range(a.repeats))
               for e in ("lightning", "standalone")}
    bare = statistics.median(bare_import_seconds() for _ in range(a.repeats))
    record = {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "overrides": a.overrides,
              "fp32_peak_gflops": peak, "tokens_per_s": rates, "median_tokens_per_s": median,
              "ratio_to_hand_written": {k: v / base for k, v in median.items()},
              "first_step_s": startup, "bare_imports_s": bare}
    targets = {"lightning": 0.97, "standalone": 0.99, "hand-written": 1.0}
    lines = ["| engine | tokens/s (median) | runs | vs hand-written | target |", "|---|---|---|---|---|"]
    for k, v in median.items():
        lines.append(f"| {k} | {v:,.0f} | {', '.join(f'{r:,.0f}' for r in rates[k])} | {v / base:.3f}x | "
                     f">= {targets[k]}x |")
    lines += ["", "| start-up (token cache warm) | seconds | vs bare imports |", "|---|---|---|",
              f"| `import torch, pytorch_lightning, hydra` | {bare:.2f} | |"]
    for e, s in startup.items():
        lines.append(f"| process start -> first optimizer step, engine={e} | {s:.2f} | +{s - bare:.2f} s "
                     "(target <= +1.5 s) |")
    body = (f"Engine overhead: {a.steps} steps per run, steps < {2 * a.warmup} dropped, median of {a.repeats} "
            f"interleaved repeats; fp32 matmul peak {peak:.0f} GFLOP/s. Overrides: `{' '.join(a.overrides) or '(defaults)'}`."
            "\n\n" + "\n".join(lines))
    save("engines", record, "Engine overhead and start-up", body)
    print(body)


if __name__ == "__main__":
    main()
