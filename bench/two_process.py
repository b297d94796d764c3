"""Two processes asking for one run directory (issue 24): a run, a DDP run and a sweep, each started, and
the same command started again a few seconds later while the first still trains. The second must exit 2
at once with one line naming the holder and write nothing; the first must end as a run alone would:
every step once in ``metrics.jsonl`` and the same final val/bpb as the same command run alone.

    python -m bench.two_process [--steps 150] [--only single,ddp,sweep]

For a run and a DDP run the second process is the same command twice: once as is, once with
``resume=auto`` (a requeued job starting while the old one is alive). For a sweep the second is the
same ``-m`` command with ``resume=auto``: it skips the job running elsewhere (the ledger says so) and
goes on with the next, and the first then finds that one held: both jobs run once, one per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import ROOT, save

TINY = ["model=sem_tiny", "sample.n=0", "accelerator=cpu", "threads=1"]


def launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(path: Path, timeout: float = 300.0) -> None:
    """Until ``path`` exists (the first process is training: its metrics file has a row)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.2)


def rows(run_dir: Path) -> dict[str, Any]:
    """The steps of ``metrics.jsonl``'s training rows: how many, whether each appears once, and the range."""
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            steps.append(row["step"])
    return {"train_rows": len(steps), "each_once": len(steps) == len(set(steps)) and steps == sorted(steps),
            "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None}


def final_bpb(run_dir: Path) -> float | None:
    return json.loads((run_dir / "summary.json").read_text()).get("val_bpb")


def second(args: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """The second process: exit code, seconds to exit, its last line."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return {"code": proc.returncode, "exit_s": round(time.monotonic() - t0, 1), "line": lines[-1] if lines else ""}


def single(work: Path, env: dict[str, str], extra: list[str], name: str) -> dict[str, Any]:
    """A run (``extra``: its settings) alone, then again with two more processes asking for its dir."""
    alone, shared = work / f"{name}-alone", work / f"{name}-shared"
    base = [*TINY, *extra]
    subprocess.run([sys.executable, str(ROOT / "launch.py"), *base, f"hydra.run.dir={alone}"], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    first = launch([*base, f"hydra.run.dir={shared}"], env, work / f"{name}-first.log")
    wait_for(shared / "metrics.jsonl")
    with ThreadPoolExecutor(2) as pool:  # both at once, while the first still trains
        asked = [pool.submit(second, [*base, f"hydra.run.dir={shared}"], env, work / f"{name}-second.log"),
                 pool.submit(second, [*base, f"hydra.run.dir={shared}", "resume=auto"], env,
                             work / f"{name}-second-auto.log")]
        seconds = [f.result() for f in asked]
    alive = first.poll() is None
    code = first.wait(timeout=1200)
    return {"scenario": name, "first_code": code, "first_alive_after_second": alive, "second": seconds[0],
            "second_resume_auto": seconds[1],
            **rows(shared), "val_bpb": final_bpb(shared), "val_bpb_alone": final_bpb(alone),
            "attempts": len((shared / "attempts.jsonl").read_text().splitlines())}


def sweep(work: Path, env: dict[str, str], steps: int) -> dict[str, Any]:
    """A two-job sweep, and the same command with resume=auto started while job 0 trains."""
    sweep_dir, alone = work / "sweep", work / "sweep-alone"
    base = [*TINY, f"trainer.max_steps={steps}", "seed=1,2"]
    subprocess.run([sys.executable, str(ROOT / "launch.py"), "-m", *base, f"hydra.sweep.dir={alone}"], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    first = launch(["-m", *base, f"hydra.sweep.dir={sweep_dir}"], env, work / "sweep-first.log")
    wait_for(sweep_dir / "0" / "metrics.jsonl")
    sec = second(["-m", *base, f"hydra.sweep.dir={sweep_dir}", "resume=auto"], env, work / "sweep-second.log")
    alive = first.poll() is None
    code = first.wait(timeout=1200)
    ledger = [json.loads(line) for line in (sweep_dir / "ledger.jsonl").read_text().splitlines()]
    jobs = {}
    for job in ("0", "1"):
        jobs[job] = {**rows(sweep_dir / job), "val_bpb": final_bpb(sweep_dir / job),
                     "val_bpb_alone": final_bpb(alone / job),
                     "attempts": len((sweep_dir / job / "attempts.jsonl").read_text().splitlines())}
    return {"scenario": "sweep", "first_code": code, "first_alive_after_second": alive, "second": sec, "jobs": jobs,
            "ledger": [(str(e.get("job", e.get("run_dir", "?"))), e.get("status"), e.get("error")) for e in ledger]}


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(out: list[dict[str, Any]]) -> list[str]:
    body = ["| scenario | second process: exit, seconds, line | first: alive when the second ended, exit | "
            "metrics.jsonl training rows (each step once) | final val/bpb | alone |", "|---|---|---|---|---:|---:|"]
    for r in out:
        first = f"{r['first_alive_after_second']}, {r['first_code']}"
        if r["scenario"] == "sweep":
            s = r["second"]
            for job, j in r["jobs"].items():
                body.append(f"| sweep job {job} | {s['code']}, {s['exit_s']} s: {cell(s['line'])} | {first} | "
                            f"{j['train_rows']} ({j['first_step']}-{j['last_step']}, once: {j['each_once']}) | "
                            f"{j['val_bpb']} | {j['val_bpb_alone']} |")
            body.append("")
            body.append(f"Sweep ledger (job, status, why), in the order written: {r['ledger']}. The first process "
                        f"exits {r['first_code']}: when it ends, the job the second process took is still "
                        "running, so its sweep is unfinished and a requeue with resume=auto would carry it on; "
                        "the second ends after both jobs have finished and exits 0.\n")
            continue
        for key in ("second", "second_resume_auto"):
            s = r[key]
            name = r["scenario"] + (" (resume=auto)" if key != "second" else "")
            body.append(f"| {name} | {s['code']}, {s['exit_s']} s: {cell(s['line'])} | {first} | {r['train_rows']} "
                        f"({r['first_step']}-{r['last_step']}, once: {r['each_once']}) | {r['val_bpb']} | "
                        f"{r['val_bpb_alone']} |")
    return body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--only", default="single,ddp,sweep")
    args = ap.parse_args(argv)
    only = args.only.split(",")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "SEM_CACHE_DIR": os.environ.get("SEM_CACHE_DIR", str(work / "cache"))}
        if "single" in only:
            out.append(single(work, env, [f"trainer.max_steps={args.steps}"], "single"))
            print(json.dumps(out[-1]), flush=True)
        if "ddp" in only:
            out.append(single(work, env, [f"trainer.max_steps={args.steps // 2}", "strategy=ddp",
                                          "trainer.devices=2"], "ddp"))
            print(json.dumps(out[-1]), flush=True)
        if "sweep" in only:
            out.append(sweep(work, env, args.steps // 3))
            print(json.dumps(out[-1]), flush=True)
    body = table(out)
    save("two_process", {"scenarios": out}, "Two processes, one run directory", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
