"""Run benchmarks by name: ``python bench/run.py --only engines utilisation`` (default: all but the long
ones; ``--list`` names them). Each is also ``python -m bench.<name>``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCHES = {  # name: (module, long-running)
    "peak": ("bench.peak", False),
    "engines": ("bench.engines", False),
    "utilisation": ("bench.utilisation", False),
    "decode": ("bench.decode", False),
    "sweeps": ("bench.sweeps", False),
    "profile_sem": ("bench.profile_sem", False),  # torch.profiler of sem_small + tokens/s vs transformer_small
    "time_to_quality": ("bench.time_to_quality", True),  # trains the default config (minutes)
    "memory": ("bench.memory", True),  # sem_base steps at seq_len 1024 (~15 min on 2 cores)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES))
    parser.add_argument("--list", action="store_true")
    a = parser.parse_args()
    if a.list:
        for name, (module, long) in BENCHES.items():
            print(f"{name:16s} python -m {module}{'   (long: trains the default run)' if long else ''}")
        return
    names = a.only or [n for n, (_, long) in BENCHES.items() if not long]
    for name in names:
        print(f"== {name}", flush=True)
        module = importlib.import_module(BENCHES[name][0])
        module.main([]) if name != "peak" else module.main()


if __name__ == "__main__":
    main()
