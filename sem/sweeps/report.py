"""Sweep and run reports: ``summary.md``, ``summary.csv``, ``curves.png``, ``best.yaml``.

Records are plain dicts (one ledger line each, ``sem.sweeps.records``); everything here reads the files
runs leave behind (``summary.json``, ``metrics.jsonl``, ``plan.json``, ``.hydra/overrides.yaml``) and
the sweep's ``ledger.jsonl`` / ``sweep.json``. ``sem-report <dir>...`` (``main``) regenerates a sweep's
report, or compares any set of run and sweep dirs.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sem.config.job import identity, split_override
from sem.record.summary import read_json
from sem.record.units import fmt_duration
from sem.sweeps.records import _metrics, _num, is_sweep_dir, run_dir_record, sweep_records

ORDER = {"completed": 0, "pruned": 1, "preempted": 2, "not_started": 3, "failed": 4}
UNFINISHED = ("preempted", "not_started")  # resume=auto carries them on: the sweep exits 75


# ------------------------------------------------------------------------------------- tables


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _rate(value: Any) -> str:
    return f"{value / 1000:.2f}k" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def varying_keys(records: list[dict[str, Any]], swept: list[str] | None = None) -> list[str]:
    """Override keys whose value differs between records (or that some lack), in first-seen order;
    with a single record, the keys the sweep swept."""
    values: dict[str, set[str | None]] = {}
    maps = [dict(split_override(o) for o in identity(r.get("overrides", []))) for r in records]
    for m in maps:
        for k in m:
            values.setdefault(k, set())
    for k in values:
        values[k] = {m.get(k) for m in maps}
    if len(records) < 2:
        return [k for k in values if k.lstrip("+~") in {s.lstrip("+~") for s in swept or []}]
    return [k for k, v in values.items() if len(v) > 1]


def ranked(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed jobs by final val/bpb (lower first), then preempted, failed, others."""
    def key(r: dict[str, Any]) -> tuple[int, float, str]:
        bpb = _num(r.get("val_bpb"))
        job = str(r["job"])
        return (ORDER.get(r.get("status", ""), 5), bpb if bpb is not None else math.inf,
                f"{int(job):09d}" if job.isdigit() else job)
    return sorted(records, key=key)


def _setting(rec: dict[str, Any], keys: list[str]) -> dict[str, str]:
    m = dict(split_override(o) for o in identity(rec.get("overrides", [])))
    return {k: m.get(k, "") for k in keys}


def seed_groups(records: list[dict[str, Any]], keys: list[str]) -> list[tuple[dict[str, str], list[float]]]:
    """Completed jobs grouped by every varying key but ``seed``: the final val/bpb of each seed."""
    others = [k for k in keys if k.lstrip("+") != "seed"]
    groups: dict[tuple[str, ...], list[float]] = {}
    settings: dict[tuple[str, ...], dict[str, str]] = {}
    for r in records:
        bpb = _num(r.get("val_bpb"))
        if r.get("status") != "completed" or bpb is None:
            continue
        s = _setting(r, others)
        groups.setdefault(tuple(s.values()), []).append(bpb)
        settings[tuple(s.values())] = s
    out = [(settings[k], v) for k, v in groups.items()]
    return sorted(out, key=lambda item: statistics.fmean(item[1]))


def _short(value: str) -> str:
    """An override value for a table cell: floats to 4 significant digits (summary.csv keeps them whole)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.lstrip("-").isdigit() or len(value) <= 8 else f"{number:.4g}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows)]


# ------------------------------------------------------------------------------------- Optuna


def optuna_trials(info: dict[str, Any], sweep_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The study's trials (number, state, value, params) when its storage can be read, and the
    sweeper's ``optimization_results.yaml`` (best_params, best_value) when present."""
    results = None
    path = Path(sweep_dir) / "optimization_results.yaml"
    if path.exists():
        results = yaml.safe_load(path.read_text())
    trials: list[dict[str, Any]] = []
    if info.get("study_name"):
        try:
            import optuna

            from sem.sweeps.trial import open_storage, storage_spec

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = open_storage(storage_spec(info.get("storage"), sweep_dir))
            study = optuna.load_study(study_name=info["study_name"], storage=storage)
            trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                      for t in study.trials]
        except Exception:  # optuna missing or the storage moved: the results file still names the best
            trials = []
    return trials, results


