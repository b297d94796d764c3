"""Each default once: a config option carries only what differs from what it extends, sem's own
constructors default to what the schema says, every composed component node is a constructor call,
and ``--help`` offers only what a user can pick.

Options are discovered from ``conf/<group>/*.yaml`` and schemas from the ConfigStore, so a new one is
covered without touching this file.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, OmegaConf

from sem.config.store import register_configs
from tests.conftest import CONF, ROOT, compose_cfg

register_configs()
OPTIONS = sorted((group.name, option.stem) for group in CONF.iterdir() if group.is_dir() and group.name != "hydra"
                 for option in group.glob("*.yaml"))


def _raw(group: str, option: str) -> dict[str, Any]:
    return yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}


def _base(group: str, option: str) -> Any:
    """What an option extends, composed: its defaults list without ``_self_`` (schemas from the
    ConfigStore, other options of the group read the same way), as one OmegaConf node."""
    base = OmegaConf.create({})
    for entry in _raw(group, option).get("defaults", []):
        if entry == "_self_" or isinstance(entry, dict):
            continue
        name = entry.split("@")[0]
        if name.startswith("/"):
            node = ConfigStore.instance().load(f"{name[1:]}.yaml").node
        else:
            node = OmegaConf.merge(_base(group, name), {k: v for k, v in _raw(group, name).items() if k != "defaults"})
        base = OmegaConf.merge(base, node)
    return base


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, node)]


@pytest.mark.parametrize("group, option", OPTIONS)
def test_an_option_sets_only_what_differs_from_what_it_extends(group: str, option: str) -> None:
    """A value written in an option and again, equal, in its schema (or the option it extends) is a
    second source of one default: change one and the other silently stops being the truth."""
    body = {k: v for k, v in _raw(group, option).items() if k != "defaults"}
    base = _base(group, option)
    same = []
    for key, value in _leaves(body):
        if value == "???":
            continue
        there = OmegaConf.select(base, key, default="<absent>", throw_on_missing=False)
        if isinstance(there, (dict, list)) or OmegaConf.is_config(there):
            there = OmegaConf.to_container(there) if OmegaConf.is_config(there) else there
        if there != "<absent>" and there == value:
            same.append(f"{key}={value!r}")
    assert not same, f"conf/{group}/{option}.yaml repeats what it extends: {', '.join(same)}"


def test_the_root_config_sets_only_what_differs_from_its_schema() -> None:
    from sem.config.schema import Config

    body = {k: v for k, v in (yaml.safe_load((CONF / "config.yaml").read_text()) or {}).items()
            if k not in ("defaults", "hydra")}
    schema = OmegaConf.structured(Config)
    same = [f"{key}={value!r}" for key, value in _leaves(body)
            if OmegaConf.select(schema, key, default="<absent>", throw_on_missing=False) == value]
    assert not same, f"conf/config.yaml repeats its schema: {', '.join(same)}"


def _schemas() -> list[tuple[str, type]]:
    import sem.config.schema as schema

    return sorted((name, cls) for name, cls in vars(schema).items() if dataclasses.is_dataclass(cls)
                  and any(f.name == "_target_" and isinstance(f.default, str) and f.default.startswith("sem.")
                          for f in dataclasses.fields(cls)))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING


@pytest.mark.parametrize("name, schema", _schemas())
def test_sems_constructors_default_to_what_the_schema_says(name: str, schema: type) -> None:
    """Building a component in Python with no arguments gives the config's component: a constructor's
    default and the schema's are one fact (a key the constructor requires has no default to differ)."""
    target = next(f.default for f in dataclasses.fields(schema) if f.name == "_target_")
    module, _, attr = target.rpartition(".")
    signature = inspect.signature(getattr(importlib.import_module(module), attr))
    # HealthMonitor: None means the check's own settings (sem.training.health.DEFAULTS, which the schema copies)
    none_means_defaults = {"loss_spike", "grad_explosion", "plateau", "stall", "probes"} if name == "HealthConf" else set()
    differ = []
    for f in dataclasses.fields(schema):
        param = signature.parameters.get(f.name)
        value = _default(f)
        if param is None or param.default is inspect.Parameter.empty or value is MISSING:
            continue
        if isinstance(value, str) and "${" in value or (f.name in none_means_defaults and param.default is None):
            continue
        if param.default != value and not (isinstance(param.default, tuple) and list(param.default) == value):
            differ.append(f"{f.name}: schema {value!r}, {attr}() {param.default!r}")
    assert not differ, f"{name} and {target} disagree: {'; '.join(differ)}"


