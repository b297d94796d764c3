"""sem's Optuna sweeper (hydra_plugins/sem_optuna_sweeper) without a Hydra run: the params grammar and
the Optuna distributions it maps to, the checks that end a sweep with exit 2 before any trial (one line
per problem), a trial's outcome from its job's return, the configs in Hydra's ConfigStore."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

optuna = pytest.importorskip("optuna", reason="the sweeps extra is not installed (pip install -e '.[sweeps]')")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.core.utils import JobReturn, JobStatus  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from hydra_plugins.sem_optuna_sweeper._impl import SweepSettings, outcome, prepare  # noqa: E402
from hydra_plugins.sem_optuna_sweeper._params import grid_values, quote, search_space  # noqa: E402
from sem.sweeps.trial import open_storage, storage_spec  # noqa: E402
from tests.conftest import CONF  # noqa: E402

TPE = {"_target_": "optuna.samplers.TPESampler", "seed": 1, "n_startup_trials": 2}
NOP = {"_target_": "optuna.pruners.NopPruner"}


# ------------------------------------------------------------------------------ params grammar


@pytest.mark.parametrize(("value", "expected"), [
    ("choice(1, 2.5, adam, 'a b', 'c,d', [1,2])", CategoricalDistribution((1, 2.5, "adam", "a b", "c,d", "[1,2]"))),
    ("1,2,3", CategoricalDistribution((1, 2, 3))),
    ("range(1, 5)", IntDistribution(1, 4)),                        # as Hydra's range: below stop
    ("range(0, 10, step=3)", IntDistribution(0, 9, step=3)),
    ("range(0.0, 1.0, 0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
    ("tag(log, range(1, 100))", IntDistribution(1, 99, log=True)),
    ("shuffle(range(1, 4))", CategoricalDistribution((1, 2, 3))),
    ("interval(0.0, 0.2)", FloatDistribution(0.0, 0.2)),
    ("interval(1, 8)", FloatDistribution(1.0, 8.0)),              # Hydra reads interval bounds as floats
    ("tag(log, interval(1e-4, 3e-2))", FloatDistribution(1e-4, 3e-2, log=True)),
    ("tag(log, interval(2, 64))", FloatDistribution(2.0, 64.0, log=True)),
])
def test_params_map_to_distributions(value: str, expected: Any) -> None:
    space, problems = search_space({"x.y": value})
    assert problems == []
    got = space.distributions["x.y"]
    if isinstance(expected, CategoricalDistribution) and "shuffle" in value:
        assert sorted(got.choices) == sorted(expected.choices)
    else:
        assert got == expected
    assert space.fixed == {}


def test_fixed_values_and_command_line_arguments() -> None:
    space, problems = search_space({"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "seed": 3, "model": "sem_tiny"},
                                   ["optimizer.lr=1e-3", "data.batch_size=choice(4,8)", "+extra=x"])
    assert problems == []
    # the command line wins over params: optimizer.lr is fixed there
    assert space.fixed == {"seed": "3", "model": "sem_tiny", "optimizer.lr": "0.001", "+extra": "x"}
    assert space.distributions == {"data.batch_size": CategoricalDistribution((4, 8))}
    assert space.overrides({"data.batch_size": 8}) == ["data.batch_size=8", "seed=3", "model=sem_tiny",
                                                       "optimizer.lr=0.001", "+extra=x"]
    parsed = OverridesParser.create().parse_overrides(space.overrides({"data.batch_size": 8}))
    assert [o.key_or_group for o in parsed][0] == "data.batch_size"


@pytest.mark.parametrize(("value", "words"), [
    ("interval(1e-4", "does not parse"),
    ("interval(0.5, 0.1)", "low"),                       # Optuna: low > high
    ("tag(log, interval(0.0, 1.0))", "log"),             # a log scale from 0
    ("range(5, 1)", "empty range"),
    ("glob(*)", "no Optuna distribution"),
])
def test_bad_params_are_one_line_each(value: str, words: str) -> None:
    _, problems = search_space({"optimizer.lr": value, "seed": "choice(1,2)"})
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert problems[0].startswith(f"hydra.sweeper.params.optimizer.lr={value!r}: ") and words in problems[0]


def test_choices_reach_the_job_as_themselves() -> None:
    """Each sampled choice is written so that the job's override parses back to the same value."""
    space, problems = search_space({"x": "choice('c,d', 'e f', \"g'h\", 'null', '1', true, 3, 1.5, [1,2], {a:1}, 'x=y')"})
    assert problems == []
    parser = OverridesParser.create()
    expected = ["c,d", "e f", "g'h", "null", "1", True, 3, 1.5, [1, 2], {"a": 1}, "x=y"]
    for choice, want in zip(space.distributions["x"].choices, expected):
        (line,) = space.overrides({"x": choice})
        got = parser.parse_override(line).value()
        assert got == want and type(got) is type(want), (choice, line, got)


