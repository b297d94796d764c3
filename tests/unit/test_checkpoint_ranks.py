"""CheckpointCallback on two ranks: every rank takes the same checkpoint decisions, so none waits alone
in a collective. The ranks are two threads whose strategy's collectives meet at a threading.Barrier
with a timeout: a rank that enters a collective the other never does fails there instead of hanging."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sem.engines.lightning.callbacks import CheckpointCallback
from sem.engines.lightning.module import SEMLightningModule
from sem.training.checkpoint import CheckpointManager

COLLECTIVE_TIMEOUT_S = 10.0


class ThreadRanks:
    """The collectives of ``world`` ranks that are threads of this process (broadcast, barrier)."""

    def __init__(self, world: int = 2) -> None:
        self.meet = threading.Barrier(world, timeout=COLLECTIVE_TIMEOUT_S)
        self.slot: list[Any] = [None]
        self.calls: dict[int, list[str]] = {r: [] for r in range(world)}

    def strategy(self, rank: int) -> SimpleNamespace:
        def broadcast(obj: Any, src: int = 0) -> Any:
            self.calls[rank].append("broadcast")
            if rank == src:
                self.slot[0] = obj
            self.meet.wait()  # rank src has written
            value = self.slot[0]
            self.meet.wait()  # every rank has read
            return value

        def barrier(name: str | None = None) -> None:
            self.calls[rank].append("barrier")
            self.meet.wait()

        return SimpleNamespace(broadcast=broadcast, barrier=barrier)


class FailsOnce(CheckpointManager):
    """Rank zero's manager: its first save fails as a full disk does (returns None, nothing written)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures = 1

    def save(self, payload: dict[str, Any], **kwargs: Any) -> Path | None:
        if self.failures:
            self.failures -= 1
            return None
        return super().save(payload, **kwargs)


def _rank(ranks: ThreadRanks, rank: int, step: int) -> tuple[Any, Any]:
    trainer = SimpleNamespace(
        is_global_zero=rank == 0, global_step=step, world_size=2, strategy=ranks.strategy(rank),
        _checkpoint_connector=SimpleNamespace(dump_checkpoint=lambda weights_only=False: {"state_dict": {}}))
    module = SimpleNamespace(last_train={"stage": None}, config=None)
    return trainer, module


def _run_ranks(body: Any) -> dict[int, BaseException | None]:
    errors: dict[int, BaseException | None] = {}

    def target(rank: int) -> None:
        try:
            body(rank)
            errors[rank] = None
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            errors[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * COLLECTIVE_TIMEOUT_S)
    return errors


def test_a_save_that_failed_on_rank_zero_is_retried_by_every_rank(tmp_path: Path) -> None:
    """The periodic save at the last step fails on rank zero: at the end of training both ranks save
    again, together (before, rank one counted the failed save as done and rank zero saved alone)."""
    ranks = ThreadRanks()
    managers = {0: FailsOnce(tmp_path / "ckpt", every_n_steps=4), 1: CheckpointManager(tmp_path / "ckpt", every_n_steps=4)}

    def body(rank: int) -> None:
        callback = CheckpointCallback(managers[rank])
        trainer, module = _rank(ranks, rank, step=4)
        callback.save(trainer, module)  # the periodic save of step 4: fails on rank 0
        callback.on_train_end(trainer, module)  # save_on_exit: retried

    errors = _run_ranks(body)
    assert errors == {0: None, 1: None}, errors
    assert ranks.calls[0] == ranks.calls[1] == ["broadcast", "broadcast"], ranks.calls
    assert managers[0].last_saved_step == managers[1].last_saved_step == 4
    assert (tmp_path / "ckpt" / "step_0000004.ckpt").exists()


def test_a_save_every_rank_agrees_on_is_not_repeated(tmp_path: Path) -> None:
    ranks = ThreadRanks()
    managers = {r: CheckpointManager(tmp_path / "ckpt", every_n_steps=4) for r in range(2)}

    def body(rank: int) -> None:
        callback = CheckpointCallback(managers[rank])
        trainer, module = _rank(ranks, rank, step=4)
        callback.save(trainer, module)
        callback.on_train_end(trainer, module)  # step 4 is saved: nothing more

    assert _run_ranks(body) == {0: None, 1: None}
    assert ranks.calls[0] == ranks.calls[1] == ["broadcast"], ranks.calls
    assert managers[1].last_saved_step == 4


def test_one_process_saves_without_a_collective_of_its_own(tmp_path: Path) -> None:
    """A single-device strategy's broadcast returns its argument: the callback needs nothing else."""
    manager = CheckpointManager(tmp_path / "ckpt", every_n_steps=0)
    trainer = SimpleNamespace(is_global_zero=True, global_step=3, world_size=1,
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
                              _checkpoint_connector=SimpleNamespace(dump_checkpoint=lambda weights_only=False: {}))
    CheckpointCallback(manager).on_train_end(trainer, SimpleNamespace(last_train={}, config=None))
    assert manager.last_saved_step == 3 and (tmp_path / "ckpt" / "step_0000003.ckpt").exists()


@pytest.mark.parametrize("world", [1, 2])
def test_a_ranks_own_signal_flushes_only_one_process(world: int) -> None:
    """With more ranks a stop signal must not make one rank read back (and replay gate events) alone:
    the stop is decided together on logging and checkpoint steps, which flush on every rank."""
    module = SimpleNamespace(signals=SimpleNamespace(received="SIGTERM"),
                             trainer=SimpleNamespace(max_steps=100, world_size=world),
                             checkpoints=CheckpointManager("unused", every_n_steps=10))
    flush = partial(SEMLightningModule._flush_due, module)
    assert flush(5, logging=False) is (world == 1)
    assert flush(9, logging=False) and flush(5, logging=True) and flush(99, logging=False)  # due, logging, last
    module.signals.received = None
    assert not flush(5, logging=False)
