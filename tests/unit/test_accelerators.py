"""XPU (and CUDA) proven without the hardware: ``sem/engines/lightning/xpu.py`` and the composition of
``accelerator=xpu|cuda`` into a Lightning Trainer, on this CPU machine, with ``torch.xpu`` /
``torch.cuda`` faked as Lightning's own tests fake them (PLATFORM.md: Trainer construction does not
touch the device, ``fit`` does). Covers the three traps of a custom accelerator that would otherwise
only show on real hardware: the strategy's device, autocast's device and dtype, and IPEX's import."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pytest
import pytorch_lightning as pl  # imported here, once: 3 s of torch and Lightning, not inside a test
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.accelerators import AcceleratorRegistry, CUDAAccelerator
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import sem.app
import sem.plan.dry_run
from sem.engines.build import build, resolve_lengths
from sem.engines.lightning import xpu as xpu_module
from sem.engines.lightning.precision import SEMPrecisionPlugin
from sem.engines.lightning.xpu import XPUAccelerator
from tests.conftest import CONF, compose_cfg, run_launch, tiny_data_overrides

IPEX = "intel_extension_for_pytorch"
GIB = 2**30


# ----------------------------------------------------------------------------------- the fakes


@dataclass
class FakeXPU:
    """What the fake ``torch.xpu`` was asked (a dry run or a Trainer construction must ask nothing)."""

    count: int = 2
    set_device_calls: list[Any] = field(default_factory=list)
    stats_asked: list[Any] = field(default_factory=list)

    def memory_allocated(self, device: Any = None) -> int:
        self.stats_asked.append(device)
        return 3 * GIB

    def memory_reserved(self, device: Any = None) -> int:
        return 5 * GIB


@pytest.fixture
def fake_xpu(monkeypatch: pytest.MonkeyPatch) -> FakeXPU:
    """Two Intel GPUs with bf16 and no FP64 (an Arc A770, as torch would describe it)."""
    fake = FakeXPU()
    props = types.SimpleNamespace(name="Fake Arc A770", total_memory=16 * GIB, has_fp64=False,
                                  has_bfloat16_conversions=True)
    patches = {
        "is_available": lambda: True,
        "device_count": lambda: fake.count,
        "memory_allocated": fake.memory_allocated,
        "memory_reserved": fake.memory_reserved,
        "set_device": fake.set_device_calls.append,
        "get_device_properties": lambda device=None: props,
        "is_bf16_supported": lambda including_emulation=True: True,
        "empty_cache": lambda: None,
        "synchronize": lambda device=None: None,
    }
    for name, value in patches.items():
        monkeypatch.setattr(torch.xpu, name, value)
    return fake


@pytest.fixture
def no_xpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as it is, said explicitly (the tests also pass on a machine that has an XPU)."""
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 0)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """One CUDA GPU with bf16 (Lightning counts GPUs with torch.cuda.device_count)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.fixture
def registry() -> Iterator[Any]:
    """Lightning's accelerator registry without "xpu", restored afterwards (it is process-global)."""
    saved = dict(AcceleratorRegistry)
    AcceleratorRegistry.pop("xpu", None)
    yield AcceleratorRegistry
    AcceleratorRegistry.clear()
    AcceleratorRegistry.update(saved)


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_steps=1, **kwargs)


# --------------------------------------------------------------------------- 1. registration


def test_register_makes_the_string_xpu_resolve_to_XPUAccelerator(registry: Any, fake_xpu: FakeXPU) -> None:
    with pytest.raises(ValueError, match="invalid accelerator name"):
        _trainer(accelerator="xpu")  # Lightning 2.6 knows no "xpu" of its own
    others = set(registry)
    xpu_module.register()
    xpu_module.register()  # idempotent (a plain second register raises in Lightning)
    assert set(registry) == others | {"xpu"}
    assert registry["xpu"]["accelerator"] is XPUAccelerator
    assert registry["xpu"]["description"] == "XPUAccelerator"
    trainer = _trainer(accelerator="xpu", devices=1)
    assert isinstance(trainer.accelerator, XPUAccelerator)
    assert fake_xpu.set_device_calls == []  # construction does not touch the device


def test_registered_xpu_without_hardware_is_refused_by_lightning(registry: Any, no_xpu: None) -> None:
    xpu_module.register()
    with pytest.raises(MisconfigurationException, match="XPUAccelerator` can not run on your system"):
        _trainer(accelerator="xpu")


# --------------------------------------------------------------------------- 2. device parsing


