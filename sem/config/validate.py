"""The list of checks a composed config goes through, before anything heavy is built.

Each group's checks live beside its schema (``sem.config.groups.<group>``); the machine's in
``sem.config.hardware`` and ``sem.config.resources``; components sem has never seen are checked by
their contract (``sem.config.components``). Every problem is reported at once, one line each, naming
the key and the value: the launcher prints them and exits with code 2. Types and unknown keys are
already caught by the schemas when Hydra composes the config.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sem.config.components import corpus_node, locate, optimizer_schedule_problems
from sem.config.groups.curriculum import curriculum_problems
from sem.config.groups.data import data_problems
from sem.config.groups.distillation import distillation_problems
from sem.config.groups.model import model_problems
from sem.config.groups.optimizer import budget_problems, optimizer_value_problems, scheduler_problems
from sem.config.groups.run import checkpoint_problems, health_problems, run_problems
from sem.config.groups.trainer import (
    logger_problems,
    open_trainer_problems,
    strategy_value_problems,
    trainer_value_problems,
)
from sem.config.hardware import hardware_problems, strategy_problems
from sem.config.resources import core_problems, memory_problems
from sem.data.user_corpus import as_corpus


def _one_line(exc: Exception) -> str:
    """An unexpected error in a check, as one line (OmegaConf's messages run over several), with the
    key it names where it names one."""
    key = getattr(exc, "full_key", None)
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{key}: {type(exc).__name__}: {first}" if key else f"{type(exc).__name__}: {first}"


def _components(node: Any, key: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, node) of every node with a ``_target_`` in a plain config, outermost first."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for k, v in node.items():
            yield from _components(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _components(v, f"{key}.{i}")


def _target_problems(cfg: DictConfig) -> list[str]:
    """Every ``_target_`` imports and names something to call: found here, one line naming the key,
    not as a multi-line error of Hydra's ``instantiate`` once the run is being built."""
    out = []
    for key, node in _components(OmegaConf.to_container(cfg, resolve=True)):
        obj, err = locate(key, node["_target_"])
        if err:
            out.append(err)
        elif not callable(obj):
            out.append(f"{key}._target_={node['_target_']!r}: names a {type(obj).__name__}, not a class or "
                       "function to build")
    return out


def validate(cfg: DictConfig, corpus: Any) -> list[str]:
    """Every problem with a composed config, one line each naming the key and the value.

    ``corpus`` is the (cheap, not yet read) corpus object built from ``data.corpus``: its own
    pre-flight checks (paths exist, readable) are part of the report. Runs before anything heavy
    is built; an empty list means the config can be built.
    """
    try:
        problems, max_len = model_problems(cfg.model, cfg.trainer.max_steps)
    except Exception as exc:  # an unexpected shape of config is still a config problem
        problems, max_len = [f"model: {_one_line(exc)}"], None
    checks = [
        lambda: _target_problems(cfg),
        lambda: data_problems(cfg, corpus, max_len),
        lambda: optimizer_value_problems(cfg.optimizer),
        lambda: scheduler_problems(cfg),
        lambda: curriculum_problems(cfg, max_len),
        lambda: logger_problems(cfg),
        lambda: distillation_problems(cfg),
        lambda: trainer_value_problems(cfg.trainer),
        lambda: open_trainer_problems(cfg),
        lambda: budget_problems(cfg),
        lambda: hardware_problems(cfg),
        lambda: run_problems(cfg),
        lambda: strategy_problems(cfg),
        lambda: strategy_value_problems(cfg),
        lambda: core_problems(cfg),
        lambda: checkpoint_problems(cfg),
        lambda: health_problems(cfg),
    ]
    for check in checks:
        try:
            problems.extend(check())
        except Exception as exc:  # an unexpected shape of config is still a config problem
            problems.append(_one_line(exc))
    if not problems:  # our own optimizers too: what only a constructor checks (torch's AdamW's eps, ...)
        problems += optimizer_schedule_problems(OmegaConf.to_container(cfg.optimizer, resolve=True),
                                                OmegaConf.to_container(cfg.scheduler, resolve=True))
    return list(dict.fromkeys(problems))  # a bad _target_ is found by its group's check too: say it once


def validate_run(cfg: DictConfig) -> tuple[list[str], Any]:
    """The config's problems, and the corpus descriptor (cheap: nothing is read yet)."""
    try:
        missing = OmegaConf.missing_keys(cfg)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves (an ${oc.env:...} unset, ...)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        first = str(exc).splitlines()[0]
        return [f"{key}: does not resolve: {first}" if key else f"the config does not resolve: {first}"], None
    if missing:
        return [f"{key}: missing value (set it, e.g. {key}=...)" for key in sorted(missing)], None
    node, problems = corpus_node(OmegaConf.to_container(cfg.data.corpus, resolve=True))
    if problems:
        return problems, None
    try:
        corpus = as_corpus(instantiate(node), node)
    except Exception as exc:
        cause = exc.__cause__ or exc
        return [f"data.corpus: cannot build {cfg.data.corpus.get('_target_')!r}: {cause}"], None
    problems = validate(cfg, corpus)
    if not problems:  # an estimate needs a config that builds
        problems = memory_problems(cfg)[0]
    return problems, corpus


def run_dir_problems(run_dir: Path) -> list[str]:
    """A run dir (or the part of its path that exists) must be writable: found now, not mid-save."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for d in {existing, existing / "checkpoints"}:
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            return [f"hydra.run.dir={str(run_dir)!r}: {d} is not writable (choose another run.name "
                    "or fix its permissions)"]
    return []
