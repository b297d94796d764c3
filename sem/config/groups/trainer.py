"""The Trainer and the hardware groups (precision, accelerator, strategy): schemas and checks.
What the machine allows is ``sem.config.hardware``'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sem.config.components import engine_component_problems, lightning_component_problems, trainer_problems
from sem.config.groups.common import positive


@dataclass
class PrecisionConf:
    _target_: str = "sem.engines.lightning.precision.make_precision_plugin"
    _partial_: bool = True
    # auto (bf16-mixed on CUDA, XPU and CPUs with bf16 instructions, else fp32) | 32-true | bf16-mixed | 16-mixed | bf16-true
    precision: str = "auto"


@dataclass
class AcceleratorConf:
    """``name`` is what the validator checks against the hardware; sem's target builds from it. An
    accelerator class of one's own keeps a ``name`` too (the device it runs on), passed where taken."""

    _target_: str = "sem.engines.lightning.xpu.accelerator"
    name: str = "auto"  # auto | cpu | cuda | xpu


@dataclass
class StrategyConf:
    """Built by ``sem.engines.lightning.strategy.make_strategy`` with the device and precision in use."""

    _target_: str = "sem.engines.lightning.strategy.make_strategy"
    _partial_: bool = True
    name: str = "auto"  # auto | ddp | fsdp
    backend: str | None = None  # null: gloo (cpu), nccl (cuda), xccl (xpu)
    find_unused_parameters: bool = False
    timeout_s: int = 1800  # a collective waits this long for the other ranks
    join_timeout_s: int = 300  # joining (and a rank gone silent afterwards): every process exits 1 after it
    sharding_strategy: str = "FULL_SHARD"  # fsdp only


@dataclass
class TrainerConf:
    _target_: str = "pytorch_lightning.Trainer"
    # x 2048 tokens (data.batch_size 16 x seq_len 128): python launch.py in fp32 within 10 reference minutes
    # (2 cores at fp32 matmul peak 195 GFLOP/s; docs/results.md)
    max_steps: int = 1400
    val_check_interval: int = 250  # in optimizer steps
    log_every_n_steps: int = 10  # a train row in metrics.jsonl every N optimizer steps
    devices: Any = 1
    num_nodes: int = 1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    deterministic: bool = False
    enable_model_summary: bool = True
    num_sanity_val_steps: int = 0
    benchmark: bool | None = None
    # Lightning habits: a quick check (a step, one validation batch, no checkpoints) and a profile.
    # Any other Trainer argument: +trainer.<arg>=..., checked against Trainer's signature.
    fast_dev_run: Any = False  # true or a number of steps
    profiler: str | None = None  # simple | advanced | pytorch


MAX_TIMEOUT_S = 2**31 - 1  # a process group's timeout; a timedelta of more overflows a C int
MAX_STEPS = 10**8  # far past any run this launcher is for; the dry run lays out every step

OWN_CALLBACKS = ("console", "metrics", "progress_bar", "curriculum")  # conf/callbacks/default.yaml
OWN_LOGGERS = ("csv",)  # engine=standalone writes metrics.jsonl instead (a warning says so)


def open_trainer_problems(cfg: DictConfig) -> list[str]:
    from dataclasses import fields

    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    p = trainer_problems(t, [f.name for f in fields(TrainerConf)], cfg.engine)
    fdr = t.get("fast_dev_run")
    if not (isinstance(fdr, bool) or (isinstance(fdr, int) and fdr >= 0)):
        p.append(f"trainer.fast_dev_run={fdr!r}: must be true, false or a number of steps >= 0")
    elif fdr and t.get("accumulate_grad_batches", 1) != 1:
        p.append(f"trainer.fast_dev_run={fdr!r}: Lightning counts micro-batches there, so with "
                 f"trainer.accumulate_grad_batches={t['accumulate_grad_batches']} it would stop inside a step; "
                 "use accumulate_grad_batches=1 for the quick check")
    loggers, callbacks = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("logger", "callbacks"))
    p += lightning_component_problems("logger", loggers) + lightning_component_problems("callbacks", callbacks)
    p += engine_component_problems("logger", cfg.logger, OWN_LOGGERS, cfg.engine)
    p += engine_component_problems("callbacks", cfg.callbacks, OWN_CALLBACKS, cfg.engine)
    return p


def trainer_value_problems(t: DictConfig) -> list[str]:
    p: list[str] = []
    for key in ("max_steps", "val_check_interval", "log_every_n_steps", "accumulate_grad_batches",
                "num_nodes"):
        positive(p, f"trainer.{key}", t[key])
    if isinstance(t.max_steps, int) and t.max_steps > MAX_STEPS:
        p.append(f"trainer.max_steps={t.max_steps}: must be <= {MAX_STEPS:_} (optimizer steps; the dry run "
                 "lays out every one)")
    positive(p, "trainer.gradient_clip_val", t.gradient_clip_val, allow_none=True)
    return p


def strategy_value_problems(cfg: DictConfig) -> list[str]:
    """The strategy's own numbers (what the machine allows is ``sem.config.hardware``'s)."""
    p = []
    for key, what in (("timeout_s", "a collective waits for the other ranks"),
                      ("join_timeout_s", "every rank has to join, or to stay heard")):
        value = cfg.strategy.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 0 < value <= MAX_TIMEOUT_S):
            p.append(f"strategy.{key}={value!r}: must be in [1, {MAX_TIMEOUT_S}] (seconds {what})")
    return p


_LOGGER_PACKAGES = {"TensorBoardLogger": ("tensorboard", "tensorboardX"), "WandbLogger": ("wandb",)}


def logger_problems(cfg: DictConfig) -> list[str]:
    import importlib.util

    out = []
    for name, node in cfg.logger.items():
        if node is None:
            continue
        needs = _LOGGER_PACKAGES.get(str(node.get("_target_", "")).rsplit(".", 1)[-1])
        if needs and not any(importlib.util.find_spec(pkg) for pkg in needs):
            out.append(f"logger.{name}: {node._target_} needs the package {needs[0]!r} "
                       f"(pip install {needs[0]})")
    return out
