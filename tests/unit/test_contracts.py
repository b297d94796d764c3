"""sem/contracts.py: how sem calls a model of any kind, and reads a corpus of any kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sem.contracts import ModelOutput, cross_entropy, documents_of, model_kwargs, model_output


class LogitsOnly(nn.Module):
    def __init__(self, vocab_size: int = 259) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class OwnLoss(LogitsOnly):
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        logits = self.embed(input_ids)
        extra = torch.tensor(0.25)
        ce = cross_entropy(logits, targets) if targets is not None else None
        return ModelOutput(logits, None if ce is None else ce + extra, ce, extra)


def test_bare_logits_get_sems_cross_entropy() -> None:
    model, x, y = LogitsOnly(), torch.randint(0, 259, (2, 5)), torch.randint(0, 259, (2, 5))
    out = model_output(model, x, y)
    torch.testing.assert_close(out.ce_loss, cross_entropy(model(x), y))
    assert out.loss is out.ce_loss and float(out.unitary_divergence) == 0.0
    assert model_output(model, x).loss is None


def test_a_model_with_its_own_loss_terms_keeps_them() -> None:
    model, x, y = OwnLoss(), torch.randint(0, 259, (2, 5)), torch.randint(0, 259, (2, 5))
    out = model_output(model, x, y)
    assert float((out.loss - out.ce_loss).detach()) == pytest.approx(0.25)


def test_a_forward_returning_something_else_names_the_contract() -> None:
    class Bad(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> list:
            return [1, 2]

    with pytest.raises(TypeError, match="logits"):
        model_output(Bad(), torch.zeros(1, 2, dtype=torch.long))


def test_vocab_size_is_passed_only_where_taken() -> None:
    assert model_kwargs(LogitsOnly, {"_target_": "x.Y"}) == {"vocab_size": 259}
    assert model_kwargs(LogitsOnly, {"vocab_size": 300}) == {"vocab_size": 300}

    class NoVocab(nn.Module):
        def __init__(self, width: int = 3) -> None:
            super().__init__()

    assert model_kwargs(NoVocab, {"width": 4}) == {"width": 4}


def test_documents_are_pairs_of_name_and_bytes() -> None:
    class Corpus:
        def documents(self):
            yield "a", "text é"
            yield ("b", b"\x00raw")

    assert list(documents_of(Corpus())) == [("a", "text é".encode()), ("b", b"\x00raw")]

    class Bad:
        def documents(self):
            yield "just a string"

    with pytest.raises(TypeError, match="corpus contract"):
        list(documents_of(Bad()))


def test_targets_go_only_to_a_parameter_named_targets() -> None:
    """A second positional parameter of another name (a recurrent state, a mask) never gets the targets."""
    seen = {}

    class WithState(LogitsOnly):
        def forward(self, input_ids: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
            seen["state"] = state
            return self.embed(input_ids)

    x, y = torch.randint(0, 259, (2, 5)), torch.randint(0, 259, (2, 5))
    model_output(WithState(), x, y)
    assert seen["state"] is None
