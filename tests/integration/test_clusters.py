"""Multi-node runs, on one host standing in for two nodes that share one run dir: ``launch.py`` started
the three ways a cluster starts it, each process a subprocess as a user (or the cluster) runs it.

- the Lightning environment (the same command on every node, ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``),
  ``torchrun --nnodes=2`` (c10d rendezvous) and the SLURM variables ``srun`` sets: every process exits 0,
  one run (one summary.json, one set of checkpoints, the run lock and ``.hydra/`` global rank 0's; global
  rank 1 writes its ``rank_1.log`` and nothing else), and 2 nodes x 1 process train what 1 node x 2
  processes and 1 process with the doubled batch train;
- a node alone: node 0 fails after ``strategy.join_timeout_s`` naming global rank 1 (Lightning, SLURM);
  node 1 alone fails without writing anything but its log;
- a rank that goes silent (SIGSTOP) or dies (SIGKILL) mid-training fails the run on node 0 in bounded time,
  in sem's words, the checkpoints written before kept.

What each process writes is recorded by an audit hook (``sitecustomize`` on ``PYTHONPATH``, see
``AUDIT_HOOK``): every open for writing, rename, mkdir, symlink and removal under the launch's folder, by
pid. Never ``strategy=ddp`` inside the pytest process (PLATFORM.md): every process here runs in a session
of its own, without the DDP or cluster variables of the process that starts it, and is killed on a
timeout. Independent launches run at the same time, at most ``MAX_BUSY`` computing processes at once
(2 cores).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, tiny_data_overrides

# Every launch is a module fixture: pyproject's `--dist loadscope` keeps this module on one worker under -n.
pytestmark = pytest.mark.slow

STEPS = 8                   # steps of the runs compared step by step
# train/loss, 2 nodes x 1 process vs 1 node x 2 processes and vs 1 process (fp32, 8 steps). Measured here:
# 0 vs 1x2 (the same two ranks and reductions: bitwise equal), 4.8e-7 vs one process (one float32 ulp at a
# loss of 4-8: the gradient sums in another order).
LOSS_TOL = 1e-6
JOIN_S = 20                 # strategy.join_timeout_s of the lone nodes
SILENT_S = 15               # strategy.join_timeout_s of the runs that lose a rank mid-training
EXIT_GRACE_S = 10           # a detected failure -> the process's exit (summary, log, teardown)
GONE_EXIT_S = 10            # SIGKILL of node 1 -> node 0's exit
TIMEOUT_S = 480             # one launch on a busy 2-core machine
MAX_BUSY = 4                # computing processes at once: two launches of two processes on 2 cores
LOOP_S = 0.2                # the scheduler's polling period (the resolution of the walls below)

QUICK = ["debug=smoke", "sample.n=0", "threads=1", "eval.stream=false"]
PARITY = ["precision=fp32", "trainer.log_every_n_steps=1"]  # fp32: see test_ddp (bf16 rounds per batch shape)
TWO_NODES = ["strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=2"]
ONE_NODE_TWO = ["strategy=ddp", "trainer.devices=2", "data.batch_size=2"]
ONE_PROCESS = ["data.batch_size=4"]
LAUNCHERS = ("lightning", "torchrun", "slurm")

# What a launch must not inherit from the process that starts it (a leftover makes it a rank of
# somebody else's job, or makes Lightning pick another cluster environment).
DDP_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "GROUP_RANK",
           "LOCAL_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")
CLUSTER_ENV = ("SLURM_", "TORCHELASTIC_", "LSB_", "LSF_", "OMPI_", "PMI_", "PMIX_")
SLURM_JOB = {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NAME": "semtest",
             "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",
             "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_CPUS_PER_TASK": "1", "SLURM_STEP_ID": "0"}

# Imported by every Python process of a launch (PYTHONPATH): one line per write under the launch's
# folder, into <audit dir>/<pid>.jsonl; the first line says which process it is.
AUDIT_HOOK = r'''
import json, os, sys
_root, _out = os.environ.get("SEM_TEST_AUDIT_ROOT"), os.environ.get("SEM_TEST_AUDIT_DIR")
if _root and _out:
    _fd = os.open(os.path.join(_out, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _prefix = os.path.abspath(_root) + os.sep
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event: (index of the path written, index of its dir_fd)
    _DIR_FD = {"os.rename": (1, 3), "os.symlink": (1, 2), "os.remove": (0, 1), "os.mkdir": (0, 2), "os.rmdir": (0, 1)}
    _KEYS = ("SEM_TEST_NODE", "NODE_RANK", "SLURM_PROCID", "RANK", "GROUP_RANK", "LOCAL_RANK")

    def _line(record):
        os.write(_fd, (json.dumps(record) + "\n").encode())

    def _rel(path):
        if path is None or isinstance(path, int):
            return None
        try:
            path = os.path.abspath(os.fsdecode(os.fspath(path)))
        except (TypeError, ValueError):
            return None
        return os.path.relpath(path, _root) if (path + os.sep).startswith(_prefix) else None

    def _hook(event, args):
        try:
            if event == "open":
                path, mode, flags = args
                if not ((flags or 0) & _WRITE or (isinstance(mode, str) and any(c in mode for c in "wax+"))):
                    return
                paths = [path]
            elif event in _DIR_FD:  # a path relative to a directory descriptor (rmtree's) is not ours to place
                if args[_DIR_FD[event][1]] not in (None, -1):  # (-1: none given)
                    return
                paths = [args[_DIR_FD[event][0]]]
            elif event in ("os.link", "shutil.copyfile"):
                paths = [args[1]]
            elif event in ("os.truncate", "shutil.rmtree"):
                paths = [args[0]]
            else:
                return
            for p in paths:
                rel = _rel(p)
                if rel is not None:
                    _line({"pid": os.getpid(), "event": event, "path": rel})
        except Exception:
            pass

    with open("/proc/self/cmdline", "rb") as _f:
        _argv = [a.decode(errors="replace") for a in _f.read().split(b"\0") if a]
    _line({"pid": os.getpid(), "ppid": os.getppid(), "argv": _argv, "env": {k: os.environ.get(k) for k in _KEYS}})
    sys.addaudithook(_hook)
'''


# ------------------------------------------------------------------------------------ helpers

_ports: set[int] = set()


def free_port(lo: int | None = None, hi: int | None = None) -> int:
    """A TCP port nobody listens on now (bound to, then let go), never the same twice in this module."""
    for _ in range(500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randint(lo, hi) if lo is not None and hi is not None else 0))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _ports:
            _ports.add(port)
            return port
    raise RuntimeError("no free port")


def listening(port: int) -> bool:
    """Something listens on ``port`` (read from /proc/net: nothing connects to it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in DDP_ENV and not k.startswith(CLUSTER_ENV)}


