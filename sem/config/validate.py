"""Value and cross-field checks of a composed config, before anything heavy is built.

Every problem is reported at once, one line each, naming the key and the value: the launcher prints
them and exits with code 2. Types and unknown keys are already caught by the schemas in
``sem.config.schema`` when Hydra composes the config.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sem.config.components import (
    VOCAB_SIZE,
    corpus_node,
    engine_component_problems,
    lightning_component_problems,
    locate,
    model_contract_problems,
    optimizer_problems,
    optimizer_schedule_problems,
    scheduler_problems,
    signature_problems,
    trainer_problems,
)
from sem.config.hardware import hardware_problems, strategy_problems
from sem.config.resources import core_problems, memory_problems
from sem.contracts import carries_training_state
from sem.data.user_corpus import as_corpus, corpus_contract_problems
from sem.models.dynamic import DynamicSettings
from sem.training.budget import length_problems, resolve_budget


def _positive(problems: list[str], key: str, value: Any, *, allow_none: bool = False,
              strict: bool = True) -> None:
    if value is None and allow_none:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if strict else value >= 0))
    if not ok:
        problems.append(f"{key}={value!r}: must be {'> 0' if strict else '>= 0'}")


MAX_TIMEOUT_S = 2**31 - 1  # a process group's timeout; a timedelta of more overflows a C int
MAX_NS_STEPS = 100  # Muon's orthogonalisation: each iteration is 3 matmuls per matrix per step
MAX_DIM = 2**31 - 1  # a model width, context or vocabulary: past it torch's sizes overflow
MAX_STEPS = 10**8  # far past any run this launcher is for (the default is 3900); the dry run lists steps


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


OWN_MODELS = ("sem.models.sem.SEMModel", "sem.models.sem.model.SEMModel", "sem.models.transformer.TransformerLM")
MAX_MODES = 256  # model.modes: beyond, the [D, N, T] kernel outgrows any use
OWN_OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.SGD", "sem.training.optim.MuonAdamW")
OWN_SCHEDULES = ("sem.training.scheduler.WSDScheduler",)


def _model_problems(m: DictConfig, max_steps: int) -> tuple[list[str], int | None]:
    """(problems, the model's max_seq_len or None). sem's models by their schemas; any other
    ``_target_`` by its signature and a 2 x 8 probe of the built model (``sem.config.components``)."""
    target = m.get("_target_")
    if target not in OWN_MODELS:
        cls, err = locate("model", target)
        if err:
            return [err], None
        # as the run builds it: lengths given as fractions of max_steps resolved first (sem.training.budget)
        node = resolve_budget({"model": OmegaConf.to_container(m, resolve=True), "trainer": {"max_steps": max_steps}}
                              )[0]["model"]
        problems = signature_problems("model", cls, node, injected=("vocab_size",))
        if isinstance(m.get("vocab_size"), int) and m.vocab_size < VOCAB_SIZE:
            problems.append(f"model.vocab_size={m.vocab_size}: the byte tokenizer needs at least {VOCAB_SIZE} "
                            "(256 bytes + BOS/EOS/PAD)")
        if problems:
            return problems, None
        return model_contract_problems("model", cls, node)
    return _own_model_problems(m, max_steps), m.max_seq_len


def _own_model_problems(m: DictConfig, max_steps: int) -> list[str]:
    p: list[str] = []
    for key in ("d_model", "n_layers", "max_seq_len", "vocab_size", "mlp_ratio"):
        _positive(p, f"model.{key}", m.get(key))
    _positive(p, "model.unitary_lambda", m.get("unitary_lambda"), strict=False)
    for key in ("d_model", "max_seq_len", "vocab_size"):  # beyond, torch's sizes overflow before any memory check
        if isinstance(m.get(key), int) and m[key] > MAX_DIM:
            p.append(f"model.{key}={m[key]}: must be <= {MAX_DIM} (a tensor dimension)")
    ratio, width = m.get("mlp_ratio"), m.get("d_model")
    if isinstance(ratio, (int, float)) and isinstance(width, int) and 0 < width <= MAX_DIM \
            and math.isfinite(ratio) and ratio * width > MAX_DIM:
        p.append(f"model.mlp_ratio={ratio!r}: the MLP would be {ratio * width:.3g} wide (mlp_ratio x "
                 f"model.d_model={width}); at most {MAX_DIM}")
    if "born_eps" in m:
        _positive(p, "model.born_eps", m.born_eps)
    if "born_power" in m:
        _positive(p, "model.born_power", m.born_power)
        if m.get("readout") == "linear" and m.born_power != 1:
            p.append(f"model.born_power={m.born_power!r} with model.readout=linear: the power is the Born "
                     "readout's (p ~ |z|^(2 born_power)); use model.readout=born or born_power=1")
    offset = m.get("born_offset", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        p.append(f"model.born_offset={offset!r}: must be a finite number (the readout's reference amplitude; 0: none)")
    elif offset != 0 and m.get("readout") == "linear":
        p.append(f"model.born_offset={offset!r} with model.readout=linear: the offset is the Born readout's "
                 "(z = W U psi + offset); use model.readout=born or born_offset=0")
    if "conv_width" in m and not 0 <= m.conv_width <= max(m.max_seq_len, 0):
        p.append(f"model.conv_width={m.conv_width!r}: must be in [0, model.max_seq_len={m.max_seq_len}] "
                 "(taps of the causal convolution; 0: none)")
    modes = m.get("modes", 1)
    if not isinstance(modes, int) or isinstance(modes, bool) or not 1 <= modes <= MAX_MODES:
        p.append(f"model.modes={modes!r}: must be an integer in [1, {MAX_MODES}] (timescales per channel)")
    elif modes > 1 and m.get("selective"):
        p.append(f"model.modes={modes} with model.selective=true: the input-dependent recurrence has one "
                 "mode per channel; use one of them")
    heads, width = m.get("heads", 0), m.get("d_model")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 0:
        p.append(f"model.heads={heads!r}: must be an integer >= 0 (0: the diagonal state)")
    elif heads and isinstance(width, int) and width > 0 and width % heads:
        p.append(f"model.heads={heads}: must divide model.d_model={width} (each head holds d_model / heads channels)")
    elif heads and (m.get("selective") or (isinstance(modes, int) and modes > 1)):
        p.append(f"model.heads={heads} with model.selective={m.get('selective')} model.modes={modes}: the "
                 "matrix state is neither; use one of them")
    every, layers = m.get("attention_every", 0), m.get("n_layers")
    if not isinstance(every, int) or isinstance(every, bool) or every < 0 \
            or (isinstance(layers, int) and every > layers):
        p.append(f"model.attention_every={every!r}: must be an integer in [0, model.n_layers={layers}] "
                 "(local attention before every k-th block; 0: none)")
    window = m.get("attention_window", 128)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        p.append(f"model.attention_window={window!r}: must be an integer >= 1 (positions a query sees, itself included)")
    r_min, r_max = m.get("r_min"), m.get("r_max")
    if isinstance(r_min, (int, float)) and isinstance(r_max, (int, float)) \
            and not 0.0 < r_min <= r_max < 1.0:
        p.append(f"model.r_min={r_min!r} model.r_max={r_max!r}: need 0 < r_min <= r_max < 1 "
                 "(the initial moduli |lambda| of the recurrence)")
    if isinstance(m.get("max_phase"), (int, float)) and not 0.0 <= m.max_phase <= 2 * math.pi:
        p.append(f"model.max_phase={m.max_phase!r}: must be in [0, 2 pi] (the initial phases' range)")
    if not 0.0 <= m.get("dropout", 0.0) < 1.0:
        p.append(f"model.dropout={m.dropout!r}: must be in [0, 1)")
    if isinstance(m.get("vocab_size"), int) and 0 < m.vocab_size < 259:
        p.append(f"model.vocab_size={m.vocab_size}: the byte tokenizer needs at least 259 "
                 "(256 bytes + BOS/EOS/PAD)")
    if "readout" in m and m.readout not in ("born", "linear"):
        p.append(f"model.readout={m.readout!r}: must be 'born' or 'linear'")
    if "recurrence" in m and m.recurrence not in ("fft", "scan"):
        p.append(f"model.recurrence={m.recurrence!r}: must be 'fft' or 'scan'")
    if "propagator_warmup_steps" in m:
        p += length_problems("model.propagator_warmup_steps", m.propagator_warmup_steps,
                             "model.propagator_warmup_fraction", m.get("propagator_warmup_fraction"), max_steps)
    if "n_heads" in m:
        _positive(p, "model.n_heads", m.n_heads)
        if m.n_heads > 0 and m.d_model % m.n_heads:
            p.append(f"model.n_heads={m.n_heads}: must divide model.d_model={m.d_model}")
    return p


def _data_problems(cfg: DictConfig, corpus: Any, max_len: int | None) -> list[str]:
    d, p = cfg.data, []
    for key in ("batch_size", "seq_len"):
        _positive(p, f"data.{key}", d[key])
    for key in ("val_seq_len", "val_max_windows", "final_val_max_windows", "val_batch_size"):
        _positive(p, f"data.{key}", d[key], allow_none=True)
    if not 0.0 < d.val_fraction < 1.0:
        p.append(f"data.val_fraction={d.val_fraction!r}: must be in (0, 1)")
    elif not 0.0 <= d.test_fraction < 1.0 - d.val_fraction:
        p.append(f"data.test_fraction={d.test_fraction!r}: must be in [0, 1 - data.val_fraction = "
                 f"{1 - d.val_fraction:g})")
    for key in ("seq_len", "val_seq_len"):
        if max_len is not None and d[key] is not None and d[key] > max_len:
            p.append(f"data.{key}={d[key]}: longer than model.max_seq_len={max_len}")
    p += _tbptt_problems(cfg)
    return (p + _cache_dir_problems(d.cache_dir) + corpus_contract_problems("data.corpus", corpus)
            + list(getattr(corpus, "problems", list)()))


def _tbptt_problems(cfg: DictConfig) -> list[str]:
    """data.tbptt K >= 2 carries the model's recurrent state across K consecutive windows: the model
    must take one (``carries_training_state``) and nothing else may read the windows without it."""
    k = cfg.data.get("tbptt", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        return [f"data.tbptt={k!r}: must be an integer >= 0 (K >= 2: lanes of K consecutive windows; 0: off)"]
    if k < 2:
        return []
    p = []
    cls, err = locate("model", cfg.model.get("_target_"))
    if not err and not carries_training_state(cls):
        p.append(f"data.tbptt={k}: model {cfg.model._target_} carries no recurrent state across windows "
                 "(its forward takes no `state`); use data.tbptt=0 or a model that does (model=sem_small)")
    if cfg.distillation.get("teacher"):
        p.append(f"data.tbptt={k}: the distillation teacher reads each window from nothing, the student from "
                 "its carried state; use one of data.tbptt and distillation")
    return p


def _cache_dir_problems(value: Any) -> list[str]:
    """The token cache's folder can be made and written (checked without writing anything)."""
    if not isinstance(value, str) or not value.strip():
        return [f"data.cache_dir={value!r}: must name a folder (default: $SEM_CACHE_DIR or ~/.cache/sem)"]
    path = Path(os.path.expanduser(value))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"data.cache_dir={value!r}: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"data.cache_dir={value!r}: {existing} is not writable"]
    return []


def _optimizer_problems(o: DictConfig) -> list[str]:
    p: list[str] = [] if o.get("_target_") in OWN_OPTIMIZERS else optimizer_problems(OmegaConf.to_container(o, resolve=True))
    if p:
        return p
    if "lr" in o:
        _positive(p, "optimizer.lr", o.lr)
    if "weight_decay" in o:
        _positive(p, "optimizer.weight_decay", o.weight_decay, strict=False)
    for key in ("betas", "adamw_betas"):  # adamw_betas: muon's AdamW side
        for i, beta in enumerate(o.get(key) or []):
            if not 0.0 <= beta < 1.0:
                p.append(f"optimizer.{key}[{i}]={beta!r}: must be in [0, 1)")
    if "eps" in o:
        _positive(p, "optimizer.eps", o.eps, strict=False)
    if "adamw_lr" in o:
        _positive(p, "optimizer.adamw_lr", o.adamw_lr)
    if "momentum" in o and not 0.0 <= o.momentum < 1.0:
        p.append(f"optimizer.momentum={o.momentum!r}: must be in [0, 1)")
    if "ns_steps" in o and not (isinstance(o.ns_steps, int) and 1 <= o.ns_steps <= MAX_NS_STEPS):
        p.append(f"optimizer.ns_steps={o.ns_steps!r}: must be in [1, {MAX_NS_STEPS}] (Newton-Schulz iterations "
                 "per step; 5 is usual)")
    if o.get("ns_dtype", "auto") not in ("auto", "float32", "bfloat16"):
        p.append(f"optimizer.ns_dtype={o.ns_dtype!r}: must be auto, float32 or bfloat16")
    return p


def _length_problems(cfg: DictConfig) -> list[str]:
    """Components that take their own max_steps must agree with the Trainer's."""
    return [f"{group}.max_steps={cfg[group].max_steps}: must equal trainer.max_steps="
            f"{cfg.trainer.max_steps} (leave it at its default, ${{trainer.max_steps}})"
            for group in ("scheduler", "curriculum") if "max_steps" in cfg[group]
            and (group != "scheduler" or cfg.scheduler.get("_target_") in OWN_SCHEDULES)
            and cfg[group].max_steps != cfg.trainer.max_steps]


def _scheduler_problems(cfg: DictConfig) -> list[str]:
    from sem.training.scheduler import problems as wsd_problems

    node = cfg.scheduler
    if node.get("_target_") in OWN_SCHEDULES:
        return wsd_problems(**{k: v for k, v in node.items() if not k.startswith("_")}, prefix="scheduler")
    return scheduler_problems(OmegaConf.to_container(node, resolve=True))


OWN_CALLBACKS = ("console", "metrics", "progress_bar", "curriculum")  # conf/callbacks/default.yaml
OWN_LOGGERS = ("csv",)  # engine=standalone writes metrics.jsonl instead (a warning says so)


def _open_trainer_problems(cfg: DictConfig) -> list[str]:
    from dataclasses import fields

    from sem.config.schema import TrainerConf

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


def _trainer_problems(t: DictConfig) -> list[str]:
    p: list[str] = []
    for key in ("max_steps", "val_check_interval", "log_every_n_steps", "accumulate_grad_batches",
                "num_nodes"):
        _positive(p, f"trainer.{key}", t[key])
    if isinstance(t.max_steps, int) and t.max_steps > MAX_STEPS:
        p.append(f"trainer.max_steps={t.max_steps}: must be <= {MAX_STEPS:_} (optimizer steps; the dry run "
                 "lays out every one)")
    _positive(p, "trainer.gradient_clip_val", t.gradient_clip_val, allow_none=True)
    return p


def _run_problems(cfg: DictConfig) -> list[str]:
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


def _strategy_value_problems(cfg: DictConfig) -> list[str]:
    """The strategy's own numbers (what the machine allows is ``sem.config.hardware``'s)."""
    p = []
    for key, what in (("timeout_s", "a collective waits for the other ranks"),
                      ("join_timeout_s", "every rank has to join, or to stay heard")):
        value = cfg.strategy.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 0 < value <= MAX_TIMEOUT_S):
            p.append(f"strategy.{key}={value!r}: must be in [1, {MAX_TIMEOUT_S}] (seconds {what})")
    return p


