"""``compile=true``: the training forward and backward go through torch.compile (StepPolicy.forward),
for any model (a user's plain logits model too), with the model's parameters and state_dict untouched
and the same loss and gradients as the model run as it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sem.training.step import StepPolicy


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
    policy = StepPolicy(model, compile=compile)
    policy.start(0)
    loss, _ = policy.micro_loss(x, y, 0)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_the_compiled_forward_runs_and_gives_the_models_loss_and_gradients() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = LogitsOnly()
    keys = list(model.state_dict())
    x = torch.randint(0, 259, (2, 12))
    y = torch.randint(0, 259, (2, 12))
    eager_loss, eager_grads = _loss_and_grads(model, False, x, y)
    torch._dynamo.reset()
    counters.clear()
    loss, grads = _loss_and_grads(model, True, x, y)
    assert counters["stats"]["unique_graphs"] >= 1  # the step went through a compiled graph
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
    assert list(model.state_dict()) == keys  # no wrapper's prefix in what checkpoints save
    torch._dynamo.reset()


def test_without_compile_the_model_runs_as_it_is() -> None:
    policy = StepPolicy(LogitsOnly())
    assert policy.forward is None


@pytest.mark.slow  # compiles the SEM's graph: ~20-40 s on 2 cores
def test_sem_compiled_matches_eager() -> None:
    from sem.models.sem import SEMModel

    torch.manual_seed(0)
    model = SEMModel(d_model=16, n_layers=2, conv_width=4, attention_every=2, attention_window=8,
                     propagator_warmup_steps=0)
    x = torch.randint(0, 259, (2, 16))
    y = torch.randint(0, 259, (2, 16))
    eager_loss, eager_grads = _loss_and_grads(model, False, x, y)
    torch._dynamo.reset()
    loss, grads = _loss_and_grads(model, True, x, y)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()


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
