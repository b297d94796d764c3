"""The run's own nodes: checkpoint, health, run, sample, eval, faults: schemas and checks."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sem.models.dynamic import DynamicSettings
from sem.training.health import DEFAULTS as HEALTH_DEFAULTS


@dataclass
class CheckpointConf:
    _target_: str = "sem.training.checkpoint.CheckpointManager"
    every_n_steps: int = 500
    keep_last: int = 2
    keep_best: int = 1
    monitor: str = "val/bpb"
    mode: str = "min"
    save_on_exit: bool = True
    every_n_train_steps: int | None = None  # removed (Lightning's name): validation names every_n_steps


def _check(name: str) -> Any:
    """A health check's settings, as ``sem.training.health.DEFAULTS`` has them (the monitor's own)."""
    return field(default_factory=lambda: copy.deepcopy(HEALTH_DEFAULTS[name]))


@dataclass
class HealthConf:
    _target_: str = "sem.training.health.HealthMonitor"
    enabled: bool = True
    nonfinite_loss: str | None = "skip"
    nonfinite_grad: str | None = "skip"
    loss_spike: dict[str, Any] = _check("loss_spike")
    grad_explosion: dict[str, Any] = _check("grad_explosion")
    plateau: dict[str, Any] = _check("plateau")
    stall: dict[str, Any] = _check("stall")
    probes: dict[str, Any] = _check("probes")
    escalate_after: int = 3
    max_rollbacks: int = 3
    rollback_lr_scale: float = 1.0


@dataclass
class RunConf:
    name: str | None = None


@dataclass
class SamplesConf:
    """``samples.txt`` at the end of a run: ``n`` samples per prompt from the final checkpoint."""

    n: int = 2  # 0: no samples.txt
    prompts: list[str] = field(default_factory=lambda: ["", "def "])  # "" starts a new document
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0


@dataclass
class DynamicConf:
    """Dynamic evaluation (``sem.models.stream.dynamic_score``): the model learns as it reads."""

    enabled: bool = False  # the shorthand ``eval.dynamic=true`` sets this
    lr: float = DynamicSettings.lr
    chunk: int = DynamicSettings.chunk  # tokens scored between two steps of the weights
    optimizer: str = DynamicSettings.optimizer  # sgd | adam | adamw | a dotted torch.optim class path
    rows: int = DynamicSettings.rows  # documents read side by side


@dataclass
class EvalConf:
    """Extra evaluations of the final checkpoint, for ``summary.json``."""

    # stream_bpb: every held-out document scored whole, the recurrent state carried (models with
    # prefill(..., all_logits); about the final validation's cost); false: skip it (null in summary.json).
    # The test split is always scored whole too (test_stream_bpb; a sliding window for other models).
    stream: bool = True
    # test_dynamic_bpb: the test documents scored whole while the weights learn from what was scored
    dynamic: DynamicConf = field(default_factory=DynamicConf)


@dataclass
class FaultsConf:
    nan_at_step: int | None = None  # the loss of this optimizer step becomes NaN
    inf_grad_at_step: int | None = None  # one gradient entry of this step becomes inf
    spike_at_step: int | None = None  # the loss of this step is multiplied by 100
    on_rank: int | None = None  # the loss faults on this global rank only (null: every rank)


def run_problems(cfg: DictConfig) -> list[str]:
    p: list[str] = []
    if cfg.engine not in ("lightning", "standalone"):
        p.append(f"engine={cfg.engine!r}: must be lightning or standalone")
    name = cfg.run.name
    if name is not None and (name.startswith("/") or ".." in name.split("/") or not name.strip()):
        p.append(f"run.name={name!r}: must be a relative name without '..'")
    resume = cfg.resume
    if resume not in (None, "auto"):
        from pathlib import Path

        path = Path(str(resume)).expanduser()
        if not path.is_file():
            p.append(f"resume={resume!r}: no such checkpoint file (use null, auto or a path to a .ckpt)")
    for key, value in cfg.faults.items():
        if value is not None and value < 0:
            what = "a global rank" if key == "on_rank" else "an optimizer step"
            p.append(f"faults.{key}={value!r}: must be >= 0 ({what}) or null")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        p.append(f"seed={seed!r}: must be an integer in [0, 2**32) (numpy and torch seeds)")
    if cfg.get("threads") is not None and cfg.threads < 1:
        p.append(f"threads={cfg.threads!r}: must be >= 1 (torch threads per job) or null")
    dynamic = cfg.eval.dynamic
    if dynamic.enabled:
        p += DynamicSettings.of(OmegaConf.to_container(dynamic)).problems("eval.dynamic")
    return p


def checkpoint_problems(cfg: DictConfig) -> list[str]:
    from sem.training.checkpoint import settings_problems

    return settings_problems(**{k: v for k, v in OmegaConf.to_container(cfg.checkpoint, resolve=True).items()
                                if not k.startswith("_")})


def health_problems(cfg: DictConfig) -> list[str]:
    from sem.training.health import settings_problems

    node = {k: v for k, v in OmegaConf.to_container(cfg.health, resolve=True).items() if not k.startswith("_")}
    return settings_problems(**node)
