"""sem/engines/fit.py: ``stream_bpb``, the summary's figure of the final checkpoint scoring every
held-out document whole (when the model carries its state and ``eval.stream`` is on)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from sem.data.tokenizer import ByteTokenizer
from sem.engines.fit import stream_bpb
from sem.models.sem import SEMModel
from sem.models.stream import stream_score
from sem.models.transformer import TransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEM = {"_target_": "sem.models.sem.SEMModel", "vocab_size": 259, "d_model": 16, "n_layers": 1, "max_seq_len": 64,
       "conv_width": 3}


def _built(tmp_path: Path, model: torch.nn.Module, node: dict[str, Any], stream: bool | None = True,
           quick: bool = False) -> SimpleNamespace:
    """What ``stream_bpb`` reads of a Built: the engine's model and device, the held-out tokens, the
    last checkpoint (a file holding the run's config, as a run writes it)."""
    config: dict[str, Any] = {"model": node}
    if stream is not None:  # a checkpoint written before eval.stream existed has none: on by default
        config["eval"] = {"stream": stream}
    path = tmp_path / "step_0000005.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 5,
                "sem": {"config": config}}, path)
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    val = np.concatenate([tok.encode(bytes(rng.integers(97, 123, n, dtype=np.uint8))) for n in (300, 90, 7)])
    datamodule = SimpleNamespace(cache=SimpleNamespace(val=val), val_seq_len=32, val_batch_size=2)
    engine = SimpleNamespace(model=model, device=torch.device("cpu"))
    return SimpleNamespace(engine=engine, datamodule=datamodule, checkpoint=SimpleNamespace(last=lambda: path),
                           quick=quick)


@pytest.mark.parametrize("stream", [True, None])
def test_stream_bpb_scores_the_final_checkpoint(tmp_path: Path, stream: bool | None) -> None:
    torch.manual_seed(0)
    model = SEMModel(**{k: v for k, v in SEM.items() if k != "_target_"})
    built = _built(tmp_path, model, SEM, stream=stream)
    model.set_step(5)  # as sem.load restores the propagator blend of the checkpoint's step
    expected = stream_score(model.eval(), built.datamodule.cache.val, 32, 2).bpb
    assert stream_bpb(built) == pytest.approx(expected, rel=1e-6)


def test_stream_bpb_is_skipped_when_off_quick_or_without_a_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SEMModel(**{k: v for k, v in SEM.items() if k != "_target_"})
    assert stream_bpb(_built(tmp_path, model, SEM, stream=False)) is None  # eval.stream=false
    assert stream_bpb(_built(tmp_path, model, SEM, quick=True)) is None  # trainer.fast_dev_run
    node = {"_target_": "sem.models.transformer.TransformerLM", "vocab_size": 259, "d_model": 16, "n_layers": 1,
            "n_heads": 2, "max_seq_len": 64}
    transformer = TransformerLM(**{k: v for k, v in node.items() if k != "_target_"})
    assert stream_bpb(_built(tmp_path, transformer, node)) is None  # a sliding window: not in the summary


def test_stream_bpb_never_fails_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = SEMModel(**{k: v for k, v in SEM.items() if k != "_target_"})
    built = _built(tmp_path, model, SEM)
    built.checkpoint.last().write_bytes(b"not a checkpoint")
    assert stream_bpb(built) is None
    assert "could not compute stream_bpb" in caplog.text