def _params_match(params: dict[str, Any], rec: dict[str, Any]) -> bool:
    # the sweeper passes each parameter to the job as f"{name}={value}"
    have = set(identity(rec.get("overrides", [])))
    return bool(params) and all(f"{k}={v}" in have for k, v in params.items())


# ------------------------------------------------------------------------------------- report


@dataclass
class Report:
    out_dir: Path
    records: list[dict[str, Any]]
    keys: list[str]
    lines: list[str] = field(default_factory=list)  # summary.md
    best: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # extra console lines (wandb sync, tensorboard)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") not in ("completed", "pruned", "dry_run", *UNFINISHED)]

    @property
    def pruned(self) -> list[dict[str, Any]]:
        """Trials a sweeper's pruner stopped: neither failed nor completed."""
        return [r for r in self.records if r.get("status") == "pruned"]

    @property
    def preempted(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") in UNFINISHED]

    def console_lines(self) -> list[str]:
        table = [ln for ln in self.lines if ln.startswith("|")]
        return [f"sweep summary: {self.out_dir / 'summary.md'}", *table, *self.notes]


def build_report(records: list[dict[str, Any]], out_dir: Path, *, title: str,
                 info: dict[str, Any] | None = None, sweep_dir: Path | None = None) -> Report:
    info = info or {}
    records = ranked(records)
    keys = varying_keys(records, info.get("swept"))
    trials, results = optuna_trials(info, sweep_dir) if sweep_dir is not None and "optuna" in str(
        info.get("sweeper", "")).lower() else ([], None)
    trial_of = {r["job"]: t["number"] for r in records for t in trials if _params_match(t["params"], r)}
    rep = Report(out_dir=out_dir, records=records, keys=keys)
    counts = {s: sum(r.get("status") == s for r in records) for s in dict.fromkeys(r.get("status") for r in records)}
    fixed = sorted({o for r in records for o in identity(r.get("overrides", []))
                    if split_override(o)[0] not in keys})
    lines = [f"# {title}", ""]
    if info.get("command"):
        lines += [f"`{' '.join(['python', *info['command']])}`", ""]
    launcher = info.get("launcher", "")
    lines.append(f"{len(records)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                 + (f". Launcher: {launcher}" + (f" (n_jobs={info['n_jobs']})" if info.get("n_jobs") else "")
                    if launcher else "")
                 + (f". Sweep wall time: {fmt_duration(info['wall_s'])}" if info.get("wall_s") else "") + ".")
    if fixed:
        lines.append("Fixed overrides: `" + " ".join(fixed) + "`.")
    lines += ["Objective: final val/bpb on all held-out windows, lower is better; best val/bpb is the "
              "lowest of any validation.", ""]
    completed = [r for r in records if r.get("status") == "completed" and _num(r.get("val_bpb")) is not None]
    if completed:
        rep.best = b = completed[0]
        label = " ".join(f"{k}={v}" for k, v in _setting(b, keys).items()) or "no varying overrides"
        trial = f" (Optuna trial {trial_of[b['job']]})" if b["job"] in trial_of else ""
        lines += [f"**Best: job {b['job']}**{trial} `{label}`: final val/bpb {_fmt(b['val_bpb'])} "
                  "(overrides in best.yaml)", ""]
    header = ["rank", "job", *(["trial"] if trial_of else []), *keys, "status", "final val/bpb",
              "best val/bpb", "tokens/s", "wall"]
    rows = []
    for i, r in enumerate(records, 1):
        status = r.get("status", "?") + (" (skipped: finished earlier)" if r.get("skipped") else "")
        rows.append([str(i), str(r["job"]), *([str(trial_of.get(r["job"], "-"))] if trial_of else []),
                     *map(_short, _setting(r, keys).values()), status, _fmt(r.get("val_bpb")), _fmt(r.get("best_val_bpb")),
                     _rate(r.get("tokens_per_s")), fmt_duration(r.get("wall_s"))])
    lines += _md_table(header, rows)
    if any(k.lstrip("+") == "seed" for k in keys):
        groups = seed_groups(records, keys)
        others = [k for k in keys if k.lstrip("+") != "seed"]
        lines += ["", "## Mean +- std over seeds", ""]
        lines += _md_table([*others, "seeds", "final val/bpb"],
                           [[*s.values(), str(len(v)), f"{statistics.fmean(v):.4f} +- "
                             + (f"{statistics.stdev(v):.4f}" if len(v) > 1 else "-")] for s, v in groups])
    if trials or results:
        lines += ["", "## Optuna study", ""]
        study = f"Study `{info.get('study_name')}` in `{info.get('storage') or sweep_dir / 'optuna.journal'}`"
        if trials:
            states = ", ".join(f"{n} {s.lower()}" for s, n in _count(t["state"] for t in trials).items())
            study += f": {len(trials)} trials ({states}), this dir's jobs included"
        lines.append(study + ".")
        if results and "best_params" in results:
            best_params = results["best_params"]
            job = next((r["job"] for r in records if _params_match(best_params, r)), None)
            number = next((t["number"] for t in trials if t["params"] == best_params), None)
            lines.append(f"Best trial{f' {number}' if number is not None else ''}"
                         f"{f' (job {job})' if job is not None else ''}: value {_fmt(results.get('best_value'))}, "
                         "overrides `" + " ".join(f"{k}={v}" for k, v in best_params.items()) + "`.")
    failed = [r for r in records if r.get("status") not in ("completed",)]
    if failed:
        lines += ["", "## Not completed", ""]
        lines += [f"- job {r['job']} (`{' '.join(identity(r.get('overrides', [])))}`): {r.get('status')}: "
                  f"{_not_completed(r)}" for r in failed]
    rep.lines = lines + [""]
    return rep


