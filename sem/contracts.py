"""What sem needs of the components it is given, written as ``typing.Protocol``s, and ``ModelOutput``,
the one result type a model may return. A leaf: every layer may import it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """What ``model(input_ids, targets)`` may return instead of bare logits: the model's own loss terms."""

    logits: torch.Tensor  # [B, T, V] float32
    loss: torch.Tensor | None  # ce_loss + unitary_lambda * unitary_divergence
    ce_loss: torch.Tensor | None  # mean nats/token over targets != -100
    unitary_divergence: torch.Tensor  # scalar float32: mean log(||psi_t||^2 / D)^2 entering norm_f
