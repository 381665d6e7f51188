"""IDX and .npz readers, and the fixed digits split."""

import gzip

import numpy as np
import pytest
import torch

from ppl_gen.datasets.images import load_digits, load_images, read_idx, read_idx_folder, write_idx
from ppl_gen.core.errors import UserError


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((7, 5, 3)) * 200).astype(dtype)
    write_idx(tmp_path / f"a{suffix}", a)
    b = read_idx(tmp_path / f"a{suffix}")
    assert b.shape == a.shape and b.dtype == a.dtype
    np.testing.assert_array_equal(a, b)


def test_idx_header_is_the_mnist_format(tmp_path):
    """Bytes as LeCun's page describes: 0, 0, 0x08 (ubyte), ndim, then big-endian sizes."""
    write_idx(tmp_path / "x", np.zeros((2, 3, 4), np.uint8))
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    assert len(raw) == 16 + 24


def test_idx_folder_to_binary_images(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (20, 4, 4)).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs[:5])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20, dtype=np.uint8))
    ds = load_images(str(tmp_path))
    assert ds.train.shape == (20, 16) and ds.test.shape == (5, 16)
    assert ds.labels_train.tolist() == list(range(20)) and ds.labels_test is None
    expected = torch.as_tensor(imgs.reshape(20, 16) / 255.0 > 0.5, dtype=torch.float32)
    assert torch.equal(ds.train, expected)
    assert ds.meta["shape"] == [4, 4]


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    write_idx(tmp_path / "ok", np.zeros((3, 2, 2), np.uint8))
    (tmp_path / "truncated").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_idx(tmp_path / "truncated")
    (tmp_path / "notidx").write_bytes(b"hello world")
    with pytest.raises(UserError, match="bad magic"):
        read_idx(tmp_path / "notidx")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="corrupt"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(UserError, match="t10k-images"):
        read_idx_folder(tmp_path)
    with pytest.raises(UserError, match="neither a known data set"):
        load_images(str(tmp_path / "nothing-here"))


def test_npz(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "d.npz", x_train=rng.random((10, 3, 3)), x_test=rng.random((4, 3, 3)))
    ds = load_images(str(tmp_path / "d.npz"))
    assert ds.train.shape == (10, 9) and set(ds.train.unique().tolist()) <= {0.0, 1.0}
    np.savez(tmp_path / "e.npz", images=rng.random((10, 9)))
    with pytest.raises(UserError, match="lacks x_test, x_train"):
        load_images(str(tmp_path / "e.npz"))
    (tmp_path / "f.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_images(str(tmp_path / "f.npz"))


def test_digits_split_is_fixed_and_binary():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.train, b.train) and a.train.shape == (1438, 64) and a.test.shape == (359, 64)
    assert set(a.train.unique().tolist()) == {0.0, 1.0}