def test_grid_values() -> None:
    assert grid_values("a", CategoricalDistribution(("x", "y"))) == ["x", "y"]
    assert grid_values("a", IntDistribution(0, 9, step=3)) == [0, 3, 6, 9]
    assert grid_values("a", FloatDistribution(0.0, 0.75, step=0.25)) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="GridSampler needs"):
        grid_values("a", FloatDistribution(0.0, 1.0))


def test_quote_round_trips_through_the_override_parser() -> None:
    parser = OverridesParser.create()
    for value in ["journal:/tmp/a b/x=y/o'k.journal", "sqlite:////tmp/x.db?a=1&b=2", "c:\\dir\\", "plain"]:
        assert parser.parse_override(f"++hydra.job.env_set.X={quote(value)}").value() == value


# ------------------------------------------------------------------------- checks before trials


def _settings(**kw: Any) -> SweepSettings:
    base: dict[str, Any] = {"sampler": TPE, "pruner": NOP, "study_name": "s", "n_trials": 3,
                            "params": {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))"}}
    return SweepSettings(**{**base, **kw})


def test_prepare_opens_the_journal_in_the_sweep_dir(tmp_path: Path) -> None:
    p = prepare(_settings(pruner={"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 3,
                                  "reduction_factor": 2, "min_early_stopping_rate": 0}), tmp_path)
    assert p.spec == f"journal:{tmp_path.resolve() / 'optuna.journal'}" == storage_spec(None, tmp_path)
    assert type(p.study.sampler).__name__ == "TPESampler" and p.study.pruner._min_resource == 3
    p.study.tell(p.study.ask(p.space.distributions), 1.0)
    again = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert [t.state for t in again.trials] == [TrialState.COMPLETE]
    assert len(open_storage(p.spec).get_all_studies()) == 1  # what a job opens


