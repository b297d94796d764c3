"""Truncated BPTT (``data.tbptt``): lanes of consecutive windows (SEMDataModule), a forward that
continues a carried state (SEMModel), the lanes that carry it from step to step and through a
checkpoint (TrainStep, sem.training.lanes), and the config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from sem.config.validate import validate
from sem.contracts import carries_training_state, model_output
from sem.data.corpus import TextFilesCorpus
from sem.data.datamodule import SEMDataModule
from sem.models.sem import SEMModel
from sem.models.transformer import TransformerLM
from sem.training.step import TrainStep
from tests.conftest import compose_cfg, tiny_data_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BOS = 256


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _model(**kw: object) -> SEMModel:
    torch.manual_seed(0)
    return SEMModel(d_model=32, n_layers=2, propagator_warmup_steps=0, **kw).eval()


# ------------------------------------------------------------------------------------------- model

LEVERS = [{"recurrence": "scan"}, {"recurrence": "fft"}, {"recurrence": "scan", "conv_width": 4},
          {"recurrence": "fft", "conv_width": 3}, {"recurrence": "scan", "conv_width": 4, "selective": True},
          {"recurrence": "fft", "modes": 4}, {"recurrence": "scan", "conv_width": 4, "modes": 3},
          {"heads": 4}, {"heads": 8, "conv_width": 4}, {"attention_every": 1, "attention_window": 16},
          {"attention_every": 2, "attention_window": 200, "conv_width": 4}]


@pytest.mark.parametrize("kw", LEVERS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_windows_with_a_carried_state_equal_one_forward_over_all_of_them(kw: dict) -> None:
    model = _model(**kw)
    x = _tokens(3, 96)
    with torch.no_grad():
        whole = model(x).logits
        parts, state = [], None
        for a in range(0, 96, 32):
            out = model(x[:, a:a + 32], state=state)
            parts.append(out.logits)
            state = out.state
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=2e-4, rtol=1e-4)
    shape = (3, 32) if kw.get("modes", 1) == 1 else (3, 32, kw["modes"])
    if kw.get("heads"):
        shape = (3, kw["heads"], 32 // kw["heads"], 32 // kw["heads"])
    assert len(state["h"]) == 2 and state["h"][0].shape == shape and state["h"][0].dtype == torch.complex64
    assert len(state["conv"]) == (2 if kw.get("conv_width") else 0)


@pytest.mark.parametrize("kw", LEVERS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_a_row_that_starts_a_document_starts_fresh(kw: dict) -> None:
    model = _model(**kw)
    x = _tokens(2, 24)
    with torch.no_grad():
        state = model(x).state
        nxt = _tokens(2, 24, seed=2)
        nxt[1, 0] = BOS
        carried, fresh = model(nxt, state=state).logits, model(nxt).logits
    torch.testing.assert_close(carried[1], fresh[1], atol=1e-4, rtol=1e-4)  # row 1: a new document
    assert (carried[0] - fresh[0]).abs().max() > 1e-3  # row 0 continues its context


def test_after_a_bos_inside_the_window_the_carried_state_is_not_added() -> None:
    """One block, no convolution: from the BOS on, the block's state is the window's own."""
    torch.manual_seed(0)
    model = SEMModel(d_model=32, n_layers=1, propagator_warmup_steps=0).eval()
    with torch.no_grad():
        state = model(_tokens(2, 24)).state
        nxt = _tokens(2, 24, seed=2)
        nxt[:, 9] = BOS
        carried, fresh = model(nxt, state=state).logits, model(nxt).logits
    torch.testing.assert_close(carried[:, 9:], fresh[:, 9:], atol=1e-5, rtol=1e-5)
    assert (carried[:, :9] - fresh[:, :9]).abs().max() > 1e-3


def test_gradients_stop_at_the_window() -> None:
    model = _model(conv_width=4).train()
    state = model(_tokens(2, 16)).state
    assert all(not t.requires_grad for t in [*state["h"], *state["conv"]])
    out = model(_tokens(2, 16, seed=3), targets=_tokens(2, 16, seed=4), state=state)
    out.loss.backward()
    assert model.blocks[0].in_proj.weight.grad is not None


def test_the_contract_says_which_models_carry_a_state() -> None:
    assert carries_training_state(SEMModel) and carries_training_state(_model())
    assert not carries_training_state(TransformerLM)

    class Plain(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    assert not carries_training_state(Plain())


# -------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory) -> SEMDataModule:
    root = tmp_path_factory.mktemp("lanes")
    rng = np.random.default_rng(0)
    for i in range(30):  # random bytes: each window can be found again in the train array
        (root / f"doc{i:02d}.bin").write_bytes(rng.integers(0, 256, 1500, dtype=np.uint8).tobytes())
    dm = SEMDataModule(TextFilesCorpus([str(root)]), batch_size=4, seq_len=16, val_fraction=0.2,
                       cache_dir=str(tmp_path_factory.mktemp("lanes_cache")), tbptt=4)
    dm.setup()
    return dm


def _where(dm: SEMDataModule, x: torch.Tensor) -> list[int]:
    hay = np.asarray(dm.cache.train, dtype=np.int64)
    out = []
    for row in x.numpy():
        hits = [s for s in np.flatnonzero(hay == row[0]) if np.array_equal(hay[s:s + len(row)], row)]
        out.append(hits[0] if len(hits) == 1 else -1)
    return out


def test_lanes_read_consecutive_windows_for_a_segment_then_jump(datamodule: SEMDataModule) -> None:
    dm = datamodule
    starts = [_where(dm, dm.train_batch(step)[0]) for step in range(9)]
    assert all(s >= 0 for row in starts for s in row)
    for step in range(1, 9):
        follows = [b == a + 16 for a, b in zip(starts[step - 1], starts[step])]
        assert all(follows) == dm.continues(step), step  # steps 1-3 and 5-7 continue; 4 and 8 jump
        assert any(follows) or not dm.continues(step)
    assert [dm.continues(s) for s in range(9)] == [False, True, True, True, False, True, True, True, False]
    assert starts[0] != starts[4] != starts[8]
    assert torch.equal(dm.train_batch(6)[0], dm.train_batch(6)[0])  # still a pure function of the step
    x, y = dm.train_batch(5)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_micro_batches_and_ranks_are_different_lanes(datamodule: SEMDataModule) -> None:
    dm = datamodule
    rows = {tuple(dm.train_batch(1, micro=j, rank=r, world_size=2)[0][:, 0].tolist()) for j in (0, 1) for r in (0, 1)}
    assert len(rows) == 4


def test_off_is_the_independent_windows_of_before(datamodule: SEMDataModule) -> None:
    dm = datamodule
    off = SEMDataModule(dm.corpus, batch_size=4, seq_len=16, val_fraction=0.2, cache_dir=dm.cache_dir)
    off.setup()
    assert not any(off.continues(s) for s in range(5))
    one = SEMDataModule(dm.corpus, batch_size=4, seq_len=16, val_fraction=0.2, cache_dir=dm.cache_dir, tbptt=1)
    one.setup()
    assert torch.equal(off.train_batch(3)[0], one.train_batch(3)[0])
    with pytest.raises(ValueError, match="data.tbptt"):
        SEMDataModule(dm.corpus, tbptt=-2)


# -------------------------------------------------------------------------------------- train step


def _train_step(dm: SEMDataModule, seed: int = 0) -> tuple[TrainStep, SEMModel]:
    torch.manual_seed(seed)
    model = SEMModel(d_model=32, n_layers=2, conv_width=4, propagator_warmup_steps=0)
    return TrainStep(model, continues=dm.continues), model


def _step(train_step: TrainStep, dm: SEMDataModule, step: int, micro: int = 2) -> list[float]:
    train_step.start(step)
    return [float(train_step.micro_loss(*dm.train_batch(step, micro=j), step)[0].detach()) for j in range(micro)]


def test_the_train_step_carries_each_micro_batchs_state_within_a_segment(datamodule: SEMDataModule) -> None:
    dm = datamodule
    train_step, model = _train_step(dm)
    seen: list[object] = []
    forward = model.forward

    def spy(input_ids: torch.Tensor, targets: torch.Tensor | None = None, state: object = None) -> object:
        seen.append(state)
        return forward(input_ids, targets, state)

    model.forward = spy  # type: ignore[method-assign]
    for step in range(6):
        _step(train_step, dm, step)
    carried = [s is not None for s in seen]  # two micro-batches per step
    assert carried == [False, False] + [True, True] * 3 + [False, False] + [True, True]
    # micro-batch j continues from micro-batch j's own state
    assert seen[2] is not seen[3]


def test_a_new_shape_or_a_gap_starts_fresh(datamodule: SEMDataModule) -> None:
    dm = datamodule
    train_step, _ = _train_step(dm)
    _step(train_step, dm, 0, micro=1)
    assert train_step.lanes.state_in(0, 1, (4, 16)) is not None
    assert train_step.lanes.state_in(0, 1, (4, 32)) is None  # a curriculum changed seq_len
    assert train_step.lanes.state_in(0, 2, (4, 16)) is None  # step 1 never ran (a rollback, a resume)
    assert train_step.lanes.state_in(1, 1, (4, 16)) is None  # no micro-batch 1 before


def test_the_carried_state_survives_a_checkpoint(datamodule: SEMDataModule) -> None:
    """Steps 0-1, a checkpoint (through torch.save with weights_only loading, as on disk), then step 2
    in a fresh train step and model: the same loss as step 2 of the uninterrupted run."""
    dm = datamodule
    train_step, model = _train_step(dm)
    for step in range(2):
        _step(train_step, dm, step)
    buffer = __import__("io").BytesIO()
    torch.save({"sem": train_step.state_dict(2), "model": model.state_dict()}, buffer)
    reference = _step(train_step, dm, 2)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again, fresh_model = _train_step(dm, seed=1)
    fresh_model.load_state_dict(saved["model"])
    again.load_state_dict(saved["sem"])
    assert _step(again, dm, 2) == pytest.approx(reference, abs=1e-6)
    without, other_model = _train_step(dm, seed=1)  # the same weights, no carried state: another loss
    other_model.load_state_dict(saved["model"])
    assert _step(without, dm, 2) != pytest.approx(reference, abs=1e-4)


def _rank_step(train_step: TrainStep, dm: SEMDataModule, step: int, rank: int, micro: int = 2) -> list[float]:
    train_step.start(step, rank)
    return [float(train_step.micro_loss(*dm.train_batch(step, rank=rank, world_size=2, micro=j), step)[0].detach())
            for j in range(micro)]


def test_every_ranks_lanes_survive_a_checkpoint(datamodule: SEMDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks (DDP: each reads its own lanes), steps 0-1, a checkpoint: it holds both ranks' lane
    states, and each rank resumes step 2 from its own. Rank 0's states on rank 1 (what a checkpoint of
    rank 0's alone gave) give another loss; at another world size the lanes start fresh."""
    import sem.training.lanes as lanes_module

    dm = datamodule
    ranks = [_train_step(dm) for _ in range(2)]  # the same weights (seed 0): the ranks of one DDP run
    for step in range(2):
        for r, (train_step, _) in enumerate(ranks):
            _rank_step(train_step, dm, step, r)
    gathered: list[object] = []  # what all_gather_object would give: each rank's own dict, in rank order
    monkeypatch.setattr(lanes_module, "every_rank", lambda mine: gathered.append(mine) or [mine])
    for train_step, _ in ranks:
        train_step.state_dict(2)
    monkeypatch.setattr(lanes_module, "every_rank", lambda mine: list(gathered))
    buffer = __import__("io").BytesIO()
    torch.save(ranks[0][0].state_dict(2), buffer)  # rank 0 writes the checkpoint
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["world"] == 2 and len(saved["carried_ranks"]) == 2
    reference = [_rank_step(train_step, dm, 2, r) for r, (train_step, _) in enumerate(ranks)]

    def resumed(rank: int, world: int, sem_state: dict) -> list[float]:
        monkeypatch.setattr(lanes_module, "rank_world", lambda: (rank, world))
        again, _ = _train_step(dm)
        again.load_state_dict(sem_state)
        return _rank_step(again, dm, 2, rank)

    for r in range(2):
        assert resumed(r, 2, saved) == pytest.approx(reference[r], abs=1e-6), r
    rank0_only = {k: v for k, v in saved.items() if k not in ("carried_ranks", "world")}
    assert resumed(1, 2, rank0_only) != pytest.approx(reference[1], abs=1e-4)  # not rank 1's lanes
    assert resumed(0, 1, rank0_only) == pytest.approx(reference[0], abs=1e-6)  # an older checkpoint, 1 process
    fresh = _train_step(dm)[0]
    assert resumed(0, 1, saved) == pytest.approx(_rank_step(fresh, dm, 2, 0), abs=1e-6)  # another world


