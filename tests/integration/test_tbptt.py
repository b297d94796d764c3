"""Truncated BPTT end to end (``data.tbptt``): both engines carry the same state and give the same
losses per step, and a checkpoint in the middle of a segment resumes, in either engine, to the losses
of the uninterrupted run (the lanes' states are in the checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import launch_ok, tiny_data_overrides, train_losses

MAX_STEPS = 14
BRANCH = 6  # with data.tbptt=4 the second step of a segment: it must continue the carried state


def _args(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return [*tiny_data_overrides(corpus_dir, cache_dir), f"trainer.max_steps={MAX_STEPS}", "data.tbptt=4",
            "trainer.accumulate_grad_batches=2", "model.conv_width=3", "trainer.log_every_n_steps=1",
            "checkpoint.every_n_steps=2", "checkpoint.keep_last=10", "eval.stream=false", "sample.n=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("tbptt")
    args = _args(corpus_dir, cache_dir)
    out = {e: launch_ok(args, cwd, cache_dir, e, f"engine={e}") for e in ("lightning", "standalone")}
    out["off"] = launch_ok(args, cwd, cache_dir, "off", "data.tbptt=0")
    for src, dst in (("lightning", "standalone"), ("standalone", "lightning")):
        ckpt = out[src] / "checkpoints" / f"step_{BRANCH:07d}.ckpt"
        out[f"{src}->{dst}"] = launch_ok(args, cwd, cache_dir, f"{src}_to_{dst}", f"engine={dst}", f"resume={ckpt}")
    return out


@pytest.mark.slow  # five short runs
def test_both_engines_carry_the_state_alike(runs: dict[str, Path]) -> None:
    lightning, standalone = train_losses(runs["lightning"]), train_losses(runs["standalone"])
    assert sorted(lightning) == sorted(standalone) == list(range(MAX_STEPS))
    for step in range(MAX_STEPS):
        assert standalone[step] == pytest.approx(lightning[step], abs=1e-5), step
    off = train_losses(runs["off"])  # other batches (lanes), so other losses: the key reaches the run
    assert all(off[s] != pytest.approx(lightning[s], abs=1e-4) for s in range(1, MAX_STEPS))
    assert "lanes of 4 consecutive windows (data.tbptt)" in (runs["lightning"] / "launch.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["lightning->standalone", "standalone->lightning"])
def test_a_checkpoint_inside_a_segment_resumes_to_the_sametrain_losses(runs: dict[str, Path], branch: str) -> None:
    reference, resumed = train_losses(runs["lightning"]), train_losses(runs[branch])
    assert sorted(resumed) == list(range(BRANCH, MAX_STEPS))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