def test_any_optuna_storage_url(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    p = prepare(_settings(storage=url), tmp_path)
    assert p.spec == url and (tmp_path / "optuna.db").exists() and not (tmp_path / "optuna.journal").exists()
    p.study.tell(p.study.ask(p.space.distributions), 2.0)
    assert optuna.load_study(study_name="s", storage=url).best_value == 2.0


def test_prepare_grid_search_space_and_cap(tmp_path: Path) -> None:
    p = prepare(_settings(sampler={"_target_": "optuna.samplers.GridSampler", "seed": None}, n_trials=10,
                          params={"seed": "choice(1,2)", "data.batch_size": "range(4, 12, 4)"}), tmp_path)
    assert p.total == 4  # 2 x 2 points
    seen = {tuple(sorted(p.study.ask(p.space.distributions).params.items())) for _ in range(4)}
    assert len(seen) == 4


@pytest.mark.parametrize(("kw", "line"), [
    ({"pruner": {"_target_": "optuna.pruners.NoSuchPruner"}},
     "hydra.sweeper.pruner._target_='optuna.pruners.NoSuchPruner': cannot be instantiated"),
    ({"pruner": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": "many"}},
     "hydra.sweeper.pruner._target_='optuna.pruners.MedianPruner': cannot be instantiated"),
    ({"sampler": {"_target_": "optuna.samplers.NoSuchSampler"}},
     "hydra.sweeper.sampler._target_='optuna.samplers.NoSuchSampler': cannot be instantiated"),
    ({"sampler": {"_target_": "optuna.pruners.NopPruner"}},
     "hydra.sweeper.sampler._target_='optuna.pruners.NopPruner': not an Optuna sampler"),
    ({"sampler": {"_target_": "optuna.samplers.GridSampler"}},
     "hydra.sweeper.params.optimizer.lr: GridSampler needs choice(...) or range(...)"),
    ({"params": {"optimizer.lr": "interval(0.1, 0.01)"}},
     "hydra.sweeper.params.optimizer.lr='interval(0.1, 0.01)': "),
    ({"storage": "nosuchdb://host/x"}, "hydra.sweeper.storage='nosuchdb://host/x': cannot be opened"),
    ({"storage": "journal:/proc/no/such/dir/optuna.journal"},
     "hydra.sweeper.storage='journal:/proc/no/such/dir/optuna.journal': cannot be opened"),
    ({"direction": "sideways"}, "hydra.sweeper.direction='sideways': must be minimize or maximize"),
    ({"n_jobs": 0}, "hydra.sweeper.n_jobs=0: must be an int >= 1"),
    ({"custom_search_space": "my.fn"}, "hydra.sweeper.custom_search_space='my.fn': not supported"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, kw: dict, line: str) -> None:
    with pytest.raises(SystemExit) as exc:
        prepare(_settings(**kw), tmp_path)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {line}"), err


def test_a_continued_study_keeps_its_direction(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prepare(_settings(), tmp_path)
    with pytest.raises(SystemExit) as exc:
        prepare(_settings(direction="maximize"), tmp_path)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("config error: hydra.sweeper.direction=maximize: study 's'")
    assert "created to minimize" in err


def test_hydra_optuna_sweeper_search_space_still_works(tmp_path: Path) -> None:
    p = prepare(_settings(params=None, search_space={
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "n": {"type": "int", "low": 1, "high": 9, "step": 2},
        "opt": {"type": "categorical", "choices": ["adamw", "muon"]}}), tmp_path)
    assert p.space.distributions == {"lr": FloatDistribution(1e-4, 1e-2, log=True),
                                     "n": IntDistribution(1, 9, step=2),
                                     "opt": CategoricalDistribution(("adamw", "muon"))}


# --------------------------------------------------------------------------------- trial outcome


class Pruned(NamedTuple):  # the shape of sem.sweeps.trial's: duck-typed by the sweeper
    step: int
    value: float

    @property
    def pruned(self) -> bool:
        return True


def _ret(value: Any, status: JobStatus = JobStatus.COMPLETED) -> JobReturn:
    ret = JobReturn()
    ret.status, ret._return_value = status, value
    return ret


@pytest.mark.parametrize(("ret", "state", "value"), [
    (_ret(1.25), TrialState.COMPLETE, 1.25),
    (_ret(3), TrialState.COMPLETE, 3.0),
    (_ret(None), TrialState.FAIL, None),
    (_ret(math.nan), TrialState.FAIL, None),
    (_ret(math.inf), TrialState.FAIL, None),
    (_ret("abc"), TrialState.FAIL, None),
    (_ret(RuntimeError("boom"), JobStatus.FAILED), TrialState.FAIL, None),
    (_ret(Pruned(step=40, value=2.5)), TrialState.PRUNED, None),
])
def test_outcome(ret: JobReturn, state: TrialState, value: float | None) -> None:
    got_state, got_value, why = outcome(ret)
    assert (got_state, got_value) == (state, value) and why
    assert outcome(None, OSError("worker died"))[0] == TrialState.FAIL


# ------------------------------------------------------------------------------- Hydra configs


def _hydra_cfg(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra


def test_configs_registered_and_overridable() -> None:
    h = _hydra_cfg("hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra/sweeper/pruner=asha",
                   "hydra.sweeper.pruner.min_resource=3", "hydra.sweeper.sampler.seed=7")
    assert h.sweeper._target_ == "hydra_plugins.sem_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert h.sweeper.sampler == {"_target_": "optuna.samplers.RandomSampler", "seed": 7}
    assert h.sweeper.pruner._target_ == "optuna.pruners.SuccessiveHalvingPruner" and h.sweeper.pruner.min_resource == 3
    assert h.sweeper.storage is None and h.sweeper.n_jobs == 1
    for name in ("tpe", "random", "cmaes", "grid", "qmc", "nsgaii"):
        assert _hydra_cfg("hydra/sweeper=optuna", f"hydra/sweeper/sampler={name}").sweeper.sampler._target_.startswith(
            "optuna.samplers.")
    for name, cls in {"none": "NopPruner", "median": "MedianPruner", "asha": "SuccessiveHalvingPruner",
                      "hyperband": "HyperbandPruner"}.items():
        node = _hydra_cfg("hydra/sweeper=optuna", f"hydra/sweeper/pruner={name}").sweeper.pruner
        assert node._target_ == f"optuna.pruners.{cls}"
        assert isinstance(optuna.pruners.__dict__[cls](**{k: v for k, v in node.items() if k != "_target_"}),
                          optuna.pruners.BasePruner)


def test_hparams_search_optuna_lr_composes() -> None:
    h = _hydra_cfg("hparams_search=optuna_lr", "hydra/sweeper/pruner=median")
    assert h.sweeper.sampler._target_ == "optuna.samplers.TPESampler" and h.sweeper.study_name == "optuna_lr"
    assert h.sweeper.storage is None and h.sweeper.max_failure_rate == 1.0
    assert dict(h.sweeper.params) == {"optimizer.lr": "tag(log, interval(1e-4, 3e-2))",
                                      "scheduler.warmup_fraction": "interval(0.0, 0.2)"}
    assert h.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"


# ------------------------------------------------------------- the sweep loop, on a fake launcher


class FakeLauncher:
    """Runs a "job" in the calling thread: sleeps ``t`` seconds, returns what ``out`` names."""

    def __init__(self) -> None:
        self.jobs: list[tuple[int, dict[str, str], float, float]] = []  # (job idx, params, start, end)

    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        (overrides,) = job_overrides
        params = dict(o.split("=", 1) for o in overrides if not o.startswith("++"))
        assert any(o.startswith("++hydra.job.env_set.SEM_OPTUNA_TRIAL=") for o in overrides)
        start = time.monotonic()
        time.sleep(float(params.get("t", 0)))
        out = params.get("out", "ok")
        value = {"ok": float(params.get("t", 1.0)), "nanval": math.nan, "none": None,
                 "pruned": Pruned(step=3, value=1.0)}.get(out)
        ret = _ret(RuntimeError("boom"), JobStatus.FAILED) if out == "raise" else _ret(value)
        self.jobs.append((initial_job_idx, params, start, time.monotonic()))
        return [ret]


def _sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel: bool, **kw: Any) -> tuple[Any, FakeLauncher]:
    from omegaconf import OmegaConf

    from hydra_plugins.sem_optuna_sweeper._impl import OptunaSweep

    monkeypatch.setattr(OptunaSweep, "_parallel", lambda self: parallel)
    sweep = OptunaSweep.__new__(OptunaSweep)
    sweep.settings = _settings(**kw)
    sweep.config = OmegaConf.create({"hydra": {"launcher": {}}})
    sweep.sweep_dir, sweep.launcher = tmp_path, FakeLauncher()
    return sweep, sweep.launcher


GRID = {"_target_": "optuna.samplers.GridSampler", "seed": 0}


def test_no_batch_barrier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two in flight, three trials of different lengths: the third starts when the shorter of the first
    two ends, while the longer still runs."""
    sweep, launcher = _sweep(tmp_path, monkeypatch, True, sampler=GRID, n_jobs=2, n_trials=3,
                             params={"t": "choice(0.05, 0.5, 1.0)"})
    sweep.sweep([])
    jobs = sorted(launcher.jobs)
    assert [j[0] for j in jobs] == [0, 1, 2]  # job index = trial number
    (_, p0, s0, e0), (_, p1, s1, e1), (_, _, s2, _) = jobs
    assert s0 < e1 and s1 < e0  # the first two at once
    assert min(e0, e1) <= s2 < max(e0, e1)  # the third did not wait for the longer one
    assert p0["t"] != p1["t"]


def test_outcomes_told_and_results_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep, launcher = _sweep(tmp_path, monkeypatch, False, sampler=GRID, n_trials=10, max_failure_rate=1.0,
                             params={"out": "choice(ok, nanval, none, pruned, raise)"})
    sweep.sweep([])
    study = optuna.load_study(study_name="s", storage=open_storage(storage_spec(None, tmp_path)))
    state = {t.params["out"]: t.state.name for t in study.trials}
    assert state == {"ok": "COMPLETE", "nanval": "FAIL", "none": "FAIL", "pruned": "PRUNED", "raise": "FAIL"}
    import yaml

    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert (results["complete"], results["pruned"], results["fail"]) == (1, 1, 3)
    assert results["best_params"] == {"out": "ok"} and results["best_value"] == 1.0


@pytest.mark.parametrize(("parallel", "n_run"), [(False, 1), (True, 2)])
def test_max_failure_rate_stops_asking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel: bool,
                                       n_run: int) -> None:
    """Every trial fails, max_failure_rate 0: no trial starts after the first failure (a running one
    finishes)."""
    sweep, launcher = _sweep(tmp_path, monkeypatch, parallel, n_trials=6, n_jobs=2, max_failure_rate=0.0,
                             params={"out": "none", "t": "choice(0.05, 0.3)"})
    sweep.sweep([])
    assert len(launcher.jobs) == n_run
    study = optuna.load_study(study_name="s", storage=open_storage(storage_spec(None, tmp_path)))
    assert [t.state.name for t in study.trials] == ["FAIL"] * n_run


def test_a_continued_study_runs_the_missing_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep, launcher = _sweep(tmp_path, monkeypatch, False, n_trials=2)
    sweep.sweep([])
    sweep2, launcher2 = _sweep(tmp_path, monkeypatch, False, n_trials=4)
    sweep2.sweep([])
    assert [j[0] for j in launcher.jobs] == [0, 1] and [j[0] for j in launcher2.jobs] == [2, 3]
    sweep3, launcher3 = _sweep(tmp_path, monkeypatch, False, n_trials=3)
    sweep3.sweep([])  # the study has 4 already: nothing to run
    assert launcher3.jobs == []


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "grid", "qmc", "nsgaii"])
def test_optuna_lr_takes_every_sampler(sampler: str) -> None:
    """`hparams_search=optuna_lr hydra/sweeper/sampler=<any>`: the search's yaml sets only what every
    sampler takes (its seed), so switching the sampler composes and builds."""
    from hydra import compose, initialize_config_dir

    from hydra_plugins.sem_optuna_sweeper._impl import _build
    from sem.config.store import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna_lr", f"hydra/sweeper/sampler={sampler}"],
                      return_hydra_config=True)
    built, problem = _build("sampler", cfg.hydra.sweeper.sampler, optuna.samplers.BaseSampler,
                            **({"search_space": {"x": [1, 2]}} if sampler == "grid" else {}))
    assert problem is None and built is not None, problem
