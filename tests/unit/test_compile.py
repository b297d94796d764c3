"""``compile=true``: the training forward and backward go through torch.compile (TrainStep.forward),
for any model (a user's plain logits model too), with the model's parameters and state_dict untouched
and the same loss and gradients as the model run as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sem.config.hardware import COMPILE_AUTO_MIN_STEPS, compile_choice, compile_missing
from sem.training.compiled import compiled_forward
from sem.training.step import TrainStep
from tests.conftest import compose_cfg, tiny_data_overrides

needs_inductor = pytest.mark.skipif(compile_missing("cpu") is not None,
                                    reason=f"torch.compile cannot build CPU kernels here: {compile_missing('cpu')}")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    """Each test compiles afresh and leaves no compiled state behind, whether it passes or not."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class LogitsOnly(nn.Module):
    """A user's model by the bare contract: forward(input_ids) -> logits [B, T, V], no targets."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(259, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 259)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


def _loss_and_grads(model: nn.Module, compile: bool, x: torch.Tensor, y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    train_step = TrainStep(model, forward=compiled_forward(model) if compile else None)
    train_step.start(0)
    loss, _ = train_step.micro_loss(x, y, 0)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@needs_inductor
def test_the_compiled_forward_runs_and_gives_the_models_loss_and_gradients() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = LogitsOnly()
    keys = list(model.state_dict())
    x = torch.randint(0, 259, (2, 12))
    y = torch.randint(0, 259, (2, 12))
    eager_loss, eager_grads = _loss_and_grads(model, False, x, y)
    counters.clear()
    loss, grads = _loss_and_grads(model, True, x, y)
    assert counters["stats"]["unique_graphs"] >= 1  # the step went through a compiled graph
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
    assert list(model.state_dict()) == keys  # no wrapper's prefix in what checkpoints save


def test_without_compile_the_model_runs_as_it_is() -> None:
    assert TrainStep(LogitsOnly()).forward is None


@needs_inductor
@pytest.mark.slow  # compiles the SEM's graph: ~10-40 s on 2 cores
def test_sem_compiles_whole_and_matches_eager() -> None:
    from torch._dynamo.utils import counters

    from sem.models.sem import SEMModel

    torch.manual_seed(0)
    model = SEMModel(d_model=16, n_layers=2, conv_width=4, attention_every=2, attention_window=8,
                     propagator_warmup_steps=0)
    x = torch.randint(0, 259, (2, 16))
    y = torch.randint(0, 259, (2, 16))
    eager_loss, eager_grads = _loss_and_grads(model, False, x, y)
    counters.clear()
    loss, grads = _loss_and_grads(model, True, x, y)
    # One graph for the whole forward (and its backward): a break (a hand-written backward that writes
    # into slices, kernels.py) leaves SEMModel.forward itself eager and only pieces of it compiled.
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5)


def test_compile_true_without_a_cpp_compiler_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf
    from torch._inductor import cpp_builder

    from sem.config.hardware import hardware_problems

    cfg = OmegaConf.create({"accelerator": {"name": "cpu"}, "precision": {"precision": "32-true"}, "compile": True})
    assert hardware_problems(cfg) == []  # this machine has one (CI builds the kernels in test_sem_compiled_...)

    def no_compiler() -> str:
        raise cpp_builder.exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    problems = hardware_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith("compile=true: ") and "C++ compiler" in problems[0]
    assert hardware_problems(OmegaConf.merge(cfg, {"compile": False})) == []  # not asked for: not checked


@pytest.mark.parametrize("engine", ["lightning", "standalone"])
def test_compile_true_reaches_the_train_step_of_either_engine(engine: str, one_thread: None, tmp_path: Path,
                                                               corpus_dir: Path, cache_dir: Path) -> None:
    from hydra.utils import instantiate

    from sem.engines.build import build, resolve_lengths

    def train_step(*extra: str) -> TrainStep:
        cfg, budget = resolve_lengths(compose_cfg([*tiny_data_overrides(corpus_dir, cache_dir), f"engine={engine}",
                                                   *extra]))
        return build(cfg, tmp_path / "_".join(extra or ("eager",)), instantiate(cfg.data.corpus),
                     budget=budget).engine.train_step

    assert train_step("compile=false").forward is None
    compiled = train_step("compile=true")
    assert compiled.forward is not None and compiled.forward._orig_mod is compiled.model
    # auto (the default): eager for a run too short to pay a cold compile back, compiled for a long one
    assert train_step().forward is None
    assert train_step(f"trainer.max_steps={COMPILE_AUTO_MIN_STEPS}", "trainer.val_check_interval=100").forward is not None


def test_compile_auto_compiles_long_runs_of_models_it_pays_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from sem.config import hardware
    from sem.models.transformer import TransformerLM

    class Pays(LogitsOnly):
        compile_pays = True

    pays, plain = Pays(), LogitsOnly()
    assert compile_choice(True, 1, "cpu", plain) == (True, "compile=true")
    assert compile_choice(False, 10**6, "cpu", pays) == (False, "compile=false")
    short, why = compile_choice("auto", COMPILE_AUTO_MIN_STEPS - 1, "cpu", pays)
    assert not short and f"trainer.max_steps={COMPILE_AUTO_MIN_STEPS - 1}" in why
    monkeypatch.setattr(hardware, "compile_missing", lambda device: None)
    assert compile_choice("auto", COMPILE_AUTO_MIN_STEPS, "cpu", pays)[0] is True
    # a model that does not say compiling pays (a user's, the Transformer baseline) stays eager under auto
    for model in (plain, TransformerLM(d_model=16, n_layers=1, n_heads=2, max_seq_len=16)):
        eager, why = compile_choice("auto", 10**6, "cpu", model)
        assert not eager and type(model).__name__ in why and "compile_pays" in why
    monkeypatch.setattr(hardware, "compile_missing", lambda device: "a C++ compiler (g++ or $CXX; none found)")
    missing, why = compile_choice("auto", 10**6, "cpu", pays)
    assert not missing and "C++ compiler" in why  # eager, said why: never a config error under auto


@pytest.mark.parametrize("value", ["maybe", 1, "yes"])
def test_a_compile_setting_other_than_true_false_auto_is_a_config_error(value: Any) -> None:
    from omegaconf import OmegaConf

    from sem.config.hardware import hardware_problems

    cfg = OmegaConf.create({"accelerator": {"name": "cpu"}, "precision": {"precision": "32-true"}, "compile": value})
    assert hardware_problems(cfg) == [f"compile={value!r}: must be true, false or auto"]
