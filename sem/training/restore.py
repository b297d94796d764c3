"""``sem.load(path) -> (model, cfg)``: rebuild a trained model from one checkpoint file, or from a
directory written by ``sem-export`` (``model.safetensors`` + ``config.yaml``), on any device; and
``build_model``, the one way a model is built from its config node (a run builds it through Hydra's
``instantiate``, a checkpoint's model is rebuilt without Hydra).

A checkpoint holds the resolved run config (``checkpoint["sem"]["config"]``), so nothing else is
needed: not the run directory (it may have moved), not the original shell command. Loading is
``weights_only=True`` and verified (sha256 against the sidecar, finite weights); an exported directory
holds no pickle at all.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sem.contracts import model_kwargs
from sem.training.checkpoint import CheckpointError, model_state, verify

# Where the model classes lived before the package layout (checkpoints written then name these):
LEGACY_TARGETS = {
    "sem.model.SEMModel": "sem.models.sem.SEMModel",
    "sem.baselines.TransformerLM": "sem.models.transformer.TransformerLM",
}


def _locate(target: str) -> Callable[..., Any]:
    """What a ``_target_`` names (a class, or a class's constructor such as ``Class.from_config``): the
    longest importable module of the dotted path, then attributes; the legacy model paths mapped."""
    parts = LEGACY_TARGETS.get(target, target).split(".")
    if len(parts) < 2:
        raise CheckpointError(f"the model class {target!r} cannot be imported: not a dotted path (module.Class)")
    missing: str | None = None  # the first module found missing, from the longest path down
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing = missing or exc.name
            if i > 1 and exc.name is not None and module.startswith(exc.name):
                continue  # perhaps ``module.Class.constructor``: its owner may import
            break
        for j, name in enumerate(parts[i:]):
            if not hasattr(obj, name):
                if j == 0 and missing == f"{module}.{name}":
                    break  # neither a module nor an attribute: the module is what is missing
                raise CheckpointError(f"the model class {target} cannot be imported: {obj.__name__} has no {name!r}")
            obj = getattr(obj, name)
        else:
            return obj
        break
    raise CheckpointError(f"the model class {target} cannot be imported: no module {missing!r} on the "
                          "path (put the folder that holds it on PYTHONPATH)")


def build_model(node: Mapping[str, Any], make: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The model a ``model`` config node describes (``_target_`` + constructor arguments), with
    ``vocab_size`` (the tokenizer's) passed when its constructor takes one and the node does not set it
    (``sem.contracts.model_kwargs``).

    ``make(node, **extra)``: how a run builds it (``hydra.utils.instantiate`` through the composition
    root, with its target checks and errors); without it the core builds the node itself, as Hydra
    would (nested ``_target_`` nodes, ``_partial_``, ``_args_``), to rebuild a checkpoint's model."""
    cls = _locate(str(node["_target_"]))
    kwargs = model_kwargs(cls, dict(node))
    if make is not None:
        return make(node, **{k: v for k, v in kwargs.items() if k not in node})
    return cls(*_built(list(node.get("_args_", []))), **{k: _built(v) for k, v in kwargs.items()})


def _built(value: Any) -> Any:
    """A constructor argument as the run built it: nested ``_target_`` nodes instantiated (what
    ``hydra.utils.instantiate`` does for the run; the core loads checkpoints without Hydra)."""
    if isinstance(value, dict) and "_target_" in value:
        args = [_built(v) for v in value.get("_args_", [])]
        kwargs = {k: _built(v) for k, v in value.items() if not str(k).startswith("_")}
        target = _locate(str(value["_target_"]))
        return functools.partial(target, *args, **kwargs) if value.get("_partial_") else target(*args, **kwargs)
    if isinstance(value, dict):
        return {k: _built(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_built(v) for v in value]
    return value


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state_dict, resolved run config) from a checkpoint file or an exported directory."""
    state, config, _ = _read(path)
    return state, config


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int | None]:
    """(state, config, optimizer steps done: None for an export, whose weights already hold it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        weights, config = path / "model.safetensors", path / "config.yaml"
        if not weights.is_file() or not config.is_file():
            raise CheckpointError(f"{path}: not an exported model (needs model.safetensors and config.yaml)")
        from safetensors.torch import load_file

        try:
            return load_file(str(weights)), OmegaConf.to_container(OmegaConf.load(config), resolve=True), None
        except Exception as exc:  # SafetensorError, a YAML error: a damaged export
            raise CheckpointError(f"{path}: damaged export: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    payload = verify(path)
    config = (payload.get("sem") or {}).get("config")
    if not config:
        raise CheckpointError(f"{path}: holds no run config (written before checkpoints were "
                              "self-describing); it can still be resumed with the config it was trained with")
    return model_state(payload["state_dict"]), config, int(payload.get("global_step", 0))


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, DictConfig]:
    """The trained model (eval mode, on ``device``) and the run config it was trained with."""
    state, config, steps_done = _read(path)
    model = build_model(config["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {config['model']['_target_']} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    set_step = getattr(model, "set_step", None)
    if set_step is not None and steps_done is not None:
        # the step-driven blends (SEM propagator alpha) as validation saw them after the last step:
        # a checkpoint holds the value of the step it last trained, one behind
        set_step(steps_done)
    return model.to(device).eval(), OmegaConf.create(config)


def export(path: str | Path, out: str | Path) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.yaml`` (no pickle) from a checkpoint."""
    from safetensors.torch import save_file

    model, cfg = load(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return out