def _not_completed(r: dict[str, Any]) -> str:
    at = r.get("pruned_at")
    if r.get("status") == "pruned" and isinstance(at, dict):
        return f"stopped by the pruner at step {at.get('step')} (val/bpb {_fmt(at.get('val_bpb'))})"
    return r.get("error") or "no error recorded"


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent jobs each write their own temp
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(rep: Report, path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "job", *rep.keys, "status", "val_bpb", "best_val_bpb", "tokens_per_s", "wall_s",
                "steps", "skipped", "run_dir", "error", "overrides"])
    for i, r in enumerate(rep.records, 1):
        w.writerow([i, r["job"], *_setting(r, rep.keys).values(), r.get("status"), r.get("val_bpb"),
                    r.get("best_val_bpb"), r.get("tokens_per_s"), r.get("wall_s"), r.get("steps"),
                    r.get("skipped", False), r.get("run_dir"), r.get("error") or "",
                    " ".join(identity(r.get("overrides", [])))])
    _write_text(path, buf.getvalue())


def write_curves(rep: Report, path: Path, title: str) -> None:
    """val/bpb against step, one line per job (periodic validations; a star marks the final one on
    all held-out windows), labelled by the job's varying overrides."""
    from sem.record.plots import plt

    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = 0
    for r in rep.records:
        rows = [x for x in _metrics(Path(r["run_dir"])) if _num(x.get("val/bpb")) is not None]
        if not rows:
            continue
        label = f"{r['job']}: " + (",".join(f"{k}={_short(v)}" for k, v in _setting(r, rep.keys).items()) or "run")
        periodic = [x for x in rows if not x.get("final")]
        style = "-" if r.get("status") == "completed" else "--"
        line, = ax.plot([x["step"] for x in periodic], [x["val/bpb"] for x in periodic], style, marker="o",
                        ms=3, lw=1.2, label=label[:60])
        for x in rows:
            if x.get("final"):
                ax.plot([x["step"]], [x["val/bpb"]], "*", ms=11, color=line.get_color())
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel("val/bpb (bits per byte)")
    ax.set_title(f"{title}  (* final validation, all held-out windows)", fontsize=9)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="upper right", ncol=1 if drawn <= 12 else 2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_best(rep: Report, path: Path, title: str) -> None:
    b = rep.best
    if b is None:
        path.unlink(missing_ok=True)
        return
    overrides = identity(b.get("overrides", []))
    data = {"job": str(b["job"]), "run_dir": b.get("run_dir"), "val_bpb": b.get("val_bpb"),
            "best_val_bpb": b.get("best_val_bpb"), "overrides": overrides,
            "command": " ".join(["python launch.py", *overrides])}
    _write_text(path, f"# the best job by final val/bpb (lower is better): {title}\n"
                + yaml.safe_dump(data, sort_keys=False))


