"""Lanes: the recurrent state carried from one optimizer step to the next under truncated BPTT
(``data.tbptt``), kept per micro-batch, saved in checkpoints for every rank.

Under truncated BPTT a batch's rows are lanes that read on through the corpus: ``continues(step)``
(``SEMDataModule.continues``) says whether step's batch continues the lanes of step - 1, and then each
micro-batch's forward starts from the state its own lanes ended step - 1 with. Plain PyTorch: no
Lightning, no Hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sem.data.datamodule import rank_world
from sem.training.distributed import every_rank

# What a model's forward returns as its state (``ModelOutput.state``): a tree of dicts, lists and
# tuples of tensors, the model's own layout.
State = Any
# One micro-batch's lanes after a step: (the step, the batch's shape [B, T], the state it ended with)
Carried = tuple[int, tuple[int, ...], State]


class Lanes:
    """Each micro-batch's carried state ``{micro index: (step, shape, state)}``; ``continues`` None:
    truncated BPTT is off (every forward starts fresh, nothing is kept)."""

    def __init__(self, continues: Callable[[int], bool] | None = None) -> None:
        self.continues = continues
        self.carried: dict[int, Carried] = {}

    def state_in(self, micro: int, step: int, shape: tuple[int, ...]) -> State | None:
        """The state micro-batch ``micro`` of ``step`` starts from: what the same micro-batch of step - 1
        left, when the batch continues its lanes at the same shape; None (fresh) otherwise: a segment's
        first step, a curriculum's new shape, a rollback, a resume without the state."""
        if self.continues is None or not self.continues(step):
            return None
        before = self.carried.get(micro)
        if before is None or before[0] != step - 1 or before[1] != shape:
            return None
        return before[2]

    def keep(self, micro: int, step: int, shape: tuple[int, ...], state: State) -> None:
        """What micro-batch ``micro`` of ``step`` (its batch of ``shape``) ended with, for step + 1
        (detached; a non-finite entry restarts at zero). Nothing when truncated BPTT is off."""
        if self.continues is not None:
            self.carried[micro] = (step, shape, tree_map(finite_or_zero, state))

    def state_dict(self) -> dict[str, Any]:
        """``carried``: rank 0's lane states (all of them in one process), ``carried_ranks``: every
        rank's, ``world``. A collective under DDP when truncated BPTT is on (every rank builds the
        checkpoint's dict: ``CheckpointCallback.save``)."""
        mine = {str(j): {"step": s, "shape": list(shape), "state": tree_map(lambda t: t.cpu(), state)}
                for j, (s, shape, state) in self.carried.items()}
        ranks = every_rank(mine) if self.continues is not None else [mine]
        return {"carried": ranks[0], "carried_ranks": ranks, "world": len(ranks)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """This rank's lane states from a checkpoint's ``sem`` dict, onto ``device``; none when it was
        written at another world size (each lane starts fresh, as at a segment's start: a cautious rule,
        since a rank's lanes can be the same windows at another world size when its batch is the same)."""
        rank, world = rank_world()
        if "carried_ranks" in state:
            ranks = state["carried_ranks"] or []
            mine = ranks[rank] if int(state.get("world", len(ranks))) == world and rank < len(ranks) else {}
        else:  # written before the lanes of every rank were kept: one process's
            mine = state.get("carried") if world == 1 else {}
        self.carried = {int(j): (int(c["step"]), tuple(c["shape"]), tree_map(lambda t: t.to(device), c["state"]))
                        for j, c in (mine or {}).items()}


def tree_map(fn: Callable[[torch.Tensor], torch.Tensor], tree: State) -> State:
    """``fn`` on every tensor of a tree of dicts, lists and tuples (a model's carried state)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """A carried state with a non-finite entry (a step the health policy held back) restarts at zero
    there rather than poisoning the lane's next windows (on the device: no host sync)."""
    t = t.detach()
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))
