"""sem's Optuna sweeper (hydra_plugins/sem_optuna_sweeper) as a user runs it (``python launch.py -m``
in a subprocess): a study kept in the sweep dir's journal and continued there, trials in flight on
joblib with no batch barrier, and bad sweeper input refused with exit 2 before any trial."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_launch, tiny_data_overrides

optuna = pytest.importorskip("optuna", reason="the sweeps extra is not installed (pip install -e '.[sweeps]')")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the sweeps extra is not installed")

from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402


def _env(cache_dir: Path) -> dict[str, str]:
    return {"SEM_CACHE_DIR": str(cache_dir)}


def _tiny(corpus_dir: Path, cache_dir: Path) -> list[str]:
    # no scheduler.warmup_steps: optuna_lr searches scheduler.warmup_fraction, which steps would override
    return [*(a for a in tiny_data_overrides(corpus_dir, cache_dir) if not a.startswith("scheduler.warmup_steps")),
            "threads=1"]


def _study(sweep: Path, name: str) -> Any:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(sweep / "optuna.journal"))))


def _log_times(run_dir: Path) -> tuple[datetime, datetime]:
    """The first and last timestamps of a job's launch.log: when it started and ended."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", (run_dir / "launch.log").read_text(), re.M)
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))
    return first, last


@pytest.mark.slow
def test_study_in_the_journal_continued_in_its_dir(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "study"
    common = ["-m", *_tiny(corpus_dir, cache_dir), "hparams_search=optuna_lr", f"hydra.sweep.dir={sweep}"]
    proc = run_launch([*common, "hydra.sweeper.n_trials=3"], cwd=tmp_path, timeout=400, env=_env(cache_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    study = _study(sweep, "optuna_lr")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for t in study.trials:  # job folder N is trial N; its value is the job's final val/bpb
        summary = json.loads((sweep / str(t.number) / "summary.json").read_text())
        assert t.value == pytest.approx(summary["val_bpb"])
        env = yaml.safe_load((sweep / str(t.number) / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["env_set"]
        assert env == {"SEM_OPTUNA_TRIAL": str(t._trial_id), "SEM_OPTUNA_STUDY": "optuna_lr",
                       "SEM_OPTUNA_STORAGE": f"journal:{(sweep / 'optuna.journal').resolve()}"}
        sampled = yaml.safe_load((sweep / str(t.number) / ".hydra" / "overrides.yaml").read_text())
        assert f"optimizer.lr={t.params['optimizer.lr']}" in sampled
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(t.value for t in study.trials))
    assert (results["complete"], results["pruned"], results["fail"]) == (3, 0, 0)

    # the same command in the same dir continues the study: n_trials is its total
    proc = run_launch([*common, "hydra.sweeper.n_trials=5"], cwd=tmp_path, timeout=400, env=_env(cache_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "it has 3 finished trials, so 2 more are run" in proc.stdout + proc.stderr
    study = _study(sweep, "optuna_lr")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3", "4"]
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["complete"] == 5


@pytest.mark.slow
def test_joblib_keeps_n_jobs_trials_in_flight(tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    """Two workers, three trials of very different lengths: the third starts as soon as the shorter of
    the first two ends, while the longer still runs (a batch would wait for both)."""
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_data_overrides(corpus_dir, cache_dir), "threads=1", "hydra/sweeper=optuna",
            "hydra/sweeper/sampler=grid", "trainer.max_steps=choice(6,120,400)", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    proc = run_launch(args, cwd=tmp_path, timeout=400, env=_env(cache_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    trials = _study(sweep, "optuna").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    steps = {t.number: t.params["trainer.max_steps"] for t in trials}
    assert len({steps[0], steps[1]}) == 2  # the grid never gives two running trials the same point
    times = {n: _log_times(sweep / str(n)) for n in steps}
    short, long = sorted((0, 1), key=steps.get)
    assert times[0][0] < times[1][1] and times[1][0] < times[0][1]  # the first two ran at once
    # the third was asked when the shorter ended, and its job ran while the longer was still running
    assert trials[short].datetime_complete <= trials[2].datetime_start < trials[long].datetime_complete
    assert times[short][1] <= times[2][0] < times[long][1]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "line"), [
    ("hydra.sweeper.pruner._target_=optuna.pruners.NoSuchPruner",
     "hydra.sweeper.pruner._target_='optuna.pruners.NoSuchPruner': cannot be instantiated"),
    ("hydra.sweeper.sampler._target_=optuna.samplers.NoSuchSampler",
     "hydra.sweeper.sampler._target_='optuna.samplers.NoSuchSampler': cannot be instantiated"),
    ("+hydra.sweeper.params.seed='interval(3, 1)'", "hydra.sweeper.params.seed='interval(3, 1)': "),
    ("hydra.sweeper.storage=nosuchdb://host/db", "hydra.sweeper.storage='nosuchdb://host/db': cannot be opened"),
])
def test_bad_sweeper_input_exits_2_before_any_trial(tmp_path: Path, corpus_dir: Path, cache_dir: Path,
                                                    override: str, line: str) -> None:
    sweep = tmp_path / "sweep"
    proc = run_launch(["-m", *_tiny(corpus_dir, cache_dir), "hparams_search=optuna_lr", override,
                       f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=120, env=_env(cache_dir))
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error:")]
    assert len(errors) == 1 and errors[0].startswith(f"config error: {line}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not any(p.name.isdigit() for p in sweep.iterdir())  # no trial started
