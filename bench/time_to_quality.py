"""Time to quality: val/bpb against wall time for a training run, beside gzip -9, bz2 -9 and xz -9e of
the same held-out bytes.

    python -m bench.time_to_quality [RUN_DIR]       # default: train the default config now (python launch.py)

Reads the run's ``metrics.jsonl`` (validation rows carry ``time``) and ``summary.json``; writes
``bench/results/time_to_bpb.png``, ``bench/results/time_to_quality.json`` and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS, ROOT, save  # noqa: E402


def curve(run: Path) -> tuple[list[float], list[float], dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = min(r["time"] for r in rows if "time" in r)
    summary = json.loads((run / "summary.json").read_text())
    vals = [r for r in rows if "val/bpb" in r and "time" in r]
    return [r["time"] - start for r in vals], [r["val/bpb"] for r in vals], summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="a finished run dir (default: run `python launch.py` now)")
    a = parser.parse_args(argv)
    if a.run is None:
        tmp = tempfile.mkdtemp()
        subprocess.run([sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={tmp}/run"], check=True, cwd=tmp)
        run = Path(tmp) / "run"
    else:
        run = Path(a.run)
    seconds, bpb, summary = curve(run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([s / 60 for s in seconds], bpb, marker="o", label="SEM val/bpb (last point: all held-out windows)")
    for key, name, style in (("gzip_bpb", "gzip -9", ":"), ("bz2_bpb", "bz2 -9", "--"), ("xz_bpb", "xz -9e", "-.")):
        ax.axhline(summary[key], linestyle=style, color="grey", label=f"{name} {summary[key]:.3f}")
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("bits per byte (held-out)")
    ax.set_ylim(top=min(max(bpb), 4.0))
    ax.legend()
    ax.set_title("time to quality")
    fig.tight_layout()
    png = RESULTS / "time_to_bpb.png"
    fig.savefig(png, dpi=120)
    lines = ["| minutes | val/bpb |", "|---:|---:|"] + [f"| {s / 60:.1f} | {b:.4f} |" for s, b in zip(seconds, bpb)]
    beaten = [n for k, n in (("gzip_bpb", "gzip -9"), ("bz2_bpb", "bz2 -9"), ("xz_bpb", "xz -9e"))
              if summary["val_bpb"] < summary[k]]
    body = (f"Run `{run}`: {summary['steps']} steps, {summary['wall_s']:.0f} s wall, final val/bpb "
            f"{summary['val_bpb']:.4f} (gzip -9 {summary['gzip_bpb']:.4f}, bz2 -9 {summary['bz2_bpb']:.4f}, xz -9e "
            f"{summary['xz_bpb']:.4f}; below {', '.join(beaten) or 'none'}). Plot: `bench/results/time_to_bpb.png`.\n\n"
            + "\n".join(lines))
    save("time_to_quality", {"run": str(run), "seconds": seconds, "val_bpb": bpb, "summary": summary},
         "Time to quality", body)
    print(body)


if __name__ == "__main__":
    main()