def write_report(sweep_dir: Path, *, final: bool = True) -> Report | None:
    """Write the sweep's ``summary.md`` and ``summary.csv`` (and with ``final``, ``curves.png`` and
    ``best.yaml``). A dry-run sweep gets its plan totals instead (nothing written). None: no jobs."""
    sweep_dir = Path(sweep_dir)
    records = sweep_records(sweep_dir)
    if not records:
        return None
    info = read_json(sweep_dir / "sweep.json")
    title = f"Sweep {sweep_dir}"
    if all(r.get("status") == "dry_run" for r in records):
        rep = Report(out_dir=sweep_dir, records=records, keys=[])
        total = sum((r.get("plan") or {}).get("estimated_s") or 0.0 for r in records)
        rep.notes = [f"dry run: {len(records)} jobs, estimated {fmt_duration(total)} of training and "
                     "validation one after another (start-up not included); nothing trained"]
        return rep
    rep = build_report(records, sweep_dir, title=title, info=info, sweep_dir=sweep_dir)
    _write_text(sweep_dir / "summary.md", "\n".join(rep.lines))
    write_csv(rep, sweep_dir / "summary.csv")
    if final:
        write_curves(rep, sweep_dir / "curves.png", title)
        write_best(rep, sweep_dir / "best.yaml", title)
        offline = sorted(sweep_dir.glob("*/wandb/offline-run-*"))
        if offline:
            rep.notes.append(f"wandb: {len(offline)} offline runs; upload them with: "
                             f"wandb sync {sweep_dir}/*/wandb/offline-run-*")
        if any(sweep_dir.glob("*/tensorboard")):
            rep.notes.append(f"tensorboard: compare the jobs with: tensorboard --logdir {sweep_dir}")
    return rep


# ------------------------------------------------------------------------------------ sem-report


def main(argv: list[str] | None = None) -> int:
    """``sem-report <dir>...``: regenerate a sweep dir's report, or compare run and sweep dirs."""
    parser = argparse.ArgumentParser(
        prog="sem-report",
        description="Regenerate a sweep's summary.md, summary.csv, curves.png and best.yaml "
                    "(one sweep dir), or compare any run and sweep dirs (several).")
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep dirs (multirun_outputs/<date>/<time>) or run dirs")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report files (default: the sweep dir when given one "
                             "sweep dir; otherwise the table is printed only)")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        for d in missing:
            print(f"sem-report: {d}: no such directory", file=sys.stderr)
        return 2
    if len(args.dirs) == 1 and is_sweep_dir(args.dirs[0]) and args.out in (None, args.dirs[0]):
        rep = write_report(args.dirs[0], final=True)
        if rep is None:
            print(f"sem-report: {args.dirs[0]}: no jobs found", file=sys.stderr)
            return 2
        print("\n".join(rep.lines if rep.lines else rep.notes))
        return 0
    records: list[dict[str, Any]] = []
    for d in args.dirs:
        if is_sweep_dir(d):
            records += [{**r, "job": f"{d}/{r['job']}"} for r in sweep_records(d)]
        else:
            records.append(run_dir_record(d, str(d)))
    if not records:
        print("sem-report: no runs found", file=sys.stderr)
        return 2
    title = "Comparison of " + ", ".join(str(d) for d in args.dirs)
    rep = build_report(records, args.out or Path("."), title=title)
    print("\n".join(rep.lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        _write_text(args.out / "summary.md", "\n".join(rep.lines))
        write_csv(rep, args.out / "summary.csv")
        write_curves(rep, args.out / "curves.png", title)
        write_best(rep, args.out / "best.yaml", title)
        print(f"written: {args.out}/summary.md, summary.csv, curves.png, best.yaml")
    else:
        print("(add --out DIR to write summary.md, summary.csv, curves.png and best.yaml)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
