"""sem/sweeps/report.py and records.py: records from run dirs, ranking, varying overrides, seed statistics, the files."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import yaml

from sem.sweeps.ledger import append_ledger
from sem.sweeps.records import job_record
from sem.sweeps.report import build_report, main, ranked, seed_groups, varying_keys, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _run(root: Path, name: str, overrides: list[str], status: str = "completed", bpb: float | None = 2.0,
         vals: tuple[float, ...] = (3.0, 2.5)) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = [{"step": 10 * (i + 1), "val/bpb": v, "final": False} for i, v in enumerate(vals)]
    if bpb is not None:
        rows.append({"step": 10 * len(vals), "val/bpb": bpb, "final": True})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"status": status, "steps": 20, "val_bpb": bpb if status == "completed" else None,
               "tokens_per_s": 1000.0, "wall_s": 12.5}
    if status != "completed":
        summary["error"] = "HealthStop: step 3: nonfinite_loss"
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _rec(job: str, overrides: list[str], status: str = "completed", bpb: float | None = None) -> dict:
    return {"job": job, "overrides": overrides, "status": status, "val_bpb": bpb, "run_dir": f"/x/{job}"}


def test_job_record_fresh_skipped_and_missing(tmp_path: Path) -> None:
    d = _run(tmp_path, "0", ["a=1"], bpb=1.9, vals=(3.0, 2.2, 1.8))
    rec = job_record(d, "0", ["a=1"], started=time.time() - 5)
    assert rec["status"] == "completed" and not rec["skipped"]
    assert rec["val_bpb"] == 1.9 and rec["best_val_bpb"] == 1.8  # the lowest of any validation
    old = time.time() - 3600
    os.utime(d / "summary.json", (old, old))
    assert job_record(d, "0", ["a=1", "resume=auto"], started=time.time())["skipped"]  # finished before
    empty = tmp_path / "1"
    empty.mkdir()
    rec = job_record(empty, "1", ["a=2"], started=time.time())
    assert rec["status"] == "failed" and "no summary.json" in rec["error"]
    rec = job_record(d, "0", ["a=1"], status="not_started", error="stopped")
    assert rec["status"] == "not_started" and rec["error"] == "stopped"


def test_ranked_and_varying() -> None:
    recs = [_rec("0", ["m=t", "lr=1"], "failed"), _rec("1", ["m=t", "lr=2"], bpb=2.5),
            _rec("10", ["m=t", "lr=3"], bpb=2.1), _rec("2", ["m=t", "lr=4"], "preempted"),
            _rec("3", ["m=t", "lr=5", "resume=auto"], bpb=2.3)]
    assert [r["job"] for r in ranked(recs)] == ["10", "3", "1", "2", "0"]
    assert varying_keys(recs) == ["lr"]  # resume is how a job ran, not what it is
    assert varying_keys([_rec("0", ["m=t", "lr=1"])], swept=["lr"]) == ["lr"]
    assert varying_keys([_rec("0", ["a=1"]), _rec("1", ["a=1", "b=2"])]) == ["b"]  # set in one only


def test_seed_groups_mean_and_std() -> None:
    recs = [_rec(str(i), [f"lr={lr}", f"seed={s}"], bpb=v) for i, (lr, s, v) in
            enumerate([(1, 1, 2.0), (1, 2, 2.2), (1, 3, 2.4), (2, 1, 1.5), (2, 2, 1.7), (3, 1, None)])]
    recs[-1]["status"] = "failed"
    groups = seed_groups(recs, ["lr", "seed"])
    assert [(g["lr"], v) for g, v in groups] == [("2", [1.5, 1.7]), ("1", [2.0, 2.2, 2.4])]
    rep = build_report(recs, Path("."), title="t")
    text = "\n".join(rep.lines)
    assert f"| 1 | 3 | {statistics.fmean([2.0, 2.2, 2.4]):.4f} +- {statistics.stdev([2.0, 2.2, 2.4]):.4f} |" in text


def test_write_report_and_sem_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    specs = [("0", ["m=t", "lr=1e-3"], "completed", 2.4), ("1", ["m=t", "lr=3e-3"], "completed", 2.1),
             ("2", ["m=t", "lr=9"], "failed", None)]
    for job, overrides, status, bpb in specs:
        d = _run(sweep, job, overrides, status, bpb)
        append_ledger(sweep, job_record(d, job, overrides, started=0.0))
    rep = write_report(sweep, final=True)
    assert rep is not None and [r["job"] for r in rep.failed] == ["2"]
    md = (sweep / "summary.md").read_text()
    assert "3 jobs: 2 completed, 1 failed" in md and "**Best: job 1** `lr=3e-3`" in md
    assert "Fixed overrides: `m=t`" in md and "HealthStop" in md
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best["overrides"] == ["m=t", "lr=3e-3"] and best["command"] == "python launch.py m=t lr=3e-3"
    assert (sweep / "curves.png").read_bytes()[:8] == PNG
    # sem-report: the same summary from the files, and a comparison of plain run dirs
    (sweep / "summary.md").unlink()
    assert main([str(sweep)]) == 0 and (sweep / "summary.md").read_text() == md
    out = tmp_path / "cmp"
    assert main([str(sweep / "0"), str(sweep / "1"), "--out", str(out)]) == 0
    assert "| 1 | " + str(sweep / "1") + " | 3e-3 |" in (out / "summary.md").read_text()
    assert main([str(tmp_path / "missing")]) == 2
    capsys.readouterr()
