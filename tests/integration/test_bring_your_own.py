"""A user's own components, as a user brings them: the example package (``examples/ext``) copied to a
folder outside the repository, on ``PYTHONPATH``, its yamls on ``hydra.searchpath``; nothing in the
repository is edited. Trains, resumes, samples, evaluates, exports; bad components exit 2 with one
line each and write nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import ROOT, run_launch

STEPS = ["trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.log_every_n_steps=1",
         "checkpoint.every_n_steps=6", "data.batch_size=4", "data.seq_len=32", "data.val_max_windows=4",
         "data.final_val_max_windows=null", "callbacks.console.every_n_steps=6", "accelerator=cpu", "sample.n=1",
         "sample.max_new_tokens=20"]
BAD_MODULE = '''
import torch
from torch import nn


class WrongShapeLM(nn.Module):
    def __init__(self, d_model: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(259, d_model)

    def forward(self, input_ids):
        return self.embed(input_ids)  # [B, T, 8]: not logits over the vocabulary


class NotAModule:
    def __init__(self) -> None:
        pass


class ExplodingLM(nn.Module):
    """Fine at validation; raises once training has run a few steps."""

    def __init__(self, vocab_size: int = 259, fail_after: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 16)
        self.head = nn.Linear(16, vocab_size)
        self.fail_after, self.calls = fail_after, 0

    def forward(self, input_ids):
        if self.training:
            self.calls += 1
            if self.calls > self.fail_after:
                raise RuntimeError("user model exploded")
        return self.head(self.embed(input_ids))


class EmptyCorpus:
    def documents(self):
        return iter(())
'''


# The most natural extension of our own model: a subclass taking whatever SEMModel takes (**kw).
SUBCLASS_MODULE = '''
from sem.models.sem import SEMModel


class WiderReadout(SEMModel):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.touched = True
'''


# Models with loss terms of their own (sem.contracts.ModelOutput), on the example's GRU: one written
# against earlier versions of sem (its loss holds its term; ``unitary_divergence`` is logged as
# train/unitary_div), one of today (its weighted term in ``aux_losses``: sem adds it, logs train/my_reg).
LOSS_MODULE = '''
from sem.contracts import ModelOutput, cross_entropy
from userlm import GRULM


class OldStyleLM(GRULM):
    def forward(self, input_ids, targets=None):
        logits = super().forward(input_ids)
        div = self.head.weight.pow(2).mean()
        if targets is None:
            return ModelOutput(logits=logits, loss=None, ce_loss=None, unitary_divergence=div)
        ce = cross_entropy(logits, targets)
        return ModelOutput(logits=logits, loss=ce + 0.5 * div, ce_loss=ce, unitary_divergence=div)


class AuxLM(GRULM):
    def forward(self, input_ids, targets=None):
        logits = super().forward(input_ids)
        return ModelOutput(logits, aux_losses={"my_reg": 0.5 * self.head.weight.pow(2).mean()})
'''


@pytest.fixture(scope="module")
def ext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package in a folder of its own (outside the repo), with a lines file to train on."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(ROOT / "examples" / "ext", root / "ext")
    (root / "ext" / "userbad.py").write_text(BAD_MODULE)
    (root / "ext" / "usersem.py").write_text(SUBCLASS_MODULE)
    (root / "ext" / "userloss.py").write_text(LOSS_MODULE)
    lines = [f"def f{i}(x): return x * {i} + {i % 7}  # line {i}" for i in range(1500)]
    (root / "lines.txt").write_text("\n".join(lines) + "\n")
    return root


def _env(ext: Path, cache_dir: Path, path: bool = True) -> dict[str, str]:
    env = {"SEM_CACHE_DIR": str(cache_dir), "LINES_FILE": str(ext / "lines.txt"), "OMP_NUM_THREADS": "1"}
    if path:
        env["PYTHONPATH"] = str(ext / "ext")
    return env


def _launch(ext: Path, cache_dir: Path, *args: str, run_dir: Path, path: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return run_launch([f"hydra.searchpath=[file://{ext}/ext/conf]", *STEPS, *args, f"hydra.run.dir={run_dir}"],
                      cwd=ext, timeout=timeout, env=_env(ext, cache_dir, path))


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gru_run(ext: Path, cache_dir: Path) -> Path:
    run_dir = ext / "runs" / "gru"
    proc = _launch(ext, cache_dir, "model=gru", "optimizer=adagrad", "scheduler=onecycle", "data=lines",
                   "logger=[csv,jsonl]", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_user_components_train_end_to_end(gru_run: Path) -> None:
    summary = json.loads((gru_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert 0 < summary["val_bpb"] < 9 and summary["gzip_bpb"] > 0  # the corpus joined the compressor anchors
    cfg = (gru_run / "config_resolved.yaml").read_text()
    assert "userlm.GRULM" in cfg and "vocab_size: 259" not in cfg.split("model:")[1].split("data:")[0]
    assert (gru_run / "user_metrics.jsonl").read_text().strip()  # the user's own logger ran
    assert (gru_run / "samples.txt").read_text().startswith("=== prompt")
    assert sorted(p.name for p in (gru_run / "checkpoints").glob("step_*.ckpt")) == ["step_0000006.ckpt",
                                                                                     "step_0000012.ckpt"]


def _train_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in _rows(run_dir) if "train/loss" in r]


def test_a_model_of_bare_logits_logs_no_terms(gru_run: Path) -> None:
    """(a) Bare logits: sem's cross-entropy is the loss; train/unitary_div stays 0.0, as it always was."""
    for row in _train_rows(gru_run):
        assert sorted(k for k in row if k.startswith("train/")) == ["train/ce_loss", "train/loss", "train/unitary_div"]
        assert row["train/loss"] == row["train/ce_loss"] and row["train/unitary_div"] == 0.0


