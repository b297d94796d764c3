"""The sweeper's configs in Hydra's ConfigStore: ``hydra/sweeper=optuna``, its samplers
(``hydra/sweeper/sampler``: tpe, random, cmaes, grid, qmc, nsgaii) and pruners (``hydra/sweeper/pruner``:
none, median, asha, hyperband). A sampler or pruner is any node with an Optuna ``_target_``; its
arguments are the constructor's (a key left ``null`` takes Optuna's own default). The keys of Hydra's
own optuna sweeper are all accepted, so a yaml written for it keeps working.

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module before it is in
``sys.modules``, where dataclasses would look the string annotations up."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# ---------------------------------------------------------------------------------------- samplers


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10  # random trials before TPE models the results
    n_ei_candidates: int = 24
    multivariate: bool | None = None
    group: bool = False
    constant_liar: bool = True  # trials still running count as bad: parallel trials spread out
    consider_prior: bool | None = None  # (Hydra's optuna sweeper had these; Optuna deprecates them)
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None
    warn_independent_sampling: bool | None = None


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    x0: dict[str, Any] | None = None
    sigma0: float | None = None
    n_startup_trials: int | None = None
    independent_sampler: Any | None = None
    warn_independent_sampling: bool | None = None
    consider_pruned_trials: bool | None = None
    restart_strategy: str | None = None
    popsize: int | None = None
    inc_popsize: int | None = None
    use_separable_cma: bool | None = None
    with_margin: bool | None = None
    lr_adapt: bool | None = None
    source_trials: Any | None = None


@dataclass
class GridSamplerConf:
    """The grid is ``params``' points (choices and ranges), filled in by the sweeper; the study is
    capped at the grid's size."""

    _target_: str = "optuna.samplers.GridSampler"
    seed: int | None = None


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False
    warn_independent_sampling: bool | None = None


@dataclass
class NSGAIISamplerConf:
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Any | None = None


# ----------------------------------------------------------------------------------------- pruners
# A trial reports its metric at each validation (the job side, with the pruner built from this node);
# a pruned trial is recorded PRUNED with its intermediate values.


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that finish before any is pruned
    n_warmup_steps: int = 0  # steps of each trial before it may be pruned
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # steps before the first rung ("auto": from the first finished trial)
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # a trial's steps ("auto": from the first finished trial)
    reduction_factor: int = 3
    bootstrap_count: int = 0


# ----------------------------------------------------------------------------------------- sweeper


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sem_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds sampler and pruner itself (bad ones: exit 2, one line)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])

    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: Any = "minimize"  # minimize | maximize (one objective)
    study_name: str | None = "optuna"
    # null: a journal file in the sweep dir (<sweep dir>/optuna.journal); or "journal:<path>", or any
    # Optuna storage URL (sqlite:///..., needs SQLAlchemy)
    storage: str | None = None
    n_trials: int = 20  # the study's total: a continued study runs until it has this many finished trials
    n_jobs: int = 1  # trials in flight at once (a new one starts as soon as one ends)
    max_failure_rate: float = 0.0  # stop asking for trials when failed / finished (this run) exceeds it
    params: dict[str, Any] | None = None  # key: choice(...) | range(...) | interval(...) | tag(log, ...) | value
    search_space: dict[str, Any] | None = None  # deprecated form of params (Hydra's optuna sweeper)
    custom_search_space: str | None = None  # accepted for old yamls; not supported (exit 2 if set)


def _open(node: Any) -> dict:
    """A sampler's or pruner's defaults as a plain node: any ``_target_`` (a user's own pruner too) with
    any of its constructor's arguments composes over it; the constructor checks them (exit 2, one line)."""
    return OmegaConf.to_container(OmegaConf.structured(node))


def register() -> None:
    cs = ConfigStore.instance()
    provider = "sem_optuna_sweeper"
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider=provider)
    for name, node in {"tpe": TPESamplerConf, "random": RandomSamplerConf, "cmaes": CmaEsSamplerConf,
                       "grid": GridSamplerConf, "qmc": QMCSamplerConf, "nsgaii": NSGAIISamplerConf}.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=_open(node), provider=provider)
    for name, node in {"none": NopPrunerConf, "median": MedianPrunerConf, "asha": SuccessiveHalvingPrunerConf,
                       "hyperband": HyperbandPrunerConf}.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=_open(node), provider=provider)


register()
