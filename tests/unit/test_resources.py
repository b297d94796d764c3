"""Resource guards (sem.config.resources): cores on CPU and the peak-memory estimate, ours and a user's model."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import sem.config.resources as resources
from sem.config.resources import MiB, core_problems, estimate_memory, largest_shape, memory_problems
from sem.training.budget import resolve_budget
from sem.training.restore import build_model
from tests.conftest import ROOT, compose_cfg

TINY = ["model=sem_tiny", "accelerator=cpu", "data.batch_size=4", "data.seq_len=32"]


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "cpu_cores", lambda: 2)


def test_cpu_processes_are_capped_by_the_cores_this_process_may_use(two_cores: None) -> None:
    (line,) = core_problems(compose_cfg([*TINY, "strategy=ddp", "trainer.devices=64"]))
    assert line.startswith("trainer.devices=64:") and "2 core(s)" in line and "trainer.devices<=2" in line
    assert core_problems(compose_cfg([*TINY, "strategy=ddp", "trainer.devices=2"])) == []


def test_threads_times_processes_are_capped_too(two_cores: None) -> None:
    (line,) = core_problems(compose_cfg([*TINY, "threads=100000"]))
    assert line.startswith("threads=100000:") and "threads<=2" in line
    (line,) = core_problems(compose_cfg([*TINY, "strategy=ddp", "trainer.devices=2", "threads=2"]))
    assert "2 processes x threads=2" in line and "threads<=1" in line
    assert core_problems(compose_cfg([*TINY, "strategy=ddp", "trainer.devices=2", "threads=1"])) == []
    assert core_problems(compose_cfg([*TINY, "threads=null"])) == []


def test_a_bad_devices_value_is_left_to_the_hardware_check(two_cores: None) -> None:
    assert core_problems(compose_cfg([*TINY, "trainer.devices=many"])) == []


def test_the_largest_shape_is_the_stage_with_most_tokens() -> None:
    cfg = {"data": {"batch_size": 8, "seq_len": 64},
           "curriculum": {"stages": [{"seq_len": 16, "batch_size": 64}, {"seq_len": 256, "batch_size": None},
                                     {"seq_len": 128, "batch_size": 16}]}}
    assert largest_shape(cfg) == (8, 256)
    assert largest_shape({"data": {"batch_size": 8, "seq_len": 64}, "curriculum": None}) == (8, 64)


def test_the_estimate_counts_the_real_models_tensors_exactly() -> None:
    cfg = compose_cfg(TINY)
    est = estimate_memory(cfg)
    plain, _ = resolve_budget(OmegaConf.to_container(cfg, resolve=True))
    model = build_model(plain["model"])  # for real, as a checkpoint is loaded
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert est.parts["params"] == real and est.parts["grads"] == real
    assert 2 * real <= est.parts["optimizer"] <= 2 * real + 64 * len(list(model.parameters()))  # AdamW moments
    assert est.parts["activations"] > 4 * 32 * 259 * 4  # at least the logits
    assert est.shape == (4, 32) and est.ranks == 1
    assert est.parts["teacher"] == 0
    with_teacher = estimate_memory(compose_cfg([*TINY, "distillation=ema_teacher"]))
    assert with_teacher.parts["teacher"] >= real
    assert "peak memory estimate:" in est.line() and "4 x 32 tokens" in est.line()


def test_activations_grow_linearly_with_the_batch() -> None:
    act = {b: estimate_memory(compose_cfg([*TINY, f"data.batch_size={b}"])).parts["activations"] for b in (4, 8, 16)}
    assert act[16] - act[4] == pytest.approx(3 * (act[8] - act[4]), rel=0.01)
    assert act[4] > 4 * 32 * 259 * 4  # at least the logits


def test_ranks_on_this_node_multiply_the_estimate(two_cores: None) -> None:
    one = estimate_memory(compose_cfg(TINY))
    two = estimate_memory(compose_cfg([*TINY, "strategy=ddp", "trainer.devices=2"]))
    assert two.ranks == 2 and two.total == 2 * one.total


def test_deep_models_are_extrapolated_from_one_and_two_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg([*TINY, "model.n_layers=12"])
    extrapolated = estimate_memory(cfg)
    monkeypatch.setattr(resources, "MEASURED_LAYERS", 100)
    built = estimate_memory(cfg)
    assert extrapolated.parts == built.parts


def test_a_run_that_cannot_fit_is_one_line_naming_the_estimate_and_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(TINY)
    monkeypatch.setattr(resources, "memory_available", lambda device: (64 * MiB, "a test's limit"))
    (line,), est = memory_problems(cfg)
    assert line.startswith("data.batch_size=4 data.seq_len=32:")
    assert f"{est.total / MiB:,.0f} MiB" in line and "64 MiB are available (a test's limit)" in line
    assert "model.d_model=" in line and "trainer.devices" in line
    monkeypatch.setattr(resources, "memory_available", lambda device: (10**15, "plenty"))
    assert memory_problems(cfg)[0] == []
    monkeypatch.setattr(resources, "memory_available", lambda device: (None, "unknown"))
    assert memory_problems(cfg)[0] == []


def test_a_users_model_is_estimated_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example package's GRU (examples/ext), as a user brings it: the estimate is by contract."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "ext"))
    est = estimate_memory(compose_cfg([*TINY, "~model", "+model._target_=userlm.GRULM", "+model.d_model=32",
                                       "+model.n_layers=1"]))
    import userlm

    real = sum(p.numel() * p.element_size() for p in userlm.GRULM(d_model=32).parameters())
    assert est.parts["params"] == real and est.parts["activations"] > 0


def test_an_estimate_that_cannot_be_made_is_no_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(cfg: object) -> None:
        raise RuntimeError("fake tensors cannot run this model")

    monkeypatch.setattr(resources, "estimate_memory", broken)
    assert memory_problems(compose_cfg(TINY)) == ([], None)


def test_memory_available_is_a_positive_figure_here() -> None:
    available, where = resources.memory_available("cpu")
    assert available is None or available > 0
    assert isinstance(where, str) and where
