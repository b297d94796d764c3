"""Shared fixtures: the real composed config, forced onto CPU, a tiny model and tmp outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

if TYPE_CHECKING:
    import torch

from sem.config.store import register_configs

# Under `pytest -n 2` (the full suite) two workers share the 2 cores, and every launch.py they start
# would spin up one torch thread per core: a parallel region then waits for a time slice at every op.
# Measured here: the stream score of a smoke run took 40 s with 2 threads beside 2 busy processes,
# 6 s with 1 (and the CI of 2026-12-04 timed out on it). One thread per worker, inherited by the
# processes the tests start; a test that wants more says so (`threads=...`).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

register_configs()  # the conf/ options start from schemas in the ConfigStore: compose needs them

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# Small, fast settings for anything that trains in a test.
TINY = [
    "model=sem_tiny",
    "accelerator=cpu",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=2",
    "data.batch_size=4",
    "data.seq_len=32",
    "data.val_max_windows=4",
    "scheduler.warmup_steps=2",
    "callbacks.console.every_n_steps=4",
    "checkpoint.every_n_steps=6",
]


def make_corpus(root: Path, n_files: int = 40, size: int = 3000) -> Path:
    """A small deterministic text corpus of Python-like files (enough for a 5% split)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}  # comment {i * j}\n"
                 for j in range(size // 60)]
        (root / f"mod_{i:03d}.py").write_text("".join(lines))
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def losses_on_repeated_batch(model: torch.nn.Module, steps: int = 30) -> list[float]:
    """Cross-entropy of `steps` AdamW steps on one fixed batch (a model that learns drives it down)."""
    import torch

    from sem.models.common import param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.95))
    x = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(steps):
        out = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    return losses


def run_launch(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """Run launch.py as a user would, in a subprocess."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def launch_ok(args: list[str], cwd: Path, cache_dir: Path, name: str, *extra: str) -> Path:
    """launch.py ``args`` with run.name=``name`` and ``extra`` under ``cwd``; it must exit 0. The run dir."""
    proc = run_launch([*args, f"run.name={name}", *extra], cwd=cwd, timeout=300,
                      env={"SEM_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return cwd / "outputs" / name


def train_losses(run: Path) -> dict[int, float]:
    """step -> train/loss of a run's metrics.jsonl."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def tiny_data_overrides(corpus_dir: Path, cache_dir: Path) -> list[str]:
    """TINY on the small corpus. The corpus is named by a glob so document names are `mod_XXX.py`
    whatever the tmp folder is called: the train/val split hashes names, and with a folder name in
    them some folder names put none of the 40 files in a 5% val split."""
    return [*TINY, "data=text_files", f"data.corpus.paths=[{corpus_dir}/*.py]",
            f"data.cache_dir={cache_dir}"]


@pytest.fixture(scope="module")
def one_thread() -> object:
    """Torch on one thread for a module's in-process work (restored afterwards): small models run
    faster on one thread, and far faster on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config._sem_slow = sum(1 for item in items if item.get_closest_marker("slow"))  # before -m deselects them


# `slow` is a measurement, not a kind (the folders say the kind: unit/, integration/): a test is marked
# slow when its call takes more than SLOW_S seconds in the fast tier's own run (-n 2 on 2 cores; a
# module's shared launches are its fixtures' setup, paid once, and not counted).
SLOW_S = 15.0
_TIMES: dict[str, tuple[float, bool]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        took, slow = _TIMES.get(report.nodeid, (0.0, "slow" in report.keywords))
        _TIMES[report.nodeid] = (took + report.duration, slow)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Say how to run the rest when the default (fast) tier left slow tests out, and name any test whose
    measured time says it is in the wrong tier (a fast-tier test over SLOW_S seconds)."""
    slow = getattr(config, "_sem_slow", 0)
    if slow and config.getoption("markexpr") == "not slow":
        terminalreporter.write_line(
            f"fast tier: {slow} slow tests not run; the full suite: python -m pytest -m \"\" -n 2 "
            "(make test-full; what .ci/run runs)", yellow=True)
    over = sorted((took, nodeid) for nodeid, (took, marked) in _TIMES.items() if not marked and took > SLOW_S)
    for took, nodeid in over[::-1][:10]:
        terminalreporter.write_line(f"tier: {nodeid} took {took:.1f} s (> {SLOW_S:g} s): mark it slow, or make it "
                                    "faster", yellow=True)