@pytest.mark.slow  # 12-20 s measured in the fast tier
@pytest.mark.parametrize("engine", ["lightning", "standalone"])
def test_a_models_own_loss_term_trains_and_is_logged_by_name(ext: Path, cache_dir: Path, engine: str) -> None:
    """(c) ``ModelOutput(logits, aux_losses={"my_reg": t})``: train/my_reg on every row, and the loss
    is the cross-entropy plus it."""
    run_dir = ext / "runs" / f"aux_{engine}"
    proc = _launch(ext, cache_dir, "model=gru", "model._target_=userloss.AuxLM", "data=lines", f"engine={engine}",
                   "sample.n=0", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _train_rows(run_dir)
    assert len(rows) == 12
    for row in rows:
        assert 0 < row["train/my_reg"] < 1
        assert row["train/loss"] == pytest.approx(row["train/ce_loss"] + row["train/my_reg"], rel=1e-5)
    assert rows[-1]["train/my_reg"] != rows[0]["train/my_reg"]  # its gradient moves the weights it reads


@pytest.mark.slow  # 25 s measured in the fast tier
def test_a_model_written_for_earlier_versions_still_trains(ext: Path, cache_dir: Path) -> None:
    """(b) ``ModelOutput(logits=..., loss=..., ce_loss=..., unitary_divergence=...)``: its loss as it made
    it, its divergence logged unweighted as train/unitary_div."""
    run_dir = ext / "runs" / "old_style"
    proc = _launch(ext, cache_dir, "model=gru", "model._target_=userloss.OldStyleLM", "data=lines", "sample.n=0",
                   run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _train_rows(run_dir)
    assert len(rows) == 12
    for row in rows:
        assert row["train/unitary_div"] > 0
        assert row["train/loss"] == pytest.approx(row["train/ce_loss"] + 0.5 * row["train/unitary_div"], rel=1e-5)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_onecycle_lr_is_torchs_own(gru_run: Path) -> None:
    """The LR column of metrics.jsonl is torch's OneCycleLR for the same settings, step for step."""
    opt = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=12, pct_start=0.1,
                                                cycle_momentum=False)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    rows = {r["step"]: r["lr"] for r in _rows(gru_run) if "lr" in r and "train/loss" in r}
    assert len(rows) >= 10
    for step, lr in rows.items():
        assert lr == pytest.approx(expected[step], rel=1e-6), (step, lr, expected[step])


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_sample_evaluate_export_load_a_user_model(gru_run: Path, ext: Path, cache_dir: Path) -> None:
    ckpt = gru_run / "checkpoints" / "last.ckpt"
    env = {**os.environ, **_env(ext, cache_dir)}
    for entry, args in (("sem.sample", [f"ckpt={ckpt}", "prompt=def ", "max_new_tokens=12", "device=cpu"]),
                        ("sem.evaluate", [f"ckpt={ckpt}", f"out={ext}/eval.json", "device=cpu"]),
                        ("sem.export", [f"ckpt={ckpt}", f"out={ext}/exported"])):
        proc = subprocess.run([sys.executable, "-m", entry, *args], cwd=ext, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (entry, proc.stderr[-2000:])
    evaluated = json.loads((ext / "eval.json").read_text())
    summary = json.loads((gru_run / "summary.json").read_text())
    assert evaluated["bpb"] == pytest.approx(summary["val_bpb"], abs=1e-3)  # the same held-out windows
    # without the user's package on the path: one line naming the module to put there, exit 2
    no_path = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "sem.sample", f"ckpt={ckpt}", "max_new_tokens=4"], cwd=ext,
                          env=no_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'userlm'" in proc.stderr and "PYTHONPATH" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_lightning_module_loads_a_user_model(gru_run: Path, ext: Path) -> None:
    code = ("from sem.engines.lightning import SEMLightningModule; import torch; "
            f"m = SEMLightningModule.load_from_checkpoint({str(gru_run / 'checkpoints' / 'last.ckpt')!r}); "
            "print(type(m.model).__name__, m.training, tuple(m.model(torch.zeros(1, 5, dtype=torch.long)).shape))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ext, env={**os.environ, "PYTHONPATH": str(ext / "ext")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["GRULM", "False", "(1,", "5,", "259)"]


@pytest.mark.slow
def test_resume_of_user_components_is_exact(gru_run: Path, ext: Path, cache_dir: Path) -> None:
    """From the straight run's step-6 checkpoint, resume=auto to 12: the rows (loss, OneCycleLR's LR) are
    the uninterrupted run's."""
    run_dir = ext / "runs" / "gru_resumed"
    common = ["model=gru", "optimizer=adagrad", "scheduler=onecycle", "data=lines", "logger=[csv,jsonl]"]
    # the straight run's step-6 checkpoint, alone in a run dir of its own: resume=auto continues it
    (run_dir / "checkpoints").mkdir(parents=True)
    for f in (gru_run / "checkpoints").glob("step_0000006.*"):
        shutil.copy(f, run_dir / "checkpoints" / f.name)
    proc = _launch(ext, cache_dir, *common, "resume=auto", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = {r["step"]: r for r in _rows(gru_run) if "train/loss" in r}
    resumed = {r["step"]: r for r in _rows(run_dir) if "train/loss" in r}
    assert sorted(resumed) == list(range(6, 12))
    for step in resumed:
        assert resumed[step]["train/loss"] == pytest.approx(straight[step]["train/loss"], rel=1e-5), step
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9), step


BAD = {
    # case: (overrides, what the one line must name)
    "no such class": (["model=gru", "model._target_=userlm.GRULMX"], "has no 'GRULMX'"),
    "module not on the path": (["model=gru", "model._target_=nowhere.Model"], "cannot import module 'nowhere'"),
    "a key the class does not take": (["model=gru", "+model.hidden=3"], "does not take 'hidden'"),
    "wrong type where annotated": (["model=gru", "model.d_model=wide"], "model.d_model='wide'"),
    "wrong output shape": (["model=gru", "model._target_=userbad.WrongShapeLM", "~model.n_layers"],
                           "returned logits of shape [2, 8, 64]"),
    "not an nn.Module": (["model=gru", "model._target_=userbad.NotAModule", "~model.n_layers", "~model.d_model"],
                         "wants a torch.nn.Module"),
    "optimizer key it does not take": (["optimizer._target_=torch.optim.Adagrad"], "does not take 'betas'"),
    "not an optimizer": (["optimizer._target_=torch.nn.Linear"], "not a torch.optim.Optimizer"),
    "ReduceLROnPlateau": (["scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau"], "ReduceLROnPlateau"),
    "a constructor-only check": (["optimizer=adagrad", "scheduler=onecycle", "scheduler.cycle_momentum=true"],
                                 "cycle_momentum"),
    "empty corpus": (["data=lines", "data.corpus._target_=userbad.EmptyCorpus", "~data.corpus.path"],
                     "yielded no document"),
    "Trainer argument typo": (["+trainer.limit_val_batchs=2"], "closest: limit_val_batches"),
    "Lightning callback under standalone": (["engine=standalone",
                                             "+callbacks.swa._target_=pytorch_lightning.callbacks.StochasticWeightAveraging",
                                             "+callbacks.swa.swa_lrs=0.01"], "engine=standalone"),
}


@pytest.fixture
def user_path(ext: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(ext / "ext"))
    monkeypatch.setenv("LINES_FILE", str(ext / "lines.txt"))
    return ext


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_component_is_one_problem_line(user_path: Path, cache_dir: Path, case: str) -> None:
    """Validation in-process (what launch.py runs before anything is written): one line naming it."""
    from sem.config.validate import validate_run
    from tests.conftest import compose_cfg

    args, expected = BAD[case]
    cfg = compose_cfg([f"hydra.searchpath=[file://{user_path}/ext/conf]", *STEPS, "model=sem_tiny", *args,
                       f"data.cache_dir={cache_dir}"])
    problems, _ = validate_run(cfg)
    assert any(expected in line for line in problems), problems
    assert not any("Traceback" in line or "ConfigAttributeError" in line for line in problems)


@pytest.fixture(scope="module")
def bad_runs(ext: Path, cache_dir: Path) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    out = {}
    for i, (case, (args, _)) in enumerate(BAD.items()):
        run_dir = ext / "bad" / str(i)
        out[case] = _launch(ext, cache_dir, "model=sem_tiny", *args, run_dir=run_dir), run_dir
    return out


@pytest.mark.slow  # 13 launches, ~5 s each; the in-process test above checks the same lines in the fast tier
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_component_is_one_line_exit_2_nothing_written(bad_runs: dict, case: str) -> None:
    proc, run_dir = bad_runs[case]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert any(BAD[case][1] in line for line in lines), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ConfigAttributeError" not in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_user_model_raising_in_training_fails_with_its_message(ext: Path, cache_dir: Path) -> None:
    run_dir = ext / "runs" / "exploding"
    proc = _launch(ext, cache_dir, "model=gru", "model._target_=userbad.ExplodingLM", "~model.d_model",
                   "~model.n_layers", run_dir=run_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "user model exploded" in summary["error"]
    assert (run_dir / "checkpoints" / "step_0000006.ckpt").exists()  # what was saved before is kept


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_inline_swaps_train(ext: Path, cache_dir: Path) -> None:
    for i, args in enumerate((["optimizer._target_=torch.optim.RAdam"],
                              ["scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR", "+scheduler.T_max=12"])):
        run_dir = ext / "runs" / f"inline{i}"
        proc = _launch(ext, cache_dir, "model=sem_tiny", *args, "sample.n=0", run_dir=run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        if i == 1:
            out = proc.stdout + proc.stderr
            assert "does not take" in out and "warmup_fraction" in out  # said, not silent


@pytest.mark.slow  # measured >= 5 s (--durations, 2026-12-03)
def test_user_model_under_standalone_and_dry_run(ext: Path, cache_dir: Path) -> None:
    run_dir = ext / "runs" / "standalone"
    proc = _launch(ext, cache_dir, "model=gru", "data=lines", "engine=standalone", "logger=none", "sample.n=0",
                   run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    plan_dir = ext / "runs" / "plan"
    proc = _launch(ext, cache_dir, "model=gru", "data=lines", "scheduler=onecycle", "dry_run=true", run_dir=plan_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert plan["model"] == "GRULM" and plan["flops_per_token"] and plan["flops_per_token"] > 0


def test_a_subclass_of_our_model_takes_every_key_of_its_preset(ext: Path, cache_dir: Path) -> None:
    """``model._target_`` on a preset keeps the preset's keys, lengths given as fractions of
    trainer.max_steps included (``model.propagator_warmup_fraction``): they reach the subclass resolved,
    as they reach ours. The subclass inherits the carried state of truncated BPTT too."""
    run_dir = ext / "runs" / "subclass"
    proc = _launch(ext, cache_dir, "model=sem_tiny", "model._target_=usersem.WiderReadout",
                   "model.propagator_warmup_fraction=0.5", "data=lines", "data.tbptt=3", "sample.n=0", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["_target_"] == "usersem.WiderReadout"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    log = (run_dir / "launch.log").read_text()
    assert "Instantiating <usersem.WiderReadout>" in log and "lanes of 3 consecutive windows (data.tbptt)" in log
