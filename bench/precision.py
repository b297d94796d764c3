"""Training step time of the default SEM and transformer_small in fp32 and under bf16 autocast, side by side.

    python -m bench.precision [--rounds 5] [--round-steps 3] [--save]

What ``precision=auto`` decides on a CPU (bf16-mixed where the CPU has bf16 instructions): each model
at the default ``data.batch_size`` x ``data.seq_len`` with the run's optimizer, both precisions, all
four stepping in turn, ``--round-steps`` steps each per round, so a shared machine's drift hits them
alike. Reports the median seconds per step and the speed of bf16 relative to fp32 per model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.common import command, machine, save
from bench.profile_sem import Trainer, defaults
from sem.models.common import param_groups
from sem.models.sem import SEMModel
from sem.models.transformer import TransformerLM
from sem.training.precision import cpu_has_bf16


def measure(rounds: int, round_steps: int) -> dict[str, Any]:
    node, tnode, batch, seq_len, optimizer = defaults()
    for n in (node, tnode):
        n.pop("_target_", None)
        n.pop("propagator_warmup_fraction", None)
    runs: dict[str, Trainer] = {}
    for name, cls, kwargs in (("sem_small", SEMModel, node), ("transformer_small", TransformerLM, tnode)):
        for bf16 in (False, True):
            torch.manual_seed(0)
            runs[f"{name} {'bf16' if bf16 else 'fp32'}"] = Trainer(cls(**kwargs), batch, seq_len, optimizer,
                                                                   param_groups, bf16)
    for trainer in runs.values():
        for _ in range(2):  # warm-up: allocator, first-call costs
            trainer.step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, trainer in runs.items():
            start = time.perf_counter()
            for _ in range(round_steps):
                trainer.step()
            times[name].append((time.perf_counter() - start) / round_steps)
    out = {name: {"s_per_step": statistics.median(t), "tokens_per_s": batch * seq_len / statistics.median(t)}
           for name, t in times.items()}
    for name in ("sem_small", "transformer_small"):
        out[f"{name} bf16"]["speed_vs_fp32"] = out[f"{name} fp32"]["s_per_step"] / out[f"{name} bf16"]["s_per_step"]
    return {"batch": batch, "seq_len": seq_len, "rounds": rounds, "round_steps": round_steps,
            "cpu_has_bf16": cpu_has_bf16(), "runs": out}


def table(record: dict[str, Any]) -> str:
    lines = ["| model, precision | s/step | tokens/s | speed vs fp32 |", "|---|---:|---:|---:|"]
    for name, r in record["runs"].items():
        lines.append(f"| {name} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | {r.get('speed_vs_fp32', 1.0):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-steps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write bench/results/precision.json and BENCHMARKS.md")
    args = parser.parse_args()
    record = measure(args.rounds, args.round_steps)
    body = (f"Batch {record['batch']} x seq_len {record['seq_len']}, {args.rounds} rounds of {args.round_steps} "
            f"steps each, in turn; CPU with bf16 instructions: {record['cpu_has_bf16']}.\n\n" + table(record))
    print(f"{machine()}: {command()}\n{body}")
    if args.save:
        save("precision", record, "fp32 vs bf16 autocast on CPU: training speed side by side", body)


if __name__ == "__main__":
    main()