def _torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


@dataclass
class Node:
    """One process as the cluster starts it (``launch.py``, or the ``torchrun`` agent that starts it)."""

    name: str
    proc: subprocess.Popen
    console: Path
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def poll(self) -> bool:
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is not None

    @property
    def code(self) -> int | None:
        return self.proc.returncode

    @property
    def wall_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` to its session (the process and whatever it started), while it still runs."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


@dataclass
class Proc:
    """A Python process of a launch as the audit hook saw it: what it wrote under the launch's folder."""

    pid: int
    ppid: int | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=dict)
    writes: list[tuple[str, str]] = field(default_factory=list)  # (event, path relative to the launch's folder)

    def wrote(self, path: str) -> bool:
        return any(p == path for _, p in self.writes)


@dataclass
class Launch:
    """A run: its nodes (or its single launcher), in ``cwd``, run dir ``cwd/run``."""

    name: str
    cwd: Path
    audit_dir: Path
    nodes: list[Node]
    port: int | None = None
    timeout_s: float = TIMEOUT_S
    started: float = field(default_factory=time.monotonic)
    timed_out: bool = False
    act: Callable[[Launch], None] | None = None  # called at every tick while it runs
    marks: dict[str, Any] = field(default_factory=dict)  # what act saw and did, when (monotonic)

    @property
    def run_dir(self) -> Path:
        return self.cwd / "run"

    def tick(self) -> bool:
        """Poll every node, let ``act`` act, kill everything past the deadline. True once all ended."""
        done = all([n.poll() for n in self.nodes])
        if not done and self.act is not None:
            self.act(self)
            done = all([n.poll() for n in self.nodes])
        if not done and time.monotonic() - self.started > self.timeout_s:
            self.timed_out = True
            self.kill()
        return done

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def wait(self) -> None:
        for node in self.nodes:
            node.proc.wait()
            node.poll()

    @property
    def codes(self) -> list[int | None]:
        return [n.code for n in self.nodes]

    def facts(self) -> str:
        """Exit codes and walls, for assertion messages."""
        nodes = ", ".join(f"{n.name} exit {n.code} after {n.wall_s or 0:.1f} s" for n in self.nodes)
        marks = ", ".join(f"{k} at {v - self.started:.1f} s" for k, v in self.marks.items() if isinstance(v, float))
        return f"{self.name}: {nodes}{'; ' + marks if marks else ''}{'; TIMED OUT' if self.timed_out else ''}"

    def tail(self, n: int = 2500) -> str:
        parts = [self.facts()]
        for node in self.nodes:
            text = node.console.read_text(errors="replace") if node.console.exists() else ""
            parts.append(f"--- {node.name} ({node.console.name}):\n{text[-n:]}")
        return "\n".join(parts)

    def json(self, name: str) -> Any:
        return json.loads((self.run_dir / name).read_text())

    def summary(self) -> dict[str, Any]:
        path = self.run_dir / "summary.json"
        assert path.exists(), f"no summary.json\n{self.tail()}\n{tree(self.cwd)}"
        return self.json("summary.json")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written
                pass
        return rows

    def train_losses(self) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in self.metrics() if "train/loss" in r}

    def processes(self) -> dict[int, Proc]:
        procs: dict[int, Proc] = {}
        for path in sorted(self.audit_dir.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                proc = procs.setdefault(rec["pid"], Proc(rec["pid"]))
                if "argv" in rec:
                    proc.ppid, proc.argv, proc.env = rec["ppid"], rec["argv"], rec["env"]
                else:
                    proc.writes.append((rec["event"], rec["path"]))
        return procs

    def writers_of(self, path: str) -> list[Proc]:
        return [p for p in self.processes().values() if p.wrote(path)]


def tree(root: Path, depth: int = 3) -> str:
    paths = [p for p in root.rglob("*") if len(p.relative_to(root).parts) <= depth]
    return "\n".join([str(root), *sorted(str(p.relative_to(root)) for p in paths)])


class Starter:
    """Starts the processes of launches (in folders of their own, audited)."""

    def __init__(self, tmp: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> None:
        self.tmp, self.cache_dir = tmp, cache_dir
        self.base = [*tiny_data_overrides(corpus_dir, cache_dir), *QUICK]
        self.hook_dir = tmp.mktemp("audit_hook")
        (self.hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)

    def _folders(self, name: str) -> tuple[Path, Path]:
        return self.tmp.mktemp(name), self.tmp.mktemp(f"{name}_audit")

    def _spawn(self, cwd: Path, audit: Path, name: str, argv: list[str], env_extra: dict[str, str]) -> Node:
        env = _clean_env()
        env.update(SEM_CACHE_DIR=str(self.cache_dir), PYTHONUNBUFFERED="1", SEM_TEST_NODE=name,
                   SEM_TEST_AUDIT_ROOT=str(cwd), SEM_TEST_AUDIT_DIR=str(audit),
                   PYTHONPATH=os.pathsep.join(p for p in (str(self.hook_dir), env.get("PYTHONPATH")) if p))
        env.update(env_extra)
        console = cwd / f"{name}.txt"
        with open(console, "a") as out:  # (a requeued job appends, as sbatch --open-mode=append)
            # A session of its own: the process and what it starts can be stopped and killed together.
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return Node(name, proc, console)

    def _args(self, cwd: Path, steps: int, extra: list[str]) -> list[str]:
        return [*self.base, f"trainer.max_steps={steps}", f"hydra.run.dir={cwd / 'run'}", *extra]

    def single(self, name: str, extra: list[str], steps: int = STEPS) -> Launch:
        """One ``launch.py`` (one process, or a launcher starting its own ranks)."""
        cwd, audit = self._folders(name)
        node = self._spawn(cwd, audit, "launcher", [sys.executable, str(ROOT / "launch.py"),
                                                    *self._args(cwd, steps, extra)], {})
        return Launch(name, cwd, audit, [node])

    def two_nodes(self, name: str, launcher: str, extra: list[str], steps: int = STEPS,
                  only: tuple[int, ...] = (0, 1), again: Launch | None = None) -> Launch:
        """``trainer.num_nodes=2``, one process per node, started as ``launcher`` starts it on node
        ``k`` for each ``k`` in ``only`` (a node left out never comes); ``again``: the same job once more
        in that launch's folders (a requeue: SLURM gives it the same job id)."""
        cwd, audit = (again.cwd, again.audit_dir) if again is not None else self._folders(name)
        args = self._args(cwd, steps, [*TWO_NODES, *extra])
        launch_py = [sys.executable, str(ROOT / "launch.py"), *args]
        if launcher == "slurm" and again is not None:
            port = again.port
            job = {**SLURM_JOB, "SLURM_JOB_ID": f"7{port - 15000:04d}"}
        elif launcher == "slurm":  # Lightning's SLURMEnvironment: port 15000 + the job id's last 4 digits
            port = free_port(15000, 24999)
            job = {**SLURM_JOB, "SLURM_JOB_ID": f"7{port - 15000:04d}"}
        else:
            port = free_port()
        nodes = []
        for k in only:
            name_k = f"node{k}"
            if launcher == "lightning":
                env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(k)}
                nodes.append(self._spawn(cwd, audit, name_k, launch_py, env))
            elif launcher == "slurm":
                env = {**job, "SLURM_PROCID": str(k), "SLURM_LOCALID": "0", "SLURM_NODEID": str(k)}
                nodes.append(self._spawn(cwd, audit, name_k, launch_py, env))
            elif launcher == "torchrun":
                argv = [*_torchrun(), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=sem{port}", f"--node-rank={k}",
                        str(ROOT / "launch.py"), *args]
                nodes.append(self._spawn(cwd, audit, name_k, argv, {}))
            else:
                raise ValueError(launcher)
        return Launch(name, cwd, audit, nodes, port=port)


def run_all(plan: list[tuple[int, Callable[[], Launch]]]) -> list[Launch]:
    """Start the launches of ``plan`` ((computing processes, starter)) in order, as many at once as
    ``MAX_BUSY`` allows, and tick them all until every one has ended; in ``plan``'s order."""
    pending = list(enumerate(plan))
    running: dict[int, tuple[int, Launch]] = {}
    done: dict[int, Launch] = {}
    try:
        while pending or running:
            busy = sum(w for w, _ in running.values())
            for item in list(pending):
                i, (weight, start) = item
                if not running or busy + weight <= MAX_BUSY:
                    running[i] = (weight, start())
                    busy += weight
                    pending.remove(item)
            for i, (_, launch) in list(running.items()):
                if launch.tick():
                    done[i] = running.pop(i)[1]
            time.sleep(LOOP_S)
    finally:
        for _, launch in running.values():
            launch.kill()
    return [done[i] for i in range(len(plan))]


# --------------------------------------------------------------------- what a test does to a run

def _stop_node1(sig: int, after_step: int) -> Callable[[Launch], None]:
    """``sig`` to node 1 once rank 0 has logged step ``after_step`` and the checkpoint of step 6 is
    there (the checkpoints then present are verified first, to be checked after the failure); SIGKILL
    to a stopped node 1 once node 0 has exited, or ``SILENT_S + 60`` s after the stop."""
    from sem.training.checkpoint import verify

    def act(launch: Launch) -> None:
        node0, node1 = launch.nodes
        if "signal" not in launch.marks:
            ckpts = launch.run_dir / "checkpoints"
            if max(launch.train_losses(), default=-1) >= after_step and (ckpts / "step_0000006.ckpt").exists():
                launch.marks["before"] = {p.name: verify(p)["global_step"] for p in sorted(ckpts.glob("step_*.ckpt"))}
                os.kill(node1.proc.pid, sig)
                launch.marks["signal"] = time.monotonic()
                launch.marks["step_at_signal"] = max(launch.train_losses())
        elif node0.poll() or time.monotonic() - launch.marks["signal"] > SILENT_S + 60:
            launch.kill()  # SIGKILL, to a stopped node 1 too (the fixture kills again in its finally)
    return act


def _watch_port(launch: Launch) -> None:
    """Mark when node 0's rendezvous started listening (the join timeout runs from there)."""
    if "listening" not in launch.marks and launch.port is not None and listening(launch.port):
        launch.marks["listening"] = time.monotonic()


def _with(launch: Launch, act: Callable[[Launch], None]) -> Launch:
    launch.act = act
    return launch


# ------------------------------------------------------------------------------------ the launches


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> dict[str, Launch]:
    """Every launch of this module, started as ``run_all`` allows (the cheap lone nodes beside the rest)."""
    start = Starter(tmp_path_factory, corpus_dir, cache_dir)
    fault = [f"strategy.join_timeout_s={SILENT_S}", "trainer.log_every_n_steps=1", "checkpoint.keep_last=10",
             "trainer.val_check_interval=1000", "callbacks.console.every_n_steps=50"]
    plan: dict[str, tuple[int, Callable[[], Launch]]] = {
        "lightning": (2, lambda: start.two_nodes("lightning", "lightning", PARITY)),
        "torchrun": (2, lambda: start.two_nodes("torchrun", "torchrun", PARITY)),
        "lone_node1": (1, lambda: start.two_nodes("lone_node1", "lightning", [f"strategy.join_timeout_s={JOIN_S}"],
                                                  only=(1,))),
        "slurm": (2, lambda: start.two_nodes("slurm", "slurm", PARITY)),
        "one_node_two": (2, lambda: start.single("one_node_two", [*PARITY, *ONE_NODE_TWO])),
        "one_process": (1, lambda: start.single("one_process", [*PARITY, *ONE_PROCESS])),
        "lone_lightning": (1, lambda: _with(start.two_nodes(
            "lone_lightning", "lightning", [f"strategy.join_timeout_s={JOIN_S}"], only=(0,)), _watch_port)),
        "lone_slurm": (1, lambda: _with(start.two_nodes(
            "lone_slurm", "slurm", [f"strategy.join_timeout_s={JOIN_S}"], only=(0,)), _watch_port)),
        "silent": (2, lambda: _with(start.two_nodes("silent", "lightning", fault, steps=1000),
                                    _stop_node1(signal.SIGSTOP, after_step=8))),
        "killed": (2, lambda: _with(start.two_nodes("killed", "lightning", fault, steps=1000),
                                    _stop_node1(signal.SIGKILL, after_step=8))),
    }
    t0 = time.monotonic()
    done: list[Launch] = []
    try:
        done = run_all(list(plan.values()))
        print(f"\nall launches: {time.monotonic() - t0:.0f} s")
        for launch in done:
            print(launch.facts())
        yield dict(zip(plan, done))
    finally:
        for launch in done:
            launch.kill()
            launch.wait()


def _ok(launch: Launch) -> Launch:
    if launch.codes != [0] * len(launch.nodes):
        pytest.fail(f"the reference run failed:\n{launch.tail()}")
    return launch


# ------------------------------------------------------- 1) three launchers, one run, the same losses


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_nodes_complete(launches: dict[str, Launch], launcher: str) -> None:
    run = launches[launcher]
    assert run.codes == [0, 0], run.tail()
    summary = run.summary()
    assert summary["status"] == "completed" and summary["steps"] == STEPS, (run.facts(), summary)
    summaries = sorted(run.cwd.rglob("summary.json"))
    assert summaries == [run.run_dir / "summary.json"], (run.facts(), tree(run.cwd, 9))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_nodes_write_one_run(launches: dict[str, Launch], launcher: str) -> None:
    """Global rank 0 holds the lock and writes the run (``.hydra/``, its log, summary, metrics); global
    rank 1 (node 1; torchrun's rendezvous may number the nodes otherwise) writes ``rank_1.log`` only."""
    from sem.record.lock import busy

    run = launches[launcher]
    assert run.codes == [0, 0], run.tail()
    procs = run.processes()
    rank1 = run.writers_of("run/rank_1.log")
    rank0 = run.writers_of("run/summary.json")
    assert len(rank1) == 1 and len(rank0) == 1, (run.facts(), {p.pid: p.writes for p in procs.values()})
    rank0, rank1 = rank0[0], rank1[0]
    assert rank1.pid != rank0.pid
    written = sorted({p for _, p in rank1.writes} - {"run"})  # (creating the shared run dir is allowed)
    assert written == ["run/rank_1.log"], f"{run.facts()}\nglobal rank 1 ({rank1.env}) wrote {rank1.writes}"
    assert not any(p.startswith("run/.hydra") for p in written)
    # the one lock, taken by global rank 0, and free now
    lock = json.loads((run.run_dir / "run.lock").read_text())
    assert lock["pid"] == rank0.pid, (lock, rank0.pid, rank1.pid)
    assert not rank1.wrote("run/run.lock")
    assert busy(run.run_dir) is None
    # .hydra/ once, by global rank 0; its log and rank 1's
    hydra = sorted(p.name for p in (run.run_dir / ".hydra").iterdir())
    assert hydra == ["config.yaml", "hydra.yaml", "overrides.yaml"], hydra
    for name in hydra:
        assert [p.pid for p in run.writers_of(f"run/.hydra/{name}")] == [rank0.pid]
    logs = sorted(p.name for p in run.run_dir.glob("*.log"))
    assert logs == ["launch.log", "rank_1.log"], logs
    assert "global rank 1 of 2 (node 1, local rank 0" in (run.run_dir / "rank_1.log").read_text()
    assert "global rank 0 of 2 (node 0, local rank 0" in (run.run_dir / "launch.log").read_text()
    # nothing beside the run dir: no outputs/ of node 1's own
    assert sorted(p.name for p in run.cwd.iterdir()) == ["node0.txt", "node1.txt", "run"], tree(run.cwd)
    for name in ("summary.json", "metrics.jsonl", "config_resolved.yaml", "env.json", "run.lock"):
        assert list(run.cwd.rglob(name)) == [run.run_dir / name], tree(run.cwd, 9)
    if launcher in ("lightning", "slurm"):  # NODE_RANK / SLURM_PROCID 1 is global rank 1
        assert (rank0.pid, rank1.pid) == (run.nodes[0].proc.pid, run.nodes[1].proc.pid), run.facts()
    else:  # torchrun starts launch.py; c10d numbers the nodes in its own order
        agents = {n.proc.pid: n.name for n in run.nodes}
        assert rank0.ppid in agents and rank1.ppid in agents and rank0.ppid != rank1.ppid, (agents, rank0, rank1)
        print(f"torchrun: global rank 0 on {agents[rank0.ppid]}, global rank 1 on {agents[rank1.ppid]}")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_nodes_checkpoints_written_once(launches: dict[str, Launch], launcher: str) -> None:
    """The one-process schedule of checkpoints (every 6 steps and the last), each step file put in place
    once, by global rank 0, and verifying against its sidecar."""
    from sem.training.checkpoint import verify

    run, single = launches[launcher], _ok(launches["one_process"])
    assert run.codes == [0, 0], run.tail()
    names = sorted(p.name for p in (run.run_dir / "checkpoints").iterdir())
    expected = ["best.ckpt", "last.ckpt", "step_0000006.ckpt", "step_0000006.json",
                "step_0000008.ckpt", "step_0000008.json"]
    assert names == sorted(p.name for p in (single.run_dir / "checkpoints").iterdir()) == expected, names
    rank0 = run.writers_of("run/summary.json")
    for step in (6, 8):
        name = f"step_{step:07d}.ckpt"
        puts = [(p.pid, e) for p in run.processes().values() for e, path in p.writes if path == f"run/checkpoints/{name}"]
        assert puts == [(rank0[0].pid, "os.rename")], (name, puts)  # one atomic rename, by rank 0
        assert verify(run.run_dir / "checkpoints" / name)["global_step"] == step


def _loss_table(a: dict[int, float], b: dict[int, float], what: str) -> tuple[float, str]:
    diffs = {s: abs(a[s] - b[s]) for s in a}
    table = "\n".join(f"step {s}: 2 nodes {a[s]:.8f}  {what} {b[s]:.8f}  diff {d:.2e}" for s, d in diffs.items())
    return max(diffs.values()), table


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_nodes_losses_match_one_node(launches: dict[str, Launch], launcher: str) -> None:
    """2 nodes x 1 process, 1 node x 2 processes (both data.batch_size=2 a rank) and 1 process with
    data.batch_size=4: the same 4 windows a step, the same losses step by step."""
    run = launches[launcher]
    assert run.codes == [0, 0], run.tail()
    two_nodes = run.train_losses()
    for ref, what in ((_ok(launches["one_node_two"]), "1x2"), (_ok(launches["one_process"]), "1 process")):
        other = ref.train_losses()
        assert sorted(two_nodes) == sorted(other) == list(range(STEPS)), (sorted(two_nodes), sorted(other))
        worst, table = _loss_table(two_nodes, other, what)
        print(f"{launcher} vs {what}: max |diff| {worst:.2e}")
        assert worst <= LOSS_TOL, f"{launcher} vs {what}: max |diff| {worst:.2e} > {LOSS_TOL:g}\n{table}"


# --------------------------------------------------------------------------------- 2) a lone node


@pytest.mark.parametrize("launcher", ["lightning", "slurm"])
def test_node0_alone_fails_after_the_join_timeout(launches: dict[str, Launch], launcher: str) -> None:
    run = launches[f"lone_{launcher}"]
    node0 = run.nodes[0]
    assert "listening" in run.marks, f"the rendezvous never listened on {run.port}\n{run.tail()}"
    after_listen = node0.ended - run.marks["listening"]
    facts = f"{run.facts()}; exit {after_listen:.1f} s after the rendezvous listened"
    print(facts)
    assert node0.code == 1, f"{facts}\n{run.tail()}"
    assert JOIN_S - 1 <= after_listen <= JOIN_S + EXIT_GRACE_S, facts
    summary = run.summary()
    assert summary["status"] == "failed", (facts, summary)
    assert "global rank 1 never joined" in summary["error"], (facts, summary["error"])
    assert f"strategy.join_timeout_s={JOIN_S}" in summary["error"], summary["error"]


def test_node1_alone_writes_only_its_log(launches: dict[str, Launch]) -> None:
    from sem.record.lock import busy

    run = launches["lone_node1"]
    node1 = run.nodes[0]
    facts = run.facts()
    print(facts)
    assert node1.code == 1, run.tail()
    assert JOIN_S - 1 <= node1.wall_s <= JOIN_S + 60, facts  # start-up, then the join timeout
    assert sorted(p.name for p in run.run_dir.iterdir()) == ["rank_1.log"], tree(run.cwd)
    assert sorted(p.name for p in run.cwd.iterdir()) == ["node1.txt", "run"], tree(run.cwd)
    assert busy(run.run_dir) is None
    writes = {p for proc in run.processes().values() for _, p in proc.writes} - {"run"}
    assert writes == {"run/rank_1.log"}, writes
    log = (run.run_dir / "rank_1.log").read_text()
    assert "could not reach global rank 0's rendezvous" in log, log[-2000:]


# ---------------------------------------------------------------- 3) a rank goes silent or dies


def _lost(run: Launch, bound_s: float, words: str, not_before_s: float = 0.0) -> None:
    """Node 0 exits 1 between ``not_before_s`` and ``bound_s`` after the signal to node 1, the run failed
    in ``words``; the checkpoints verified before the signal are still there and verify."""
    from sem.training.checkpoint import verify

    assert "signal" in run.marks, f"node 1 was never signalled\n{run.tail()}"
    node0 = run.nodes[0]
    after = node0.ended - run.marks["signal"]
    facts = (f"{run.facts()}; node 0 exit {after:.1f} s after the signal "
             f"(rank 0 at step {run.marks['step_at_signal']})")
    print(facts)
    assert node0.code == 1, f"{facts}\n{run.tail()}"
    assert not_before_s <= after <= bound_s, facts
    summary = run.summary()
    assert summary["status"] == "failed" and words in summary["error"], (facts, summary)
    assert "global rank 1" in summary["error"], summary["error"]
    before = run.marks["before"]
    assert before, facts
    for name, step in before.items():
        assert verify(run.run_dir / "checkpoints" / name)["global_step"] == step, name


def test_a_silent_rank_fails_the_run(launches: dict[str, Launch]) -> None:
    """SIGSTOP to node 1: node 0 hears no heartbeat for strategy.join_timeout_s and exits 1 (not before:
    node 0 saw rank 1's last beat at most one heartbeat period, min(2 s, join_timeout_s / 10), before)."""
    _lost(launches["silent"], SILENT_S + EXIT_GRACE_S, "went silent", not_before_s=SILENT_S - 2 - LOOP_S)


def test_a_killed_rank_fails_the_run(launches: dict[str, Launch]) -> None:
    """SIGKILL to node 1: node 0's collective breaks, the heartbeat says rank 1 is gone, exit 1."""
    _lost(launches["killed"], GONE_EXIT_S, "gone")


# ------------------------------------------------------------- 4) elastic resume and SLURM requeue

REQUEUE_STEPS = 30          # the requeued job's length; SIGUSR1 to both tasks once step REQUEUE_AT is logged
REQUEUE_AT = 12


def _usr1_to_every_task(launch: Launch) -> None:
    """What ``#SBATCH --signal=USR1@<s>`` does before the time limit: SIGUSR1 to every task at once."""
    if "signal" not in launch.marks and max(launch.train_losses(), default=-1) >= REQUEUE_AT:
        for node in launch.nodes:
            os.kill(node.proc.pid, signal.SIGUSR1)
        launch.marks["signal"] = time.monotonic()


@pytest.fixture(scope="module")
def resumes(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path,
            launches: dict[str, Launch]) -> dict[str, Launch]:
    """A checkpoint of 2 nodes resumed on 1 process and one of 1 process on 2 nodes (step 6 of the parity
    runs, the same global batch); a 2-task SLURM job stopped by SIGUSR1, then requeued (the same command,
    ``resume=auto``), beside the same job uninterrupted."""
    start = Starter(tmp_path_factory, corpus_dir, cache_dir)
    two, one = _ok(launches["lightning"]), _ok(launches["one_process"])
    from_two = f"resume={two.run_dir / 'checkpoints' / 'step_0000006.ckpt'}"
    from_one = f"resume={one.run_dir / 'checkpoints' / 'step_0000006.ckpt'}"
    job = [*PARITY, "resume=auto", "checkpoint.every_n_steps=100", "callbacks.console.every_n_steps=50"]
    plan: dict[str, tuple[int, Callable[[], Launch]]] = {
        "two_then_one": (1, lambda: start.single("two_then_one", [*PARITY, *ONE_PROCESS, from_two])),
        "one_then_two": (2, lambda: start.two_nodes("one_then_two", "slurm", [*PARITY, from_one])),
        "requeue_ref": (2, lambda: start.two_nodes("requeue_ref", "slurm", job, steps=REQUEUE_STEPS)),
        "stopped": (2, lambda: _with(start.two_nodes("stopped", "slurm", job, steps=REQUEUE_STEPS),
                                     _usr1_to_every_task)),
    }
    done: list[Launch] = []
    try:
        done = run_all(list(plan.values()))
        out = dict(zip(plan, done))
        stopped = out["stopped"]
        stopped.marks["summary"] = stopped.summary() if (stopped.run_dir / "summary.json").exists() else {}
        stopped.marks["codes"] = stopped.codes
        out["requeued"] = run_all([(2, lambda: start.two_nodes("stopped", "slurm", job, steps=REQUEUE_STEPS,
                                                               again=stopped))])[0]
        done.append(out["requeued"])
        for launch in out.values():
            print(launch.facts())
        yield out
    finally:
        for launch in done:
            launch.kill()
            launch.wait()


@pytest.mark.parametrize("name, written_by, resumed_on", [("two_then_one", "lightning", "one_process"),
                                                           ("one_then_two", "one_process", "lightning")])
def test_a_checkpoint_resumes_on_another_layout(launches: dict[str, Launch], resumes: dict[str, Launch],
                                                name: str, written_by: str, resumed_on: str) -> None:
    """Step 6 of one layout, resumed on the other with the same global batch, trains steps 6 and 7 as the
    uninterrupted run on that layout does (within the 1 process vs 2 nodes tolerance)."""
    run = resumes[name]
    assert run.codes == [0] * len(run.nodes), run.tail()
    assert run.summary()["steps"] == STEPS
    resumed, source, ref = run.train_losses(), launches[written_by].train_losses(), launches[resumed_on].train_losses()
    assert sorted(resumed) == [6, 7], resumed
    # The same weights on the same batch; the loss summed on the other layout (one float32 step apart).
    assert abs(resumed[6] - source[6]) <= LOSS_TOL, (resumed, source)
    worst = max(abs(resumed[s] - ref[s]) for s in resumed)
    print(f"{name}: step 6 {resumed[6]:.8f} (written by {written_by}: {source[6]:.8f}); max |diff| vs "
          f"uninterrupted {resumed_on} {worst:.2e}")
    assert worst <= LOSS_TOL, (resumed, ref)


def test_a_requeued_slurm_job_goes_on_from_the_step_it_saved(resumes: dict[str, Launch]) -> None:
    """SIGUSR1 to both tasks: both exit 75 at one saved step; the requeued job (resume=auto) goes on from
    it to the end, with the uninterrupted job's losses step by step (the same layout: bitwise)."""
    stopped, requeued, ref = resumes["stopped"], resumes["requeued"], resumes["requeue_ref"]
    assert "signal" in stopped.marks, stopped.tail()
    assert stopped.marks["codes"] == [75, 75], stopped.tail()
    first = stopped.marks["summary"]
    assert first.get("status") == "preempted" and first["steps"] > REQUEUE_AT, first
    assert requeued.codes == [0, 0], requeued.tail()
    assert requeued.summary()["status"] == "completed" and requeued.summary()["steps"] == REQUEUE_STEPS
    attempts = [json.loads(line) for line in (requeued.run_dir / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2, attempts
    losses, expected = requeued.train_losses(), ref.train_losses()
    assert sorted(losses) == sorted(expected) == list(range(REQUEUE_STEPS))
    worst = max(abs(losses[s] - expected[s]) for s in expected)
    print(f"requeue: saved step {first['steps']}, resumed loss {losses[first['steps']]:.8f} vs uninterrupted "
          f"{expected[first['steps']]:.8f}; max |diff| over {REQUEUE_STEPS} steps {worst:.2e}")
    assert worst == 0.0, {s: (losses[s], expected[s]) for s in expected if losses[s] != expected[s]}
