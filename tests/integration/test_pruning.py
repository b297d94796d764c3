"""A trial stopped by its sweeper's pruner, as a user runs it (``python launch.py -m`` in a subprocess, sem's
Optuna sweeper): each validation reports val/bpb to the trial, the pruner's verdict stops the run at that
validation (saved; ``summary.json`` status ``pruned`` with the step and value; the ledger and
``summary.md`` say pruned; the sweep exits 0), in both engines and in a DDP trial (rank 0 reports, both
ranks stop). The pruner is Optuna's ThresholdPruner, so which trial stops does not depend on the order the
sampler draws: a learning rate of 1e-7 cannot bring val/bpb under 7.5 bits by step 10; 3e-3 does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_launch, tiny_data_overrides

optuna = pytest.importorskip("optuna", reason="the sweeps extra is not installed (pip install -e '.[sweeps]')")

pytestmark = pytest.mark.slow

THRESHOLD = """# @package _global_
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: grid
hydra:
  sweeper:
    study_name: threshold
    n_trials: 2
    pruner:
      _target_: optuna.pruners.ThresholdPruner
      upper: 7.5
      n_warmup_steps: 9
    params:
      optimizer.lr: choice(3e-3, 1e-7)
"""
PRUNED_AT = 10  # the first validation after the warm-up (val_check_interval 5)
CASES = {"lightning": [], "standalone": ["engine=standalone"], "ddp": ["strategy=ddp", "trainer.devices=2"]}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pruning")
    (root / "conf" / "hparams_search").mkdir(parents=True)
    (root / "conf" / "hparams_search" / "threshold.yaml").write_text(THRESHOLD)
    base = [*tiny_data_overrides(corpus_dir, cache_dir), "sample.n=0", "threads=1", "trainer.max_steps=30",
            "trainer.val_check_interval=5", "checkpoint.every_n_steps=100", f"hydra.searchpath=[file://{root / 'conf'}]",
            "hparams_search=threshold"]
    out = {}
    for name, extra in CASES.items():
        sweep = root / name
        proc = run_launch(["-m", *base, *extra, f"hydra.sweep.dir={sweep}"], cwd=root, timeout=600,
                          env={"SEM_CACHE_DIR": str(cache_dir)})
        out[name] = (proc, sweep)
    return out


def _trials(sweep: Path) -> dict[str, Any]:
    from sem.sweeps.trial import open_storage, storage_spec

    study = optuna.load_study(study_name="threshold", storage=open_storage(storage_spec(None, sweep)))
    return {t.params["optimizer.lr"]: t for t in study.trials}


@pytest.mark.parametrize("case", list(CASES))
def test_the_pruner_stops_the_trial_that_cannot_learn(sweeps: dict[str, Any], case: str) -> None:
    proc, sweep = sweeps[case]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    trials = _trials(sweep)
    bad, good = trials[1e-7], trials[3e-3]
    assert bad.state.name == "PRUNED" and good.state.name == "COMPLETE", (bad, good)
    assert sorted(bad.intermediate_values) == [5, PRUNED_AT]  # every validation up to the verdict
    assert good.value == pytest.approx(json.loads((sweep / str(good.number) / "summary.json").read_text())["val_bpb"])
    run = sweep / str(bad.number)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["steps"] == PRUNED_AT, summary
    assert summary["pruned_at"] == {"step": PRUNED_AT, "val_bpb": pytest.approx(bad.intermediate_values[PRUNED_AT])}
    assert summary["last_checkpoint"].endswith(f"step_{PRUNED_AT:07d}.ckpt") and Path(summary["last_checkpoint"]).exists()
    assert summary["test_bpb"] is None  # a pruned trial is not a result: no final scores
    ledger = [json.loads(line) for line in (sweep / "ledger.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in ledger) == ["completed", "pruned"], ledger
    report = (sweep / "summary.md").read_text()
    assert "1 completed, 1 pruned" in report and f"stopped by the pruner at step {PRUNED_AT}" in report, report
    if case == "ddp":  # both ranks stopped at the verdict: rank 1 logged no step past it
        log = (run / "rank_1.log").read_text()
        assert "pruned" in log and "step 15" not in log, log[-2000:]