@pytest.mark.parametrize(("devices", "ids"), [
    (1, [0]), (2, [0, 1]), ("2", [0, 1]), ("0,1", [0, 1]), ("1,", [1]), ([1], [1]), ("auto", [0, 1]),
    (-1, [0, 1]), ("-1", [0, 1]), (OmegaConf.create([1]), [1]),  # trainer.devices=[1] arrives as a ListConfig
])
def test_parse_devices_with_two_xpus(fake_xpu: FakeXPU, devices: Any, ids: list[int]) -> None:
    parsed = XPUAccelerator.parse_devices(devices)
    assert parsed == ids
    # Lightning's connector hands the parsed ids to get_parallel_devices
    assert XPUAccelerator.get_parallel_devices(parsed) == [torch.device("xpu", i) for i in ids]


@pytest.mark.parametrize("devices", [3, [2], "0,2", 0])
def test_devices_this_machine_lacks_are_refused_naming_the_key(fake_xpu: FakeXPU, devices: Any) -> None:
    with pytest.raises(ValueError, match=r"trainer\.devices=.*has 2 XPU device"):
        XPUAccelerator.parse_devices(devices)


def test_auto_device_count_and_availability(fake_xpu: FakeXPU, monkeypatch: pytest.MonkeyPatch) -> None:
    assert XPUAccelerator.is_available() and XPUAccelerator.auto_device_count() == 2
    assert XPUAccelerator.name() == "xpu"
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert not XPUAccelerator.is_available() and XPUAccelerator.auto_device_count() == 0