def test_the_health_schema_is_the_monitors_own_settings() -> None:
    from sem.config.schema import HealthConf
    from sem.training.health import DEFAULTS

    conf = HealthConf()
    assert {name: getattr(conf, name) for name in DEFAULTS} == DEFAULTS


COMPONENT_GROUPS = ("model", "data", "optimizer", "scheduler", "curriculum", "checkpoint", "health", "accelerator",
                    "precision", "strategy", "logger")


@pytest.mark.parametrize("group, option", [(g, o) for g, o in OPTIONS if g in COMPONENT_GROUPS and g != "data"]
                         + [("data", "stdlib")])
def test_a_composed_node_is_a_constructor_call(group: str, option: str, tmp_path: Path) -> None:
    """``hydra.utils.instantiate(cfg.<group>)`` on a composed config builds the component, as in a
    notebook: fractions of the budget are taken by the constructor with the node's max_steps."""
    cfg = compose_cfg([f"{group}={option}"])
    node = cfg[group]
    if group == "data":
        built = instantiate(node)
        assert type(built).__name__ == "SEMDataModule" and built.batch_size == cfg.data.batch_size
        return
    if group == "optimizer":
        import torch

        built = instantiate(node)(params=[torch.nn.Parameter(torch.zeros(2, 2))])
        assert isinstance(built, torch.optim.Optimizer)
        return
    if group == "scheduler":
        import torch

        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        built = instantiate(node)(optimizer=opt)
        assert built.optimizer is opt
        return
    if group in ("accelerator", "precision", "strategy") and option not in ("auto", "cpu", "fp32", "ddp"):
        pytest.skip(f"{group}={option} builds for a device this machine may not have")
    # what the composition root passes: the run's checkpoint folder, a logger's save_dir
    extra = {"checkpoint": {"dirpath": str(tmp_path)}}.get(group, {})
    if group == "logger":
        assert all(instantiate(n, **({} if "save_dir" in n else {"save_dir": str(tmp_path)})) is not None
                   for n in node.values() if n)
        return
    built = instantiate(node, **extra)
    assert built is not None
    if group == "model" and hasattr(built, "propagator_warmup_steps"):
        assert built.propagator_warmup_steps == round(cfg.model.propagator_warmup_fraction * cfg.trainer.max_steps)


def test_the_teacher_node_is_a_constructor_call() -> None:
    import torch

    cfg = compose_cfg(["distillation=ema_teacher", "trainer.max_steps=100"])
    teacher = instantiate(cfg.distillation.teacher)(student=torch.nn.Linear(2, 2))
    assert teacher.ramp_steps == 50  # ramp_fraction 0.5 of the node's max_steps


def test_help_lists_only_what_a_user_can_pick() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    groups = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "schema" not in groups, groups
    assert "model: sem_base, sem_small, sem_tiny, transformer_small, transformer_tiny" in groups


