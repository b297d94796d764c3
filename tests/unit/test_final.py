"""sem/engines/final.py: ``final_scores``, the summary's figures of the final checkpoint besides the final
validation: ``stream_bpb`` (every val document scored whole, when the model carries its state and
``eval.stream`` is on), and once, at the end, the test split's ``test_bpb`` (its windows),
``test_stream_bpb`` (its documents whole) and ``test_dynamic_bpb`` (whole, the weights learning;
``eval.dynamic.enabled``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from sem.data.tokenizer import ByteTokenizer
from sem.engines.final import final_scores
from sem.models.dynamic import DynamicSettings
from sem.models.sem import SEMModel
from sem.models.stream import dynamic_score, stream_rows, stream_score
from sem.models.transformer import TransformerLM
from sem.training.evaluation import score_windows
from sem.training.restore import load

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEM = {"_target_": "sem.models.sem.SEMModel", "vocab_size": 259, "d_model": 16, "n_layers": 1, "max_seq_len": 64,
       "conv_width": 3, "propagator_warmup_steps": 4}  # resolved, as a run's checkpoint holds it
TRANSFORMER = {"_target_": "sem.models.transformer.TransformerLM", "vocab_size": 259, "d_model": 16,
               "n_layers": 1, "n_heads": 2, "max_seq_len": 64}
VAL_SEQ_LEN, VAL_BATCH = 32, 2
KEYS = {"stream_bpb", "test_bpb", "test_stream_bpb", "test_dynamic_bpb"}


def _stream(seed: int, lengths: tuple[int, ...]) -> np.ndarray:
    """Documents of random lowercase bytes, packed as the token cache packs them (BOS bytes EOS)."""
    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    return np.concatenate([tok.encode(bytes(rng.integers(97, 123, n, dtype=np.uint8))) for n in lengths])


class FakeData:
    """What ``final_scores`` reads of a datamodule: the held-out token streams, the test windows (the
    tiling of ``SEMDataModule.test_windows``), has_test and the validation shape."""

    def __init__(self, has_test: bool = True) -> None:
        self.val = _stream(0, (300, 90, 7))
        self.test = _stream(1, (200, 150, 40)) if has_test else np.zeros(0, dtype=np.uint16)
        self.has_test = has_test
        self.val_seq_len, self.val_batch_size = VAL_SEQ_LEN, VAL_BATCH
        self.final_val_max_windows = None  # every window
        self.test_windows_read = 0

    def tokens(self, split: str) -> np.ndarray:
        return {"val": self.val, "test": self.test}[split]

    def test_windows(self, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        assert max_windows is None, "the final validation reads every window here: so does the test's"
        assert self.has_test, "final_scores read the test windows of a datamodule without a test split"
        self.test_windows_read += 1
        t = self.val_seq_len
        n = (self.test.size - 1) // t
        w = torch.from_numpy(self.test[np.arange(n)[:, None] * t + np.arange(t + 1)].astype(np.int64))
        return w[:, :-1], w[:, 1:]


def _built(tmp_path: Path, model: torch.nn.Module, node: dict[str, Any], stream: bool | None = True,
           quick: bool = False, has_test: bool = True, dynamic: dict[str, Any] | None = None) -> SimpleNamespace:
    """What ``final_scores`` reads of a Built: the engine's device, the datamodule, the last checkpoint
    (a file holding the run's config, as a run writes it), quick."""
    config: dict[str, Any] = {"model": node}
    if stream is not None or dynamic is not None:  # a checkpoint written before eval existed has none
        config["eval"] = {}
        if stream is not None:
            config["eval"]["stream"] = stream
        if dynamic is not None:
            config["eval"]["dynamic"] = dynamic
    path = tmp_path / "step_0000005.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 5,
                "sem": {"config": config}}, path)
    engine = SimpleNamespace(model=model, device=torch.device("cpu"))
    return SimpleNamespace(engine=engine, datamodule=FakeData(has_test), checkpoints=SimpleNamespace(last=lambda: path),
                           quick=quick)


def _sem() -> SEMModel:
    torch.manual_seed(0)
    return SEMModel(**{k: v for k, v in SEM.items() if k != "_target_"})


def _transformer() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(**{k: v for k, v in TRANSFORMER.items() if k != "_target_"})


ROWS = stream_rows(VAL_BATCH, VAL_SEQ_LEN)  # what final_scores (and sem.evaluate mode=stream) read


@pytest.mark.parametrize("stream", [True, None])
def test_stream_bpb_scores_the_final_checkpoint(tmp_path: Path, stream: bool | None) -> None:
    built = _built(tmp_path, _sem(), SEM, stream=stream)
    model, _ = load(built.checkpoints.last())  # as final_scores loads it: the propagator blend of step 5
    expected = stream_score(model, built.datamodule.tokens("val"), VAL_SEQ_LEN, ROWS).bpb
    scores = final_scores(built)
    assert set(scores) == KEYS
    assert scores["stream_bpb"] == pytest.approx(expected, rel=1e-6)


