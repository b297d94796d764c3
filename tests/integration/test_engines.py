"""Engine parity: the Lightning engine and the standalone loop drive the same core policies, so
from one seed they give the same per-step training loss (dropout, a gated curriculum and an EMA
teacher included), and each resumes the other's checkpoints to the same losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import launch_ok, run_launch, tiny_data_overrides, train_losses

MAX_STEPS = 30
BRANCH = 15  # a checkpoint inside the second stage (the gate ends the first around step 7)


def _args(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return [*tiny_data_overrides(corpus_dir, cache_dir), f"trainer.max_steps={MAX_STEPS}", "model.dropout=0.1",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=10", "data.final_val_max_windows=8",
            "checkpoint.every_n_steps=5", "checkpoint.keep_last=10", "curriculum=two_stage",
            "curriculum.stages.0.seq_len=16", "curriculum.stages.0.batch_size=8",
            "curriculum.stages.1.seq_len=32", "curriculum.stages.1.batch_size=4", "curriculum.stages.0.fraction=0.2",
            "+curriculum.stages.0.gate={window:3,threshold:0.5,min_steps:6}", "curriculum.stages.1.checkpoint=true",
            "distillation=ema_teacher"]


def _events(run: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["event"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "event" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("engines")
    args = _args(corpus_dir, cache_dir)
    out = {e: launch_ok(args, cwd, cache_dir, e, f"engine={e}") for e in ("lightning", "standalone")}
    for src, dst in (("lightning", "standalone"), ("standalone", "lightning")):
        ckpt = out[src] / "checkpoints" / f"step_{BRANCH:07d}.ckpt"
        out[f"{src}->{dst}"] = launch_ok(args, cwd, cache_dir, f"{src}_to_{dst}", f"engine={dst}", f"resume={ckpt}")
    return out


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_both_engines_give_the_same_losses_per_step(runs: dict[str, Path]) -> None:
    lightning, standalone = train_losses(runs["lightning"]), train_losses(runs["standalone"])
    assert sorted(lightning) == sorted(standalone) == list(range(MAX_STEPS))
    for step in range(MAX_STEPS):
        assert standalone[step] == pytest.approx(lightning[step], abs=1e-5), step
    # the run exercised what it claims: a gate-decided stage change and a distilling teacher
    assert _events(runs["lightning"]) == _events(runs["standalone"]) != []
    rows = [json.loads(line) for line in (runs["standalone"] / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("distill/kl") for r in rows)
    assert len({r["seq_len"] for r in rows if "seq_len" in r}) == 2
    for name in ("lightning", "standalone"):
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS
        assert (runs[name] / "plots" / "loss.png").exists() and (runs[name] / "health.jsonl").exists()
        assert list((runs[name] / "checkpoints").glob("stage_long_step_*.ckpt"))
    assert json.loads((runs["standalone"] / "summary.json").read_text())["val_bpb"] == pytest.approx(
        json.loads((runs["lightning"] / "summary.json").read_text())["val_bpb"], abs=1e-6)


@pytest.mark.parametrize("branch", ["lightning->standalone", "standalone->lightning"])
def test_each_engine_resumes_the_others_checkpoint(runs: dict[str, Path], branch: str) -> None:
    reference = train_losses(runs["lightning"])
    resumed = train_losses(runs[branch])
    assert sorted(resumed) == list(range(BRANCH, MAX_STEPS))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
    final = torch.load(runs[branch] / "checkpoints" / f"step_{MAX_STEPS:07d}.ckpt", weights_only=True)
    expected = torch.load(runs["lightning"] / "checkpoints" / f"step_{MAX_STEPS:07d}.ckpt", weights_only=True)
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, atol=1e-6, rtol=1e-5)


PROBE = '''
import json, os, torch
from sem.models.sem import SEMModel

class AutocastProbe(SEMModel):
    """Writes [step, autocast on] for every forward in eval mode (the validations)."""
    step_seen = None

    def set_step(self, step):
        super().set_step(step)
        self.step_seen = step

    def forward(self, input_ids, targets=None, state=None):
        if not self.training:
            with open(os.environ["AUTOCAST_LOG"], "a") as f:
                f.write(json.dumps([self.step_seen, torch.is_autocast_enabled("cpu")]) + "\\n")
        return super().forward(input_ids, targets, state)
'''


@pytest.mark.slow  # measured 12-15 s each (2026-12-04)
@pytest.mark.parametrize("engine", ["lightning", "standalone"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_mixed"])
def test_validations_run_under_the_runs_precision_and_the_final_one_in_fp32(
        engine: str, precision: str, tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    """Periodic validations autocast exactly when training does (never on an fp32 run: an enabled
    torch.autocast imposes the device's default dtype); the final one (summary.json's val_bpb) never."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "autocastprobe.py").write_text(PROBE)
    log = tmp_path / "autocast.jsonl"
    proc = run_launch([*tiny_data_overrides(corpus_dir, cache_dir), "trainer.max_steps=6", "trainer.val_check_interval=4",
                       "model._target_=autocastprobe.AutocastProbe", f"engine={engine}", f"precision={precision}",
                       "sample.n=0", "eval.stream=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                      env={"SEM_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(tmp_path / "probe"),
                           "AUTOCAST_LOG": str(log)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    seen = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    by_step = {step: {on for s, on in seen if s == step} for step, _ in seen if step is not None}
    assert by_step == {4: {precision == "bf16_mixed"}, 6: {False}}, seen  # periodic at 4, final at 6
