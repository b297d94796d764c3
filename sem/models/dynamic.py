"""Dynamic evaluation: ``sem.models.stream.dynamic_score`` (Krause et al., 2018, "Dynamic Evaluation of
Neural Sequence Models"): every document scored whole, as ``stream_score`` scores it, but the model learns
as it reads: each chunk of ``chunk`` tokens is scored first, then the model takes one gradient step on
that chunk's cross-entropy. A chunk is always scored by weights that saw only earlier bytes, so the total
stays a valid code length: a decoder holding the same weights and optimizer replays the same updates, as
a PPMd decoder replays PPMd's counts.

The weights carry across documents (not reset at each): what the model learns of one file of a corpus
(its names, its idioms) helps with the next, as PPMd's statistics and the xz window carry across the
whole held-out stream its anchors are measured on. The documents are dealt into ``rows`` lanes read
side by side (``lanes``), one step per chunk of every lane; a model that carries its recurrent state
(``forward(..., state)``: SEM) carries it from chunk to chunk of a document (gradients stop at the
chunk) and starts each document afresh, any other model reads each chunk after up to ``context - chunk``
tokens of its document as context.

This module holds its settings and their check, light (no torch): the config schema and its validation
read the same defaults as ``sem.models.stream.dynamic_score`` without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

# Optimizers dynamic evaluation knows by name; any other value is a dotted path of a
# torch.optim.Optimizer class (``torch.optim.RMSprop``).
OPTIMIZERS: dict[str, str] = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}

@dataclass(frozen=True)
class DynamicSettings:
    """How dynamic evaluation adapts: ``lr`` of ``optimizer`` (sgd, adam, adamw or a dotted class path), one
    step per ``chunk`` tokens of each document, up to ``rows`` documents side by side per step."""

    # Chosen on val (the default run's final checkpoint, CPython 3.11 stdlib, 2026-12-07): Adam at 3e-4 beat
    # 3e-5 / 1e-4 / 1.5e-4 / 5e-4 / 1e-3 and SGD; each halving of the chunk gained (128: -0.153 bpb,
    # 64: -0.189, 32: -0.222) at about 1.6x the cost (195 / 247 / 387 s per MB on 2 cores); 4 rows
    # beat 16 (few steps while one long document holds a lane) and 2 (twice the steps). Rescreened at
    # chunks of 32 the same evening: lr 2e-4 1.3102, 3e-4 1.3108, 4.5e-4 1.3368 (flat below 3e-4); chunks
    # of 16 1.2911 (-0.020) at twice the cost (8: 1.2980), -0.015 to -0.019 on test (4 checkpoints):
    # ``dynamic.chunk=16`` for the better code length.
    lr: float = 3e-4
    chunk: int = 32
    optimizer: str = "adam"
    rows: int = 4

    @classmethod
    def of(cls, node: dict) -> DynamicSettings:
        """The settings of a config node (``eval.dynamic``, sem.evaluate's ``dynamic``): its keys but ``enabled``."""
        return cls(**{k: v for k, v in dict(node).items() if k != "enabled"})

    def problems(self, prefix: str = "dynamic") -> list[str]:
        p = []
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr >= 0:
            p.append(f"{prefix}.lr={self.lr!r}: must be a number >= 0")
        for key in ("chunk", "rows"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                p.append(f"{prefix}.{key}={v!r}: must be a positive integer")
        if not isinstance(self.optimizer, str) or (self.optimizer not in OPTIMIZERS and "." not in self.optimizer):
            p.append(f"{prefix}.optimizer={self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)} or a "
                     "dotted path of a torch.optim.Optimizer class")
        return p
