"""``eval_context.png`` of ``python -m sem.evaluate mode=stream``: bits per byte by position in the
document, beside the model's overall figure and the compressors' on the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMPRESSORS = (("gzip -9", "gzip_bpb"), ("bz2 -9", "bz2_bpb"), ("xz -9e", "xz_bpb"))


def plot_context(record: dict[str, Any], path: Path) -> Path:
    """``eval_context.png``: bits per byte by position in the document (mode=stream's ``by_position``),
    beside the overall figure and the compressors'."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [r for r in record["by_position"] if r["bpb"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = range(len(rows))
    bars = ax.bar(xs, [r["bpb"] for r in rows], color="tab:blue", alpha=0.8, label="model, by position")
    for bar, r in zip(bars, rows):  # inside the bar, under its top: clear of the lines across
        ax.annotate(f"{r['bpb']:.3f}\n{r['byte_targets']:,} B", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, -4), textcoords="offset points", ha="center", va="top", fontsize=8, color="white")
    ax.axhline(record["bpb"], color="tab:blue", linestyle="--", label=f"model, all bytes {record['bpb']:.3f}")
    for (name, key), color in zip(COMPRESSORS, ("tab:gray", "tab:orange", "tab:green")):
        ax.axhline(record[key], color=color, linestyle=":", label=f"{name} {record[key]:.3f}")
    ax.set_xticks(list(xs), [r["position"] for r in rows])
    ax.set_xlabel("position of the byte in its document (bytes)")
    ax.set_ylabel("bits per byte")
    how = {"recurrent": "recurrent state carried",
           "dynamic": f"dynamic evaluation, a step every {record.get('chunk_tokens')} tokens",
           }.get(record["method"]) or f"sliding window {record['context']}, stride {record['stride']}"
    ax.set_title(f"{record['model'].rsplit('.', 1)[-1]}: {record['documents']} documents whole ({how})", fontsize=10)
    top = max([r["bpb"] for r in rows] + [record[key] for _, key in COMPRESSORS])
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
