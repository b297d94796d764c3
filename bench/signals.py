"""Stop signals in every phase of a run: ``launch.py`` is started in its own process group, the trial
waits until the run is in a phase (a log line, or a file the phase makes), sends a signal, and records
the seconds until the launcher exits and until every process of the run is gone, the exit code, the
processes left over, and what was left on disk (partial files, torn JSON lines, unverifiable
checkpoints, the ``summary.json`` status).

    python -m bench.signals [--phases training,sampling] [--signals SIGTERM,SIGINT,SIGINTx2] [--save]

Signals: ``SIGTERM`` to the launcher's pid (``kill PID``, a scheduler); ``SIGINT`` to the whole process
group (Ctrl-C in a terminal); ``SIGINTx2`` a second Ctrl-C once the first has been seen. The processes
of a run are found by a marker in their environment (inherited by every rank), not by name.
``tests/integration/test_signals.py`` runs the same trials; ``--save`` writes
``bench/results/signals.json`` and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "SEM_SIGNAL_TRIAL"
# Each phase's own settings on top of this: a tiny model on the CPU, on the built-in corpus.
BASE = ("debug=smoke", "sample.n=0", "run.name=trial")
SIGNALS = ("SIGTERM", "SIGINT", "SIGINTx2")
EXIT_TARGET_S = 10.0  # issue 24: every process of the run ends within 10 s of the signal


@dataclass
class Trial:
    """One launch.py in the background: its log, its folders, the processes that carry its marker."""

    work: Path
    cache: Path
    args: list[str]
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK")}
        env.update(SEM_CACHE_DIR=str(self.cache), PYTHONUNBUFFERED="1", **{MARKER: self.token})
        self.log_path = self.work / "launch.out"
        self._log = self.log_path.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *self.args], cwd=self.work,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def launcher_heard(self, name: str) -> bool:
        """The launcher logged ``<name> received`` (its own ``launch.log``: the console has every rank's)."""
        logs = list(self.work.glob("**/launch.log"))
        texts = [p.read_text(errors="replace") for p in logs] if logs else [self.output()]
        return any(f"{name} received" in text for text in texts)

    def pids(self) -> list[int]:
        """Every live process carrying this trial's marker (the launcher, its ranks, anything they started)."""
        needle = f"{MARKER}={self.token}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in environ and state != "Z":  # a zombie has exited: only its parent's wait is due
                found.append(int(entry))
        return found

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)

    def close(self) -> None:
        self.kill_all()
        self._log.close()


def log_has(text: str) -> Callable[[Trial], bool]:
    return lambda t: text in t.output()


def file_appears(pattern: str, under: str = "work") -> Callable[[Trial], bool]:
    return lambda t: any((t.cache if under == "cache" else t.work).glob(pattern))


def after(seconds: float) -> Callable[[Trial], bool]:
    return lambda t: time.monotonic() - t.started >= seconds


