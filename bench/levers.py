"""Training tokens/s of SEM variants (``model.<key>`` levers) against the default model, side by side.

    python -m bench.levers [--rounds 7] [--round-steps 3] [--only NAME ...] [--variant NAME key=value ...]

Each variant is the default run's model (conf/, ``model=sem_small``) with some keys changed (``model.``
keys by their name; ``data.batch_size``, ``data.seq_len``; ``compile``); all of them step in turn,
``--round-steps`` steps each per round, in one process with the run's optimizer at the default
``data.batch_size`` x ``data.seq_len`` (or the variant's), so a shared machine's drift hits them alike.
``--variant`` adds one of your own (repeatable), e.g. ``--variant ctx512 data.seq_len=512
data.batch_size=4 attention_window=512``. Reports the median seconds per step and the per-round ratio of
the default's time per token to the variant's (median and quartiles): a variant at ratio r trains r x the
default's tokens per second, so an equal-wall-time comparison gives it r x the default's tokens
(``trainer.max_steps`` x r at the same tokens per step). Writes bench/results/levers.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import yaml

from bench.common import command, machine, save
from bench.profile_sem import Trainer, defaults
from sem.models.common import param_groups
from sem.models.sem import SEMModel

VARIANTS = {  # the default has model.conv_width=4 and model.attention_every=2 since 2026-12-04
    "default": {},
    "attention_every=0 (the default before the fourth session of 2026-12-04)": {"attention_every": 0},
    "attention_every=0, conv_width=0 (the default before 2026-12-04)": {"attention_every": 0, "conv_width": 0},
    "ring init": {"r_min": 0.9, "r_max": 0.999, "max_phase": 0.314},
    "selective": {"selective": True},
    "selective, conv_width=0": {"selective": True, "conv_width": 0},
    "modes=4": {"modes": 4},
    "modes=8": {"modes": 8},
    "heads=4": {"heads": 4},
    "heads=8": {"heads": 8},
    "heads=16": {"heads": 16},
    "attention_every=4": {"attention_every": 4},
    "attention_every=1": {"attention_every": 1},
    "attention_window=64": {"attention_window": 64},
    "attention_rope": {"attention_rope": True},
    "recurrence=scan": {"recurrence": "scan"},
    "compile=true": {"compile": True},  # not a model key: the run's top-level compile (TrainStep.forward)
}


def measure(variants: dict[str, dict[str, Any]], rounds: int, round_steps: int, bf16: bool = False) -> dict[str, Any]:
    node, _, batch, seq_len, optimizer = defaults()
    node.pop("_target_", None)
    trainers, tokens = {}, {}
    for name, keys in variants.items():
        torch.manual_seed(0)
        model_keys = {k: v for k, v in keys.items() if k != "compile" and not k.startswith("data.")}
        b, t = keys.get("data.batch_size", batch), keys.get("data.seq_len", seq_len)
        tokens[name] = b * t
        trainers[name] = Trainer(SEMModel(**{**node, **model_keys}), b, t, optimizer, param_groups, bf16)
        if keys.get("compile"):  # as a run with compile=true: the forward (and backward) compiled
            trainers[name].model = torch.compile(trainers[name].model)
        for _ in range(2):  # warm-up: allocator, first-call costs
            trainers[name].step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(round_steps):
                trainer.step()
            times[name].append((time.perf_counter() - start) / round_steps)
    base = times["default"]
    out = {}
    for name in variants:  # time per token: a variant may take other tokens per step
        ratios = sorted((b / tokens["default"]) / (t / tokens[name]) for b, t in zip(base, times[name]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {"keys": variants[name], "s_per_step": statistics.median(times[name]),
                     "tokens_per_s": tokens[name] / statistics.median(times[name]),
                     "speed_ratio": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
                     "parameters": sum(p.numel() for p in trainers[name].model.parameters())}
    return {"batch": batch, "seq_len": seq_len, "rounds": rounds, "round_steps": round_steps,
            "precision": "bf16 autocast" if bf16 else "fp32", "variants": out}


def table(record: dict[str, Any]) -> str:
    lines = ["| variant | keys | parameters | s/step | tokens/s | speed vs default (median, quartiles) |",
             "|---|---|---:|---:|---:|---|"]
    for name, v in record["variants"].items():
        keys = " ".join(f"{'' if k == 'compile' or k.startswith('data.') else 'model.'}{k}={val}"
                        for k, val in v["keys"].items()) or "-"
        lines.append(f"| {name} | {keys} | {v['parameters']:,} | {v['s_per_step']:.3f} | {v['tokens_per_s']:,.0f} "
                     f"| {v['speed_ratio']:.2f} ({v['ratio_q1']:.2f}-{v['ratio_q3']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="every variant under bf16 autocast (precision=auto here)")
    parser.add_argument("--only", nargs="*", help="these variants (and the default) only")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME key=value",
                        help="a variant of your own: a name, then model keys, data.batch_size, data.seq_len")
    parser.add_argument("--save", action="store_true", help="write bench/results/levers.json and BENCHMARKS.md")
    args = parser.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k == "default" or k in args.only}
    for name, *pairs in args.variant:
        bad = [p for p in pairs if "=" not in p]
        if bad:
            parser.error(f"--variant {name}: {' '.join(bad)}: expected key=value")
        variants[name] = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
    record = measure(variants, args.rounds, args.round_steps, args.bf16)
    body = (f"Batch {record['batch']} x seq_len {record['seq_len']}, {record['precision']}, {args.rounds} rounds of "
            f"{args.round_steps} steps per variant, in turn.\n\n" + table(record))
    print(f"{machine()}: {command()}\n{body}")
    if args.save:
        save("levers", record, "SEM levers: training speed side by side", body)


if __name__ == "__main__":
    main()
