"""Scoring a trained model on fixed windows, as a run validates (``score_windows``): the sums of
``val_sums``, so the same windows in the same batches on the same device give the same bpb."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sem.training.step import val_sums


@dataclass
class Score:
    """Sums over scored windows."""

    nats: float  # total cross-entropy over every target
    tokens: int  # targets
    bytes: int  # targets that are bytes (the bpb denominator)
    windows: int

    @property
    def loss(self) -> float:
        return self.nats / self.tokens  # nats/token

    @property
    def bpb(self) -> float:
        return self.nats / math.log(2) / self.bytes


@torch.no_grad()
def score_windows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  device: torch.device | str = "cpu", advance: Callable[[int], None] | None = None) -> Score:
    """Cross-entropy sums of ``model`` over windows x, y [n, T], ``batch_size`` windows at a time.

    The sums are the training run's validation sums (``sem.training.step.val_sums``: a batch's
    loss summed in float64), so the same windows in the same batches on the same device give the same bpb.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, byte targets, windows
    for i in range(0, len(x), batch_size):
        sums += val_sums(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
        if advance is not None:
            advance(min(batch_size, len(x) - i))
    nats, tokens, n_bytes, windows = (float(v) for v in sums)
    return Score(nats, int(tokens), int(n_bytes), int(windows))
