"""Where sem_small's training step spends its CPU time, and its tokens/s against transformer_small.

    python -m bench.profile_sem [--steps 10] [--seq-lens 128 512] [--threads N] [--recurrence scan] [--bf16]
                                [--baseline REV | --baseline REV:sem/model.py | --baseline path/to/model.py]

1. torch.profiler over ``--steps`` training steps (forward + backward + the configured optimizer,
   fused AdamW by default) of sem_small at the default ``data.batch_size`` x ``data.seq_len``
   (composed from conf/, as a run would): the top ops
   by self CPU time, and the time grouped by model part. The forward is grouped by the
   ``record_function`` labels of sem/model.py (``sem/norm``, ``sem/recurrence``, ...); each backward
   node is charged to the part whose forward op created it (the autograd sequence number links the
   two), so a part's figure is its forward plus its backward.
2. Training tokens/s of sem_small and transformer_small (and of ``--baseline``, an earlier
   sem/model.py, if given) at each ``--seq-lens`` with the default tokens per step, the models
   taking turns step-block by step-block in one process: medians over ``--rounds``, and ratios paired
   per round (median and quartiles of the per-round ratios), since on a shared machine only figures
   taken side by side compare.

Writes bench/results/<--output>.json (default profile_sem). BENCHMARKS.md's section is written by
hand from it: one run on a shared machine is not a figure to append unread.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import RESULTS, ROOT, command, machine
from bench.peak import matmul_gflops
from sem.training.allocator import keep_freed_memory

# Parts in the order of the forward; per block: (attention,) norm, in_proj, (conv,) recurrence, mlp. A label
# not listed here is still reported, after these.
BLOCK_PARTS = ("attention", "norm", "in_proj", "conv", "recurrence", "mlp")
PARTS = ("embed", *BLOCK_PARTS, "unitary_penalty", "final_norm", "propagator", "cayley_solve", "readout",
         "cross_entropy", "unlabelled forward", "unlabelled backward", "optimizer")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
LABELS = ("sem/", "transformer/")  # the models' record_function labels: <model>/<part>


def defaults() -> tuple[dict[str, Any], dict[str, Any], int, int, dict[str, Any]]:
    """(sem_small node, transformer_small node, batch, seq_len, optimizer node) as a default run has them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sem.config.store import register_configs

    register_configs()
    nodes = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in ("sem_small", "transformer_small"):
            cfg = compose(config_name="config", overrides=[f"model={name}"])
            nodes[name] = OmegaConf.to_container(cfg.model, resolve=True)
    node = nodes["sem_small"]
    for key in ("propagator_warmup_fraction", "max_steps"):  # the training budget, resolved per run (and
        node.pop(key, None)  # not arguments of older revisions, --baseline)
    node["propagator_warmup_steps"] = 0  # alpha = 1: the same work as at any alpha
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return node, nodes["transformer_small"], cfg.data.batch_size, cfg.data.seq_len, optimizer


