import math

import numpy as np
import pytest
import torch

from sem.data.cache import split_of
from sem.data.corpus import CorpusError, StdlibCorpus, TextFilesCorpus
from sem.data.datamodule import SEMDataModule, byte_targets


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    # random bytes: every window of a few tokens is unique, so a window can be located in the arrays
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(60):
        (root / f"doc{i:02d}.bin").write_bytes(rng.integers(0, 256, 1500, dtype=np.uint8).tobytes())
    names = [f"{root.name}/doc{i:02d}.bin" for i in range(60)]
    assert 3 <= sum(split_of(n, 0.2) == "val" for n in names) <= 25
    return root


def make(corpus_dir, tmp_path, **kw):
    kw = {"batch_size": 4, "seq_len": 16, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache"), **kw}
    dm = SEMDataModule(TextFilesCorpus([str(corpus_dir)]), **kw)
    dm.setup()
    return dm


def find_rows(rows: np.ndarray, arr: np.ndarray) -> list[int]:
    """Token index of each row of rows inside arr (-1 when absent): a byte search over uint16 data."""
    hay = np.asarray(arr, dtype=np.uint16).tobytes()
    out = []
    for r in np.asarray(rows, dtype=np.uint16):
        needle, at = r.tobytes(), hay.find(r.tobytes())
        while at > 0 and at % 2:  # a match straddling two tokens is not a match
            at = hay.find(needle, at + 1)
        out.append(at // 2 if at >= 0 else -1)
    return out


def test_train_batch_is_a_pure_function_of_its_arguments(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    x, y = dm.train_batch(3)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for _ in range(2):
        dm.train_batch(7)  # calls in between change nothing
    assert torch.equal(dm.train_batch(3)[0], x)
    fresh = make(corpus_dir, tmp_path)  # a new process after a resume: same batch
    assert torch.equal(fresh.train_batch(3)[0], x)
    assert not torch.equal(dm.train_batch(4)[0], x)
    assert not torch.equal(make(corpus_dir, tmp_path, seed=1).train_batch(3)[0], x)


def test_targets_are_inputs_shifted_by_one_from_the_train_array(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    x, y = dm.train_batch(0, seq_len=12, batch_size=6)
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    assert -1 not in find_rows(windows, dm.cache.train)


def test_windows_never_run_past_the_end(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    n = dm.cache.train.size
    x, y = dm.train_batch(0, seq_len=n - 1, batch_size=3)  # exactly one possible start
    for row in range(3):
        assert torch.equal(y[row], torch.from_numpy(dm.cache.train[1:].astype(np.int64)))
    with pytest.raises(CorpusError, match=f"train split has {n} tokens"):
        dm.train_batch(0, seq_len=n)


def test_rank_slices_partition_the_global_batch(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    r0 = dm.train_batch(9, rank=0, world_size=2)[0]
    r1 = dm.train_batch(9, rank=1, world_size=2)[0]
    global_batch = dm.train_batch(9, batch_size=8)[0]
    assert torch.equal(torch.cat([r0, r1]), global_batch)
    assert not torch.equal(r0, r1)
    with pytest.raises(ValueError, match="rank"):
        dm.train_batch(9, rank=2, world_size=2)


def test_loader_resumes_at_start_step(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    start = {"step": 5}
    loader = dm.train_loader(lambda: start["step"])
    it = iter(loader)
    for step in (5, 6):
        x, y = next(it)
        ex, ey = dm.train_batch(step)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    start["step"] = 42  # a new iter() (new epoch / resume) asks again
    assert torch.equal(next(iter(loader))[0], dm.train_batch(42)[0])


def test_loader_accumulation_yields_distinct_micro_batches_per_step(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    it = iter(dm.train_loader(lambda: 5, accumulate=2))
    got = [next(it)[0] for _ in range(4)]
    assert torch.equal(got[0], dm.train_batch(5)[0])  # micro 0 of a step is train_batch(step)
    assert torch.equal(got[1], dm.train_batch(5, micro=1)[0])
    assert not torch.equal(got[0], got[1])
    assert torch.equal(got[2], dm.train_batch(6)[0])


def test_shape_at_changes_shape_exactly_at_the_step(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    it = iter(dm.train_loader(lambda: 5, shape_at=lambda s: (8, 4) if s < 7 else (32, 2)))
    shapes = [tuple(next(it)[0].shape) for _ in range(4)]
    assert shapes == [(4, 8), (4, 8), (2, 32), (2, 32)]


def test_val_windows_are_fixed_tile_the_val_array_and_never_touch_train(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path, val_seq_len=10)
    x, y = dm.val_windows(None)
    n = (dm.cache.val.size - 1) // 10
    assert x.shape == (n, 10)
    val = torch.from_numpy(dm.cache.val.astype(np.int64))
    assert torch.equal(x.flatten(), val[: n * 10]) and torch.equal(y.flatten(), val[1: n * 10 + 1])
    assert find_rows(x[:, :8].numpy(), dm.cache.train) == [-1] * n  # no held-out text in training data
    again = make(corpus_dir, tmp_path, val_seq_len=10).val_windows(None)
    assert torch.equal(again[0], x)
    sub, _ = dm.val_windows(4)
    rows = find_rows(sub.numpy(), x.numpy().reshape(-1))
    assert [r % 10 for r in rows] == [0] * 4 and rows[0] == 0  # whole windows, first one included
    gaps = np.diff(rows) // 10
    assert gaps.max() - gaps.min() <= 1 and gaps.min() >= n // 4  # evenly spread over the val set


def test_val_loader_batches(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path, val_max_windows=5, val_batch_size=2)
    assert [b[0].shape[0] for b in dm.val_loader()] == [2, 2, 1]
    assert sum(b[0].shape[0] for b in dm.val_loader(None)) == (dm.cache.val.size - 1) // 16
    assert torch.equal(next(iter(dm.val_loader()))[1], dm.val_windows(5)[1][:2])


def test_bpb_helpers(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    assert dm.val_bpb(100 * math.log(2), 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_byte_targets"):
        dm.val_bpb(1.0, 0)
    assert byte_targets(torch.tensor([[1, 256, 255, 257]])) == 2
    assert dm.gzip_bpb == dm.cache.gzip_bpb > 7.0  # random bytes do not compress


def test_setup_is_idempotent(corpus_dir, tmp_path):
    dm = make(corpus_dir, tmp_path)
    cache = dm.cache
    dm.setup()
    assert dm.cache is cache
    assert f"val {cache.n_val_docs} docs" in dm.describe() and "batch 4 x 16" in dm.describe()


def test_data_used_before_setup_is_a_clear_error(corpus_dir, tmp_path):
    dm = SEMDataModule(TextFilesCorpus([str(corpus_dir)]), cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_batch(0)


def test_corpus_smaller_than_a_window_is_refused(corpus_dir, tmp_path):
    with pytest.raises(CorpusError, match=r"train split has \d+ tokens, fewer than one window of seq_len\+1 = "
                                          r"100001 \(data.seq_len\)"):
        make(corpus_dir, tmp_path, seq_len=100_000)
    with pytest.raises(CorpusError, match=r"val split .* \(data.val_seq_len\)"):
        make(corpus_dir, tmp_path, seq_len=16, val_seq_len=50_000)


@pytest.mark.parametrize("kw,name", [
    ({"batch_size": 0}, "data.batch_size"), ({"seq_len": -1}, "data.seq_len"),
    ({"val_fraction": 0.0}, "data.val_fraction"), ({"val_fraction": 1.0}, "data.val_fraction"),
    ({"val_max_windows": 0}, "data.val_max_windows"), ({"val_seq_len": 0}, "data.val_seq_len"),
    ({"seed": -3}, "seed"),
])
def test_bad_arguments_name_the_field(kw, name):
    with pytest.raises(ValueError, match=name):
        SEMDataModule(TextFilesCorpus(["x"]), **kw)


@pytest.mark.slow
def test_default_stdlib_corpus_end_to_end(tmp_path):
    # the only test on the real stdlib: builds its cache in tmp_path (~30 s: mostly the prior anchors,
    # three passes of xz -9e and of PPMd over the 10 MB training set)
    dm = SEMDataModule(StdlibCorpus(), cache_dir=str(tmp_path))
    dm.setup()
    c = dm.cache
    assert c.n_train_docs > 300 and c.n_val_docs > 5 and c.n_test_docs > 5
    total = c.val_bytes + c.test_bytes + c.train_bytes
    assert 3e6 < c.train_bytes < 4e7 and 0.02 < c.val_bytes / total < 0.1 and 0.02 < c.test_bytes / total < 0.1
    assert 1.6 < dm.gzip_bpb < 2.5
    for split in ("val", "test"):
        a = dm.anchors(split)
        # the training set as a prior helps both, and PPMd (adaptive, order 64) is the strongest anchor
        assert a["ppmd_prior"] < a["xz_prior"] < a["xz"] < a["gzip"], (split, a)
    x, y = dm.train_batch(0)
    assert x.shape == (16, 128) and int(x.max()) < 259  # the datamodule's defaults are the config's
