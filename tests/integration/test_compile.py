"""``python launch.py compile=true`` as a user runs it, in both engines: the run trains through the
compiled forward to the same losses as without it, saves checkpoints of the model's own keys, and a
compiled run's checkpoint resumes without compile (and the other way round)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sem.config.hardware import compile_missing
from tests.conftest import launch_ok, run_launch, tiny_data_overrides, train_losses

pytestmark = [pytest.mark.slow,  # each compiled run compiles the SEM's graph: ~30-60 s on 2 cores
              pytest.mark.skipif(compile_missing("cpu") is not None, reason="torch.compile cannot build CPU kernels here")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("compile")
    args = [*tiny_data_overrides(corpus_dir, cache_dir), "trainer.log_every_n_steps=1", "sample.n=0",
            "eval.stream=false", "data.final_val_max_windows=4", "precision=fp32"]
    out = {"eager": launch_ok(args, cwd, cache_dir, "eager")}
    for engine in ("lightning", "standalone"):  # inductor's cache of each: the kernels it built
        env = {"SEM_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_CACHE_DIR": str(cwd / f"inductor_{engine}")}
        proc = run_launch([*args, f"run.name={engine}", "compile=true", f"engine={engine}"], cwd, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        out[engine] = cwd / "outputs" / engine
    ckpt = out["lightning"] / "checkpoints" / "step_0000006.ckpt"
    out["resumed"] = launch_ok(args, cwd, cache_dir, "resumed", f"resume={ckpt}")
    return out


@pytest.mark.parametrize("engine", ["lightning", "standalone"])
def test_compiled_runs_train_to_the_same_losses(runs: dict[str, Path], engine: str) -> None:
    eager, compiled = train_losses(runs["eager"]), train_losses(runs[engine])
    assert sorted(compiled) == sorted(eager) and len(eager) >= 6
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4, abs=1e-4), step
    assert "compile: true" in (runs[engine] / "config_resolved.yaml").read_text()
    log = (runs[engine] / "launch.log").read_text()
    assert "compile: the training forward and backward run through torch.compile" in log
    assert "torch.compile" not in (runs["eager"] / "launch.log").read_text()
    kernels = list((runs[engine].parents[1] / f"inductor_{engine}").rglob("*.cpp"))
    assert kernels, "the run built no kernels: the training step did not go through torch.compile"


def test_compiled_checkpoints_hold_the_models_own_keys(runs: dict[str, Path]) -> None:
    name = "step_0000012.ckpt"
    eager = torch.load(runs["eager"] / "checkpoints" / name, weights_only=True)["state_dict"]
    compiled = torch.load(runs["lightning"] / "checkpoints" / name, weights_only=True)["state_dict"]
    assert list(compiled) == list(eager)
    assert not any("_orig_mod" in key for key in compiled)


def test_a_compiled_runs_checkpoint_resumes_without_compile(runs: dict[str, Path]) -> None:
    resumed, eager = train_losses(runs["resumed"]), train_losses(runs["eager"])
    assert sorted(resumed) == list(range(6, 12))
    for step, loss in resumed.items():
        assert loss == pytest.approx(eager[step], rel=1e-4, abs=1e-4), step
