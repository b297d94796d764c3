"""Validation by contract, for components sem has never seen: the ``_target_`` is imported, its
constructor's signature is bound to the config node (missing required arguments, keys it does not
take, wrong types where annotated), and the built object is checked against its contract, the
Protocols of ``sem.contracts`` (``LanguageModel`` and ``ModelOutput``, ``OptimizerFactory``,
``SchedulerFactory``; a corpus's ``Corpus`` in ``sem.data.user_corpus``). Every problem is one line
naming the key, the class and what the contract wants.

Known classes (sem's own models, optimizers, schedules and corpora) are checked by their groups
(``sem.config.groups``), with the checks their constructors run; these run for every other ``_target_``."""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from sem.contracts import VOCAB_SIZE, OptimizerFactory, SchedulerFactory, model_kwargs

log = logging.getLogger("sem.config")

# Keys of sem's WSD schema that a torch scheduler swapped in inline inherits: they do not apply to it.
SEM_SCHEDULE_KEYS = ("max_steps", "warmup_steps", "warmup_fraction", "decay_steps", "decay_fraction",
                     "decay_start_step", "decay_shape", "min_lr_ratio")
PERF_KEYS = ("fused", "foreach")  # optimizer speed flags: passed only where the class takes them


def locate(key: str, target: Any) -> tuple[Any, str | None]:
    """(the object ``target`` names, None) or (None, one line saying why it cannot be imported)."""
    if not isinstance(target, str) or "." not in target:
        return None, f"{key}._target_={target!r}: must be a dotted path such as mypackage.module.Class"
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes (Class.from_config)
        module_name, rest = ".".join(parts[:i]), parts[i:]
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name) and i > 1:
                continue
            return None, (f"{key}._target_={target!r}: cannot import module {exc.name!r} (put the folder "
                          "that holds it on PYTHONPATH)")
        except Exception as exc:  # the user's module raised while importing
            return None, f"{key}._target_={target!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        for j, name in enumerate(rest):
            owner, obj = obj, getattr(obj, name, None)
            if obj is None:
                where = ".".join(parts[:i + j])
                close = difflib.get_close_matches(name, [n for n in dir(owner) if not n.startswith("_")], n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                return None, f"{key}._target_={target!r}: {where} has no {name!r}{hint}"
        return obj, None
    raise AssertionError("not reached: the first module of the path either imports or is reported")


def parameters(obj: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named constructor/call parameters of ``obj`` and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return {}, True  # a builtin without a signature: nothing to check against
    named = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolvable string annotations: no type checks
        return {}


def _type_ok(value: Any, hint: Any) -> bool:
    """Is ``value`` (plain config data) acceptable for annotation ``hint``? Unknown hints accept anything."""
    if value is None:  # wrong only for a plain, non-Optional type
        return not (hint in (int, float, str, bool, list, dict, tuple) or typing.get_origin(hint) in (list, dict, tuple))
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin in (list, tuple, typing.Sequence, Iterable) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, Mapping)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def signature_problems(key: str, obj: Any, node: Mapping[str, Any], *, injected: Iterable[str] = (),
                       ignored: Iterable[str] = ()) -> list[str]:
    """Bind the config ``node`` (its non-underscore keys) to ``obj``'s signature. ``injected``: arguments
    sem passes itself (params, optimizer, corpus, ...); ``ignored``: keys dropped before the call."""
    named, var_kw = parameters(obj)
    injected, ignored = set(injected), set(ignored)
    given = {k: v for k, v in node.items() if not str(k).startswith("_") and k not in ignored}
    name = getattr(obj, "__qualname__", repr(obj))
    where = f"{getattr(obj, '__module__', '?')}.{name}"
    takes = ", ".join(n for n in named if n not in injected and n != "self") or "nothing"
    problems = []
    if not var_kw:
        for k in given:
            if k not in named:
                close = difflib.get_close_matches(k, list(named), n=2)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                problems.append(f"{key}.{k}: {where} does not take {k!r} (it takes: {takes}){hint}")
    for n, p in named.items():
        if p.kind is p.POSITIONAL_ONLY and n in given:
            problems.append(f"{key}.{n}: {where} takes it by position only; config keys are passed by name")
        if n == "self" or n in injected or p.default is not inspect.Parameter.empty or n in given:
            continue
        problems.append(f"{key}.{n}: missing, {where} requires it (set it: {key}.{n}=...)")
    hints = _hints(obj)
    for k, v in given.items():
        if k in hints and k in named and not _type_ok(v, hints[k]):
            problems.append(f"{key}.{k}={v!r}: {where} wants {_hint_name(hints[k])}")
    return problems


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def takes(obj: Any, name: str) -> bool:
    named, var_kw = parameters(obj)
    return name in named or var_kw


_PROBED: dict[str, tuple[list[str], int | None]] = {}


def model_contract_problems(key: str, cls: Any, node: Mapping[str, Any]) -> tuple[list[str], int | None]:
    """Build the model and run a 2 x 8 probe batch against ``sem.contracts.LanguageModel`` (below).
    Returns (problems, the model's ``max_seq_len`` or None). Once per process and node (a single run
    validates in ValidateFirst and again in the recipe)."""
    cache_key = json.dumps([key, dict(node)], sort_keys=True, default=str)
    if cache_key not in _PROBED:
        _PROBED[cache_key] = _model_contract_problems(key, cls, node)
    return _PROBED[cache_key]


def _model_contract_problems(key: str, cls: Any, node: Mapping[str, Any]) -> tuple[list[str], int | None]:
    """Build the model and run a 2 x 8 probe batch: it must be a ``LanguageModel`` (an ``nn.Module``
    with a forward) returning logits ``[2, 8, V]`` with ``V >= 259``, and with targets a scalar loss and
    ``ModelOutput`` terms that are scalars named apart from sem's own (``output_problems``). Returns
    (problems, the model's ``max_seq_len`` or None)."""
    import torch
    from hydra.utils import instantiate

    from sem.contracts import LanguageModel, model_output

    where = f"{cls.__module__}.{cls.__qualname__}" if hasattr(cls, "__qualname__") else repr(cls)
    try:  # as the run builds it: nested _target_ nodes instantiated, vocab_size passed where taken
        extra = {k: v for k, v in model_kwargs(cls, node).items() if k not in node}
        model = instantiate(dict(node), _convert_="all", **extra)
    except Exception as exc:
        exc = exc.__cause__ or exc
        return [f"{key}: {where}(...) raised {type(exc).__name__}: {exc}"], None
    if not isinstance(model, torch.nn.Module) or not isinstance(model, LanguageModel):
        return [f"{key}: {where} built a {type(model).__name__}; the model contract (sem.contracts.LanguageModel) "
                "wants a torch.nn.Module"], None
    max_len = getattr(model, "max_seq_len", None)
    max_len = int(max_len) if isinstance(max_len, int) else None
    contract = ("(the model contract, sem.contracts.LanguageModel: forward(input_ids LongTensor[B, T]) -> "
                "logits [B, T, V])")
    if type(model).forward is torch.nn.Module.forward:
        return [f"{key}: {where} defines no forward {contract}"], max_len
    ids = torch.zeros(2, 8, dtype=torch.long)
    try:
        with torch.no_grad():
            logits = model_output(model.eval(), ids).logits
    except Exception as exc:
        return [f"{key}: {where}.forward(input_ids [2, 8]) raised {type(exc).__name__}: {exc} {contract}"], max_len
    shape = tuple(logits.shape)
    if len(shape) != 3 or shape[:2] != (2, 8) or shape[2] < VOCAB_SIZE:
        return [f"{key}: {where}.forward(input_ids [2, 8]) returned logits of shape {list(shape)}; the model "
                f"contract wants [2, 8, V] with V >= {VOCAB_SIZE} (256 bytes + BOS/EOS/PAD)"], max_len
    try:  # with targets: the loss and the model's own terms
        with torch.no_grad():
            out = model_output(model, ids, targets=ids)
    except Exception as exc:
        return [f"{key}: {where}.forward(input_ids [2, 8], targets [2, 8]) raised {type(exc).__name__}: "
                f"{exc}"], max_len
    return output_problems(key, f"{where}.forward(input_ids, targets)", out), max_len


def output_problems(key: str, call: str, out: Any) -> list[str]:
    """A ``ModelOutput`` (as ``model_output`` returns it, with targets) by its contract: a scalar
    ``loss``; ``aux_losses`` and ``metrics`` scalar tensors under names of their own, each logged as
    ``train/<name>`` (not ``loss``/``ce_loss``, not in both dicts)."""
    import torch

    from sem.contracts import RESERVED_NAMES

    wants = "the model contract (sem.contracts.ModelOutput) wants"
    problems = []
    for field in ("aux_losses", "metrics"):
        terms = getattr(out, field)
        if not isinstance(terms, Mapping):
            problems.append(f"{key}: {call} returned {field} of type {type(terms).__name__}; {wants} a dict")
            continue
        for name, value in terms.items():
            label = ("unitary_divergence" if field == "metrics" and value is out.unitary_divergence
                     else f"{field}[{name!r}]")
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                what = f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                problems.append(f"{key}: {call} returned {label} of {what}; {wants} a scalar tensor")
            if not isinstance(name, str) or not name or name in RESERVED_NAMES:
                problems.append(f"{key}: {call} returned {label}: {name!r} is not a name of its own "
                                f"(logged as train/<name>; {', '.join(RESERVED_NAMES)} are sem's)")
    if isinstance(out.aux_losses, Mapping) and isinstance(out.metrics, Mapping):
        for name in sorted(set(out.aux_losses) & set(out.metrics), key=str):
            problems.append(f"{key}: {call} returned {name!r} in both aux_losses and metrics; {wants} "
                            "one name per logged value (train/<name>)")
    if not problems and (not isinstance(out.loss, torch.Tensor) or out.loss.dim() != 0):  # else: from a term
        what = f"shape {list(out.loss.shape)}" if isinstance(out.loss, torch.Tensor) else type(out.loss).__name__
        problems.append(f"{key}: {call} returned a loss of {what}; {wants} a scalar tensor")
    return problems


def factory_contract(protocol: type) -> tuple[str, type]:
    """(the type a factory Protocol of ``sem.contracts`` says its ``__call__`` returns, as written there;
    that type): what a built optimizer or scheduler is checked against."""
    return str(protocol.__call__.__annotations__["return"]), typing.get_type_hints(protocol.__call__)["return"]


def target_problems(key: str, target: Any, obj: Any, protocol: type) -> list[str]:
    """The ``_target_`` of a factory node (``OptimizerFactory``, ``SchedulerFactory``): a class of the
    type the Protocol returns, or a callable (checked on what it builds: ``built_problems``)."""
    written, wants = factory_contract(protocol)
    contract = f"(the {key} contract, sem.contracts.{protocol.__name__}: a {written} class, or a callable returning one)"
    if not isinstance(obj, protocol):  # runtime_checkable: has __call__
        return [f"{key}._target_={target!r}: not callable (an object of type {type(obj).__name__}) {contract}"]
    if inspect.isclass(obj) and not issubclass(obj, wants):
        return [f"{key}._target_={target!r}: {obj.__name__} is not a {written} {contract}"]
    return []


def built_problems(key: str, call: str, built: Any, protocol: type) -> list[str]:
    """What a factory built is of the type its Protocol returns."""
    written, wants = factory_contract(protocol)
    if isinstance(built, wants):
        return []
    return [f"{key}: {call} returned {type(built).__name__}; the {key} contract (sem.contracts.{protocol.__name__}) "
            f"wants a {written}"]


def optimizer_problems(node: Mapping[str, Any]) -> list[str]:
    """An optimizer node whose ``_target_`` is not one of sem's schemas: an ``Optimizer`` class taking
    the configured keys (``fused``/``foreach`` dropped where not taken), or a callable returning one
    (``sem.contracts.OptimizerFactory``)."""
    import torch

    cls, err = locate("optimizer", node.get("_target_"))
    if err:
        return [err]
    problems = target_problems("optimizer", node["_target_"], cls, OptimizerFactory)
    if problems:
        return problems
    drop = [k for k in PERF_KEYS if k in node and not takes(cls, k)]
    problems = signature_problems("optimizer", cls, node, injected=("params",), ignored=drop)
    if problems:
        return problems
    if not inspect.isclass(cls):  # a factory of one's own: build it once on a probe parameter
        try:
            built = partial_of(node, drop)(params=[{"params": [torch.nn.Parameter(torch.zeros(1))]}])
        except Exception as exc:
            exc = exc.__cause__ or exc
            return [f"optimizer: {node['_target_']}(params=...) raised {type(exc).__name__}: {exc}"]
        return built_problems("optimizer", f"{node['_target_']}(params=...)", built, OptimizerFactory)
    return []


def scheduler_problems(node: Mapping[str, Any]) -> list[str]:
    """A scheduler node whose ``_target_`` is not sem's WSD: an ``LRScheduler`` class (not
    ``ReduceLROnPlateau``) taking the configured keys, or a callable returning one
    (``sem.contracts.SchedulerFactory``). sem's schedule keys it inherits from the default
    option (``warmup_fraction``, ...) do not apply to it: a warning says so, and they are not passed."""
    import torch

    cls, err = locate("scheduler", node.get("_target_"))
    if err:
        return [err]
    if inspect.isclass(cls) and issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return [f"scheduler._target_={node['_target_']!r}: ReduceLROnPlateau needs a metric at every step "
                "and is not supported (use a schedule of the step: sem's wsd/cosine, or a torch LRScheduler)"]
    problems = target_problems("scheduler", node["_target_"], cls, SchedulerFactory)
    if problems:
        return problems
    return signature_problems("scheduler", cls, node, injected=("optimizer",), ignored=inherited_schedule_keys(cls, node))


def inherited_schedule_keys(cls: Any, node: Mapping[str, Any]) -> list[str]:
    """sem's schedule keys in ``node`` that ``cls`` does not take (left over from the default option)."""
    return [k for k in SEM_SCHEDULE_KEYS if k in node and not takes(cls, k)]


OWN_CORPORA = ("sem.data.corpus.StdlibCorpus", "sem.data.corpus.TextFilesCorpus", "sem.data.corpus.JsonlCorpus")


def corpus_node(node: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the corpus node to build, its problems). An option of one's own that extends a shipped data
    option (``defaults: [stdlib, _self_]``) inherits that corpus's arguments: the null ones its class
    does not take are dropped; any other key it does not take is a problem naming it."""
    node = dict(node)
    target = node.get("_target_")
    if target in OWN_CORPORA:
        return node, []
    cls, err = locate("data.corpus", target)
    if err:
        return node, [err]
    named, var_kw = parameters(cls)
    inherited = [k for k, v in node.items() if v is None and not str(k).startswith("_") and k not in named
                 and not var_kw]
    node = {k: v for k, v in node.items() if k not in inherited}
    return node, signature_problems("data.corpus", cls, node)


def optimizer_schedule_problems(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]) -> list[str]:
    """Build the configured optimizer on a probe parameter and the configured schedule on it: what only
    the constructors can check (OneCycleLR's ``cycle_momentum`` with an optimizer without momentum,
    ...) is found now, as a config problem, not at step 0."""
    import torch

    opt_cls, _ = locate("optimizer", optimizer.get("_target_"))
    try:
        opt_factory = partial_of(optimizer, [k for k in PERF_KEYS if k in optimizer and not takes(opt_cls, k)])
        param = torch.nn.Parameter(torch.zeros(2, 2))
        groups = [{"params": [param], "weight_decay": float(optimizer.get("weight_decay", 0.0) or 0.0)}]
        opt = opt_factory(params=groups)
    except Exception as exc:
        exc = exc.__cause__ or exc
        return [f"optimizer: {optimizer.get('_target_')}(...) raised {type(exc).__name__}: {exc}"]
    problems = built_problems("optimizer", f"{optimizer.get('_target_')}(params=...)", opt, OptimizerFactory)
    if problems:
        return problems
    sched_cls, _ = locate("scheduler", scheduler.get("_target_"))
    call = f"{scheduler.get('_target_')}(optimizer={type(opt).__name__}, ...)"
    try:
        factory = partial_of(scheduler, inherited_schedule_keys(sched_cls, scheduler))
        extra = {"lr_scale": lambda step: 1.0} if "lr_scale" in parameters(sched_cls)[0] else {}
        built = factory(optimizer=opt, **extra)
    except Exception as exc:
        exc = exc.__cause__ or exc
        return [f"scheduler: {call} raised {type(exc).__name__}: {exc}"]
    return built_problems("scheduler", call, built, SchedulerFactory)


def partial_of(node: Mapping[str, Any], drop: Iterable[str] = ()) -> Any:
    """The node as the run builds it: a partial of its ``_target_`` with its keys but ``drop``, nested
    ``_target_`` nodes instantiated, plain Python containers."""
    from hydra.utils import instantiate

    drop = set(drop)
    return instantiate({k: v for k, v in node.items() if k not in drop and k != "_partial_"},
                       _partial_=True, _convert_="all")


# Trainer arguments sem sets itself, and the config that sets them.
SET_BY_SEM = {"accelerator": "accelerator=...", "strategy": "strategy=...", "plugins": "precision=...",
              "precision": "precision=...", "callbacks": "callbacks.<name>=...", "logger": "logger=...",
              "default_root_dir": "run.name or hydra.run.dir", "max_epochs": "trainer.max_steps",
              "check_val_every_n_epoch": "trainer.val_check_interval", "enable_checkpointing": "checkpoint.*",
              "use_distributed_sampler": "(sem shards by rank itself)", "enable_progress_bar": "callbacks.progress_bar"}


def trainer_problems(node: Mapping[str, Any], schema_keys: Iterable[str], engine: str) -> list[str]:
    """Trainer arguments beyond sem's schema (``+trainer.<arg>=...``) are checked against the
    Trainer's signature; under engine=standalone they are refused (it runs no Lightning Trainer)."""
    extra = [k for k in node if not str(k).startswith("_") and k not in set(schema_keys)]
    problems = []
    if engine == "standalone":
        for k in extra + [k for k in ("fast_dev_run", "profiler") if node.get(k)]:
            problems.append(f"trainer.{k}={node[k]!r}: a Lightning Trainer argument; engine=standalone runs "
                            "no Trainer (use engine=lightning)")
        return problems
    cls, err = locate("trainer", node.get("_target_"))
    if err:
        return [err]
    named, _ = parameters(cls)
    for k in extra:
        if k in SET_BY_SEM:
            problems.append(f"trainer.{k}: set by sem (from {SET_BY_SEM[k]}), not a trainer key")
        elif k not in named:
            close = difflib.get_close_matches(k, list(named), n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            problems.append(f"trainer.{k}: {cls.__module__}.{cls.__qualname__} has no argument {k!r}{hint}")
    return problems


def lightning_component_problems(kind: str, nodes: Mapping[str, Any]) -> list[str]:
    """Each logger or callback node: its ``_target_`` imports and its signature takes the keys given
    (a logger's ``save_dir`` is passed by sem where taken)."""
    problems = []
    for name, node in nodes.items():
        if not node:
            continue
        key = f"{kind}.{name}"
        cls, err = locate(key, node.get("_target_"))
        problems += [err] if err else signature_problems(key, cls, node, injected=("save_dir",) if kind == "logger" else ())
    return problems


def engine_component_problems(kind: str, nodes: Mapping[str, Any], own: Iterable[str], engine: str) -> list[str]:
    """Under engine=standalone, a Lightning logger or callback beyond sem's own is a config error:
    the plain-PyTorch loop runs no Lightning hooks."""
    if engine != "standalone":
        return []
    return [f"{kind}.{name}: {node.get('_target_')} is a Lightning {kind[:-1] if kind.endswith('s') else kind}; "
            "engine=standalone runs none (use engine=lightning)"
            for name, node in nodes.items() if node and name not in set(own)]
