"""Time per generated token against the context length: SEM recurrent decoding vs SEM full recompute
vs the Transformer baseline (full recompute; it has no KV cache)::

    python -m bench.decode                     # contexts 128, 1k, 4k, 16k; CPU
    python -m bench.decode --contexts 128 1024 --device cuda

One generated token costs, at context L:

- SEM recurrent: one ``model.step`` (the context is already folded into the state by ``prefill``);
- SEM recurrent, compiled: the same through ``decode_state(compile=True)`` (one graph for every position);
  its cold compile (the first call: an empty inductor cache in a fresh process, a warm one after) is
  reported beside it, since a generation pays it once;
- SEM full recompute: one forward over the L tokens (the last position's logits are the next token's);
- Transformer: one forward over the last min(L, max_seq_len) tokens, which is what ``sem.sample``
  does; beyond max_seq_len it forgets the rest, so those contexts are marked rather than timed.

``sem_small`` and ``transformer_small`` from ``conf/model`` with random weights (timing does not
depend on the values); the SEM's forward length check is raised to the largest context (nothing
in the model depends on it). Each figure is the median over ``--repeats`` timings; a configuration
whose predicted time exceeds ``--budget-s`` is skipped and says so. On a shared machine pass
``--threads 1``: with other processes on the cores, torch's spinning worker threads can make a
small model 20-60x slower, which measures the neighbours rather than the model. Writes
``bench/results/decode.json`` and appends a table to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.peak import cpu_model

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("sem_recurrent", "sem_compiled", "sem_recompute", "transformer")
TITLES = {"sem_recurrent": "SEM recurrent (step)", "sem_compiled": "SEM recurrent, compiled step",
          "sem_recompute": "SEM full recompute", "transformer": "Transformer (full recompute)"}
RECURRENT = ("sem_recurrent", "sem_compiled")


def build(name: str, max_seq_len: int | None = None) -> nn.Module:
    """The model a ``conf/model/<name>.yaml`` option describes, random weights, eval mode."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sem.config.store import register_configs
    from sem.training.restore import build_model

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        node = OmegaConf.to_container(compose(config_name="config", overrides=[f"model={name}"]).model,
                                      resolve=True)
    node.pop("propagator_warmup_fraction", None)  # a training-budget setting, resolved per run
    if "propagator_warmup_steps" in node:
        node["propagator_warmup_steps"] = 0  # alpha = 1: the trained model's propagator
    if max_seq_len is not None:
        node["max_seq_len"] = max_seq_len
    torch.manual_seed(0)
    return build_model(node).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def recurrent_call(model: nn.Module, context: int, steps: int, device: torch.device, compile: bool = False
                   ) -> Callable[[], None]:
    """``steps`` tokens of ``model.step`` after a ``context``-token prefill (the state carries on
    from call to call: its size does not change); ``compile``: through a compiled step."""
    x = torch.randint(0, 256, (1, context), device=device)
    logits, state = model.prefill(x, model.decode_state(1, compile=compile))
    token = logits.argmax(-1)

    def call() -> None:
        nonlocal state, token
        for _ in range(steps):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)

    return call


def forward_call(model: nn.Module, context: int, device: torch.device) -> Callable[[], None]:
    """One forward over ``context`` tokens (= one generated token by full recompute)."""
    x = torch.randint(0, 256, (1, context), device=device)
    return lambda: model(x).logits[:, -1]


