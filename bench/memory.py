"""Gradient checkpointing: peak memory and time of one training step, with and without
``model.gradient_checkpointing``, for sem_base and transformer_small at seq_len 1024.

    python -m bench.memory [--models sem_base transformer_small] [--seq-len 1024] [--batch N]
                           [--steps 2] [--memory-fraction 0.5] [--no-profile]

A step is forward + backward (no optimizer update: its state is the same either way); the models are
built from the composed config (``model=<name> model.gradient_checkpointing=<flag>``) as a run builds them.

Memory, each configuration in a fresh process (a high-water mark is per process):

- **Peak RSS**: the step is the process's first at full size. A full-size warm-up would pre-fault
  memory (glibc keeps freed heap pages resident) that the step then reuses, hiding part of its peak;
  the only warm-up is a step on a 1 x 8 batch, for lazy one-time state (imports, kernel caches).
  The process's high-water mark is then reset (``/proc/self/clear_refs``); the figure is the
  high-water mark after the step (``ru_maxrss``) minus the RSS just before it: the activations, the
  gradients (allocated anew, as after ``zero_grad(set_to_none=True)``) and any temporaries.
- **Profiler peak**: the highest running total of tensor bytes allocated minus freed during a second
  step, from ``torch.profiler`` (``profile_memory``, per-op self memory in start order): the torch
  allocator's view only, at op granularity.

The batch defaults to ``data.batch_size``; where the plain step is projected (batch x the increment
of a batch-1 probe, an upper bound) to need more than ``--memory-fraction`` of this machine's
available memory, it is halved until it fits, and the table says so.

Time: one process per model alternates plain and checkpointed steps (one warm-up each, then
``--steps`` each, median), so drift in a shared machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT, save

MB = 2**20


# ------------------------------------------------------------------------------- in the child


def _compose(name: str, checkpointing: bool) -> Any:
    """The resolved run config of ``launch.py model=<name> model.gradient_checkpointing=<flag> data=stdlib``."""
    from hydra import compose, initialize_config_dir

    from sem.config.store import register_configs
    from sem.engines.build import resolve_lengths

    register_configs()
    overrides = [f"model={name}", f"model.gradient_checkpointing={str(checkpointing).lower()}", "data=stdlib"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return resolve_lengths(cfg)[0]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _profiled_peak(step: Any) -> int:
    """Peak bytes (allocated - freed) that torch's allocator held during ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage  # bytes this op allocated minus freed, children excluded
        peak = max(peak, running)
    return peak


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate

    cfg = _compose(spec["model"], spec["checkpointing"])
    if cfg.model.max_seq_len < spec["seq_len"]:
        raise ValueError(f"--seq-len={spec['seq_len']} exceeds {spec['model']}'s max_seq_len={cfg.model.max_seq_len}")
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    x = torch.randint(0, 256, (spec["batch"], spec["seq_len"] + 1))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x[:, :-1], x[:, 1:]).loss.backward()

    if spec["mode"] == "time":  # alternate plain and checkpointed steps in one process
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(2 * (spec["steps"] + 1)):
            flag = bool(i % 2)
            model.gradient_checkpointing = flag
            t0 = time.perf_counter()
            step()
            if i >= 2:  # the first of each is a warm-up
                times[flag].append(time.perf_counter() - t0)
        return {"step_s": statistics.median(times[False]), "step_s_checkpointed": statistics.median(times[True]),
                "steps": spec["steps"]}

    # Lazy one-time state (torch.utils.checkpoint's first call alone costs ~70 MB of imports and 3 s)
    # is set up by a step on a 1 x 8 batch: the same code paths, nothing activation-sized pre-faulted.
    tiny = x[:1, :9]
    model(tiny[:, :-1], tiny[:, 1:]).loss.backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    reset = _reset_peak_rss()
    before_kb, maxrss_before_kb = _status_kb("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - t0
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"params": sum(p.numel() for p in model.parameters()), "rss_before_mb": before_kb / 1024,
           "step_peak_rss_mb": (maxrss_kb - before_kb) / 1024, "first_step_s": first_step_s,
           # a high-water mark above the pre-step RSS (no reset) would make the figure a lower bound
           "exact": maxrss_before_kb <= before_kb, "hwm_reset": reset}
    if spec["profile"]:
        out["profiler_peak_mb"] = _profiled_peak(step) / MB
    return out


