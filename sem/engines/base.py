"""``Engine``: what the recipe, the final stages and the dry run drive, whichever engine built it
(``LightningEngine`` for ``engine=lightning``, ``SEMTrainer`` for ``engine=standalone``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sem.training.step import TrainStep


@runtime_checkable
class Engine(Protocol):
    """An engine trains ``model`` through ``train_step`` (the step semantics both engines share) for
    ``max_steps`` optimizer steps, validates on demand and says what it is."""

    @property
    def model(self) -> nn.Module:
        """The model it trains (not a compiled or distributed wrapper: what checkpoints save)."""
        ...

    @property
    def train_step(self) -> TrainStep:
        """The step semantics it calls each optimizer step (curriculum, teacher, health, lanes)."""
        ...

    @property
    def device(self) -> torch.device:
        """The device it trains on."""
        ...

    @property
    def global_step(self) -> int:
        """Optimizer steps done."""
        ...

    @property
    def max_steps(self) -> int:
        """``trainer.max_steps``: where ``fit`` ends unless stopped."""
        ...

    @property
    def tokens_per_s(self) -> float | None:
        """Training tokens per second over the run so far (validation excluded); None before a step."""
        ...

    def fit(self, resume_from: str | None = None) -> None:
        """Train to ``max_steps`` (or a stop signal, or a sweeper's verdict), from the checkpoint
        ``resume_from`` (either engine's) when given."""
        ...

    def validate(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], final: bool = False) -> dict[str, float]:
        """Score the model on ``loader``'s windows: ``val/loss``, ``val/bpb``, ``val/windows``, ``final``.
        ``final``: the run's final validation (full precision)."""
        ...

    def describe(self) -> str:
        """One line for the run log: the engine and its device."""
        ...
