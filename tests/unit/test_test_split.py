"""The test split (sem/data/cache.py, sem/data/datamodule.py) and the anchors it is reported against
(sem/data/anchors.py): a third split taken from train by the same name hash, packed into test.bin,
with the anchors of both held-out splits in meta.json."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import pathlib

import numpy as np
import pytest
import torch

from sem.data import anchors
from sem.data.anchors import Alone, describe, given_prior, strongest_beaten
from sem.data.cache import load_or_build_cache, split_of
from sem.data.corpus import CorpusError, TextFilesCorpus
from sem.data.datamodule import SEMDataModule
from sem.data.tokenizer import ByteTokenizer
from tests.unit.test_corpus import Counting

tok = ByteTokenizer()
NAMES = [f"pkg/mod_{i}.py" for i in range(4000)]


def write_texts(root: pathlib.Path, names: list[str], size: int = 300) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        (root / name).write_bytes(bytes(rng.integers(97, 123, size, dtype=np.uint8)))


def names_in(split: str, n: int, val: float, test: float, prefix: str = "d") -> list[str]:
    """The first n file names ``<prefix><i>.txt`` that fall in ``split``."""
    out = [f"{prefix}{i}.txt" for i in range(5000) if split_of(f"{prefix}{i}.txt", val, test) == split]
    assert len(out) >= n
    return out[:n]


# ----------------------------------------------------------------------------------------- split_of


def test_val_is_the_same_with_or_without_a_test_split():
    """Val figures stay comparable with those measured before the test split existed."""
    before = [split_of(n, 0.05) for n in NAMES]
    after = [split_of(n, 0.05, 0.05) for n in NAMES]
    assert [a == "val" for a in after] == [b == "val" for b in before]
    assert "test" not in before and "test" not in [split_of(n, 0.05, 0.0) for n in NAMES]


def test_test_is_taken_from_what_was_train():
    after = {n: split_of(n, 0.05, 0.05) for n in NAMES}
    test = {n for n, s in after.items() if s == "test"}
    assert test and all(split_of(n, 0.05) == "train" for n in test)
    assert 140 <= len(test) <= 260  # 5% of 4000 = 200, binomial sd ~14
    # growing test_fraction only moves train documents into test
    bigger = {n for n in NAMES if split_of(n, 0.05, 0.10) == "test"}
    assert test < bigger


def test_test_split_of_whole_percentages_follows_the_hash_rule():
    for i in range(500):
        name = f"x/{i}.py"
        h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
        expected = "val" if h % 100 < 5 else "test" if h % 100 < 10 else "train"
        assert split_of(name, 0.05, 0.05) == expected


@pytest.mark.parametrize("bad", [-0.1, 0.95, 1.0, 1.5])
def test_bad_test_fractions_are_refused(bad):
    with pytest.raises(ValueError, match=r"data\.test_fraction"):
        split_of("a", 0.05, bad)
    with pytest.raises(ValueError, match=r"data\.test_fraction"):
        SEMDataModule(TextFilesCorpus(["x"]), test_fraction=bad)


def test_bad_test_fraction_is_refused_before_a_build(tmp_path):
    write_texts(tmp_path / "src", ["a.txt"])
    with pytest.raises(ValueError, match=r"data\.test_fraction"):
        load_or_build_cache(TextFilesCorpus([str(tmp_path / "src")]), tok, 0.5, tmp_path / "cache", test_fraction=0.5)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache with all three splits: 4 val, 3 test, 8 train documents (val 0.2, test 0.2)."""
    root = tmp_path_factory.mktemp("three")
    names = names_in("val", 4, 0.2, 0.2) + names_in("test", 3, 0.2, 0.2) + names_in("train", 8, 0.2, 0.2)
    write_texts(root / "src", names)
    corpus = TextFilesCorpus([str(root / "src" / "*.txt")])
    return corpus, load_or_build_cache(corpus, tok, 0.2, root / "cache", test_fraction=0.2)


def test_test_bin_holds_the_test_documents(built):
    corpus, cache = built
    docs = list(corpus.documents())
    side = {d.name: split_of(d.name, 0.2, 0.2) for d in docs}
    for split, arr in (("train", cache.train), ("val", cache.val), ("test", cache.test)):
        expected = np.concatenate([tok.encode(d.data) for d in docs if side[d.name] == split])
        np.testing.assert_array_equal(arr, expected)
    assert (cache.n_train_docs, cache.n_val_docs, cache.n_test_docs) == (8, 4, 3)
    test_bytes = b"".join(d.data for d in docs if side[d.name] == "test")
    assert cache.test_bytes == len(test_bytes) == 900
    assert cache.val_bytes == 1200 and cache.train_bytes == 2400
    assert np.array_equal(np.fromfile(cache.path / "test.bin", dtype=np.uint16), cache.test)