def _catches_stop_signals(pid: int) -> bool:
    """The process has its SIGINT and SIGTERM handlers in place (Linux: /proc/<pid>/status SigCgt);
    elsewhere, assume so."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    caught = int(next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0"), 16)
    return all(caught >> (int(sig) - 1) & 1 for sig in (signal.SIGINT, signal.SIGTERM))


def importing(seconds: float) -> Callable[[Trial], bool]:
    """``seconds`` after start and the launcher's startup handlers installed: under load the
    interpreter itself can take longer than ``seconds`` to reach them (a Ctrl-C then is Python's own)."""
    return lambda t: after(seconds)(t) and _catches_stop_signals(t.proc.pid)


@dataclass(frozen=True)
class Phase:
    name: str
    args: tuple[str, ...]
    ready: Callable[[Trial], bool]  # true once the run is in the phase
    fresh_cache: bool = False  # the token cache is built in this trial (else shared, built once)
    what: str = ""


PHASES = {p.name: p for p in (
    Phase("imports", (), importing(1.0), what="1 s after start: Python imports torch, Hydra, Lightning"),
    Phase("setup", (), file_appears("outputs/trial/.hydra/overrides.yaml"),
          what="Hydra has made the run dir: logging, validation, records"),
    Phase("token_cache", (), file_appears(".tmp-tokens-*", under="cache"), fresh_cache=True,
          what="the token cache is being built (its temp dir exists)"),
    Phase("ddp_rendezvous", ("strategy=ddp", "trainer.devices=2", "accelerator=cpu"),
          log_has("joining the process group: global rank 0"),
          what="rank 0 waits in the gloo rendezvous for rank 1 (still importing)"),
    Phase("sanity_check", ("trainer.num_sanity_val_steps=100000", "data.val_max_windows=null", "data.seq_len=512"),
          log_has("Total FLOPs"), what="Lightning's sanity check (every held-out window)"),
    Phase("training", ("trainer.max_steps=100000",), log_has("validation at step 10 "),
          what="training, after the first validation"),
    Phase("ddp_training", ("strategy=ddp", "trainer.devices=2", "accelerator=cpu", "trainer.max_steps=100000"),
          log_has("validation at step 10 "), what="2-rank DDP training"),
    Phase("final_validation", ("data.final_val_max_windows=null", "data.seq_len=512"),
          log_has("final validation on"), what="the final validation on every held-out window"),
    Phase("sampling", ("sample.n=50", "sample.max_new_tokens=4000"), log_has("final: val/bpb"),
          what="samples.txt from the final checkpoint"),
    Phase("sweep_between_jobs", ("-m", "optimizer.lr=1e-3,2e-3,3e-3", "hydra.sweep.dir=sweep"),
          log_has("job 0: completed"), what="a 3-job sweep, as job 0 has ended"),
)}


@dataclass
class Outcome:
    phase: str
    signal: str
    exit_s: float | None  # signal -> launcher exit (None: still running at the timeout)
    all_gone_s: float | None  # signal -> no process of the run left
    returncode: int | None
    survivors: int  # processes of the run alive at the timeout (then SIGKILLed)
    status: str  # summary.json status(es), or "none"
    left: list[str]  # problems on disk: partial files, torn rows, bad checkpoints
    files: str  # what the run left, in a few words
    traceback: bool
    phase_missed: bool = False  # the run left the phase before the signal (too fast to hit)
    second_sent: bool = False  # SIGINTx2: the launcher was still running at the second Ctrl-C

    @property
    def ok(self) -> bool:
        """Exit 75 (SIGINTx2: 130, or -2 from a shell's point of view the same, when the second Ctrl-C
        reached a process still running), every process gone in time, nothing torn (a second Ctrl-C
        exits at once: a temporary may stay, for the next run to remove), no traceback."""
        if self.signal == "SIGINTx2":
            code_ok = self.returncode in ((130, -signal.SIGINT, 75) if self.second_sent else (75,))
            left = [p for p in self.left if not p.startswith("partial: ")]
        else:
            code_ok, left = self.returncode == 75, self.left
        return (code_ok and self.all_gone_s is not None and self.all_gone_s < EXIT_TARGET_S
                and not self.survivors and not left and not self.traceback and not self.phase_missed)


def run_trial(phase: Phase, sig: str, root: Path, shared_cache: Path, timeout: float = 60.0,
              ready_timeout: float = 180.0) -> Outcome:
    """Start the run, wait for the phase, send ``sig``, measure; every process of the run is gone after."""
    work = Path(tempfile.mkdtemp(prefix=f"{phase.name}-{sig}-", dir=root))
    cache = work / "cache" if phase.fresh_cache else shared_cache
    trial = Trial(work, cache, [*([a for a in phase.args if a == "-m"]), *BASE,
                                *(a for a in phase.args if a != "-m")])
    trial.start()
    try:
        deadline = time.monotonic() + ready_timeout
        while not phase.ready(trial):
            if trial.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{phase.name}: the run never reached the phase (exit {trial.proc.poll()}):\n"
                                   + trial.output()[-3000:])
            time.sleep(0.01)
        sent, seen_at_send, second_sent = time.monotonic(), trial.output(), False
        if sig == "SIGTERM":
            os.kill(trial.proc.pid, signal.SIGTERM)
        else:  # Ctrl-C in a terminal: the whole foreground process group
            os.killpg(trial.proc.pid, signal.SIGINT)
        if sig == "SIGINTx2":  # once the launcher (not another rank) has logged the first, or 1 s
            seen = time.monotonic() + 1
            while not trial.launcher_heard("SIGINT") and time.monotonic() < seen and trial.proc.poll() is None:
                time.sleep(0.01)
            if trial.proc.poll() is None:
                os.killpg(trial.proc.pid, signal.SIGINT)
                second_sent = True
        exit_s = all_gone_s = None
        end = sent + timeout
        while time.monotonic() < end:
            if exit_s is None and trial.proc.poll() is not None:
                exit_s = time.monotonic() - sent
            if exit_s is not None and not trial.pids():
                all_gone_s = time.monotonic() - sent
                break
            time.sleep(0.02)
        survivors = len(trial.pids())
        returncode = trial.proc.poll()
        trial.close()
        out = trial.output()
        missed = _missed(phase, seen_at_send)
        statuses, left, files = inspect(work, cache if phase.fresh_cache else None)
        return Outcome(phase.name, sig, _r(exit_s), _r(all_gone_s), returncode, survivors, statuses, left, files,
                       "Traceback" in out, missed, second_sent)
    finally:
        trial.close()


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _missed(phase: Phase, out: str) -> bool:
    """The run got past the phase before the signal landed (a phase too short on this machine)."""
    later = {"ddp_rendezvous": "joined the process group", "sanity_check": "step 5/",
             "final_validation": "final: val/bpb", "sampling": "samples from", "sweep_between_jobs": "job 1: "
             }.get(phase.name)
    return later is not None and later in out


