"""launch.py as a user runs it, in a subprocess: one tiny training run, bad configs, a sweep.

Each launch runs once per module (module-scoped fixtures) and writes only under tmp folders.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import launch_ok, run_launch, tiny_data_overrides

MAX_STEPS, VAL_EVERY, LOG_EVERY = 12, 6, 2  # as in conftest.TINY
TRAIN_KEYS = ("step", "train/loss", "train/ce_loss", "train/unitary_div", "lr", "seq_len", "stage",
              "grad_norm", "tokens_per_s")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Launch:
    proc: subprocess.CompletedProcess
    run_dir: Path

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def json(self, name: str) -> Any:
        return json.loads((self.run_dir / name).read_text())


def _env(cache_dir: Path) -> dict[str, str]:
    return {"SEM_CACHE_DIR": str(cache_dir)}


def config_errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("config error:")]


# ------------------------------------------------------------------------ a) one tiny training run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Launch:
    cwd = tmp_path_factory.mktemp("launch")
    run_dir = cwd / "run"
    args = [*tiny_data_overrides(corpus_dir, cache_dir), f"hydra.run.dir={run_dir}"]
    proc = run_launch(args, cwd=cwd, timeout=300, env=_env(cache_dir))
    return Launch(proc, run_dir)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_run_exits_zero(tiny_run: Launch) -> None:
    assert tiny_run.proc.returncode == 0, tiny_run.output[-3000:]


def test_summary(tiny_run: Launch) -> None:
    s = tiny_run.json("summary.json")
    assert s["status"] == "completed"
    assert s["steps"] == MAX_STEPS
    for key in ("val_bpb", "val_loss", "gzip_bpb", "tokens_per_s"):
        assert _finite(s[key]) and s[key] > 0, (key, s[key])
    assert "error" not in s


def _metrics(run: Launch) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_train_rows(tiny_run: Launch) -> None:
    train = [r for r in _metrics(tiny_run) if "train/loss" in r]
    steps = [r["step"] for r in train]
    # 0-based step index, every log_every_n_steps, plus the last step
    assert steps == [*range(0, MAX_STEPS, LOG_EVERY), MAX_STEPS - 1]
    for row in train:
        missing = [k for k in TRAIN_KEYS if k not in row or row[k] is None]
        assert not missing, (row["step"], missing)
        for k in ("train/loss", "train/ce_loss", "lr", "grad_norm", "tokens_per_s"):
            assert _finite(row[k]), (row["step"], k, row[k])
        assert row["seq_len"] == 32 and row["stage"] == "main"
    assert train[-1]["train/loss"] < train[0]["train/loss"]  # it learned something in 12 steps


def test_metrics_validation_rows(tiny_run: Launch) -> None:
    val = [r for r in _metrics(tiny_run) if "val/bpb" in r]
    periodic = [r for r in val if not r.get("final")]
    final = [r for r in val if r.get("final")]
    assert [r["step"] for r in periodic] == list(range(VAL_EVERY, MAX_STEPS + 1, VAL_EVERY))
    assert len(final) == 1 and final[0]["step"] == MAX_STEPS
    assert val[-1] is final[0]
    for r in val:
        assert _finite(r["val/loss"]) and _finite(r["val/bpb"]), r
    assert final[0]["val/bpb"] == tiny_run.json("summary.json")["val_bpb"]


def test_env_json(tiny_run: Launch) -> None:
    env = tiny_run.json("env.json")
    for key in ("git_sha", "packages", "hardware", "command_line"):
        assert env.get(key), key
    assert re.fullmatch(r"[0-9a-f]{40}", env["git_sha"]), env["git_sha"]
    assert env["packages"]["torch"] and env["packages"]["pytorch-lightning"]
    assert any("launch.py" in part for part in env["command_line"])


def test_config_resolved(tiny_run: Launch) -> None:
    text = (tiny_run.run_dir / "config_resolved.yaml").read_text()
    assert "${" not in text
    cfg = yaml.safe_load(text)
    assert cfg["trainer"]["max_steps"] == MAX_STEPS
    assert cfg["curriculum"]["stages"][0]["seq_len"] == 32  # interpolations resolved, not copied
    # compile=auto (the default) said what it chose and why: a run this short stays eager
    assert cfg["compile"] == "auto"
    log = (tiny_run.run_dir / "launch.log").read_text()
    assert f"compile=auto: eager (trainer.max_steps={MAX_STEPS} < 2000" in log
    assert "run through torch.compile" not in log
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # every job keeps freed memory
        assert "malloc: freed blocks kept for reuse" in log


def test_plots_and_checkpoint(tiny_run: Launch) -> None:
    for name in ("loss.png", "lr.png"):
        assert (tiny_run.run_dir / "plots" / name).read_bytes()[:8] == PNG_MAGIC, name
    last = tiny_run.run_dir / "checkpoints" / "last.ckpt"
    assert last.stat().st_size > 0
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    summary = tiny_run.json("summary.json")
    assert last.is_symlink() and summary["last_checkpoint"] == str(last.resolve())
    assert Path(summary["best_checkpoint"]).exists()


@pytest.mark.parametrize("engine", ["lightning", "standalone"])
def test_final_checkpoint_is_ranked_by_the_final_validation(tmp_path: Path, corpus_dir: Path, cache_dir: Path,
                                                             engine: str) -> None:
    # max_steps 8 is no validation step (every 6): the final checkpoint is saved before the final
    # validation, and its sidecar must get that validation's metrics, or best.ckpt could never be the
    # final model (the default run's ends after its last periodic validation). Either engine.
    run = launch_ok([*tiny_data_overrides(corpus_dir, cache_dir), "trainer.max_steps=8", f"engine={engine}"],
                    tmp_path, cache_dir, "final-ranked")
    summary = json.loads((run / "summary.json").read_text())
    sidecars = {p: json.loads(p.read_text())["metrics"] for p in (run / "checkpoints").glob("step_*.json")}
    final = run / "checkpoints" / "step_0000008.json"
    assert sidecars[final]["val/bpb"] == summary["val_bpb"]
    best = min((m["val/bpb"], -int(p.stem[5:]), p) for p, m in sidecars.items() if "val/bpb" in m)[2]
    assert summary["best_checkpoint"] == str(best.with_suffix(".ckpt"))
    assert (run / "checkpoints" / "best.ckpt").resolve() == best.with_suffix(".ckpt")


def test_console_lines(tiny_run: Launch) -> None:
    # a line every callbacks.console.every_n_steps=4 steps: "step N/M | ce ... | udiv ..." (CE first)
    done = [int(n) for n in re.findall(rf"step (\d+)/{MAX_STEPS} \| ce \d\.\d+ \| udiv \d", tiny_run.output)]
    assert done == [4, 8, 12], tiny_run.output[-3000:]
    assert "Traceback" not in tiny_run.output


# ---------------------------------------------------- b) bad config: exit 2, nothing overwritten


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bad_config_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
                   ) -> tuple[Launch, dict[str, str]]:
    """A finished-looking run `outputs/prev/`, then a bad config launched with run.name=prev."""
    cwd = tmp_path_factory.mktemp("bad")
    prev = cwd / "outputs" / "prev"
    (prev / "checkpoints").mkdir(parents=True)
    (prev / ".hydra").mkdir()
    (prev / "summary.json").write_text('{"status": "completed", "steps": 7}\n')
    (prev / "metrics.jsonl").write_text('{"step": 0, "train/loss": 5.0}\n')
    (prev / "config_resolved.yaml").write_text("seed: 1\n")
    (prev / "checkpoints" / "last.ckpt").write_bytes(bytes(range(256)) * 4)
    (prev / ".hydra" / "config.yaml").write_text("seed: 1\n")
    before = _digests(cwd)
    args = [*tiny_data_overrides(corpus_dir, cache_dir), "run.name=prev", "optimizer.lr=-1",
            "data.batch_size=0", "trainer.max_steps=10", "scheduler.warmup_steps=20"]
    return Launch(run_launch(args, cwd=cwd, timeout=120, env=_env(cache_dir)), prev), before


def test_bad_config_exit_code_and_lines(bad_config_run: tuple[Launch, dict[str, str]]) -> None:
    run, _ = bad_config_run
    assert run.proc.returncode == 2, run.output[-3000:]
    assert "Traceback" not in run.output
    errors = config_errors(run.proc)
    for needles in (("optimizer.lr=-1",), ("data.batch_size=0",), ("scheduler", "20", "max_steps=10")):
        assert any(all(n in line for n in needles) for line in errors), (needles, errors)
    assert len(errors) >= 3


def test_bad_config_leaves_previous_run_untouched(bad_config_run: tuple[Launch, dict[str, str]]) -> None:
    run, before = bad_config_run
    after = _digests(run.run_dir.parent.parent)
    for name in ("summary.json", "metrics.jsonl", "config_resolved.yaml", "checkpoints/last.ckpt"):
        key = f"outputs/prev/{name}"
        assert after.get(key) == before[key], name
    assert not (run.run_dir / "env.json").exists()


def test_bad_config_writes_nothing(bad_config_run: tuple[Launch, dict[str, str]]) -> None:
    run, before = bad_config_run
    assert _digests(run.run_dir.parent.parent) == before


# ------------------------------------------------------------- c) composition and device errors


@pytest.fixture(scope="module")
def unknown_key_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Launch:
    cwd = tmp_path_factory.mktemp("unknown")
    return Launch(run_launch(["model.foo=1"], cwd=cwd, timeout=120, env=_env(cache_dir)), cwd)


def test_unknown_key_is_usage_error(unknown_key_run: Launch) -> None:
    proc = unknown_key_run.proc
    assert proc.returncode == 2, unknown_key_run.output[-3000:]
    assert "Traceback" not in unknown_key_run.output
    assert "model.foo" in proc.stderr
    assert not (unknown_key_run.run_dir / "outputs").exists()  # nothing composed, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_missing_cuda_is_one_line(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    args = [*tiny_data_overrides(corpus_dir, cache_dir), "accelerator=cuda", f"hydra.run.dir={tmp_path}/run"]
    proc = run_launch(args, cwd=tmp_path, timeout=120, env=_env(cache_dir))
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = config_errors(proc)
    assert len(errors) == 1 and "accelerator=cuda" in errors[0] and "CUDA" in errors[0], errors


# --------------------------------------------------------- d, f) a two-job sweep on the baseline


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Launch:
    cwd = tmp_path_factory.mktemp("sweep")
    args = ["-m", *tiny_data_overrides(corpus_dir, cache_dir), "model=transformer_tiny",
            "trainer.max_steps=6", "trainer.val_check_interval=3", "checkpoint.every_n_steps=3",
            "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={cwd}/sweep"]
    return Launch(run_launch(args, cwd=cwd, timeout=300, env=_env(cache_dir)), cwd / "sweep")


@pytest.mark.slow
def test_sweep_jobs_complete_with_their_own_lr(sweep: Launch) -> None:
    assert sweep.proc.returncode == 0, sweep.output[-3000:]
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        summary = json.loads((sweep.run_dir / job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 6, (job, summary)
        assert _finite(summary["val_bpb"])
        cfg = yaml.safe_load((sweep.run_dir / job / "config_resolved.yaml").read_text())
        assert cfg["optimizer"]["lr"] == pytest.approx(lr)
        assert cfg["model"]["_target_"] == "sem.models.transformer.TransformerLM"
    assert not (sweep.run_dir.parent / "multirun_outputs").exists()


# ------------------------------------------------ d) keys that shape the end of a run reach it


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
@pytest.mark.parametrize("n", [1, 0])
def test_final_validation_and_samples_follow_their_keys(n: int, tmp_path: Path, corpus_dir: Path,
                                                        cache_dir: Path) -> None:
    """data.final_val_max_windows bounds the final validation; sample.* shape samples.txt (n=0: none)."""
    run_dir = tmp_path / "run"
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), "trainer.max_steps=4", "data.final_val_max_windows=3",
                       f"sample.n={n}", "sample.prompts=[abc]", "sample.max_new_tokens=5",
                       f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    final = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("final")]
    assert [r["val/windows"] for r in final] == [3]
    samples = run_dir / "samples.txt"
    if n == 0:
        assert not samples.exists()
    else:
        headers = [line for line in samples.read_text().splitlines() if line.startswith("=== ")]
        assert headers == ["=== prompt 'abc', sample 1/1 (seed 0, temperature 0.8, top_k 50, top_p None) ==="]


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_fast_dev_run_is_lightnings_quick_check(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    """trainer.fast_dev_run=true: one step, one validation batch, no checkpoints, exit 0, and it says so."""
    run_dir = tmp_path / "quick"
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), "trainer.fast_dev_run=true",
                       f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=300, env=_env(cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1 and summary["last_checkpoint"] is None
    assert not list((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").exists() else True
    assert "fast_dev_run" in proc.stdout + proc.stderr and "no checkpoints" in proc.stdout + proc.stderr
    assert "final validation on a fixed subset of 4 held-out windows" in proc.stdout + proc.stderr  # one batch


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_profiler_prints_lightnings_report(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), "trainer.max_steps=4", "+trainer.profiler=simple",
                       "sample.n=0", f"hydra.run.dir={tmp_path / 'profiled'}"], cwd=tmp_path, timeout=300,
                      env=_env(cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FIT Profiler Report" in proc.stdout + proc.stderr