def load_model_module(spec: str) -> Any:
    """The SEM as it was, to time beside today's: ``spec`` is a git revision (its ``sem/models/sem``
    package, imported under another name) or, for revisions before the package layout of 2026-12-03
    when the SEM was one file, ``REV:sem/model.py`` or a path to such a file."""
    import tempfile
    from types import SimpleNamespace

    from sem.models.common import param_groups

    path = Path(spec)
    if ":" not in spec and not path.is_file():  # a revision: its package, imports renamed
        name = "sem_models_baseline"
        folder = Path(tempfile.mkdtemp(prefix="sem_baseline_")) / name
        folder.mkdir()
        listing = subprocess.run(["git", "ls-tree", "--name-only", f"{spec}:sem/models/sem"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.split()
        for file in listing:
            source = subprocess.run(["git", "show", f"{spec}:sem/models/sem/{file}"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout
            (folder / file).write_text(source.replace("sem.models.sem.", f"{name}.").replace(
                "from sem.models.sem import", f"from {name} import"))
        sys.path.insert(0, str(folder.parent))
        package = importlib.import_module(name)
        return SimpleNamespace(SEMModel=package.SEMModel, param_groups=param_groups)
    source = path.read_text() if path.is_file() else subprocess.run(
        ["git", "show", spec], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    name = "sem_model_baseline"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, spec, "exec"), module.__dict__)
    return module


class Trainer:
    """One model with the run's optimizer (conf/optimizer, e.g. fused AdamW) over its param_groups,
    stepping on a fixed random batch [batch, seq_len + 1]."""

    def __init__(self, model: torch.nn.Module, batch: int, seq_len: int, opt_cfg: dict[str, Any],
                 param_groups: Callable[[torch.nn.Module, float], list[dict]], bf16: bool = False) -> None:
        from hydra.utils import instantiate

        self.model = model.train()
        self.opt = instantiate(opt_cfg)(params=param_groups(model, opt_cfg.get("weight_decay", 0.0)))
        self.x = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
        self.tokens = batch * seq_len
        self.bf16 = bf16

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):  # as precision=bf16_mixed
            out = self.model(self.x[:, :-1], self.x[:, 1:])
        out.loss.backward()
        with record_function("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def _label(event: Any) -> tuple[str | None, str | None]:
    """(part, block) of a forward op: its innermost ``sem/<part>`` label and enclosing ``sem/block<i>``."""
    part = block = None
    e = event
    while e is not None:
        if e.name.startswith("sem/block"):
            block = e.name[len("sem/"):]
        elif e.name.startswith(LABELS) and part is None:
            part = e.name.split("/", 1)[1]
        elif e.name == "optimizer":
            part = "optimizer"
        e = e.cpu_parent
    return part, block


def group_by_part(events: list[Any], steps: int) -> dict[str, Any]:
    """Per part (and per block x part): forward and backward ms per step, from profiler events."""
    seq_part: dict[int, tuple[str, str | None]] = {}
    fwd: dict[tuple[str, str | None], float] = defaultdict(float)
    bwd: dict[tuple[str, str | None], float] = defaultdict(float)
    for e in events:  # forward ops: self time charged to the innermost label
        if e.name.startswith(BACKWARD_PREFIX) or _in_backward(e):
            continue
        part, block = _label(e)
        if e.sequence_nr >= 0 and part is not None:
            seq_part.setdefault(e.sequence_nr, (part, block))
        if not e.name.startswith(LABELS) and e.name != "optimizer":
            fwd[(part or "unlabelled forward", block)] += e.self_cpu_time_total
    for e in events:  # backward nodes: their whole time (children included) to the part that made them
        if e.name.startswith(BACKWARD_PREFIX) and not _in_backward(e.cpu_parent):
            bwd[seq_part.get(e.sequence_nr, ("unlabelled backward", None))] += e.cpu_time_total
    keys = set(fwd) | set(bwd)
    ms = 1e-3 / steps
    names = [*PARTS, *sorted({k[0] for k in keys} - set(PARTS))]
    parts = {p: {"forward_ms": sum(fwd[k] for k in keys if k[0] == p) * ms,
                 "backward_ms": sum(bwd[k] for k in keys if k[0] == p) * ms} for p in names}
    blocks = {f"{b}/{p}": {"forward_ms": fwd[(p, b)] * ms, "backward_ms": bwd[(p, b)] * ms}
              for (p, b) in sorted(k for k in keys if k[1] is not None)}
    return {"parts": parts, "blocks": blocks}


def _in_backward(e: Any) -> bool:
    while e is not None:
        if e.name.startswith(BACKWARD_PREFIX):
            return True
        e = e.cpu_parent
    return False


# Op kinds, by aten name prefix, for the lower-bound table: matrix products are what the FLOP count covers.
KINDS = (("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
         ("attention kernels", ("aten::_scaled_dot_product",)),
         ("FFT", ("aten::_fft",)),
         ("optimizer", ("aten::_fused_adam", "aten::_foreach", "Optimizer.")),
         ("linear solve", ("aten::linalg", "aten::_linalg")))


def kind(op: str) -> str:
    # torch.compile's generated kernels (elementwise chains)
    if "cpp_fused" in op or op.startswith("graph_") or "CompiledFxGraph" in op:
        return "inductor's fused kernels"
    return next((name for name, prefixes in KINDS if op.startswith(prefixes)), "elementwise, copies, reductions")


def counted_flops(trainer: Trainer) -> int:
    """FLOPs of one training step as torch.utils.flop_counter counts them (matrix products, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.step()
    return counter.get_total_flops()


def _compiled_step(trainer: Trainer) -> Callable[[], None]:
    """Trainer.step with the model's forward (and backward) through torch.compile."""
    torch._dynamo.reset()
    compiled = torch.compile(trainer.model)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.bf16):
            out = compiled(trainer.x[:, :-1], trainer.x[:, 1:])
        out.loss.backward()
        with record_function("optimizer"):
            trainer.opt.step()
            trainer.opt.zero_grad(set_to_none=True)
    return step


def profile_steps(trainer: Trainer, steps: int, top: int, peak_gflops: float | None = None,
                  flops: int | None = None) -> dict[str, Any]:
    flops = counted_flops(trainer) if flops is None else flops
    for _ in range(3):  # warm-up: allocator, thread pool
        trainer.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        wall = (time.perf_counter() - t0) / steps
    averages = prof.key_averages()
    total = sum(a.self_cpu_time_total for a in averages)
    ops = sorted((a for a in averages if not a.key.startswith((*LABELS, "optimizer"))),
                 key=lambda a: -a.self_cpu_time_total)[:top]
    kinds: dict[str, float] = defaultdict(float)
    for a in averages:
        if not a.key.startswith((*LABELS, "optimizer", BACKWARD_PREFIX)) and "Backward" not in a.key:
            kinds[kind(a.key)] += a.self_cpu_time_total * 1e-3 / steps
    bound = flops / (peak_gflops * 1e9) * 1e3 if peak_gflops else None
    return {"wall_ms_per_step": wall * 1e3, "self_cpu_ms_per_step": total * 1e-3 / steps,
            "counted_gflop_per_step": flops / 1e9, "lower_bound_ms": bound, "peak_gflops": peak_gflops,
            "kinds_ms": dict(kinds),
            "top_ops": [{"op": a.key, "self_ms_per_step": a.self_cpu_time_total * 1e-3 / steps,
                         "share": a.self_cpu_time_total / total, "calls_per_step": a.count / steps}
                        for a in ops],
            **group_by_part(list(prof.events()), steps)}


def paired_ratio(times: dict[str, list[float]], num: str, den: str, steps: int) -> dict[str, float]:
    """Median and quartiles over rounds of (num's step time / den's) within the same round: on a shared
    machine neighbouring steps see the same load, so this is steadier than a ratio of medians."""
    per_round = [sum(times[num][i:i + steps]) / sum(times[den][i:i + steps])
                 for i in range(0, len(times[num]), steps)]
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {"median": statistics.median(per_round), "q1": q[0], "q3": q[2]}


def interleaved_tokens_per_s(trainers: dict[str, Trainer], rounds: int, steps: int
                             ) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Each round runs ``steps`` steps of every trainer in turn; median step time over all rounds,
    and the raw step times (seconds) for paired ratios."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for t in trainers.values():
        t.step()  # warm-up
    for r in range(rounds):
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))  # no fixed position
        for name in order:
            for _ in range(steps):
                t0 = time.perf_counter()
                trainers[name].step()
                times[name].append(time.perf_counter() - t0)
    return {name: {"tokens_per_s": trainers[name].tokens / statistics.median(ts),
                   "step_ms_median": statistics.median(ts) * 1e3, "step_ms": [round(t * 1e3, 1) for t in ts]}
            for name, ts in times.items()}, times


def table(result: dict[str, Any]) -> str:
    lines = [f"wall {result['wall_ms_per_step']:.0f} ms/step under the profiler, "
             f"self CPU {result['self_cpu_ms_per_step']:.0f} ms/step", "",
             "| op | self ms/step | share | calls/step |", "|---|---:|---:|---:|"]
    lines += [f"| {o['op']} | {o['self_ms_per_step']:.1f} | {o['share']:.1%} | {o['calls_per_step']:.0f} |"
              for o in result["top_ops"]]
    if result.get("lower_bound_ms"):
        wall = result["wall_ms_per_step"]
        lines += ["", f"Counted {result['counted_gflop_per_step']:.2f} GFLOP/step (torch.utils.flop_counter) at the "
                  f"measured peak {result['peak_gflops']:.0f} GFLOP/s: lower bound **{result['lower_bound_ms']:.0f} "
                  f"ms/step**; wall {wall:.0f} ms/step = {result['lower_bound_ms'] / wall:.2f} of peak.", "",
                  "| kind of op | self ms/step | share of wall |", "|---|---:|---:|"]
        kinds = result["kinds_ms"]
        for name in [k for k, _ in KINDS] + ["inductor's fused kernels", "elementwise, copies, reductions"]:
            if kinds.get(name):
                lines.append(f"| {name} | {kinds[name]:.1f} | {kinds[name] / wall:.1%} |")
        rest = wall - sum(kinds.values())
        lines.append(f"| autograd nodes, Python, dispatch (wall minus ops' self time) | {rest:.1f} | {rest / wall:.1%} |")
    parts = result["parts"]
    total = sum(v["forward_ms"] + v["backward_ms"] for v in parts.values())
    lines += ["", "| part | forward ms/step | backward ms/step | share |", "|---|---:|---:|---:|"]
    for p, v in parts.items():
        both = v["forward_ms"] + v["backward_ms"]
        if both > 0:  # the optimizer's time is in the forward column: it has no backward
            lines.append(f"| {p} | {v['forward_ms']:.1f} | {v['backward_ms']:.1f} | {both / total:.1%} |")
    fwd = sum(v["forward_ms"] for p, v in parts.items() if p != "optimizer")
    bwd = sum(v["backward_ms"] for v in parts.values())
    lines.append(f"| **total**: forward / backward / optimizer | {fwd:.0f} | {bwd:.0f} | "
                 f"optimizer {parts['optimizer']['forward_ms'] / total:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="ops listed by self CPU time")
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[128, 512],
                        help="tokens/s at these lengths, default tokens per step (none: profile only)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-steps", type=int, default=2, help="steps per model per round")
    parser.add_argument("--baseline", default=None,
                        help="an earlier SEM to profile and time beside this one: a git revision (its sem/models/sem), "
                             "or a file or REV:sem/model.py (before the package layout)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--recurrence", choices=["fft", "scan"], default=None,
                        help="override sem_small's recurrence (default: the config's)")
    parser.add_argument("--bf16", action="store_true",
                        help="forward under bf16 autocast, as precision=bf16_mixed (precision=auto on a bf16 CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="profile the step through torch.compile (as compile=true/auto; parts then unlabelled)")
    parser.add_argument("--transformer", action="store_true",
                        help="profile transformer_small's step too (its parts by its transformer/<part> labels)")
    parser.add_argument("--output", default="profile_sem", help="bench/results/<output>.json")
    a = parser.parse_args(argv)
    keep_freed_memory()  # as a run does (sem.app)
    if a.threads:
        torch.set_num_threads(a.threads)

    from types import SimpleNamespace

    from sem.models.common import param_groups
    from sem.models.sem import SEMModel
    from sem.training.restore import build_model

    sem_node, tr_node, batch, seq_len, opt_cfg = defaults()
    if a.recurrence:
        sem_node["recurrence"] = a.recurrence
    tokens = batch * seq_len
    variants: dict[str, Any] = {"sem_small": SimpleNamespace(SEMModel=SEMModel, param_groups=param_groups)}
    if a.baseline:
        variants["sem_small@baseline"] = load_model_module(a.baseline)

    def sem_trainer(module: Any, b: int, t: int) -> Trainer:
        torch.manual_seed(0)
        kwargs = {k: v for k, v in sem_node.items() if not k.startswith("_")}
        return Trainer(module.SEMModel(**{**kwargs, "max_seq_len": max(t, 2048)}), b, t, opt_cfg,
                       module.param_groups, a.bf16)

    def transformer_trainer(b: int, t: int) -> Trainer:
        torch.manual_seed(0)
        return Trainer(build_model({**tr_node, "max_seq_len": max(t, 2048)}), b, t, opt_cfg, param_groups, a.bf16)

    peak = matmul_gflops()
    record: dict[str, Any] = {
        "machine": machine(), "date": date.today().isoformat(), "command": command(),
        "threads": torch.get_num_threads(), "peak_gflops": peak, "bf16": a.bf16, "batch": batch, "seq_len": seq_len,
        "model": sem_node, "optimizer": opt_cfg, "baseline": a.baseline, "profile": {}, "throughput": {}}
    profiled = {name: functools.partial(sem_trainer, module) for name, module in variants.items()}
    if a.transformer:
        profiled["transformer_small"] = transformer_trainer
    for name, make in profiled.items():
        trainer = make(batch, seq_len)
        if a.compile:  # FLOPs are counted on the eager model: the counter sees none inside a compiled graph
            flops = counted_flops(trainer)
            trainer.step = _compiled_step(trainer)
        result = profile_steps(trainer, a.steps, a.top, peak, flops if a.compile else None)
        record["profile"][name] = result
        print(f"\n### {name}: {a.steps} steps, B={batch} T={seq_len}\n\n{table(result)}")
    for t in a.seq_lens:
        b = max(1, tokens // t)
        trainers = {name: sem_trainer(module, b, t) for name, module in variants.items()}
        trainers["transformer_small"] = transformer_trainer(b, t)
        rates, times = interleaved_tokens_per_s(trainers, a.rounds, a.round_steps)
        for name in variants:
            rates[name]["vs_transformer"] = rates[name]["tokens_per_s"] / rates["transformer_small"]["tokens_per_s"]
            rates[name]["vs_transformer_paired"] = paired_ratio(times, "transformer_small", name, a.round_steps)
        if a.baseline:
            rates["sem_small"]["speedup_paired"] = paired_ratio(times, "sem_small@baseline", "sem_small",
                                                                a.round_steps)
        record["throughput"][f"T={t} B={b}"] = rates
        print(f"\nT={t} B={b}, {torch.get_num_threads()} threads (fp32 matmul peak {peak:.0f} GFLOP/s):")
        for name, r in rates.items():
            line = f"  {name}: {r['tokens_per_s']:,.0f} tokens/s (median step {r['step_ms_median']:.0f} ms)"
            if "vs_transformer" in r:
                p = r["vs_transformer_paired"]
                line += (f", {r['vs_transformer']:.3f}x transformer_small (paired per round: median "
                         f"{p['median']:.3f}, quartiles {p['q1']:.3f}-{p['q3']:.3f})")
            if "speedup_paired" in r:
                p = r["speedup_paired"]
                line += f"; {p['median']:.3f}x the baseline (quartiles {p['q1']:.3f}-{p['q3']:.3f})"
            print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.output}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