def inspect(work: Path, cache: Path | None) -> tuple[str, list[str], str]:
    """What a run left: the summary status(es), problems (partial files, torn rows, bad checkpoints),
    and a few words on the files."""
    from sem.training.checkpoint import CheckpointError, verify

    problems: list[str] = []
    statuses: list[str] = []
    roots = [work] + ([cache] if cache is not None and work not in cache.parents else [])
    ckpts = 0
    for base in roots:
        for path in sorted(base.rglob("*")):
            rel = str(path.relative_to(work if base == work else base.parent))
            name = path.name
            if name.endswith(".tmp") or name.startswith(".tmp"):
                problems.append(f"partial: {rel}")
            elif path.is_file() and name.endswith(".jsonl"):
                text = path.read_text(errors="replace")
                if text and not text.endswith("\n"):
                    problems.append(f"torn last line: {rel}")
                for line in text.splitlines():
                    try:
                        json.loads(line)
                    except ValueError:
                        problems.append(f"unreadable row in {rel}: {line[:60]!r}")
                        break
            elif path.is_file() and name.endswith(".json") and path.parent.name != "checkpoints":
                try:
                    data = json.loads(path.read_text())
                except ValueError:
                    problems.append(f"unreadable: {rel}")
                    continue
                if name == "summary.json":
                    statuses.append(str(data.get("status")))
            elif name.endswith(".ckpt") and path.parent.name == "checkpoints" and not path.is_symlink():
                ckpts += 1
                try:
                    verify(path)
                except CheckpointError as exc:
                    problems.append(f"bad checkpoint {rel}: {exc}")
            elif path.is_dir() and name.startswith("tokens-") and not (path / "meta.json").is_file():
                problems.append(f"incomplete token cache: {rel}")
    status = ",".join(statuses) or "none"
    words = [f"summary {status}", f"{ckpts} ckpt"]
    for ledger in work.rglob("ledger.jsonl"):
        rows = []
        for line in ledger.read_text().splitlines():
            try:
                rows.append(str(json.loads(line).get("status")))
            except ValueError:
                rows.append("torn")
        words.append("ledger " + ",".join(rows))
    if any(work.rglob("samples.txt")):
        words.append("samples.txt")
    if cache is not None:
        words.append("cache built" if any(cache.glob("tokens-*/meta.json")) else "no cache")
    return status, problems, ", ".join(words)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| phase | signal | launcher exit (s) | all gone (s) | exit code | left on disk | problems |",
             "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        problems = "; ".join(o.left) or ("traceback" if o.traceback else "none")
        if o.survivors:
            problems = f"{o.survivors} processes left; " + problems
        if o.phase_missed:
            problems += " (phase already over when the signal landed)"
        lines.append(f"| {o.phase} | {o.signal} | {o.exit_s} | {o.all_gone_s} | {o.returncode} | {o.files} | "
                     f"{problems} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--save", action="store_true", help="bench/results/signals.json and BENCHMARKS.md")
    parser.add_argument("--keep", action="store_true", help="keep the trial folders (printed)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="sem-signals-"))
    shared_cache = Path(os.environ.get("SEM_CACHE_DIR") or root / "cache")
    outcomes = []
    try:
        for name in args.phases.split(","):
            for sig in args.signals.split(","):
                try:
                    o = run_trial(PHASES[name], sig, root, shared_cache, timeout=args.timeout)
                except RuntimeError as exc:  # the run never reached the phase: say so, go on
                    print(exc, flush=True)
                    continue
                print(json.dumps(asdict(o)), flush=True)
                outcomes.append(o)
    finally:
        if args.keep:
            print(f"trial folders: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(table(outcomes))
    if args.save:
        from bench.common import save

        body = (table(outcomes) + f"\n\nTarget: every process gone within {EXIT_TARGET_S:.0f} s, exit 75 "
                "(130 for a second Ctrl-C), no partial file.\n")
        save("signals", {"outcomes": [asdict(o) for o in outcomes]}, "Stop signals in every phase", body)
    if not all(o.ok for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
