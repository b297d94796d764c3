"""sem/contracts.py: how sem calls a model of any kind, and reads a corpus of any kind; and the checks
that hold a component sem has never seen to these contracts (sem/config/components.py, sem/data/user_corpus.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sem.config.components import (
    factory_contract,
    model_contract_problems,
    optimizer_problems,
    optimizer_schedule_problems,
    output_problems,
    scheduler_problems,
)
from sem.contracts import (
    Corpus,
    LanguageModel,
    ModelOutput,
    OptimizerFactory,
    SchedulerFactory,
    cross_entropy,
    documents_of,
    model_kwargs,
    model_output,
)
from sem.data.corpus import StdlibCorpus, TextFilesCorpus
from sem.data.user_corpus import as_corpus, corpus_contract_problems


class LogitsOnly(nn.Module):
    def __init__(self, vocab_size: int = 259) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class OwnLoss(LogitsOnly):
    """Written against earlier versions: ``ModelOutput(logits, loss, ce_loss, unitary_divergence)``,
    positionally, its loss already holding its term."""

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        logits = self.embed(input_ids)
        extra = torch.tensor(0.25)
        ce = cross_entropy(logits, targets) if targets is not None else None
        return ModelOutput(logits, None if ce is None else ce + extra, ce, extra)


class AuxLoss(LogitsOnly):
    """Today's way: its own weighted term in ``aux_losses``, the loss left to sem."""

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        logits = self.embed(input_ids)
        reg = 0.5 * self.embed.weight.pow(2).mean()
        return ModelOutput(logits, aux_losses={"my_reg": reg}, metrics={"my_norm": self.embed.weight.norm()})


def test_bare_logits_get_sems_cross_entropy_and_no_terms() -> None:
    model, x, y = LogitsOnly(), torch.randint(0, 259, (2, 5)), torch.randint(0, 259, (2, 5))
    out = model_output(model, x, y)
    torch.testing.assert_close(out.ce_loss, cross_entropy(model(x), y))
    assert out.loss is out.ce_loss and out.aux_losses == {} and out.logged() == {}
    assert model_output(model, x).loss is None


def test_a_model_of_earlier_versions_keeps_its_loss_and_its_logged_divergence() -> None:
    model, x, y = OwnLoss(), torch.randint(0, 259, (2, 5)), torch.randint(0, 259, (2, 5))
    out = model_output(model, x, y)
    assert float((out.loss - out.ce_loss).detach()) == pytest.approx(0.25)  # its loss as it made it
    assert out.logged() == {"unitary_div": torch.tensor(0.25)}  # train/unitary_div, unweighted, as before
    assert out.aux_losses == {}  # already inside its loss: not added again
    by_name = ModelOutput(logits=out.logits, loss=out.loss, ce_loss=out.ce_loss, unitary_divergence=torch.tensor(2.0),
                          state={"h": 1})
    assert by_name.metrics == {"unitary_div": torch.tensor(2.0)} and by_name.state == {"h": 1}
    assert ModelOutput(out.logits, out.loss, out.ce_loss, torch.tensor(2.0), {"h": 1}).state == {"h": 1}


def test_aux_losses_are_summed_into_the_loss_and_logged_by_name() -> None:
    model, x, y = AuxLoss(), torch.randint(0, 259, (2, 5)), torch.randint(0, 259, (2, 5))
    out = model_output(model, x, y)
    reg = 0.5 * model.embed.weight.pow(2).mean()
    torch.testing.assert_close(out.ce_loss, cross_entropy(model.embed(x), y))
    torch.testing.assert_close(out.loss, out.ce_loss + reg)
    out.loss.backward()  # the term trains: its gradient reaches the weights with the CE's
    assert sorted(out.logged()) == ["my_norm", "my_reg"]
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in out.logged().values())
    # a ce_loss of the model's own, loss left None: the loss is still ce + the terms
    given = ModelOutput(out.logits, ce_loss=torch.tensor(1.0), aux_losses={"a": torch.tensor(0.5)})
    assert float(model_output(_Returning(given), x, y).loss) == pytest.approx(1.5)


class _Returning(nn.Module):
    def __init__(self, out: ModelOutput) -> None:
        super().__init__()
        self.out = out

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        return self.out