def test_test_figures_score_the_test_split_once(tmp_path: Path) -> None:
    built = _built(tmp_path, _sem(), SEM)
    dm = built.datamodule
    model, _ = load(built.checkpoints.last())
    x, y = dm.test_windows()
    dm.test_windows_read = 0
    scores = final_scores(built)
    assert scores["test_bpb"] == pytest.approx(score_windows(model, x, y, VAL_BATCH).bpb, rel=1e-6)
    assert scores["test_stream_bpb"] == pytest.approx(
        stream_score(model, dm.tokens("test"), VAL_SEQ_LEN, ROWS).bpb, rel=1e-6)
    assert scores["test_dynamic_bpb"] is None  # eval.dynamic.enabled not set
    assert dm.test_windows_read == 1
    # the test split is another text than val: its figures are not val's
    assert scores["test_stream_bpb"] != pytest.approx(scores["stream_bpb"], rel=1e-6)


def test_transformer_gets_test_figures_but_no_stream_bpb(tmp_path: Path) -> None:
    """The sliding window is not cheap: the summary leaves val's to sem.evaluate, but the test split is
    scored whole once (its test_stream_bpb), every model alike."""
    built = _built(tmp_path, _transformer(), TRANSFORMER)
    model, _ = load(built.checkpoints.last())
    scores = final_scores(built)
    assert scores["stream_bpb"] is None
    x, y = built.datamodule.test_windows()
    assert scores["test_bpb"] == pytest.approx(score_windows(model, x, y, VAL_BATCH).bpb, rel=1e-6)
    by_window = stream_score(model, built.datamodule.tokens("test"), VAL_SEQ_LEN, ROWS)
    assert by_window.method == "sliding_window"
    assert scores["test_stream_bpb"] == pytest.approx(by_window.bpb, rel=1e-6)


def test_no_test_split_no_test_figures(tmp_path: Path) -> None:
    built = _built(tmp_path, _sem(), SEM, has_test=False, dynamic={"enabled": True})
    scores = final_scores(built)
    assert scores["stream_bpb"] is not None
    assert scores["test_bpb"] is None and scores["test_stream_bpb"] is None and scores["test_dynamic_bpb"] is None


def test_stream_off_leaves_the_whole_document_figures_out(tmp_path: Path) -> None:
    scores = final_scores(_built(tmp_path, _sem(), SEM, stream=False))  # eval.stream=false
    assert scores["stream_bpb"] is None and scores["test_stream_bpb"] is None
    assert scores["test_bpb"] is not None  # the test windows are the report: always scored


@pytest.mark.parametrize("name", ["sem", "transformer"])
def test_dynamic_bpb_only_when_enabled_in_the_checkpoints_config(tmp_path: Path, name: str) -> None:
    net, node = (_sem(), SEM) if name == "sem" else (_transformer(), TRANSFORMER)
    dynamic = {"lr": 1e-3, "chunk": 16, "optimizer": "adam", "rows": 2}
    assert final_scores(_built(tmp_path, net, node, dynamic={"enabled": False, **dynamic}))["test_dynamic_bpb"] is None
    built = _built(tmp_path, net, node, dynamic={"enabled": True, **dynamic})
    model, _ = load(built.checkpoints.last())
    # dynamic_score changes the model in place: `model` is a fresh copy of the checkpoint's weights
    # the context of a forward: val_seq_len, the static stream's window
    expected = dynamic_score(model, built.datamodule.tokens("test"), DynamicSettings(**dynamic), VAL_SEQ_LEN)
    scores = final_scores(built)
    assert scores["test_dynamic_bpb"] == pytest.approx(expected.bpb, rel=1e-5)
    assert scores["test_dynamic_bpb"] != pytest.approx(scores["test_stream_bpb"], rel=1e-6)  # it did learn
    # the other figures are the unadapted checkpoint's (the dynamic figure is computed last)
    fresh, _ = load(built.checkpoints.last())
    assert scores["test_stream_bpb"] == pytest.approx(
        stream_score(fresh, built.datamodule.tokens("test"), VAL_SEQ_LEN, ROWS).bpb, rel=1e-6)


def test_nothing_when_quick(tmp_path: Path) -> None:
    built = _built(tmp_path, _sem(), SEM, quick=True, dynamic={"enabled": True})  # trainer.fast_dev_run
    assert final_scores(built) == dict.fromkeys(KEYS)
    assert built.datamodule.test_windows_read == 0


def test_final_scores_never_fail_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    built = _built(tmp_path, _sem(), SEM)
    built.checkpoints.last().write_bytes(b"not a checkpoint")
    assert final_scores(built) == dict.fromkeys(KEYS)
    assert "could not load" in caplog.text
    caplog.clear()
    # one figure that fails (an optimizer that cannot be imported) leaves the others
    built = _built(tmp_path, _sem(), SEM, dynamic={"enabled": True, "optimizer": "no.such.Optimizer", "chunk": 16})
    scores = final_scores(built)
    assert scores["test_dynamic_bpb"] is None and "could not compute test_dynamic_bpb" in caplog.text
    assert None not in (scores["stream_bpb"], scores["test_bpb"], scores["test_stream_bpb"])
