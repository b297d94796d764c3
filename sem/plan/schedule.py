"""``plots/schedule.png``: the dry-run calendar drawn (LR, seq_len and batch per step, stages shaded)."""

from __future__ import annotations

from pathlib import Path

from sem.plan.calendar import Calendar


def phase_spans(cal: Calendar) -> list[tuple[str, int, int]]:
    """(phase, first step, end) of each run of segments in one schedule phase."""
    spans: list[tuple[str, int, int]] = []
    for s in cal.segments:
        if spans and spans[-1][0] == s.phase:
            spans[-1] = (s.phase, spans[-1][1], s.end)
        else:
            spans.append((s.phase, s.start, s.end))
    return spans


def plot_schedule(cal: Calendar, path: Path, title: str) -> Path:
    """``plots/schedule.png``: LR per step (top) and seq_len and batch size per step (bottom), stages
    shaded and named, WSD phase boundaries, validation and checkpoint steps, teacher switch-on."""
    from sem.record.plots import plt

    steps = [s[0] for s in cal.samples]
    fig, (ax_lr, ax_shape) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.get_cmap("Pastel1").colors
    starts = cal.stage_starts
    for ax in (ax_lr, ax_shape):
        for i, (lo, _name) in enumerate(starts):
            hi = starts[i + 1][0] if i + 1 < len(starts) else cal.max_steps
            if len(starts) > 1:
                ax.axvspan(lo, hi, color=colors[i % len(colors)], alpha=0.5, lw=0)
        for step in cal.val_steps:
            ax.axvline(step, color="tab:green", lw=1.0, ls=":", alpha=0.9)
        if cal.teacher_start is not None:
            ax.axvline(cal.teacher_start, color="tab:red", lw=1.2, ls="--")
    for lo, name in starts:
        ax_lr.text(lo, 1.0, f" {name}", transform=ax_lr.get_xaxis_transform(), va="top", fontsize=8)
    # values are per optimizer step: step plots, held to the end of the last step
    xs, lrs = [*steps, cal.max_steps], [s[1] for s in cal.samples]
    ax_lr.step(xs, [*lrs, lrs[-1]], where="post", color="tab:blue", lw=1.5, label="learning rate")
    for phase, lo, hi in phase_spans(cal):
        if phase != "stable":
            ax_lr.annotate("", xy=(lo, 0.05), xytext=(hi, 0.05), xycoords=ax_lr.get_xaxis_transform(),
                           arrowprops={"arrowstyle": "<->", "color": "tab:blue", "lw": 0.8})
            ax_lr.text((lo + hi) / 2, 0.07, phase, transform=ax_lr.get_xaxis_transform(), ha="center",
                       fontsize=8, color="tab:blue")
    ax_lr.plot(cal.checkpoint_steps, [0] * len(cal.checkpoint_steps), "v", color="black", ms=6,
               clip_on=False, label="checkpoint")
    if cal.milestones:
        ax_lr.plot([s for s, _ in cal.milestones], [0] * len(cal.milestones), "*", color="tab:orange", ms=11,
                   clip_on=False, label="milestone checkpoint")
    ax_lr.plot([], [], color="tab:green", lw=1.0, ls=":", label="validation")
    if cal.teacher_start is not None:
        ax_lr.plot([], [], color="tab:red", ls="--", label=f"teacher on (step {cal.teacher_start})")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_ylim(bottom=0)
    ax_lr.legend(fontsize=7, loc="upper right")
    ax_lr.grid(alpha=0.3)
    ax_lr.set_title(title, fontsize=9)
    ax_shape.step(xs, [*(s[2] for s in cal.samples), cal.samples[-1][2]], where="post", color="tab:purple",
                  label="seq_len")
    ax_shape.set_ylabel("seq_len", color="tab:purple")
    ax_b = ax_shape.twinx()
    ax_b.step(xs, [*(s[3] for s in cal.samples), cal.samples[-1][3]], where="post", color="tab:brown", ls="--",
              label="batch size")
    ax_b.set_ylabel("batch size", color="tab:brown")
    ax_shape.set_ylim(bottom=0)
    ax_b.set_ylim(bottom=0)
    ax_shape.set_xlabel("optimizer step")
    ax_shape.set_xlim(0, cal.max_steps)
    ax_shape.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
