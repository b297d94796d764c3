"""``compiled_forward(model)``: the training forward (and its backward) through ``torch.compile``
(``compile=true``, or ``auto`` where it pays: ``sem.config.hardware.compile_choice``).

Only the training step runs it (``TrainStep(forward=...)``); the model's parameters and state_dict are
untouched, and validation, sampling and evaluation run the model itself (a compiled graph per shape and
mode would cost more there than it saves). Plain PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn


def compiled_forward(model: nn.Module, eager_fallback: bool = False) -> Callable[..., Any]:
    """``torch.compile(model)``, compiled afresh. ``eager_fallback``: a model inductor fails on runs
    eager instead (``compile=auto``); otherwise the failure is the run's (``compile=true``)."""
    import torch._dynamo

    # Each run compiles afresh: a sweep's jobs in one process would otherwise share dynamo's caches
    # and its recompile limit (and past it run eager, unannounced).
    torch._dynamo.reset()
    forward = torch.compile(model)
    # Expected, not news: complex ops (SEM's recurrence) stay torch's own kernels, unfused, and the
    # profiler labels (record_function, for bench/profile_sem.py) are left out of the graph.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_not_profiler_note)
    torch._dynamo.config.suppress_errors = eager_fallback
    return forward


def _not_profiler_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Profiler record function")