def test_a_forward_returning_something_else_names_the_contract() -> None:
    class Bad(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> list:
            return [1, 2]

    with pytest.raises(TypeError, match="logits"):
        model_output(Bad(), torch.zeros(1, 2, dtype=torch.long))


def test_retired_arguments_of_a_model_are_dropped() -> None:
    """A config (a checkpoint's) of an earlier version holds an argument the class no longer takes."""

    class Slimmer(LogitsOnly):
        retired_arguments = ("unitary_lambda",)

    assert model_kwargs(Slimmer, {"unitary_lambda": 0.0, "vocab_size": 300}) == {"vocab_size": 300}
    assert model_kwargs(LogitsOnly, {"unitary_lambda": 0.0}) == {"unitary_lambda": 0.0, "vocab_size": 259}


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


# ------------------------------------------------------------------ the Protocols, as validation holds them


def test_sems_components_meet_the_protocols(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("x")
    assert isinstance(LogitsOnly(), LanguageModel)
    for corpus in (StdlibCorpus(), TextFilesCorpus(paths=[str(tmp_path / "a.txt")]), as_corpus(object())):
        assert isinstance(corpus, Corpus)
    assert not isinstance(object(), Corpus)
    assert factory_contract(OptimizerFactory) == ("torch.optim.Optimizer", torch.optim.Optimizer)
    assert factory_contract(SchedulerFactory) == ("torch.optim.lr_scheduler.LRScheduler",
                                                  torch.optim.lr_scheduler.LRScheduler)


def test_a_corpus_without_documents_is_one_line() -> None:
    problems = corpus_contract_problems("data.corpus", as_corpus(object()))
    assert len(problems) == 1 and "no documents()" in problems[0] and "sem.contracts.Corpus" in problems[0]


class VectorTerm(LogitsOnly):
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        logits = self.embed(input_ids)
        return ModelOutput(logits, aux_losses={"per_row": logits.mean((1, 2))} if targets is not None else {})


def test_the_probe_checks_the_models_own_terms() -> None:
    """The terms only appear with targets: the probe runs the model with them too."""
    for cls in (LogitsOnly, OwnLoss, AuxLoss):
        assert model_contract_problems("model", cls, {"_target_": f"{__name__}.{cls.__qualname__}"}) == ([], None)
    problems, _ = model_contract_problems("model", VectorTerm, {"_target_": f"{__name__}.VectorTerm"})
    assert problems == [f"model: {__name__}.VectorTerm.forward(input_ids, targets) returned aux_losses['per_row'] of "
                        "shape [2]; the model contract (sem.contracts.ModelOutput) wants a scalar tensor"]


def test_output_problems_name_each_term() -> None:
    logits, one = torch.zeros(1, 2, 259), torch.tensor(1.0)
    out = ModelOutput(logits, one, one, aux_losses={"loss": one, "reg": one}, metrics={"reg": one, "n": 3})
    problems = output_problems("model", "M.forward", out)
    assert len(problems) == 3, problems
    assert "aux_losses['loss']: 'loss' is not a name of its own" in problems[0]
    assert "metrics['n'] of int" in problems[1]
    assert "'reg' in both aux_losses and metrics" in problems[2]
    old = ModelOutput(logits, one, one, 0.0)  # earlier versions' field given a float
    assert output_problems("model", "M.forward", old) == [
        "model: M.forward returned unitary_divergence of float; the model contract (sem.contracts.ModelOutput) "
        "wants a scalar tensor"]


def _returns_a_dict(params):
    return {"params": params}


def _returns_a_plain_object(optimizer):
    return object()


NOT_CALLABLE = 3


@pytest.mark.parametrize(("node", "needle"), [
    ({"_target_": "torch.nn.Linear"}, "Linear is not a torch.optim.Optimizer (the optimizer contract, "
                                      "sem.contracts.OptimizerFactory"),
    ({"_target_": f"{__name__}.NOT_CALLABLE"}, "NOT_CALLABLE': not callable (an object of type int)"),
    ({"_target_": f"{__name__}._returns_a_dict"}, "returned dict; the optimizer contract "
                                                  "(sem.contracts.OptimizerFactory) wants a torch.optim.Optimizer"),
])
def test_an_optimizer_factory_is_held_to_its_protocol(node: dict, needle: str) -> None:
    problems = optimizer_problems(node)
    assert len(problems) == 1 and needle in problems[0], problems


def test_a_scheduler_factory_is_held_to_its_protocol() -> None:
    problems = scheduler_problems({"_target_": "torch.optim.SGD"})
    assert len(problems) == 1 and "SGD is not a torch.optim.lr_scheduler.LRScheduler" in problems[0], problems
    assert scheduler_problems({"_target_": f"{__name__}._returns_a_plain_object"}) == []  # a callable: built below
    problems = optimizer_schedule_problems({"_target_": "torch.optim.SGD", "lr": 0.1},
                                           {"_target_": f"{__name__}._returns_a_plain_object"})
    assert problems == [f"scheduler: {__name__}._returns_a_plain_object(optimizer=SGD, ...) returned object; the "
                        "scheduler contract (sem.contracts.SchedulerFactory) wants a torch.optim.lr_scheduler.LRScheduler"]