# ------------------------------------------------------------------------------ in the parent


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def fit_batch(name: str, seq_len: int, wanted: int, fraction: float) -> tuple[int, str]:
    """``wanted`` halved until batch x (a batch-1 plain step's peak) fits ``fraction`` of free memory."""
    probe = _run_child({"model": name, "seq_len": seq_len, "batch": 1, "checkpointing": False,
                        "mode": "memory", "profile": False})
    budget = fraction * _available_mb()
    batch = wanted
    while batch > 1 and batch * probe["step_peak_rss_mb"] > budget:
        batch //= 2
    note = "" if batch == wanted else (
        f"batch {wanted} projected to need {wanted * probe['step_peak_rss_mb'] / 1024:.1f} GB (batch x "
        f"{probe['step_peak_rss_mb']:.0f} MB at batch 1) > {fraction:g} x {budget / fraction / 1024:.1f} GB "
        f"available: halved to {batch}")
    return batch, note


def measure(name: str, seq_len: int, batch: int | None, steps: int, fraction: float, profile: bool
            ) -> dict[str, Any]:
    if batch is None:
        default = _compose(name, False).data.batch_size
        batch, note = fit_batch(name, seq_len, default, fraction)
    else:
        default, note = batch, ""
    base = {"model": name, "seq_len": seq_len, "batch": batch}
    plain = _run_child({**base, "checkpointing": False, "mode": "memory", "profile": profile})
    ckpt = _run_child({**base, "checkpointing": True, "mode": "memory", "profile": profile})
    timing = _run_child({**base, "checkpointing": False, "mode": "time", "steps": steps})
    row = {**base, "default_batch": default, "batch_note": note, "params": plain["params"],
           "plain": plain, "checkpointed": ckpt, **timing,
           "peak_rss_ratio": ckpt["step_peak_rss_mb"] / plain["step_peak_rss_mb"],
           "slowdown": timing["step_s_checkpointed"] / timing["step_s"]}
    if profile:
        row["profiler_peak_ratio"] = ckpt["profiler_peak_mb"] / plain["profiler_peak_mb"]
    return row


def _table(rows: list[dict[str, Any]], profile: bool) -> str:
    lines = ["| model | params | seq_len x batch | step peak RSS, plain | checkpointed | ratio |"
             + (" profiler peak, plain | checkpointed | ratio |" if profile else "")
             + " step s, plain | checkpointed | slowdown |",
             "|---|---:|---|---:|---:|---:|" + ("---:|---:|---:|" if profile else "") + "---:|---:|---:|"]
    for r in rows:
        p, c = r["plain"], r["checkpointed"]
        bound = "" if p["exact"] and c["exact"] else " (lower bound)"
        line = (f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['seq_len']} x {r['batch']} | "
                f"{p['step_peak_rss_mb']:,.0f} MB | {c['step_peak_rss_mb']:,.0f} MB{bound} | {r['peak_rss_ratio']:.2f} |")
        if profile:
            line += (f" {p['profiler_peak_mb']:,.0f} MB | {c['profiler_peak_mb']:,.0f} MB | "
                     f"{r['profiler_peak_ratio']:.2f} |")
        lines.append(line + f" {r['step_s']:.2f} | {r['step_s_checkpointed']:.2f} | {r['slowdown']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sem_base", "transformer_small"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=None, help="default: data.batch_size, fitted to memory")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--memory-fraction", type=float, default=0.5)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return
    if a.batch is not None and a.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {a.batch}")
    if not 0 < a.memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {a.memory_fraction}")
    load = os.getloadavg()
    rows = [measure(m, a.seq_len, a.batch, a.steps, a.memory_fraction, a.profile) for m in a.models]
    notes = [f"- {r['model']}: {r['batch_note']}" for r in rows if r["batch_note"]]
    body = ("A step = forward + backward (fp32, CPU, no optimizer update), on a fresh process per "
            "memory figure. Step peak RSS = `ru_maxrss` after the process's first step minus the RSS just "
            "before it (high-water mark reset after the model, the batch and a 1 x 8 warm-up step). Profiler peak = "
            "highest running total of tensor bytes held during a second step (torch.profiler, op "
            f"granularity). Step time: plain and checkpointed steps alternated in one process, median of "
            f"{a.steps} each after one warm-up each; load average at start {load[0]:.2f}, {load[1]:.2f}, "
            f"{load[2]:.2f} (shared machine).\n\n" + _table(rows, a.profile) + "\n"
            + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    save("memory", {"seq_len": a.seq_len, "steps": a.steps, "load_average": load, "rows": rows},
         "Gradient checkpointing: peak memory and time of a training step", body)
    print(body)


if __name__ == "__main__":
    main()