def test_meta_holds_the_anchors_of_both_held_out_splits(built):
    corpus, cache = built
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["version"] == 3 and meta["test_fraction"] == 0.2
    assert meta["n_test_docs"] == 3 and meta["test_bytes"] == cache.test_bytes
    assert set(meta["anchors"]) == {"val", "test"}
    for split in ("val", "test"):
        assert set(meta["anchors"][split]) == {"gzip", "bz2", "xz", "xz_prior", "ppmd_prior"}
        assert all(isinstance(v, float) and v > 0 for v in meta["anchors"][split].values()), meta["anchors"]
    assert cache.anchors == meta["anchors"]
    assert meta["anchors_s"] >= 0
    assert meta["ppmd"]["order"] == anchors.PPMD_ORDER and meta["ppmd"]["memory_mb"] == anchors.PPMD_MEMORY_MB
    assert "PPMd" in meta["ppmd"]["variant"]
    # each split's anchors are its own bytes'
    docs = list(corpus.documents())
    test_bytes = b"".join(d.data for d in docs if split_of(d.name, 0.2, 0.2) == "test")
    assert meta["anchors"]["test"]["gzip"] == pytest.approx(8 * len(gzip.compress(test_bytes, 9)) / 900, abs=1e-9)
    xz = lzma.compress(test_bytes, preset=9 | lzma.PRESET_EXTREME)
    assert meta["anchors"]["test"]["xz"] == pytest.approx(8 * len(xz) / 900, abs=1e-9)
    # the val anchors keep their flat names too (readers of older caches' meta.json)
    assert meta["gzip_bpb"] == meta["anchors"]["val"]["gzip"] == cache.gzip_bpb