def test_every_option_still_composes_against_its_schema() -> None:
    """The schemas moved out of the groups still type every option: a wrong type fails at compose."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["model.d_model=wide"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["optimizer.no_such_key=1"])


def test_the_conf_dir_is_the_checkouts() -> None:
    assert Path(CONF).is_dir()


@pytest.mark.parametrize("group, overrides, build", [
    ("model", {"d_model": 0}, "sem.models.sem.SEMModel"),
    ("model", {"conv_width": -1}, "sem.models.sem.SEMModel"),
    ("model", {"heads": 3}, "sem.models.sem.SEMModel"),
    ("model", {"r_min": 0.99, "r_max": 0.9}, "sem.models.sem.SEMModel"),
    ("model", {"propagator_warmup_fraction": 1.5}, "sem.models.sem.SEMModel"),
    ("model", {"n_heads": 5}, "sem.models.transformer.TransformerLM"),
    ("data", {"batch_size": 0}, "sem.data.datamodule.SEMDataModule"),
    ("data", {"test_fraction": 0.99}, "sem.data.datamodule.SEMDataModule"),
    ("checkpoint", {"keep_last": 0}, "sem.training.checkpoint.CheckpointManager"),
])
def test_a_bad_value_gets_the_same_line_from_the_shell_and_from_python(group: str, overrides: dict[str, Any],
                                                                         build: str, tmp_path: Path) -> None:
    """One check per component: validation reports exactly the line the constructor raises."""
    from sem.config.validate import validate

    model = ["model=transformer_tiny"] if "Transformer" in build else ["model=sem_tiny"]
    cfg = compose_cfg([*model, "accelerator=cpu", "trainer.max_steps=20",
                       *(f"{group}.{k}={v}" for k, v in overrides.items())])
    problems = validate(cfg, corpus=None)
    module, _, attr = build.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    node = {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items() if not k.startswith("_")}
    node.pop("corpus", None)
    extra = {"data": {"corpus": None}, "checkpoint": {"dirpath": tmp_path}}.get(group, {})
    with pytest.raises(ValueError) as raised:
        cls(**node, **extra)
    # the constructor names its own arguments (the model's without "model."); validation the same lines
    said = [line for line in problems if line.startswith(f"{group}.") and not line.startswith("data.corpus")]
    if group == "model":
        said = [line.replace("model.", "") for line in said]
    assert str(raised.value) == "; ".join(said), problems


def test_a_resumed_warm_up_longer_than_a_decay_branch_still_builds() -> None:
    """The warm-up is a ramp: steps pinned at the start of a run (a parent of 1,400 steps: 280) still
    build in a decay branch of fewer steps; alpha simply stops where the branch ends."""
    from sem.models.sem import SEMModel

    model = SEMModel(d_model=8, n_layers=1, propagator_warmup_steps=280, propagator_warmup_fraction=None, max_steps=200)
    assert model.propagator_warmup_steps == 280
    with pytest.raises(ValueError, match="both null, give one"):
        SEMModel(d_model=8, n_layers=1, propagator_warmup_steps=None, propagator_warmup_fraction=None, max_steps=200)


def test_the_transformer_keeps_the_size_limits() -> None:
    from sem.config.validate import validate

    cfg = compose_cfg(["model=transformer_tiny", "accelerator=cpu", "model.d_model=4294967296"])
    assert any(line.startswith("model.d_model=4294967296: must be <= ") for line in validate(cfg, corpus=None))
    cfg = compose_cfg(["model=transformer_tiny", "accelerator=cpu", "model.mlp_ratio=1e9"])
    assert any(line.startswith("model.mlp_ratio=1000000000.0: the MLP would be") for line in validate(cfg, corpus=None))


def test_a_teacher_set_by_hand_is_built_as_validated() -> None:
    """On distillation=off a hand-set teacher has only the keys it was given: the schema's defaults
    (ramp_fraction 0.5 of max_steps) fill in for validation and for the build alike."""
    import torch

    from sem.engines.build import resolve_lengths

    cfg = compose_cfg(["distillation.teacher={_target_: sem.training.distillation.EMATeacher, _partial_: true}",
                       "distillation.loss={_target_: sem.training.distillation.DistillationLoss}",
                       "trainer.max_steps=100"])
    resolved, record = resolve_lengths(cfg)
    teacher = instantiate(resolved.distillation.teacher)(student=torch.nn.Linear(2, 2))
    assert teacher.ramp_steps == record["distillation.teacher.ramp_steps"] == 50
