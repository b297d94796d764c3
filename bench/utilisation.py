"""Utilisation: training tokens/s and achieved FLOP/s as a fraction of this machine's matmul peak,
measured in the same run, for sem_small and transformer_small at several sequence lengths.

    python -m bench.utilisation [--seq-lens 128 512 2048] [--tokens 4096] [--steps 8] [--compile] [--bf16]

A step is forward + backward + AdamW on ``--tokens`` tokens (batch = tokens / seq_len), timed after
two warm-up steps, median of ``--steps``. FLOPs per step are counted by ``torch.utils.flop_counter``
(matrix products; the FFT, the Cayley solve and elementwise work are not counted, so the SEM's
fraction is a lower bound). On CUDA the same runs in bf16 autocast against the bf16 peak; ``--bf16`` does
so on a CPU too. ``--compile`` adds each model's step through torch.compile (as ``compile=true``/``auto``
runs it; the FLOPs counted on the eager step), with its first (compiling) step's seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import save
from bench.peak import matmul_gflops
from sem.config.store import register_configs
from sem.training.allocator import keep_freed_memory


def build(name: str, seq_len: int) -> torch.nn.Module:
    from omegaconf import OmegaConf

    from sem.training.restore import build_model

    register_configs()
    node = OmegaConf.load(f"conf/model/{name}.yaml")
    node = {k: v for k, v in OmegaConf.to_container(node).items() if k != "defaults"}
    target = "sem.models.sem.SEMModel" if name.startswith("sem") else "sem.models.transformer.TransformerLM"
    return build_model({"_target_": target, **node, "max_seq_len": max(seq_len, 2048)})


def measure(name: str, seq_len: int, tokens: int, steps: int, device: str, dtype: torch.dtype | None,
            compiled: bool = False) -> dict[str, Any]:
    from sem.models.common import param_groups

    torch.manual_seed(0)
    model = build(name, seq_len).to(device).train()
    # as a run builds it (conf/optimizer/adamw: fused, weight decay on matrices only)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    batch = max(1, tokens // seq_len)
    x = torch.randint(0, 256, (batch, seq_len + 1), device=device)
    torch._dynamo.reset()
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(x[:, :-1], x[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    if compiled:  # count on the eager model (the counter sees no FLOPs inside a compiled graph)
        autocast = torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)
        with FlopCounterMode(display=False) as counter, autocast:
            model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
    else:
        with FlopCounterMode(display=False) as counter:
            step()
        first = None
    flops = counter.get_total_flops()
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"model": name + (" (compiled)" if compiled else ""), "compile_s": first,
            "seq_len": seq_len, "batch": batch, "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": batch * seq_len / sec, "step_s": sec, "flops_per_step": flops,
            "achieved_gflops": flops / sec / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["sem_small", "transformer_small"])
    parser.add_argument("--compile", action="store_true", help="each model eager and through torch.compile")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on a CPU too (against the bf16 peak)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    a = parser.parse_args(argv)
    keep_freed_memory()  # as a run does (sem.app)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" or a.bf16 else None
    peak = matmul_gflops(device=device, dtype=dtype or torch.float32, n=4096 if device == "cuda" else 1024)
    rows = [measure(m, t, a.tokens, a.steps, device, dtype, c) for t in a.seq_lens for m in a.models
            for c in ((False, True) if a.compile else (False,))]
    for r in rows:
        r["fraction_of_peak"] = r["achieved_gflops"] / peak
    lines = ["| model | params | seq_len x batch | tokens/s | counted GFLOP/step | achieved GFLOP/s | of peak |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['seq_len']} x {r['batch']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['flops_per_step'] / 1e9:.2f} | {r['achieved_gflops']:.1f} | "
                     f"{r['fraction_of_peak']:.2f} |")
    for r in rows:
        if r["compile_s"] is not None:
            eager = next(e for e in rows if e["model"] == r["model"].removesuffix(" (compiled)")
                         and e["seq_len"] == r["seq_len"])
            lines.append(f"\n- {r['model']}, seq_len {r['seq_len']}: {r['tokens_per_s'] / eager['tokens_per_s']:.2f}x "
                         f"the eager step; its first step (the compile) took {r['compile_s']:.0f} s")
    by = {(r["model"], r["seq_len"]): r for r in rows}
    ratios = [f"seq_len {t}: sem_small / transformer_small tokens/s = "
              f"{by[('sem_small', t)]['tokens_per_s'] / by[('transformer_small', t)]['tokens_per_s']:.2f}x"
              for t in a.seq_lens if ("sem_small", t) in by and ("transformer_small", t) in by]
    precision = "bf16 autocast" if dtype else "fp32"
    body = (f"{precision} on {device}; matmul peak measured in the same run: {peak:.0f} GFLOP/s. A step = "
            f"forward + backward + AdamW on {a.tokens} tokens, median of {a.steps}. FLOPs counted by "
            "torch.utils.flop_counter (matrix products only).\n\n" + "\n".join(lines) + "\n\n" +
            "\n".join(f"- {r}" for r in ratios))
    save("utilisation", {"device": device, "precision": precision, "peak_gflops": peak, "rows": rows},
         "Utilisation: tokens/s and fraction of the matmul peak", body)
    print(body)


if __name__ == "__main__":
    main()
