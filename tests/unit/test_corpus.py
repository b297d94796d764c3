import gzip
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from sem.data.cache import load_or_build_cache, split_of
from sem.data.corpus import (
    CorpusError,
    Document,
    JsonlCorpus,
    StdlibCorpus,
    TextFilesCorpus,
)
from sem.data.tokenizer import ByteTokenizer

tok = ByteTokenizer()


def write_files(root: pathlib.Path, n: int, size: int = 200, prefix: str = "f") -> list[pathlib.Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        p = root / f"{prefix}{i:03d}.txt"
        p.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths.append(p)
    return paths


class Counting:
    """Wraps a corpus and counts documents() calls (i.e. cache builds)."""

    def __init__(self, inner):
        self.inner, self.builds = inner, 0

    def documents(self):
        self.builds += 1
        return self.inner.documents()

    def fingerprint(self):
        return self.inner.fingerprint()

    def describe(self):
        return self.inner.describe()


# ----------------------------------------------------------------------------------------- split


def test_split_is_deterministic_and_close_to_the_fraction():
    names = [f"pkg/mod_{i}.py" for i in range(4000)]
    first = [split_of(n, 0.05) for n in names]
    assert first == [split_of(n, 0.05) for n in reversed(names)][::-1]
    assert 140 <= first.count("val") <= 260  # 5% of 4000 = 200, binomial sd ~14
    # a larger fraction holds out a superset: growing val_fraction never moves a file into train
    val5 = {n for n, s in zip(names, first) if s == "val"}
    val10 = {n for n in names if split_of(n, 0.10) == "val"}
    assert val5 < val10


def test_split_matches_the_design_reference_rule_for_whole_percentages():
    for i in range(500):
        name = f"x/{i}.py"
        h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
        assert (split_of(name, 0.05) == "val") == (h % 100 < 5)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_open_unit_interval(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        split_of("a", bad)


# ----------------------------------------------------------------------------------------- sources


def test_stdlib_corpus_excludes_tests_and_encodings(tmp_path):
    for rel in ["os.py", "json/__init__.py", "json/tool.py", "test/test_os.py", "unittest/test/t.py",
                "pkg/tests/t.py", "encodings/cp1252.py", "idlelib/idle_test/x.py", "site-packages/s.py",
                "notes.txt", "deep/keep.py", "deep/skip/me.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    names = [d.name for d in StdlibCorpus(str(tmp_path)).documents()]
    assert names == ["deep/keep.py", "deep/skip/me.py", "json/__init__.py", "json/tool.py", "os.py"]
    custom = StdlibCorpus(str(tmp_path), exclude_dirs=["deep/skip", "json"])
    assert "deep/skip/me.py" not in [d.name for d in custom.documents()]
    assert "test/test_os.py" in [d.name for d in custom.documents()]
    assert StdlibCorpus(str(tmp_path)).problems() == []


def test_stdlib_corpus_missing_root_is_a_problem(tmp_path):
    (problem,) = StdlibCorpus(str(tmp_path / "nope")).problems()
    assert "data.corpus.root" in problem and "nope" in problem


def test_text_files_names_are_relative_and_location_independent(tmp_path):
    a = tmp_path / "a"
    write_files(a / "data", 3)
    (a / "data" / "sub").mkdir()
    (a / "data" / "sub" / "z.md").write_text("z")
    (a / "data" / ".hidden").write_text("h")
    (a / "one.txt").write_text("1")
    shutil.copytree(a, tmp_path / "b")

    def names(root):
        c = TextFilesCorpus([str(root / "data"), str(root / "one.txt"), str(root / "data" / "*.txt"),
                             str(root / "one.txt")])
        return [d.name for d in c.documents()]

    got = names(tmp_path / "a")
    assert got == names(tmp_path / "b")  # the split does not move with the data
    # dir -> "data/...", file -> basename, glob -> relative to its static prefix; duplicates read once
    assert got == ["data/f000.txt", "data/f001.txt", "data/f002.txt", "data/sub/z.md", "one.txt"]


def test_text_files_problems_name_each_bad_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok.txt").write_text("x")
    c = TextFilesCorpus([str(tmp_path / "ok.txt"), str(tmp_path / "missing.txt"), str(tmp_path / "*.nothing"),
                         str(tmp_path / "empty")])
    problems = c.problems()
    assert len(problems) == 3
    assert problems[0].startswith("data.corpus.paths[1]: ") and "does not exist" in problems[0]
    assert problems[1].startswith("data.corpus.paths[2]: ") and "matches no files" in problems[1]
    assert problems[2].startswith("data.corpus.paths[3]: ") and "no files" in problems[2]
    assert TextFilesCorpus([]).problems() == ["data.corpus.paths: the list of paths is empty"]
    with pytest.raises(CorpusError, match=r"paths\[1\].*does not exist"):
        list(c.documents())


def test_fingerprint_tracks_content_changes_cheaply(tmp_path):
    (p,) = write_files(tmp_path, 1)
    c = TextFilesCorpus([str(tmp_path)])
    fp = c.fingerprint()
    assert fp == TextFilesCorpus([str(tmp_path)]).fingerprint()
    p.write_bytes(p.read_bytes() + b"more")
    assert c.fingerprint() != fp
    fp2 = c.fingerprint()
    (tmp_path / "new.txt").write_text("new")
    assert c.fingerprint() != fp2


def test_jsonl_one_document_per_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "héllo"}\n\n{"text": "b", "id": 2}\n')
    docs = list(JsonlCorpus([str(f)]).documents())
    assert docs == [Document("d.jsonl:1", "héllo".encode()), Document("d.jsonl:3", b"b")]


@pytest.mark.parametrize("line,match", [
    ('{"body": "x"}', r"d\.jsonl:2: no 'text' field.*body"),
    ('{"text": 5}', r"d\.jsonl:2: field 'text' is int"),
    ('{"text": ', r"d\.jsonl:2: invalid JSON"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, match):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=match):
        list(JsonlCorpus([str(f)]).documents())


# ----------------------------------------------------------------------------------------- cache


def expected_tokens(docs, side, frac):
    parts = [tok.encode(d.data) for d in docs if split_of(d.name, frac) == side]
    return np.concatenate(parts)


def test_cache_packs_each_split_from_its_own_documents(tmp_path):
    write_files(tmp_path / "src", 40)
    (tmp_path / "src" / "bin.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    c = TextFilesCorpus([str(tmp_path / "src")])
    cache = load_or_build_cache(c, tok, 0.25, tmp_path / "cache")
    docs = list(c.documents())
    np.testing.assert_array_equal(cache.train, expected_tokens(docs, "train", 0.25))
    np.testing.assert_array_equal(cache.val, expected_tokens(docs, "val", 0.25))
    val_docs = [d for d in docs if split_of(d.name, 0.25) == "val"]
    assert cache.n_val_docs == len(val_docs) and cache.n_train_docs == len(docs) - len(val_docs)
    val_bytes = b"".join(d.data for d in val_docs)
    assert cache.val_bytes == len(val_bytes)
    assert cache.train_bytes == sum(len(d.data) for d in docs) - len(val_bytes)
    assert cache.gzip_bpb == pytest.approx(8 * len(gzip.compress(val_bytes, 9)) / len(val_bytes), abs=1e-9)
    assert isinstance(cache.train, np.memmap) and cache.train.dtype == np.uint16
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["n_val_docs"] == cache.n_val_docs


def test_cache_is_built_once_then_reused_and_rebuilt_on_change(tmp_path):
    paths = write_files(tmp_path / "src", 30)
    c = Counting(TextFilesCorpus([str(tmp_path / "src")]))
    first = load_or_build_cache(c, tok, 0.2, tmp_path / "cache")
    mtime = (first.path / "train.bin").stat().st_mtime_ns
    again = load_or_build_cache(c, tok, 0.2, tmp_path / "cache")
    assert c.builds == 1 and again.path == first.path
    assert (first.path / "train.bin").stat().st_mtime_ns == mtime
    paths[0].write_bytes(b"changed")
    changed = load_or_build_cache(c, tok, 0.2, tmp_path / "cache")
    assert c.builds == 2 and changed.path != first.path
    assert changed.train_bytes + changed.val_bytes == 29 * 200 + 7
    load_or_build_cache(c, tok, 0.3, tmp_path / "cache")  # the split is part of the key
    assert c.builds == 3


def test_failed_build_leaves_no_partial_cache(tmp_path):
    write_files(tmp_path / "src", 20)
    inner = TextFilesCorpus([str(tmp_path / "src")])

    class Dies(Counting):
        def documents(self):
            for i, d in enumerate(self.inner.documents()):
                if i == 10:
                    raise KeyboardInterrupt  # as a Ctrl-C mid-build
                yield d

    with pytest.raises(KeyboardInterrupt):
        load_or_build_cache(Dies(inner), tok, 0.2, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_build_dir_of_a_builder_that_died_is_removed_by_the_next_build(tmp_path):
    """A second Ctrl-C exits at once, mid-build: its temporary dir (never the cache's name) is removed by
    the next build at once when its builder is a process of this host that is gone; a live builder's stays."""
    write_files(tmp_path / "src", 20)
    c = TextFilesCorpus([str(tmp_path / "src")])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace("-", "_")
    cache = tmp_path / "cache"
    dead = cache / f".tmp-tokens-0123456789abcdef0123-{host}.{gone.stdout.strip()}-x1y2z3"
    live = cache / f".tmp-tokens-0123456789abcdef0123-{host}.{os.getppid()}-a1b2c3"
    other_host = cache / ".tmp-tokens-0123456789abcdef0123-elsewhere.1-q9w8e7"
    for d in (dead, live, other_host):
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"\x00" * 10)
    load_or_build_cache(c, tok, 0.2, cache)
    assert not dead.exists() and live.exists() and other_host.exists()


def test_leftovers_of_a_killed_build_are_never_loaded(tmp_path):
    write_files(tmp_path / "src", 20)
    c = Counting(TextFilesCorpus([str(tmp_path / "src")]))
    good = load_or_build_cache(c, tok, 0.2, tmp_path / "cache")
    (good.path / "meta.json").unlink()  # a directory under the final name but never completed
    (good.path / "train.bin").write_bytes(b"\x00\x01")
    rebuilt = load_or_build_cache(c, tok, 0.2, tmp_path / "cache")
    assert c.builds == 2 and rebuilt.train.size > 1


def test_concurrent_builder_that_finishes_first_wins(tmp_path):
    write_files(tmp_path / "src", 20)
    inner = TextFilesCorpus([str(tmp_path / "src")])
    other = Counting(inner)

    class Racing(Counting):
        def documents(self):
            # another process completes the same cache while this one is still tokenizing
            load_or_build_cache(other, tok, 0.2, tmp_path / "cache")
            return self.inner.documents()

    cache = load_or_build_cache(Racing(inner), tok, 0.2, tmp_path / "cache")
    assert other.builds == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.path.name]
    np.testing.assert_array_equal(cache.train, expected_tokens(list(inner.documents()), "train", 0.2))


def test_empty_corpus_is_refused(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(CorpusError, match="no documents"):
        load_or_build_cache(JsonlCorpus([str(f)]), tok, 0.1, tmp_path / "cache")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="no files"):
        load_or_build_cache(TextFilesCorpus([str(tmp_path / "emptydir")]), tok, 0.1, tmp_path / "cache")


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_or_build_cache(TextFilesCorpus([str(tmp_path / "gone.txt")]), tok, 0.1, tmp_path / "cache")


def test_unreadable_file_is_refused_with_its_name(tmp_path, monkeypatch):
    write_files(tmp_path / "src", 10)
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "f004.txt":  # chmod 000 does not stop root, so fail the read directly
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    with pytest.raises(CorpusError, match=r"cannot read corpus file '.*f004\.txt': Permission denied"):
        load_or_build_cache(TextFilesCorpus([str(tmp_path / "src")]), tok, 0.2, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_split_with_no_val_or_no_train_documents_is_refused(tmp_path):
    val_name = next(f"v{i}.txt" for i in range(1000) if split_of(f"v{i}.txt", 0.3) == "val")
    train_name = next(f"t{i}.txt" for i in range(1000) if split_of(f"t{i}.txt", 0.3) == "train")
    for name in (val_name, train_name):
        (tmp_path / name).write_text("a single file")
    with pytest.raises(CorpusError, match="no training documents.*val_fraction=0.3"):
        load_or_build_cache(TextFilesCorpus([str(tmp_path / val_name)]), tok, 0.3, tmp_path / "cache")
    with pytest.raises(CorpusError, match="no held-out bytes.*val_fraction=0.3"):
        load_or_build_cache(TextFilesCorpus([str(tmp_path / train_name)]), tok, 0.3, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