def test_a_non_finite_state_restarts_at_zero(datamodule: SEMDataModule) -> None:
    dm = datamodule
    train_step, model = _train_step(dm)
    _step(train_step, dm, 0, micro=1)
    step, shape, state = train_step.lanes.carried[0]
    state["h"][0][0, 0] = complex(float("nan"), 0.0)
    train_step.lanes.carried[0] = (step, shape, state)
    train_step.start(1)
    out = model_output(model, *dm.train_batch(1), state=train_step.lanes.state_in(0, 1, shape))
    assert not torch.isfinite(out.loss)  # what a poisoned lane would do
    train_step.micro_loss(*dm.train_batch(1), 1)
    assert all(bool(torch.isfinite(t).all()) for t in train_step.lanes.carried[0][2]["h"])


# ------------------------------------------------------------------------------------------ config


@pytest.fixture(scope="module")
def base(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return tiny_data_overrides(corpus_dir, cache_dir)


def _problems(base: list[str], *overrides: str) -> list[str]:
    cfg = compose_cfg([*base, *overrides])
    return validate(cfg, instantiate(cfg.data.corpus))


def test_config_checks_name_the_key_and_the_value(base: list[str]) -> None:
    assert _problems(base, "data.tbptt=8") == []
    assert _problems(base, "data.tbptt=-1") == [
        "data.tbptt=-1: must be an integer >= 0 (K >= 2: lanes of K consecutive windows; 0: off)"]
    (line,) = _problems(base, "data.tbptt=8", "model=transformer_small", "data.seq_len=32")
    assert line.startswith("data.tbptt=8: model sem.models.transformer.TransformerLM carries no recurrent state")
    (line,) = _problems(base, "data.tbptt=8", "distillation=ema_teacher")
    assert line.startswith("data.tbptt=8: the distillation teacher")
