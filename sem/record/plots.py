"""Loss and learning-rate curves of one run, with curriculum stages shaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def stage_spans(rows: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(stage, first step, last step) of each stage seen in the train rows; a stage's first step
    is taken from its ``stage_start`` event row when there is one (train rows are sparse)."""
    starts = {r["stage"]: r["step"] for r in rows if r.get("event") == "stage_start"}
    spans: list[tuple[str, int, int]] = []
    for r in rows:
        if "stage" not in r or "train/loss" not in r:
            continue
        if spans and spans[-1][0] == r["stage"]:
            spans[-1] = (spans[-1][0], spans[-1][1], r["step"])
        else:
            spans.append((r["stage"], starts.get(r["stage"], r["step"]), r["step"]))
    return spans


def _shade(ax: Any, spans: list[tuple[str, int, int]]) -> None:
    if len(spans) < 2:
        return
    colors = plt.get_cmap("Pastel1").colors
    for i, (name, lo, _) in enumerate(spans):
        hi = spans[i + 1][1] if i + 1 < len(spans) else spans[i][2]
        ax.axvspan(lo, hi, color=colors[i % len(colors)], alpha=0.5, lw=0)
        ax.text(lo, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)


def plot_run(metrics_path: Path, out_dir: Path) -> list[Path]:
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    spans = stage_spans(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _shade(ax, spans)
    if train:  # cross-entropy, comparable with val/loss (train/loss may hold a distillation mix)
        key = "train/ce_loss" if all("train/ce_loss" in r for r in train) else "train/loss"
        ax.plot([r["step"] for r in train], [r[key] for r in train], label=key, lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val/loss"] for r in val], "o-", label="val/loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    _shade(ax, spans)
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out_dir / "lr.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
