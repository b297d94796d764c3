"""A checkpoint as a product: load it alone, evaluate it, sample from it, export it.

Two tiny checkpoints (SEM and Transformer) are trained once per module by launch.py, copied out of
their run directories, and the run directories deleted: everything below works from the file alone.
The entries run as a user runs them (``python -m sem.evaluate ...`` in a subprocess).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import sem
from sem.models.dynamic import DynamicSettings
from sem.models.generate import generate, show, write_samples
from tests.conftest import ROOT, tiny_data_overrides

SEQ_LEN = 32  # conftest.TINY's data.seq_len: what the checkpoints were trained (and validated) at
TRANSFORMER_MAX_SEQ_LEN = 64


@dataclass
class Trained:
    name: str  # "sem" | "transformer"
    ckpt: Path  # the checkpoint file, copied out of its (since deleted) run dir
    summary: dict[str, Any]  # the run's summary.json, read before the run dir was deleted


def _env(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    # One intra-op thread: these models are tiny, and on a busy 2-core machine two spinning threads
    # per process make each far slower. Training and evaluation alike, so their sums match bit for bit.
    env.update(SEM_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> dict[str, Trained]:
    """Train both tiny models at once (two processes), then keep only their checkpoint files."""
    work = tmp_path_factory.mktemp("product")
    models = {"sem": ["model=sem_tiny"],
              "transformer": ["model=transformer_tiny", f"model.max_seq_len={TRANSFORMER_MAX_SEQ_LEN}"]}
    procs = {}
    for name, model in models.items():
        args = [*tiny_data_overrides(corpus_dir, cache_dir), *model, "data.final_val_max_windows=null",
                f"hydra.run.dir={work / name}"]
        procs[name] = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=work,
                                       env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
        run_dir = work / name
        summary = json.loads((run_dir / "summary.json").read_text())
        moved = work / "elsewhere" / f"{name}.ckpt"
        moved.parent.mkdir(exist_ok=True)
        shutil.copy(run_dir / "checkpoints" / "last.ckpt", moved)  # follows the last -> step_... link
        shutil.rmtree(run_dir)
        out[name] = Trained(name, moved, summary)
    return out


def run_entry(module: str, args: list[str | bytes], cwd: Path, cache_dir: Path,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` as a user runs it; stdout and stderr as bytes."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(cache_dir),
                          capture_output=True, timeout=timeout)


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]


@pytest.fixture(params=["sem", "transformer"])
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


# ------------------------------------------------------------------------------------ load alone


def test_load_alone_from_a_moved_checkpoint(trained: dict[str, Trained], model_name: str) -> None:
    t = trained[model_name]
    assert not (t.ckpt.parent.parent / model_name).exists()  # its run dir is gone
    model, cfg = sem.load(t.ckpt)
    assert type(model).__name__ == {"sem": "SEMModel", "transformer": "TransformerLM"}[model_name]
    assert not model.training
    assert cfg.data.seq_len == SEQ_LEN
    x = torch.randint(0, 256, (2, SEQ_LEN))
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (2, SEQ_LEN, 259) and torch.isfinite(logits).all()


# -------------------------------------------------------------------------------------- evaluate


def test_evaluate_held_out_equals_the_training_runs_final_val_bpb(
        trained: dict[str, Trained], model_name: str, tmp_path: Path, cache_dir: Path) -> None:
    t = trained[model_name]
    proc = run_entry("sem.evaluate", [f"ckpt={t.ckpt}", "out=eval.json", "device=cpu"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["split"] == "val" and result["val_seq_len"] == SEQ_LEN
    # the run's final validation saw every held-out window (final_val_max_windows=null): same number
    assert abs(result["bpb"] - t.summary["val_bpb"]) <= 1e-6, (result["bpb"], t.summary["val_bpb"])
    assert abs(result["loss"] - t.summary["val_loss"]) <= 1e-6
    for key in ("gzip_bpb", "bz2_bpb", "xz_bpb"):
        assert result[key] == pytest.approx(t.summary[key], rel=1e-12)
    table = proc.stdout.decode()
    for row in ("gzip -9", "bz2 -9", "xz -9e", f"{result['bpb']:.4f}"):
        assert row in table


def _documents(root: Path) -> list[bytes]:
    root.mkdir()
    docs = [("a.txt", "Hello, world! Ünïcödé text, repeated. " * 40),
            ("b.py", "def add(a, b):\n    return a + b\n" * 30),
            ("c.md", "# Notes\n\n- one\n- two\n" * 25)]
    for name, text in docs:
        (root / name).write_text(text, encoding="utf-8")
    return [text.encode("utf-8") for _, text in docs]  # the order TextFilesCorpus reads them (sorted)


def test_evaluate_a_text_corpus_scores_every_window_of_all_of_it(
        trained: dict[str, Trained], tmp_path: Path, cache_dir: Path) -> None:
    docs = _documents(tmp_path / "texts")
    val_seq_len = 48  # not the training seq_len (32): a checkpoint evaluates at any length
    proc = run_entry("sem.evaluate", [f"ckpt={trained['sem'].ckpt}", "data=text_files",
                                      f"data.corpus.paths=[{tmp_path / 'texts'}]",
                                      f"data.val_seq_len={val_seq_len}", "out=out/eval.json"],
                     tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    stream = sum(len(d) + 2 for d in docs)  # BOS bytes EOS per document
    assert result["split"] == "all" and result["documents"] == 3
    assert result["bytes"] == sum(len(d) for d in docs)
    assert result["stream_tokens"] == stream
    assert result["val_seq_len"] == val_seq_len and result["trained_seq_len"] == SEQ_LEN
    assert result["windows"] == (stream - 1) // val_seq_len  # every whole window, not a sample
    assert result["tokens"] == result["windows"] * val_seq_len
    assert 0 < result["bpb"] < 12
    data = b"".join(docs)
    expected = {"gzip_bpb": gzip.compress(data, 9), "bz2_bpb": bz2.compress(data, 9),
                "xz_bpb": lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)}
    for key, packed in expected.items():
        assert result[key] == pytest.approx(8 * len(packed) / len(data), rel=0.02), key


def test_evaluate_stream_scores_every_held_out_document_whole(
        trained: dict[str, Trained], model_name: str, tmp_path: Path, cache_dir: Path) -> None:
    """mode=stream: the SEM carries its state through each document, the Transformer slides a window;
    every byte of every held-out document is scored once, bpb by position, a plot; the SEM's figure is
    the run's summary.json stream_bpb (same final checkpoint, chunks, device)."""
    t = trained[model_name]
    proc = run_entry("sem.evaluate", [f"ckpt={t.ckpt}", "mode=stream", "out=e/stream.json", "device=cpu"],
                     tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads((tmp_path / "e" / "stream.json").read_text())
    windows = run_entry("sem.evaluate", [f"ckpt={t.ckpt}", "out=e/windows.json", "device=cpu"], tmp_path, cache_dir)
    assert windows.returncode == 0
    by_windows = json.loads((tmp_path / "e" / "windows.json").read_text())
    assert result["mode"] == "stream" and by_windows["mode"] == "windows"
    assert result["method"] == {"sem": "recurrent", "transformer": "sliding_window"}[model_name]
    assert result["documents"] == by_windows["documents"] and result["split"] == "val"
    assert result["byte_targets"] == result["bytes"]  # every byte of every document, once
    assert result["tokens"] == result["bytes"] + result["documents"]  # and each document's EOS
    rows = result["by_position"]
    assert [r["position"] for r in rows] == ["0-128", "128-512", "512-2k", "2k+"]
    assert sum(r["byte_targets"] for r in rows) == result["bytes"]
    # sane: a trained tiny model, the same ballpark as its windows figure
    assert 0 < result["bpb"] < 8 and abs(result["bpb"] - by_windows["bpb"]) < 0.25 * by_windows["bpb"]
    assert (tmp_path / "e" / "stream_context.png").stat().st_size > 10_000
    assert "bytes into the document" in proc.stdout.decode()
    if model_name == "sem":
        assert t.summary["stream_bpb"] == pytest.approx(result["bpb"], rel=1e-6)
    else:  # a sliding window is not "cheap": the summary leaves it to sem.evaluate
        assert t.summary["stream_bpb"] is None


# ---------------------------------------------------------------------------------- the test split


@pytest.fixture(scope="module")
def split_runs(trained: dict[str, Trained], tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
               ) -> dict[str, tuple[subprocess.CompletedProcess, dict[str, Any]]]:
    """The evaluations of the test split (and a dynamic one), each run as a user would, all at once:
    name -> (the process, its eval.json)."""
    tmp = tmp_path_factory.mktemp("split")
    cases = {f"{name} {what}": [f"ckpt={t.ckpt}", "device=cpu", *args]
             for name, t in trained.items()
             for what, args in (("windows test", ["split=test"]), ("stream test", ["mode=stream", "split=test"]))}
    cases["sem dynamic lr=0"] = [f"ckpt={trained['sem'].ckpt}", "device=cpu", "mode=stream", "dynamic=true",
                                 "dynamic.lr=0"]
    procs = {name: subprocess.Popen([sys.executable, "-m", "sem.evaluate", *args, f"out=eval_{i}.json"], cwd=tmp,
                                    env=_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i, (name, args) in enumerate(cases.items())}
    results = {}
    for i, (name, proc) in enumerate(procs.items()):
        out, err = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        results[name] = (done, json.loads((tmp / f"eval_{i}.json").read_text()) if proc.returncode == 0 else {})
    return results


def _ok(run: tuple[subprocess.CompletedProcess, dict[str, Any]]) -> dict[str, Any]:
    """The eval.json of a run of ``split_runs``, which must have exited 0."""
    proc, result = run
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return result


def test_the_runs_report_the_test_split(trained: dict[str, Trained], model_name: str) -> None:
    """The fixture's corpus (mod_000..039.py) holds 3 test documents at val 0.05 / test 0.05: every run
    reports the test split once, its windows and its documents whole (the Transformer too: a sliding
    window), beside the test bytes' anchors; no dynamic figure unless eval.dynamic is on."""
    summary = trained[model_name].summary
    assert 0 < summary["test_bpb"] < 12 and 0 < summary["test_stream_bpb"] < 12
    assert summary["test_dynamic_bpb"] is None
    assert set(summary["test_anchors_bpb"]) == {"gzip", "bz2", "xz", "xz_prior", "ppmd_prior"}
    assert summary["test_anchors_bpb"] != summary["val_anchors_bpb"]  # other bytes


@pytest.mark.slow  # the split_runs fixture: 5 evaluations at once, ~18 s (--durations, 2 busy cores)
def test_evaluate_test_split_equals_the_training_runs_test_bpb(
        trained: dict[str, Trained], model_name: str, split_runs: dict) -> None:
    t = trained[model_name]
    result = _ok(split_runs[f"{model_name} windows test"])
    proc = split_runs[f"{model_name} windows test"][0]
    assert result["split"] == "test" and result["mode"] == "windows" and result["documents"] == 3
    # the run scored every test window at the end, in the validation's batches: the same number
    assert abs(result["bpb"] - t.summary["test_bpb"]) <= 1e-6, (result["bpb"], t.summary["test_bpb"])
    assert result["anchors_bpb"] == pytest.approx(t.summary["test_anchors_bpb"], rel=1e-12)
    assert result["gzip_bpb"] == pytest.approx(t.summary["test_anchors_bpb"]["gzip"], rel=1e-12)
    table = proc.stdout.decode()
    for row in ("gzip -9", "xz -9e | train", "PPMd | train", f"{result['bpb']:.4f}"):
        assert row in table, table


@pytest.mark.slow  # the split_runs fixture: 5 evaluations at once, ~18 s (--durations, 2 busy cores)
def test_evaluate_stream_test_split_equals_the_training_runs_test_stream_bpb(
        trained: dict[str, Trained], model_name: str, split_runs: dict) -> None:
    t = trained[model_name]
    result = _ok(split_runs[f"{model_name} stream test"])
    assert result["split"] == "test" and result["mode"] == "stream" and result["documents"] == 3
    assert result["method"] == {"sem": "recurrent", "transformer": "sliding_window"}[model_name]
    assert result["byte_targets"] == result["bytes"]  # every byte of every test document, once
    assert result["bpb"] == pytest.approx(t.summary["test_stream_bpb"], rel=1e-6)


@pytest.mark.slow  # the split_runs fixture: 5 evaluations at once, ~18 s (--durations, 2 busy cores)
def test_dynamic_evaluation_at_lr_0_is_the_stream_score(trained: dict[str, Trained], split_runs: dict) -> None:
    """``dynamic=true`` (the shorthand of dynamic.enabled=true) with weights that never move: the SEM's
    plain stream figure, the summary's stream_bpb."""
    result = _ok(split_runs["sem dynamic lr=0"])
    proc = split_runs["sem dynamic lr=0"][0]
    assert result["method"] == "dynamic" and result["split"] == "val"
    defaults = DynamicSettings()
    assert result["dynamic"] == {"lr": 0.0, "chunk": defaults.chunk, "optimizer": defaults.optimizer,
                                 "rows": defaults.rows}
    assert result["byte_targets"] == result["bytes"]
    assert result["bpb"] == pytest.approx(trained["sem"].summary["stream_bpb"], rel=1e-5)
    assert "dynamic evaluation" in proc.stdout.decode()
    assert "could not draw" not in proc.stderr.decode()  # its eval_context.png too


# ---------------------------------------------------------------------------------------- sample


def test_sample_is_deterministic_for_a_seed_and_differs_across_seeds(
        trained: dict[str, Trained], model_name: str) -> None:
    model, _ = sem.load(trained[model_name].ckpt)
    kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=None, top_p=0.95)
    a = generate(model, b"def ", seed=0, **kwargs)
    assert generate(model, b"def ", seed=0, **kwargs) == a
    others = {generate(model, b"def ", seed=s, **kwargs) for s in (1, 2, 3)}
    assert others - {a}  # a 12-step model spreads its bets: other seeds draw other text
    streamed: list[int] = []
    assert generate(model, b"def ", seed=0, on_token=streamed.append, **kwargs) == a == bytes(streamed)


def test_sample_stops_at_max_new_tokens(trained: dict[str, Trained], model_name: str) -> None:
    model, _ = sem.load(trained[model_name].ckpt)
    lengths = [len(generate(model, b"x = ", 25, temperature=1.0, seed=s)) for s in range(4)]
    assert max(lengths) == 25 and all(n <= 25 for n in lengths)
    assert generate(model, b"x = ", 0, seed=0) == b""


def test_sample_stops_at_eos() -> None:
    class AlwaysEOS(torch.nn.Module):  # no step(): the full-recompute path
        max_seq_len = 16

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> Any:
            logits = torch.zeros(*x.shape, 259)
            logits[..., 257] = 10.0  # EOS
            return type("Out", (), {"logits": logits})

    assert generate(AlwaysEOS(), b"abc", 50, temperature=0) == b""


def test_sample_non_utf8_prompt(trained: dict[str, Trained], model_name: str) -> None:
    model, _ = sem.load(trained[model_name].ckpt)
    prompt = b"\xff\xfe\x80 caf\xc3"  # not UTF-8, cut mid-character
    out = generate(model, prompt, 30, temperature=1.0, seed=0)
    assert isinstance(out, bytes) and len(out) <= 30
    assert show(prompt + out).startswith("\ufffd\ufffd\ufffd caf")


def test_sample_cli_streams_the_same_text_as_generate(
        trained: dict[str, Trained], tmp_path: Path, cache_dir: Path) -> None:
    t = trained["sem"]
    prompt = "def fib(n):"  # not Hydra override grammar: the entry takes it verbatim
    proc = run_entry("sem.sample", [f"ckpt={t.ckpt}", f"prompt={prompt}", "max_new_tokens=60",
                                    "temperature=0.8", "top_k=50", "top_p=null", "seed=7", "n=2",
                                    "device=cpu"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    model, _ = sem.load(t.ckpt)
    expected = "".join(show(prompt.encode() + generate(model, prompt.encode(), 60, 0.8, 50, None, seed)) + "\n"
                       for seed in (7, 8))
    assert proc.stdout.decode("utf-8") == expected
    assert not list(tmp_path.iterdir())  # nothing written: no outputs/, no log file


@pytest.mark.slow  # a compile of the decoding step
def test_sample_cli_compile_true_decodes_through_the_compiled_step(
        trained: dict[str, Trained], tmp_path: Path, cache_dir: Path) -> None:
    """``compile=true`` reaches the decoding (its log line says so) and writes what eager decoding writes."""
    t = trained["sem"]
    proc = run_entry("sem.sample", [f"ckpt={t.ckpt}", "prompt=def ", "max_new_tokens=40", "temperature=0",
                                    "device=cpu", "compile=true"], tmp_path, cache_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert any("decoding: a compiled step (compile=true)" in line for line in stderr_lines(proc))
    model, _ = sem.load(t.ckpt)
    assert proc.stdout.decode("utf-8") == show(b"def " + generate(model, b"def ", 40, temperature=0)) + "\n"


def test_write_samples(trained: dict[str, Trained], tmp_path: Path) -> None:
    model, _ = sem.load(trained["sem"].ckpt)
    path = write_samples(model, tmp_path / "run" / "samples.txt", prompts=["", "def "], n=2, max_new_tokens=20)
    text = path.read_text(encoding="utf-8")
    assert text.count("=== prompt") == 4 and "sample 2/2" in text
    assert write_samples(model, tmp_path / "none.txt", n=0) is None and not (tmp_path / "none.txt").exists()


# ---------------------------------------------------------------------------------------- export


def test_export_round_trip_is_bit_exact(trained: dict[str, Trained], model_name: str, tmp_path: Path,
                                        cache_dir: Path) -> None:
    t = trained[model_name]
    out = tmp_path / "exported"
    if model_name == "sem":  # the entry, as a user runs it
        proc = run_entry("sem.export", [f"ckpt={t.ckpt}", "out=exported"], tmp_path, cache_dir)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    else:  # the function it calls (saves an interpreter start)
        from sem.training.restore import export

        export(t.ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    original, cfg = sem.load(t.ckpt)
    loaded, cfg2 = sem.load(out)
    assert cfg2 == cfg
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    x = torch.randint(0, 256, (2, SEQ_LEN))
    with torch.no_grad():
        assert torch.equal(original(x).logits, loaded(x).logits)
    assert generate(original, b"def ", 20, seed=3) == generate(loaded, b"def ", 20, seed=3)


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_runs(trained: dict[str, Trained], tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
             ) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Every bad input, each run as a user would, all at once (each is mostly interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("bad")
    corrupt = tmp / "corrupt.ckpt"
    corrupt.write_bytes(trained["sem"].ckpt.read_bytes()[:4000])  # truncated mid-file
    (tmp / "empty_dir").mkdir()
    (tmp / "empty.txt").write_bytes(b"")
    ckpt = f"ckpt={trained['sem'].ckpt}"
    # a checkpoint of a run from before the test split: no data.test_fraction in its config
    payload = torch.load(trained["sem"].ckpt, map_location="cpu", weights_only=True)
    del payload["sem"]["config"]["data"]["test_fraction"]
    no_test = tmp / "no_test.ckpt"
    torch.save(payload, no_test)
    cases = {  # name: (module, args, what the one line must say)
        "missing checkpoint": ("sem.sample", [f"ckpt={tmp / 'nope.ckpt'}"], "no such file"),
        "corrupt checkpoint": ("sem.evaluate", [f"ckpt={corrupt}"], "not a checkpoint"),
        "top_k <= 0": ("sem.sample", [ckpt, "top_k=0"], "top_k=0"),
        "top_p > 1": ("sem.sample", [ckpt, "top_p=1.5"], "top_p=1.5"),
        "bad compile": ("sem.sample", [ckpt, "compile=maybe"], "compile='maybe'"),
        "empty corpus (folder)": ("sem.evaluate", [ckpt, "data=text_files",
                                                   f"data.corpus.paths=[{tmp / 'empty_dir'}]"], "no files"),
        "empty corpus (file)": ("sem.evaluate", [ckpt, "data=text_files",
                                                 f"data.corpus.paths=[{tmp / 'empty.txt'}]"], "no text"),
        "dynamic without mode=stream": ("sem.evaluate", [ckpt, "dynamic=true", "mode=windows"], "dynamic=true"),
        "bad dynamic setting": ("sem.evaluate", [ckpt, "mode=stream", "dynamic=true", "dynamic.lr=-1"],
                                "dynamic.lr=-1"),
        "bad split": ("sem.evaluate", [ckpt, "split=foo"], "split='foo'"),
        "split=test without a test split": ("sem.evaluate", [f"ckpt={no_test}", "split=test"], "split=test"),
    }
    assert sorted(cases) == sorted(BAD)
    procs = {name: (subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp, env=_env(cache_dir),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE), expected)
             for name, (module, args, expected) in cases.items()}
    results = {}
    for name, (proc, expected) in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), expected)
    return results


BAD = ["missing checkpoint", "corrupt checkpoint", "top_k <= 0", "top_p > 1", "bad compile", "empty corpus (folder)",
       "empty corpus (file)", "dynamic without mode=stream", "bad dynamic setting", "bad split",
       "split=test without a test split"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(bad_runs: dict[str, tuple[subprocess.CompletedProcess, str]],
                                         case: str) -> None:
    proc, expected = bad_runs[case]
    lines = stderr_lines(proc)
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert proc.stdout == b""


def test_greedy_and_long_non_utf8_prompt_are_notices_not_errors(trained: dict[str, Trained], tmp_path: Path,
                                                                cache_dir: Path) -> None:
    long_prompt = b"\xff\xfe" + b"x" * (2 * TRANSFORMER_MAX_SEQ_LEN)  # not UTF-8, longer than max_seq_len
    proc = run_entry("sem.sample", [f"ckpt={trained['transformer'].ckpt}", b"prompt=" + long_prompt,
                                    "temperature=0", "max_new_tokens=10", "n=2"], tmp_path, cache_dir)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err
    assert err.count("greedy") == 1  # said once, not per sample
    assert err.count("truncated from the left") == 2  # once per sample (each is its own generate call)
    first, second = proc.stdout.decode("utf-8").splitlines()[:2]
    assert first == second  # greedy: every sample the same
    assert first.startswith("\ufffd\ufffd" + "x" * (2 * TRANSFORMER_MAX_SEQ_LEN))


def test_bad_sampling_settings_are_refused_by_generate(trained: dict[str, Trained]) -> None:
    model, _ = sem.load(trained["sem"].ckpt)
    for bad in (dict(top_k=0), dict(top_k=-3), dict(top_p=0.0), dict(top_p=1.01), dict(max_new_tokens=-1)):
        kwargs = {"max_new_tokens": 5, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate(model, b"", **kwargs)
    assert len(generate(model, b"", 5, top_p=1.0, top_k=1000, seed=0)) <= 5  # the edges are allowed