@torch.no_grad()
def run(contexts: list[int], repeats: int, steps: int, budget_s: float, device: torch.device
        ) -> dict[str, dict[int, dict[str, Any]]]:
    """Seconds per token for every (method, context), or why it was skipped.

    A first pass (ascending contexts) warms each configuration up and predicts its cost, skipping
    the ones over budget; then ``repeats`` rounds time every configuration once per round, so a
    change in the machine's load over the run spreads over all cells instead of biasing some.
    """
    sem = build("sem_small", max_seq_len=max(contexts)).to(device)
    transformer = build("transformer_small").to(device)
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in METHODS}
    cells: dict[tuple[str, int], tuple[Callable[[], None], int]] = {}  # -> (call, tokens per call)
    first_call: dict[int, float] = {}  # context -> the compiled step's first call (at the first: the cold compile)
    last: dict[str, tuple[int, float]] = {}  # method -> (context, seconds per call) of its last warm-up
    for context in sorted(contexts):
        for method in METHODS:
            if method == "transformer" and context > transformer.max_seq_len:
                results[method][context] = {"skipped": f"beyond max_seq_len={transformer.max_seq_len} "
                                                       "(sampling truncates the context to it)"}
                continue
            if method not in RECURRENT and method in last:
                prev_context, prev_s = last[method]
                growth = context / prev_context  # attention is quadratic, the SEM forward ~linear
                predicted = prev_s * (growth ** 2 if method == "transformer" else growth) * (repeats + 1)
                if predicted > budget_s:
                    results[method][context] = {"skipped": f"predicted {predicted:.0f} s > {budget_s:.0f} s budget"}
                    continue
            if method in RECURRENT:
                call, tokens = recurrent_call(sem, context, steps, device, method == "sem_compiled"), steps
            else:
                call, tokens = forward_call(sem if method == "sem_recompute" else transformer, context, device), 1
            first = _timed(call, device)  # warm-up: allocator, kernels, FFT plans; the compile
            if method == "sem_compiled":
                first_call[context] = first
            last[method] = (context, _timed(call, device))
            cells[method, context] = (call, tokens)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in cells}
    for _ in range(repeats):
        for key, (call, tokens) in cells.items():
            times[key].append(_timed(call, device) / tokens)
    for (method, context), ts in sorted(times.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        s = statistics.median(ts)
        results[method][context] = {"ms_per_token": s * 1e3, "repeats_ms": [t * 1e3 for t in ts]}
        if method == "sem_compiled":
            results[method][context]["first_call_s"] = first_call[context]
        print(f"  context {context:>6}: {TITLES[method]:<30} {s * 1e3:9.3f} ms/token", file=sys.stderr)
    return results


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host CPU {cpu_model()})"
    n = torch.get_num_threads()
    return f"{cpu_model()}, {n} torch thread{'s' * (n != 1)} ({os.cpu_count()} cores)"


def _cell(entry: dict[str, Any]) -> str:
    if "ms_per_token" in entry:
        ms = entry["ms_per_token"]
        cell = f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"
        return cell + (f" (first call {entry['first_call_s']:.1f} s)" if "first_call_s" in entry else "")
    return f"skipped: {entry['skipped']}"


def table(record: dict[str, Any]) -> str:
    contexts = record["contexts"]
    lines = [f"### Decode: time per generated token ({record['date']})", "",
             f"- machine: {record['machine']} (load average {record['load_average']} at start)",
             f"- torch {record['torch']}, Python {record['python']}, device {record['device']}",
             f"- command: `{record['command']}`",
             f"- models: sem_small and transformer_small (conf/model), random weights; median of "
             f"{record['repeats']} repeats ({record['steps']} steps each for the recurrent paths); the compiled "
             "step's first call (its compile: cold at the first context) beside it", "",
             "| context | " + " | ".join(TITLES[m] for m in METHODS) + " |",
             "|---:|" + "---:|" * len(METHODS)]
    for c in contexts:
        lines.append(f"| {c:,} | " + " | ".join(_cell(record["results"][m][str(c)]) for m in METHODS) + " |")
    rec = [record["results"]["sem_recurrent"][str(c)].get("ms_per_token") for c in contexts]
    if all(r is not None for r in rec):
        lines += ["", f"SEM recurrent decoding at {contexts[-1]:,} vs {contexts[0]:,} tokens of context: "
                      f"{rec[-1] / rec[0]:.2f}x the time per token."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="recurrent steps per timing")
    parser.add_argument("--budget-s", type=float, default=60.0, help="skip a configuration predicted to take longer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own); 1 is steadier on a busy machine")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode.json"))
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{machine(device)}, torch {torch.__version__}, load average {load}", file=sys.stderr)
    results = run(args.contexts, args.repeats, args.steps, args.budget_s, device)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(device),
        "load_average": load,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "command": " ".join(["python -m bench.decode", shlex.join(argv if argv is not None else sys.argv[1:])]).strip(),
        "repeats": args.repeats,
        "steps": args.steps,
        "contexts": sorted(args.contexts),
        "results": {m: {str(c): v for c, v in r.items()} for m, r in results.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    md = Path(args.markdown)
    text = table(record)
    if not md.exists():
        md.write_text("# Benchmarks\n\nMeasured figures, newest last. Each section says how to reproduce it.\n\n")
    with md.open("a") as f:
        f.write("\n" + text)
    print(text)
    print(f"wrote {out} and appended to {md}", file=sys.stderr)


if __name__ == "__main__":
    main()
