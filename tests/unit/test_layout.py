"""The house (docs/architecture.md): one package per concern, layers that only import downward (the
contracts in ``.importlinter``), no import cycles between modules, and a core (training, models, data,
record) that imports neither Lightning nor Hydra, statically and at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = {"__init__", "__main__", "app", "recipe", "errors", "contracts", "lengths",
             "evaluate", "sample", "export", "report"}  # the last four: `python -m sem.<tool>`, public commands


def test_import_linter_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run([exe, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _cycle(graph: grimp.ImportGraph, modules: set[str]) -> list[str] | None:
    """One import cycle among ``modules`` (function-level imports included), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m) & modules):
            if n.startswith(m + "."):
                continue  # a package's __init__ re-exporting its own module is not a cycle
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("sem")
    modules = {m for m in graph.modules if m.startswith("sem")}
    assert _cycle(graph, modules) is None, " -> ".join(_cycle(graph, modules) or [])


def test_top_level_holds_only_the_entry_the_recipe_and_the_leaves() -> None:
    top = {p.stem for p in (ROOT / "sem").glob("*.py")}
    assert top <= TOP_LEVEL, f"modules outside a package: {sorted(top - TOP_LEVEL)}"
    packages = {p.parent.name for p in (ROOT / "sem").glob("*/__init__.py")}
    assert {"config", "models", "data", "training", "engines", "sweeps", "plan", "tools", "record"} <= packages
    for init in (ROOT / "sem").glob("**/__init__.py"):
        assert init.read_text().lstrip().startswith('"""'), f"{init} says nothing about what it owns"


def test_core_imports_neither_lightning_nor_hydra_at_run_time() -> None:
    core = sorted(f"sem.{p.relative_to(ROOT / 'sem').with_suffix('').as_posix().replace('/', '.')}"
                  .removesuffix(".__init__")
                  for pkg in ("training", "models", "data", "record") for p in (ROOT / "sem" / pkg).rglob("*.py"))
    core += ["sem.contracts", "sem.errors", "sem.engines.standalone"]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {core!r}]; bad = sorted(m for m in "
            "sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'lightning_fabric', 'hydra'));"
            " print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"the core imports {out.stdout.strip()}"


def test_lightning_adapters_live_under_engines() -> None:
    training = {p.stem for p in (ROOT / "sem" / "training").glob("*.py")}
    assert not training & {"lightning_module", "callbacks", "precision_plugin", "xpu_accelerator"}
    assert (ROOT / "sem" / "engines" / "lightning" / "module.py").exists()