def _checkpoint_problems(cfg: DictConfig) -> list[str]:
    c, p = cfg.checkpoint, []
    if c.get("every_n_train_steps") is not None:
        p.append(f"checkpoint.every_n_train_steps={c.every_n_train_steps}: removed; use "
                 f"checkpoint.every_n_steps={c.every_n_train_steps}")
    for key, low in (("every_n_steps", 0), ("keep_last", 1), ("keep_best", 0)):
        if c[key] < low:
            p.append(f"checkpoint.{key}={c[key]}: must be >= {low}")
    if c.mode not in ("min", "max"):
        p.append(f"checkpoint.mode={c.mode!r}: must be min or max")
    return p


def _health_problems(cfg: DictConfig) -> list[str]:
    from sem.training.health import settings_problems

    node = {k: v for k, v in OmegaConf.to_container(cfg.health, resolve=True).items() if not k.startswith("_")}
    return settings_problems(**node)


def validate(cfg: DictConfig, corpus: Any) -> list[str]:
    """Every problem with a composed config, one line each naming the key and the value.

    ``corpus`` is the (cheap, not yet read) corpus object built from ``data.corpus``: its own
    pre-flight checks (paths exist, readable) are part of the report. Runs before anything heavy
    is built; an empty list means the config can be built.
    """
    try:
        problems, max_len = _model_problems(cfg.model, cfg.trainer.max_steps)
    except Exception as exc:  # an unexpected shape of config is still a config problem
        problems, max_len = [f"model: {_one_line(exc)}"], None
    checks = [
        lambda: _target_problems(cfg),
        lambda: _data_problems(cfg, corpus, max_len),
        lambda: _optimizer_problems(cfg.optimizer),
        lambda: _scheduler_problems(cfg),
        lambda: _curriculum_problems(cfg, max_len),
        lambda: _logger_problems(cfg),
        lambda: _distillation_problems(cfg),
        lambda: _trainer_problems(cfg.trainer),
        lambda: _open_trainer_problems(cfg),
        lambda: _length_problems(cfg),
        lambda: hardware_problems(cfg),
        lambda: _run_problems(cfg),
        lambda: strategy_problems(cfg),
        lambda: _strategy_value_problems(cfg),
        lambda: core_problems(cfg),
        lambda: _checkpoint_problems(cfg),
        lambda: _health_problems(cfg),
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


def _curriculum_problems(cfg: DictConfig, max_len: int | None) -> list[str]:
    from sem.training.curriculum import stage_problems

    stages = cfg.curriculum.stages
    lines = stage_problems(OmegaConf.to_container(stages, resolve=True), cfg.trainer.max_steps,
                           max_len, prefix="curriculum")
    # A stage field copied from elsewhere (curriculum=none takes ${data.seq_len}) is reported
    # under its source key already: say it once.
    copied = tuple(f"curriculum.stages[{i}]({st.name}).{key}=" for i, st in enumerate(stages)
                   for key in ("seq_len", "batch_size") if OmegaConf.is_interpolation(st, key))
    return [line for line in lines if not line.startswith(copied)]


_LOGGER_PACKAGES = {"TensorBoardLogger": ("tensorboard", "tensorboardX"), "WandbLogger": ("wandb",)}


def _logger_problems(cfg: DictConfig) -> list[str]:
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


def _distillation_problems(cfg: DictConfig) -> list[str]:
    from sem.config.schema import DistillationLossConf, EMATeacherConf
    from sem.training.distillation import distill_problems

    t, loss = cfg.distillation.teacher, cfg.distillation.loss
    if (t is None) != (loss is None):
        return ["distillation: teacher and loss must both be set or both be null"]
    if t is None:
        return []
    p = []
    for key, node in (("teacher", t), ("loss", loss)):  # distillation=off takes any value: it is typed Any
        if not isinstance(node, DictConfig) or "_target_" not in node:
            p.append(f"distillation.{key}={_plain(node)!r}: not a component (no _target_); choose "
                     f"distillation=ema_teacher and override its keys (distillation.{key}.<name>=...)")
    if p:
        return p
    # a node set by hand on distillation=off has only the keys it was given: the schema's defaults fill in
    t = OmegaConf.merge(EMATeacherConf, t) if OmegaConf.get_type(t) is dict else t
    loss = OmegaConf.merge(DistillationLossConf, loss) if OmegaConf.get_type(loss) is dict else loss
    n = cfg.trainer.max_steps
    return distill_problems(alpha=loss.alpha, temperature=loss.temperature, decay_start=t.decay_start,
                            decay_end=t.decay_end, start_stage=t.start_stage,
                            stage_names=[s.name for s in cfg.curriculum.stages]) + [
        *length_problems("distillation.teacher.ramp_steps", t.ramp_steps,
                         "distillation.teacher.ramp_fraction", t.get("ramp_fraction"), n, may_overrun=True),
        *length_problems("distillation.teacher.start_step", t.start_step,
                         "distillation.teacher.start_fraction", t.get("start_fraction"), n,
                         required=False, strictly_inside=True),
    ]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


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
