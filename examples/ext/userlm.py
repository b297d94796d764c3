"""A user's own components for sem, in a package of their own (nothing in sem is edited):
a GRU byte language model and a corpus of one document per line of a text file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


class GRULM(nn.Module):
    """Embedding -> GRU -> linear: ``forward(input_ids [B, T])`` returns logits ``[B, T, V]``.
    That is the whole model contract; sem computes the cross-entropy."""

    def __init__(self, vocab_size: int = 259, d_model: int = 64, n_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rnn = nn.GRU(d_model, d_model, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(input_ids))
        return self.head(hidden)


class LinesCorpus:
    """Each non-empty line of a text file is a document (names ``line_000001``, ...)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def documents(self) -> Iterator[tuple[str, str]]:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip():
                yield f"line_{i:06d}", line + "\n"
