"""Host syncs per optimizer step: every read of a tensor's value on the host (``.item()``, ``float()``,
``int()``, ``bool()``, ``.tolist()``, ``.numpy()``) counted per step, for both engines, and the
tokens/s of the same runs. On a GPU each such read stalls the pipeline: between logging steps there
should be none.

    python -m bench.host_syncs [key=value ...]     # overrides for the runs (default: sem_small, 60 steps)
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")


@contextlib.contextmanager
def counting_reads(current_step: list[int]) -> Iterator[Counter[int]]:
    """Count host reads of tensor values, attributed to ``current_step[0]`` at the time of the read."""
    counts: Counter[int] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(original: Any) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[current_step[0]] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def build_run(overrides: list[str], run_dir: Path) -> Any:
    """What ``python launch.py <overrides>`` builds (no Hydra run: the engine is driven directly)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sem.config.store import CONF_DIR as CONF
    from sem.engines.build import build, resolve_lengths

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg, budget = resolve_lengths(cfg)
    return build(cfg, run_dir, instantiate(cfg.data.corpus), budget=budget)


def syncs_per_step(overrides: list[str], run_dir: Path) -> tuple[dict[int, int], float]:
    """({step: host reads}, tokens/s) of one fit. Reads between ``policy.start(s)`` and
    ``policy.start(s + 1)`` belong to step s (its callbacks, logging and saving included)."""
    built = build_run(overrides, run_dir)
    policy = built.engine.train_step
    current = [-1]
    start = policy.start

    def started(step: int, rank: int = 0) -> None:
        current[0] = step
        start(step, rank)

    policy.start = started  # type: ignore[method-assign]
    began = time.perf_counter()
    with counting_reads(current) as counts:
        built.engine.fit()
    seconds = time.perf_counter() - began
    steps = built.engine.global_step
    tokens = steps * built.datamodule.batch_size * built.datamodule.seq_len
    return {s: counts.get(s, 0) for s in range(steps)}, tokens / seconds


def quiet_steps(max_steps: int, every: int) -> list[int]:
    """Steps that are neither logging, console, checkpoint nor first/last steps (``every`` for all)."""
    return [s for s in range(1, max_steps - 1) if s % every and (s + 1) % every]


def main(argv: list[str]) -> None:
    from bench.common import save

    steps, every = 60, 20
    overrides = ["accelerator=cpu", f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={every}",
                 f"callbacks.console.every_n_steps={every}", f"trainer.val_check_interval={steps}",
                 "checkpoint.every_n_steps=0", "checkpoint.save_on_exit=false", "~callbacks.progress_bar",
                 "logger=none", *argv]
    rows, record = [], {"overrides": overrides, "engines": {}}
    for engine in ("lightning", "standalone"):
        with tempfile.TemporaryDirectory() as tmp:
            counts, rate = syncs_per_step([*overrides, f"engine={engine}"], Path(tmp))
        quiet = quiet_steps(steps, every)
        per_quiet = sum(counts[s] for s in quiet) / max(len(quiet), 1)
        logging = [counts[s] for s in range(steps) if s not in quiet]
        record["engines"][engine] = {"reads_per_quiet_step": per_quiet, "reads_per_logging_step": logging,
                                     "tokens_per_s": rate}
        rows.append(f"| {engine} | {per_quiet:.1f} | {max(logging)} | {rate:,.0f} |")
        print(rows[-1], flush=True)
    body = ("Host reads of tensor values (`.item()`, `float()`, `int()`, `bool()`, `.tolist()`, `.numpy()`) "
            f"per optimizer step, {steps} steps, a logging step every {every}.\n\n"
            "| engine | reads per step between logging steps | most on a logging step | tokens/s |\n"
            "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    save("host_syncs", record, "Host syncs per step", body)


if __name__ == "__main__":
    main(sys.argv[1:])