def test_device_stats_come_from_the_device_asked_about(fake_xpu: FakeXPU, monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("xpu", 1)
    stats = XPUAccelerator().get_device_stats(device)
    assert stats == {"allocated_bytes": 3 * GIB, "reserved_bytes": 5 * GIB}
    assert fake_xpu.stats_asked == [device]
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert XPUAccelerator().get_device_stats(device) == {}  # DeviceStatsMonitor on a lost device: empty


def test_setup_device_sets_the_xpu_and_refuses_any_other(fake_xpu: FakeXPU) -> None:
    XPUAccelerator().setup_device(torch.device("xpu", 1))
    assert fake_xpu.set_device_calls == [torch.device("xpu", 1)]
    with pytest.raises(ValueError, match="device should be xpu, got cpu"):  # PLATFORM trap 1, were it to recur
        XPUAccelerator().setup_device(torch.device("cpu"))


# ------------------------------------------------- 3 and 6. accelerator=xpu|cuda into a Trainer


def _base(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return [o for o in tiny_data_overrides(corpus_dir, cache_dir) if not o.startswith("accelerator=")]


def _built(overrides: list[str], run_dir: Path) -> Any:
    """What ``sem.engines.build`` builds for a run, up to the Trainer (no fit)."""
    cfg, budget = resolve_lengths(compose_cfg(overrides))
    return build(cfg, run_dir, instantiate(cfg.data.corpus), budget=budget)


@pytest.mark.parametrize(("precision", "resolved", "dtype", "scaler"), [
    ("auto", "bf16-mixed", torch.bfloat16, False),
    ("fp16_mixed", "16-mixed", torch.float16, True),
])
def test_accelerator_xpu_builds_a_trainer_on_the_xpu(fake_xpu: FakeXPU, one_thread: None, tmp_path: Path,
                                                    corpus_dir: Path, cache_dir: Path, precision: str,
                                                    resolved: str, dtype: torch.dtype, scaler: bool) -> None:
    built = _built([*_base(corpus_dir, cache_dir), "accelerator=xpu", f"precision={precision}"], tmp_path)
    trainer = built.engine.trainer
    assert isinstance(trainer.accelerator, XPUAccelerator)
    assert trainer.strategy.root_device == torch.device("xpu", 0)  # trap 1: Lightning alone says cpu
    plugin = trainer.precision_plugin
    assert isinstance(plugin, SEMPrecisionPlugin)  # trap 2: not Lightning's MixedPrecision(device="cuda")
    assert (plugin.precision, plugin.device) == (resolved, "xpu")
    with plugin.forward_context():
        assert torch.is_autocast_enabled("xpu") and torch.get_autocast_dtype("xpu") == dtype
        assert not torch.is_autocast_enabled("cuda")
    if scaler:  # fp16 needs a grad scaler, and it must be the XPU's
        assert plugin.scaler is not None and plugin.scaler._device == "xpu"
    else:
        assert plugin.scaler is None
    assert f"autocast(xpu, {'bf16' if dtype == torch.bfloat16 else 'fp16'}" in built.precision_note
    assert fake_xpu.set_device_calls == []  # built, not set up: nothing ran on the device
    assert all(p.device.type == "cpu" for p in built.engine.model.parameters())


@pytest.mark.parametrize("devices", ["[1]", "'1,'"])
def test_accelerator_xpu_on_the_second_xpu_runs_there(fake_xpu: FakeXPU, one_thread: None, tmp_path: Path,
                                                       corpus_dir: Path, cache_dir: Path, devices: str) -> None:
    built = _built([*_base(corpus_dir, cache_dir), "accelerator=xpu", f"trainer.devices={devices}"], tmp_path)
    assert built.engine.trainer.strategy.root_device == torch.device("xpu", 1)


def test_accelerator_cuda_builds_a_trainer_on_the_gpu(fake_cuda: None, one_thread: None, tmp_path: Path,
                                                     corpus_dir: Path, cache_dir: Path) -> None:
    built = _built([*_base(corpus_dir, cache_dir), "accelerator=cuda", "precision=auto"], tmp_path)
    trainer = built.engine.trainer
    assert isinstance(trainer.accelerator, CUDAAccelerator)
    assert trainer.strategy.root_device == torch.device("cuda", 0)
    plugin = trainer.precision_plugin
    assert isinstance(plugin, SEMPrecisionPlugin)
    assert (plugin.precision, plugin.device, plugin.scaler) == ("bf16-mixed", "cuda", None)
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    assert "autocast(cuda, bf16)" in built.precision_note


# ------------------------------------------------------------------ 4. no XPU: one clear line


@pytest.mark.skipif(torch.xpu.is_available(), reason="this machine has an XPU")
def test_accelerator_xpu_without_an_xpu_is_one_line_exit_2(tmp_path: Path, cache_dir: Path) -> None:
    proc = run_launch(["accelerator=xpu", "trainer.max_steps=1"], cwd=tmp_path, timeout=120,
                      env={"SEM_CACHE_DIR": str(cache_dir)})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1, output[-3000:]
    assert "accelerator=xpu" in errors[0] and "no Intel XPU" in errors[0] and "accelerator=cpu" in errors[0]
    assert not (tmp_path / "outputs").exists()  # rejected before Hydra wrote anything


# ------------------------------------------ 5. the user's dry run, on a faked XPU, in-process


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def _app(cfg: Any) -> float | None:
    """launch.py's app (the same ``sem.app.main``), with the config dir named absolutely."""
    return sem.app.main(cfg)


@pytest.fixture
def hydra_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A Hydra app run inside pytest leaves logging, HydraConfig and torch threads changed: restore them."""
    root = logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()
    monkeypatch.setattr(sem.app, "_main_started", False)
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    HydraConfig.instance().cfg = None
    torch.set_num_threads(threads)


@dataclass
class ProbeRecord:
    devices: list[torch.device] = field(default_factory=list)
    autocast: list[tuple[bool, torch.dtype]] = field(default_factory=list)


def test_dry_run_three_stage_on_xpu_builds_everything_and_trains_nothing(
        fake_xpu: FakeXPU, hydra_in_process: None, one_thread: None, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, corpus_dir: Path, cache_dir: Path) -> None:
    # The dry run's timing probe trains a copy of the model on the run's device: on a faked XPU that
    # is the one step that needs the hardware ("Torch not compiled with XPU enabled"). Record where it
    # would run and under which autocast instead, with timings of a plausible size.
    probe = ProbeRecord()

    def fake_probe(model: Any, optimizer: Any, shapes: list[tuple[int, int]], val_shape: tuple[int, int],
                   device: Any, context: Any = None, **_: Any) -> tuple[dict[tuple[int, int], float], float]:
        probe.devices.append(device)
        with context():
            probe.autocast.append((torch.is_autocast_enabled("xpu"), torch.get_autocast_dtype("xpu")))
        return {shape: 0.01 * shape[0] * shape[1] / 8192 for shape in shapes}, 1e-3

    monkeypatch.setattr(sem.plan.dry_run, "probe_seconds", fake_probe)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["launch.py", *_base(corpus_dir, cache_dir), "accelerator=xpu",
                                      "curriculum=three_stage", "dry_run=true", f"hydra.run.dir={run_dir}"])
    sem.app.cli(_app)  # returns: a dry run exits 0

    assert probe.devices == [torch.device("xpu", 0)]
    assert probe.autocast == [(True, torch.bfloat16)]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["probe"]["device"] == "xpu:0"
    stages = list(dict.fromkeys(s["stage"] for s in plan["segments"]))
    assert stages == ["s512", "s1024", "s2048"]
    assert {(s["seq_len"], s["batch_size"]) for s in plan["segments"]} == {(512, 8), (1024, 4), (2048, 2)}
    assert (run_dir / "plots" / "schedule.png").stat().st_size > 0
    assert fake_xpu.set_device_calls == []  # no accelerator set-up, so no fit
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))


# ----------------------------------------------------------------- 7. IPEX stays optional


class _RaisingOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An installed IPEX 2.8 next to torch 2.13: found, prints a version error, raises AttributeError."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name == IPEX else None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        print("ERROR! Intel Extension for PyTorch needs torch 2.8.*, found 2.13.0", file=sys.stderr)
        raise AttributeError("module 'torch._C' has no attribute '_has_xpu_fake'\n(and a second line)")


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """As if IPEX had never been looked for in this process; INFO from the XPU module captured."""
    monkeypatch.setattr(xpu_module, "_ipex_note", None)
    monkeypatch.delitem(sys.modules, IPEX, raising=False)
    caplog.set_level(logging.INFO, logger=xpu_module.__name__)
    return caplog


def _ipex_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == xpu_module.__name__ and IPEX in r.getMessage()]


def _set_up_twice() -> None:
    XPUAccelerator().setup_device(torch.device("xpu", 0))
    XPUAccelerator().setup_device(torch.device("xpu", 1))  # a second set-up (a second fit) says nothing


def test_ipex_not_installed_is_said_once(fake_xpu: FakeXPU, fresh_process: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, IPEX, None)  # import raises ModuleNotFoundError, installed or not
    _set_up_twice()
    assert _ipex_lines(fresh_process) == [
        f"{IPEX} not used: not installed (XPU is native in torch {torch.__version__})"]
    assert all(r.levelno == logging.INFO for r in fresh_process.records if r.name == xpu_module.__name__)
    assert len(fake_xpu.set_device_calls) == 2  # the accelerator is set up anyway, on native torch.xpu


def test_ipex_whose_import_raises_attribute_error_is_not_used(fake_xpu: FakeXPU, monkeypatch: pytest.MonkeyPatch,
                                                              fresh_process: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "meta_path", [_RaisingOnImport(), *sys.meta_path])
    _set_up_twice()
    lines = _ipex_lines(fresh_process)
    assert lines == [f"{IPEX} not used: import failed: AttributeError: module 'torch._C' has no attribute "
                     "'_has_xpu_fake' (and a second line)"]
    assert "\n" not in lines[0]
    assert IPEX not in sys.modules  # the failed import left nothing half-initialised behind
    assert len(fake_xpu.set_device_calls) == 2


def test_ipex_that_imports_is_used_and_named_with_its_version(fake_xpu: FakeXPU, monkeypatch: pytest.MonkeyPatch,
                                                              fresh_process: pytest.LogCaptureFixture) -> None:
    fake_ipex = types.ModuleType(IPEX)
    fake_ipex.__version__ = "2.8.10+xpu"
    monkeypatch.setitem(sys.modules, IPEX, fake_ipex)
    _set_up_twice()
    assert _ipex_lines(fresh_process) == [f"{IPEX} 2.8.10+xpu used"]


@pytest.mark.parametrize("check,expected", [(lambda: True, "bf16-mixed"), (lambda: False, "32-true"),
                                            (None, "32-true"), (lambda: 1 / 0, "32-true")])
def test_auto_precision_on_cpu_follows_its_bf16_instructions(monkeypatch: pytest.MonkeyPatch, check: object,
                                                             expected: str) -> None:
    """precision=auto: bf16-mixed on a CPU with bf16 instructions (torch's AVX512-BF16 check), fp32 on
    one without, and fp32 when torch has no such check or it fails; CUDA/XPU are bf16-mixed either way."""
    from sem.training import precision

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setenv("SEM_CPU_BF16_SPEEDUP", "4.0")  # as measured on a CPU that has them
    if check is not None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", check, raising=False)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("auto", "cuda") == precision.resolve_precision("auto", "xpu") == "bf16-mixed"
    assert precision.resolve_precision("32-true", "cpu") == "32-true"


def test_auto_precision_takes_bf16_only_where_bf16_matmuls_measure_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU that says it has bf16 instructions but runs bf16 matmuls no faster than fp32 (a VM that traps
    them, a throttled part) gets fp32; the measurement is taken once and handed to the processes a run starts."""
    from sem.training import precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setenv("SEM_CPU_BF16_SPEEDUP", "1.1")
    assert precision.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setenv("SEM_CPU_BF16_SPEEDUP", "3.9")
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.delenv("SEM_CPU_BF16_SPEEDUP")
    measured = precision.cpu_bf16_speedup()  # this machine's, measured now, then kept for child processes
    assert measured > 0 and float(precision.os.environ["SEM_CPU_BF16_SPEEDUP"]) == pytest.approx(measured, rel=1e-3)
