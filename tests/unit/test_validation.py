"""sem.config.validate.validate: each cross-field problem is one line naming the key and the value, and
every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sem.config.validate import validate
from tests.conftest import compose_cfg, tiny_data_overrides


@pytest.fixture(scope="module")
def base(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return tiny_data_overrides(corpus_dir, cache_dir)


def problems_of(base: list[str], *overrides: str) -> list[str]:
    cfg: DictConfig = compose_cfg([*base, *overrides])
    return validate(cfg, instantiate(cfg.data.corpus))


def lines_with(problems: list[str], *needles: str) -> list[str]:
    return [p for p in problems if all(n in p for n in needles)]


def test_tiny_config_has_no_problems(base: list[str]) -> None:
    assert problems_of(base) == []


# (overrides, substrings the one line must hold: the key and the offending value)
SINGLE = {
    "warmup_plus_decay_over_max_steps": (
        ["scheduler.warmup_steps=10", "scheduler.decay_fraction=0.5"], ["scheduler", "10", "max_steps=12"]),
    "lr_zero": (["optimizer.lr=0"], ["optimizer.lr=0"]),
    "lr_negative": (["optimizer.lr=-0.5"], ["optimizer.lr=-0.5"]),
    "muon_adamw_lr_zero": (["optimizer=muon", "optimizer.adamw_lr=0"], ["optimizer.adamw_lr=0"]),
    "muon_momentum_one": (["optimizer=muon", "optimizer.momentum=1.0"], ["optimizer.momentum=1.0"]),
    "missing_data_path": (["data.corpus.paths=[/no/such/dir/x.txt]"], ["data.corpus.paths", "/no/such/dir/x.txt"]),
    "stage_seq_len_over_max": (["curriculum=two_stage", "model.max_seq_len=512"],
                               ["curriculum.stages[1]", "seq_len=1024", "512"]),
    "resume_missing": (["resume=/no/such/run/last.ckpt"], ["resume=", "/no/such/run/last.ckpt"]),
    "run_name_dotdot": (["run.name=../elsewhere"], ["run.name=", "../elsewhere", ".."]),
    "engine_unknown": (["engine=deepspeed"], ["engine=", "deepspeed"]),
    "standalone_multi_device": (["engine=standalone", "trainer.devices=2"], ["engine=standalone", "trainer.devices=2"]),
    "standalone_ddp": (["engine=standalone", "strategy=ddp"], ["engine=standalone", "strategy=ddp"]),
    "devices_zero": (["trainer.devices=0"], ["trainer.devices=0", ">= 1"]),
    "devices_negative": (["trainer.devices=-3"], ["trainer.devices=-3"]),
    "devices_words": (["trainer.devices=many"], ["trainer.devices='many'"]),
    "devices_repeated": (["trainer.devices=[0,0]"], ["trainer.devices=", "twice"]),
    "num_nodes_zero": (["trainer.num_nodes=0"], ["trainer.num_nodes=0"]),
    "join_timeout_zero": (["strategy=ddp", "strategy.join_timeout_s=0"], ["strategy.join_timeout_s=0", "[1,"]),
    "fsdp_on_cpu": (["strategy=fsdp"], ["strategy=fsdp", "CPU", "strategy=ddp"]),
    "nccl_on_cpu": (["strategy=ddp", "strategy.backend=nccl"], ["strategy.backend=nccl", "cpu"]),
    "backend_unknown": (["strategy=ddp", "strategy.backend=carrier_pigeon"], ["strategy.backend='carrier_pigeon'"]),
    "stall_stop_under_ddp": (["strategy=ddp", "trainer.devices=2", "health.stall.action=stop"],
                             ["health.stall.action=stop", "warn"]),
    "seed_negative": (["seed=-1"], ["seed=-1", "2**32"]),
    "seed_too_big": (["seed=4294967296"], ["seed=4294967296", "2**32"]),
    "trainer_arg_typo": (["+trainer.limit_val_batchs=2"], ["trainer.limit_val_batchs", "limit_val_batches"]),
    "trainer_arg_set_by_sem": (["+trainer.logger=false"], ["trainer.logger", "logger="]),
    "fast_dev_run_negative": (["trainer.fast_dev_run=-1"], ["trainer.fast_dev_run=-1"]),
    "standalone_profiler": (["engine=standalone", "trainer.profiler=simple"], ["trainer.profiler", "engine=standalone"]),
    "standalone_tensorboard": (["engine=standalone", "logger=tensorboard"], ["logger.tensorboard", "engine=standalone"]),
    "heads_not_dividing_d_model": (["model.heads=5"], ["model.heads=5", "model.d_model="]),
    "heads_with_modes": (["model.heads=2", "model.modes=2"], ["model.heads=2", "model.modes=2"]),
    "attention_every_over_n_layers": (["model.attention_every=9"], ["model.attention_every=9", "model.n_layers="]),
    "attention_window_zero": (["model.attention_window=0"], ["model.attention_window=0"]),
    "born_power_zero": (["model.born_power=0"], ["model.born_power=0", "> 0"]),
    "born_power_with_linear_readout": (["model.readout=linear", "model.born_power=4"],
                                       ["model.born_power=4", "model.readout=linear"]),
    "born_offset_nan": (["model.born_offset=nan"], ["model.born_offset=nan", "finite"]),
    "born_offset_with_linear_readout": (["model.readout=linear", "model.born_offset=2"],
                                        ["model.born_offset=2", "model.readout=linear"]),
}


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_single_problem_is_one_line_naming_key_and_value(base: list[str], case: str) -> None:
    overrides, needles = SINGLE[case]
    problems = problems_of(base, *overrides)
    assert len(problems) == 1, problems
    assert lines_with(problems, *needles), (needles, problems)
    assert "\n" not in problems[0]


def test_seq_len_over_model_max_names_both_keys(base: list[str]) -> None:
    problems = problems_of(base, "data.seq_len=64", "model.max_seq_len=48")
    assert len(lines_with(problems, "data.seq_len=64", "model.max_seq_len=48")) == 1, problems


def test_batch_size_not_positive(base: list[str]) -> None:
    problems = problems_of(base, "data.batch_size=0")
    assert len(lines_with(problems, "data.batch_size=0")) == 1, problems


@pytest.mark.parametrize("override", ["data.seq_len=4096", "data.batch_size=0"])
def test_one_bad_data_value_is_reported_once(base: list[str], override: str) -> None:
    assert len(problems_of(base, override)) == 1


def test_run_name_absolute_path(base: list[str]) -> None:
    problems = problems_of(base, "run.name=/tmp/abs")
    assert len(lines_with(problems, "run.name=", "/tmp/abs")) == 1, problems


def test_existing_resume_file_is_accepted(base: list[str], tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    assert problems_of(base, f"resume={ckpt}") == []
    assert problems_of(base, "resume=auto") == []


def test_every_problem_reported_at_once(base: list[str]) -> None:
    overrides = ["optimizer.lr=-1", "scheduler.warmup_steps=20", "trainer.max_steps=10",
                 "run.name=../x", "engine=fast", "resume=/no/such.ckpt",
                 "curriculum=two_stage", "model.max_seq_len=512"]
    problems = problems_of(base, *overrides)
    expected = [("optimizer.lr=-1",), ("scheduler", "max_steps=10"), ("run.name=",),
                ("engine=",), ("resume=",), ("curriculum.stages[1]", "seq_len=1024")]
    for needles in expected:
        assert len(lines_with(problems, *needles)) == 1, (needles, problems)
    assert len(problems) == len(expected), problems


def _built_model(base: list[str], *overrides: str) -> torch.nn.Module:
    """The model a run builds from ``base`` + ``overrides``: composed, valid, resolved as a run resolves it."""
    from omegaconf import OmegaConf

    from sem.training.budget import resolve_budget
    from sem.training.restore import build_model

    cfg = compose_cfg([*base, *overrides])
    assert validate(cfg, instantiate(cfg.data.corpus)) == []
    resolved, _ = resolve_budget(OmegaConf.to_container(cfg, resolve=True))
    return build_model(resolved["model"])


def test_born_power_reaches_the_model(base: list[str]) -> None:
    # The key is the model's, end to end: composed, valid, and the built model's logits are b times
    # those of the same weights at b = 1 (the Born rule's).
    model = _built_model(base, "model.born_power=4")
    assert model.born_power == 4.0
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        sharp = model(x).logits
        model.born_power = 1.0
        torch.testing.assert_close(sharp, 4.0 * model(x).logits)


def test_born_offset_reaches_the_model(base: list[str]) -> None:
    # model.born_offset=2: the built model has a reference amplitude 2 + 0i per token, and its logits
    # move when the offset does (it reaches _logits, not only the constructor).
    model = _built_model(base, "model.born_offset=2")
    offset = model.readout_offset.view(-1, 2)
    assert torch.equal(offset, torch.tensor([[2.0, 0.0]]).expand_as(offset))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        with_offset = model(x).logits
        model.readout_offset.zero_()
        assert not torch.allclose(with_offset, model(x).logits)
