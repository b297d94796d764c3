"""What sem needs of the components it is given, as ``typing.Protocol``s, and how it talks to a model.

A leaf: every layer may import it. The minimum a user writes (docs/bring-your-own.md):

- a **model** is an ``nn.Module`` whose ``forward(input_ids [B, T])`` returns logits ``[B, T, V]``;
- an **optimizer** is any ``torch.optim.Optimizer`` class (or a callable returning one);
- a **scheduler** is sem's schedule or any ``torch.optim.lr_scheduler.LRScheduler`` class;
- a **corpus** has ``documents()`` yielding ``Document(name, data)`` or ``(name, bytes | str)``.

Everything else is optional and used when present. ``model_output`` is the one way sem calls a model.
Validation (``sem.config.components``, ``sem.data.user_corpus``) checks a component sem has never seen
against these Protocols, the contract text living here once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@dataclass
class ModelOutput:
    """What ``model(input_ids, targets)`` may return instead of bare logits: the logits with the model's
    own loss terms and what else it wants logged.

    ``aux_losses``: the model's own loss terms by name, each a scalar already weighted, so that
    ``loss = ce_loss + sum(aux_losses.values())`` (sem adds them up where the model leaves ``loss`` None;
    a ``loss`` the model sets is taken as given). Each is logged as ``train/<name>``. A model without
    terms of its own leaves it empty. SEM: ``{"unitary_penalty": unitary_lambda * unitary_div}``.
    ``metrics``: other scalars logged as ``train/<name>``, not part of the loss. SEM: ``{"unitary_div":
    ...}``, the unweighted divergence (``train/unitary_div``). Names ``loss`` and ``ce_loss`` are sem's own.
    ``unitary_divergence``: kept for models written against earlier versions, which return
    ``ModelOutput(logits, loss, ce_loss, unitary_divergence)``: the unweighted term their ``loss`` already
    holds. Given, it is logged as ``train/unitary_div`` as before (it becomes ``metrics["unitary_div"]``)
    and is not added to anything. New models leave it None (sem's own do).
    """

    logits: torch.Tensor  # [B, T, V] float32
    loss: torch.Tensor | None = None  # ce_loss + sum(aux_losses.values()); None without targets
    ce_loss: torch.Tensor | None = None  # mean nats/token over targets != -100
    unitary_divergence: torch.Tensor | None = None  # earlier versions' field: see the docstring
    # A model that carries a recurrent state across training windows (its forward takes ``state``,
    # ``carries_training_state``): the state after this window, detached, to hand to the next window
    # of the same rows (truncated BPTT, ``data.tbptt``). Tensors in dicts/lists/tuples (checkpointed).
    state: Any = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, weighted, summed into loss
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, logged only

    def __post_init__(self) -> None:
        if self.unitary_divergence is not None and "unitary_div" not in self.metrics:
            self.metrics = {**self.metrics, "unitary_div": self.unitary_divergence}

    def logged(self) -> dict[str, torch.Tensor]:
        """What sem logs beside ``train/loss`` and ``train/ce_loss``, by name (``train/<name>``): the
        loss terms and the metrics, detached float32 scalars."""
        return {str(k): v.detach().float() for k, v in {**self.aux_losses, **self.metrics}.items()}


RESERVED_NAMES = ("loss", "ce_loss")  # train/loss, train/ce_loss: not names for aux_losses or metrics


@runtime_checkable
class LanguageModel(Protocol):
    """An ``nn.Module`` over byte tokens: ``forward(input_ids: LongTensor[B, T])`` returns logits
    ``[B, T, V]`` (V >= 259: 256 bytes + BOS/EOS/PAD), or a ``ModelOutput`` when it also takes
    ``targets``. Optional, used when present: ``set_step(step)`` (step-driven blends), ``probes() ->
    dict`` (health diagnostics), ``decode_state/prefill/step`` (recurrent sampling; ``prefill(input_ids,
    state, all_logits=True)`` returning every position's logits and the state after them: streaming
    evaluation carries the state through a document, ``sem.models.stream``; ``decode_state(batch_size,
    compile=True)``: a state whose ``step`` runs compiled, ``sem.sample compile``), a ``state`` parameter of
    ``forward`` (the previous window's ``ModelOutput.state``: truncated BPTT, ``data.tbptt``), ``max_seq_len``
    (checked against ``data.seq_len``; sampling keeps the context within it), ``vocab_size`` (passed
    to the constructor when it takes one), ``no_decay_keywords`` (parameter groups), ``compile_pays = True``
    (``compile=auto`` compiles its training step in long runs; without it auto leaves the model eager),
    ``retired_arguments`` (constructor arguments it no longer takes that configs and checkpoints of
    earlier versions hold: dropped when it is built, ``model_kwargs``). A ``ModelOutput``'s
    ``aux_losses`` are its own loss terms (logged as ``train/<name>``, summed into the loss)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | ModelOutput: ...


@runtime_checkable
class Corpus(Protocol):
    """A text collection: ``documents()`` yields ``Document(name, data)`` or ``(name, bytes | str)``,
    sorted and the same on every call (names decide the train/val split). Optional: ``fingerprint()``
    (a cheap key of the contents, for the token cache; default: a hash of the class, its arguments and
    the documents' names and sizes), ``describe()`` (default: the class name), ``problems()`` (pre-flight
    checks, one line each)."""

    def documents(self) -> Iterable[Any]: ...


class ContractError(TypeError):
    """A component broke its contract while running (a corpus document of the wrong type, ...): the
    input is wrong, so the run ends as a config error (exit 2), naming the class and the contract."""


@runtime_checkable
class OptimizerFactory(Protocol):
    """``factory(params=param_groups)`` returns a ``torch.optim.Optimizer``: a Hydra ``_partial_`` of any
    optimizer class (sem passes only the keywords its constructor takes) or a callable of one's own."""

    def __call__(self, params: list[dict[str, Any]]) -> torch.optim.Optimizer: ...


@runtime_checkable
class SchedulerFactory(Protocol):
    """``factory(optimizer=...)`` returns a ``torch.optim.lr_scheduler.LRScheduler`` (stepped once per
    optimizer step, its ``state_dict`` saved in checkpoints); sem's ``WSDScheduler`` also takes
    ``lr_scale``. ``ReduceLROnPlateau`` needs a metric per step and is refused."""

    def __call__(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler: ...


VOCAB_SIZE = 259  # the byte tokenizer's: 256 bytes + BOS/EOS/PAD


def model_kwargs(cls: Any, node: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of a model config node: its keys (not ``_target_`` and the like, nor the
    class's ``retired_arguments``: a checkpoint of an earlier version still rebuilds), plus
    ``vocab_size`` (the tokenizer's) when the constructor takes it and the config does not set it."""
    retired = set(getattr(cls, "retired_arguments", ()))
    kwargs = {k: v for k, v in node.items() if not str(k).startswith("_") and k not in retired}
    if "vocab_size" not in kwargs:
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        if "vocab_size" in params:
            kwargs["vocab_size"] = VOCAB_SIZE
    return kwargs


@functools.lru_cache(maxsize=64)
def _takes_targets(forward: Callable[..., Any]) -> bool:
    """Does ``forward`` take ``targets`` (by that name, or ``**kwargs``)? A second positional parameter
    of another name (a state, a mask) is never handed the targets."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    named = params.get("targets")
    return (named is not None and named.kind is not named.POSITIONAL_ONLY) or any(
        p.kind is p.VAR_KEYWORD for p in params.values())


def carries_training_state(model: Any) -> bool:
    """Does ``model``'s forward take a ``state`` (by that name): the ``ModelOutput.state`` of the previous
    window of the same rows? Then it can train with truncated BPTT (``data.tbptt``)."""
    forward = getattr(model, "forward", None)
    try:
        named = inspect.signature(forward).parameters.get("state") if forward is not None else None
    except (TypeError, ValueError):
        return False
    return named is not None and named.kind is not named.POSITIONAL_ONLY


def model_output(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                 state: Any = None, call: Callable[..., Any] | None = None) -> ModelOutput:
    """Call ``model`` as sem does: with ``targets`` when its forward takes them (and a carried ``state``
    when given: only to a model that ``carries_training_state``), and turn bare logits into a
    ``ModelOutput`` (sem's cross-entropy; no extra loss terms). ``call``: what runs the model in its
    place (``torch.compile(model)``, whose wrapper hides the forward's signature); None: the model.
    With ``targets``, the output's ``ce_loss`` and ``loss`` are set: what the model left None is sem's
    cross-entropy, and that plus the model's ``aux_losses``."""
    forward = type(model).forward
    extra = {} if state is None else {"state": state}
    run = model if call is None else call
    if targets is not None and _takes_targets(forward):
        out = run(input_ids, targets=targets, **extra)
    else:
        out = run(input_ids, **extra)
    if isinstance(out, ModelOutput):
        if targets is None or (out.ce_loss is not None and out.loss is not None):
            return out
        ce = cross_entropy(out.logits, targets) if out.ce_loss is None else out.ce_loss
        if out.loss is not None:
            loss = out.loss
        else:
            loss = ce + sum(out.aux_losses.values()) if out.aux_losses else ce
        return dataclasses.replace(out, loss=loss, ce_loss=ce)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{type(model).__name__}.forward returned {type(out).__name__}: the model contract "
                        "wants logits [B, T, V] (a tensor) or a sem.contracts.ModelOutput")
    ce = cross_entropy(logits, targets) if targets is not None else None
    return ModelOutput(logits, ce, ce)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean nats/token over targets != -100. logits [B, T, V], targets [B, T] long."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def set_step(model: Any, step: int) -> None:
    """``model.set_step(step)`` when the model has step-driven parts (SEM's propagator ramp)."""
    fn = getattr(model, "set_step", None)
    if callable(fn):
        fn(step)


def documents_of(corpus: Any) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each document a corpus yields (``Document``, or a ``(name, bytes | str)`` pair)."""
    for item in corpus.documents():
        try:
            name, data = item
        except (TypeError, ValueError):
            raise ContractError(f"{type(corpus).__name__}.documents() yielded {type(item).__name__}: the corpus "
                            "contract wants Document(name, data) or a (name, bytes | str) pair") from None
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ContractError(f"{type(corpus).__name__}.documents(): document {name!r} holds "
                            f"{type(data).__name__}; the corpus contract wants bytes or str")
        yield str(name), bytes(data)
