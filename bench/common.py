"""What every benchmark writes: a JSON record in ``bench/results/`` and a section in ``BENCHMARKS.md``
with the machine, the date, the torch version and the command that produced it."""

from __future__ import annotations

import json
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch

from bench.peak import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MARKDOWN = ROOT / "BENCHMARKS.md"


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_model()} ({os.cpu_count()} cores{gpu}), torch {torch.__version__}"


def command() -> str:
    return "python -m " + ".".join(Path(sys.argv[0]).with_suffix("").parts[-2:]) + "".join(
        f" {a}" for a in sys.argv[1:])


def save(name: str, record: dict[str, Any], title: str, body: str) -> Path:
    """Write ``bench/results/<name>.json`` and append ``## title`` + ``body`` to BENCHMARKS.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "date": date.today().isoformat(), "command": command(), **record}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    if not MARKDOWN.exists():
        MARKDOWN.write_text("# Benchmarks\n\nEach section is appended by the script it names; figures are "
                            "from the run it describes, on the machine it names.\n")
    with MARKDOWN.open("a") as f:
        f.write(f"\n## {title} ({record['date']})\n\n{record['machine']}. Command: `{record['command']}`\n\n"
                f"{body.rstrip()}\n")
    return path