def test_a_version_2_cache_is_rebuilt_not_misread(tmp_path):
    names = names_in("val", 2, 0.2, 0.2) + names_in("test", 2, 0.2, 0.2) + names_in("train", 4, 0.2, 0.2)
    write_texts(tmp_path / "src", names)
    corpus = Counting(TextFilesCorpus([str(tmp_path / "src" / "*.txt")]))
    cache = load_or_build_cache(corpus, tok, 0.2, tmp_path / "cache", test_fraction=0.2)
    # what a version 2 cache left under that name: no test.bin, flat anchors
    meta = json.loads((cache.path / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("anchors", "n_test_docs", "test_bytes", "n_test_tokens",
                                                      "anchors_s", "ppmd", "test_fraction")}
    (cache.path / "meta.json").write_text(json.dumps({**old, "version": 2}))
    (cache.path / "test.bin").unlink()
    again = load_or_build_cache(corpus, tok, 0.2, tmp_path / "cache", test_fraction=0.2)
    assert corpus.builds == 2 and again.path == cache.path
    assert again.n_test_docs == 2 and again.test.size == 2 * 302
    assert json.loads((again.path / "meta.json").read_text())["version"] == 3


def test_no_test_document_is_an_error_naming_test_fraction(tmp_path):
    names = names_in("val", 2, 0.2, 0.1) + names_in("train", 4, 0.2, 0.1)
    write_texts(tmp_path / "src", names)
    corpus = TextFilesCorpus([str(tmp_path / "src" / "*.txt")])
    with pytest.raises(CorpusError, match=r"data\.test_fraction=0\.1") as info:
        load_or_build_cache(corpus, tok, 0.2, tmp_path / "cache", test_fraction=0.1)
    assert "\n" not in str(info.value) and "data.test_fraction=0 " in str(info.value)  # one line, the way out
    assert list((tmp_path / "cache").iterdir()) == []
    # without a test split the same corpus is fine
    cache = load_or_build_cache(corpus, tok, 0.2, tmp_path / "cache", test_fraction=0.0)
    assert cache.n_test_docs == 0 and cache.test.size == 0


# ----------------------------------------------------------------------------------------- datamodule


def test_no_test_split_at_test_fraction_0(tmp_path):
    names = names_in("val", 2, 0.2, 0.0) + names_in("train", 6, 0.2, 0.0)
    write_texts(tmp_path / "src", names)
    dm = SEMDataModule(TextFilesCorpus([str(tmp_path / "src" / "*.txt")]), batch_size=2, seq_len=16,
                       val_fraction=0.2, cache_dir=str(tmp_path / "cache"), test_fraction=0.0)
    dm.setup()
    assert dm.has_test is False
    assert dm.tokens("test").size == 0 and dm.cache.n_test_docs == 0 and dm.cache.test_bytes == 0
    assert dm.anchors("test") == dict.fromkeys(anchors.KEYS)  # nothing measured: no bytes
    assert set(dm.anchors("val")) == set(anchors.KEYS) and None not in dm.anchors("val").values()
    with pytest.raises(CorpusError, match=r"data\.test_fraction"):
        dm.test_windows()
    assert "no test split" in dm.describe()


def test_test_windows_tile_the_test_tokens_as_val_windows_tile_val(built, tmp_path):
    corpus, cache = built
    dm = SEMDataModule(corpus, batch_size=2, seq_len=16, val_seq_len=24, val_fraction=0.2,
                       cache_dir=str(cache.path.parent), test_fraction=0.2)
    dm.setup()
    assert dm.has_test and dm.cache.path == cache.path  # the same cache, not a rebuild
    assert dm.tokens("test") is dm.cache.test and dm.tokens("val") is dm.cache.val
    assert dm.anchors("test") == cache.anchors["test"] and dm.anchors("val") == cache.anchors["val"]
    x, y = dm.test_windows()
    test = dm.tokens("test").astype(np.int64)
    n = (test.size - 1) // 24
    assert x.shape == y.shape == (n, 24)
    for i in range(n):
        assert torch.equal(x[i], torch.from_numpy(test[i * 24:i * 24 + 24]))
        assert torch.equal(y[i], torch.from_numpy(test[i * 24 + 1:i * 24 + 25]))
    vx, _ = dm.val_windows(None)  # the same tiling, over the val tokens
    val = dm.tokens("val").astype(np.int64)
    assert vx.shape == ((val.size - 1) // 24, 24)
    assert torch.equal(vx[1], torch.from_numpy(val[24:48]))


# ----------------------------------------------------------------------------------------- anchors


def test_given_prior_charges_repeated_bytes_little():
    rng = np.random.default_rng(0)
    train = bytes(rng.integers(97, 123, 20_000, dtype=np.uint8))
    repeat = train[5_000:9_000]  # held-out bytes the training set already holds
    fresh = bytes(rng.integers(97, 123, 4_000, dtype=np.uint8))  # held-out bytes it does not
    prior = given_prior(train, {"val": repeat, "test": fresh})
    alone = Alone()
    alone.add(repeat)
    by_itself = alone.bpb()
    assert set(prior) == {"val", "test"} and set(prior["val"]) == {"xz_prior", "ppmd_prior"}
    for key in ("xz_prior", "ppmd_prior"):
        assert prior["val"][key] < 0.2 * by_itself["xz"], (key, prior["val"][key], by_itself)
        assert prior["test"][key] > 3.0  # ~4.7 bits of entropy per letter: no prior helps much
        assert prior["val"][key] < 0.2 * prior["test"][key]


def test_given_prior_without_train_or_held_out_bytes_is_none():
    assert given_prior(None, {"val": b"abc", "test": b""}) == {"val": dict.fromkeys(anchors.PRIOR),
                                                              "test": dict.fromkeys(anchors.PRIOR)}
    out = given_prior(b"some training bytes " * 10, {"val": b"some", "test": b""})
    assert out["test"] == dict.fromkeys(anchors.PRIOR)
    assert out["val"]["xz_prior"] is not None


def test_alone_matches_the_compressors_and_is_none_without_bytes():
    data = b"def f(x):\n    return x + 1\n" * 50
    alone = Alone()
    for i in range(0, len(data), 97):  # fed piece by piece, as the cache build streams documents
        alone.add(data[i:i + 97])
    bpb = alone.bpb()
    assert bpb["gzip"] == pytest.approx(8 * len(gzip.compress(data, 9)) / len(data), abs=1e-9)
    assert Alone().bpb() == {"gzip": None, "bz2": None, "xz": None}


ANCHORS = {"gzip": 2.0, "bz2": 1.8, "xz": 1.6, "xz_prior": 1.2, "ppmd_prior": None}


@pytest.mark.parametrize("bpb,expected,text", [
    (1.7, ("bz2", "xz"), "beats bz2 -9 1.8000, behind xz -9e 1.6000 by 0.1000"),  # beats some
    (2.5, (None, "gzip"), "behind gzip -9 2.0000 by 0.5000"),  # beats none
    (1.0, ("xz_prior", None), "beats xz -9e | train 1.2000"),  # beats all (None: ignored)
    (1.6, ("bz2", "xz"), "beats bz2 -9 1.8000, behind xz -9e 1.6000 by 0.0000"),  # a tie is not a win
])
def test_strongest_beaten_and_describe(bpb, expected, text):
    assert strongest_beaten(bpb, ANCHORS) == expected
    assert describe(bpb, ANCHORS) == text


def test_unmeasured_anchors_are_ignored():
    assert strongest_beaten(1.0, {"gzip": None, "ppmd_prior": None}) == (None, None)
    assert describe(1.0, {"gzip": None}) == "no anchors"
    assert describe(1.0, {}) == "no anchors"
    assert strongest_beaten(1.3, {"gzip": 2.0, "ppmd_prior": None, "xz_prior": 1.2}) == ("gzip", "xz_prior")
    # an anchor only one split measured (ppmd_prior None) never becomes the verdict
    assert "PPMd" not in describe(0.5, ANCHORS)
