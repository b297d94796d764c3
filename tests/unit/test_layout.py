"""The architecture rule: core modules (model, data, training policies, loading) import neither
Lightning nor Hydra; Lightning lives under sem/engines/lightning/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted(
    ["sem.model", "sem.baselines", "sem.loading", "sem.engines.standalone"]
    + [f"sem.data.{p.stem}" for p in (ROOT / "sem" / "data").glob("*.py") if p.stem != "__init__"]
    + [f"sem.training.{p.stem}" for p in (ROOT / "sem" / "training").glob("*.py") if p.stem != "__init__"]
)


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_neither_lightning_nor_hydra(module: str) -> None:
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pytorch_lightning', 'lightning', 'lightning_fabric', 'hydra')); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_lightning_adapters_live_under_engines() -> None:
    training = {p.stem for p in (ROOT / "sem" / "training").glob("*.py")}
    assert not training & {"lightning_module", "callbacks", "precision_plugin", "xpu_accelerator"}
    assert (ROOT / "sem" / "engines" / "lightning" / "module.py").exists()
