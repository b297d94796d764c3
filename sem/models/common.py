"""What every model shares: the cross-entropy sem computes, the input-length check, the optimizer's
parameter groups and the parameter count. Pure PyTorch, for any ``nn.Module``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sem.contracts import VOCAB_SIZE

MAX_DIM = 2**31 - 1  # a model width, context or vocabulary: past it torch's sizes overflow


def size_problems(prefix: str, s: dict[str, Any], counts: tuple[str, ...], default_ratio: float) -> list[str]:
    """The sizes every model of sem has, one line each naming ``<prefix><key>``: ``counts`` are integers
    > 0 (widths, context and vocabulary also <= MAX_DIM), the vocabulary holds the byte tokenizer's ids,
    and the MLP (``mlp_ratio`` x ``d_model``) stays a tensor dimension. Keys left out are not checked."""
    p = []
    for key in counts:
        value = s.get(key)
        if key not in s:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            p.append(f"{prefix}{key}={value!r}: must be an integer > 0")
        elif key in ("vocab_size", "d_model", "max_seq_len") and value > MAX_DIM:
            p.append(f"{prefix}{key}={value!r}: must be <= {MAX_DIM} (a tensor dimension)")
    vocab = s.get("vocab_size")
    if isinstance(vocab, int) and 0 < vocab < VOCAB_SIZE:
        p.append(f"{prefix}vocab_size={vocab}: the byte tokenizer needs at least {VOCAB_SIZE} (256 bytes + BOS/EOS/PAD)")
    ratio, width = s.get("mlp_ratio", default_ratio), s.get("d_model")
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 0):
        p.append(f"{prefix}mlp_ratio={ratio!r}: must be > 0")
    elif isinstance(width, int) and 0 < width <= MAX_DIM and ratio * width > MAX_DIM:
        p.append(f"{prefix}mlp_ratio={ratio!r}: the MLP would be {ratio * width:.3g} wide (mlp_ratio x "
                 f"{prefix}d_model={width}); at most {MAX_DIM}")
    return p


def check_input_length(input_ids: torch.Tensor, max_seq_len: int) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > max_seq_len:
        raise ValueError(f"input length T={input_ids.shape[1]} exceeds max_seq_len={max_seq_len}")



def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups, empty ones dropped, in this order:

    - "matrix": hidden 2-D weight matrices (the linear maps inside blocks), Muon's share; a model
      opts in by declaring ``non_matrix_keywords``: without it no weight is called a matrix;
    - "decay": every other >=2-D weight (embeddings, readout, positional tables, the propagator);
    - "no_decay": ``p.ndim < 2`` or a ``no_decay_keywords`` match (norms, gains, biases, per-channel
      recurrence parameters), weight decay 0.

    "matrix" and "decay" both get ``weight_decay``: for AdamW or SGD the split changes nothing.
    """
    no_decay_keys: tuple[str, ...] = getattr(model, "no_decay_keywords", ("norm", "bias"))
    non_matrix_keys: tuple[str, ...] | None = getattr(model, "non_matrix_keywords", None)
    matrix, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in no_decay_keys):
            no_decay.append(p)
        elif non_matrix_keys is not None and p.ndim == 2 and not any(k in name for k in non_matrix_keys):
            matrix.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "matrix", "params": matrix, "weight_decay": weight_decay},
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
