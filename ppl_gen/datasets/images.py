"""Data sets and readers. Nothing here downloads anything.

* :func:`read_idx` / :func:`write_idx`: the IDX format of LeCun's MNIST files
  (raw or gzipped), also used by Fashion-MNIST (Xiao, Rasul & Vollgraf 2017).
* :func:`load_digits`: scikit-learn's bundled 8x8 digits (Alpaydin & Kaynak 1998).
* :func:`load_images`: the ``--data SPEC`` resolution shared by the image models.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_gen.core.dataset import Dataset, as_dataset  # noqa: F401  (re-exported)
from ppl_gen.core.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- IDX files
# The IDX header: two zero bytes, a type code, the number of dimensions, then one
# big-endian uint32 per dimension; the data follow in C order, big-endian.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a numpy array; clear errors if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"IDX file {path} does not exist; check the path")
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}); the file is corrupt or not gzip, "
                        "replace it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); "
                        "give MNIST-format files such as train-images-idx3-ubyte")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated inside its IDX header; replace the file")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(f"{path} holds {len(raw) - header} data bytes but its header "
                        f"promises {expected} for shape {shape}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(np.dtype(_IDX_TYPES[code])).tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(header + body)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    # some distributions use a dot before "idx" (train-images.idx3-ubyte)
    for cand in sorted(folder.glob(stem.replace("-idx", "*idx") + "*")):
        return cand
    return None


def read_idx_folder(folder: str | os.PathLike) -> dict[str, np.ndarray | None]:
    """Read an MNIST-format folder: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    folder = Path(folder)
    out: dict[str, np.ndarray | None] = {}
    for key, stem in [("x_train", "train-images-idx3-ubyte"), ("y_train", "train-labels-idx1-ubyte"),
                      ("x_test", "t10k-images-idx3-ubyte"), ("y_test", "t10k-labels-idx1-ubyte")]:
        path = _find(folder, stem)
        if path is None and key.startswith("x"):
            raise UserError(f"{folder} has no {stem}[.gz]; an IDX folder needs "
                            "train-images-idx3-ubyte and t10k-images-idx3-ubyte (raw or .gz)")
        out[key] = None if path is None else read_idx(path)
    return out


# ---------------------------------------------------------------- image data sets
def binarize(x: np.ndarray, max_value: float) -> torch.Tensor:
    """Fixed binarization at half the intensity range: a deterministic data set,
    so every run and every scheme sees the same bits."""
    return torch.as_tensor(np.asarray(x, dtype=np.float32) / max_value > 0.5, dtype=torch.float32)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits, binarized, with a fixed split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    rng = np.random.default_rng(seed)  # fixed split, independent of the run's seed
    order = rng.permutation(len(bunch.data))
    n_test = int(round(test_fraction * len(order)))
    test, train = order[:n_test], order[n_test:]
    x = binarize(bunch.data, 16.0)
    y = torch.as_tensor(bunch.target)
    return Dataset(x[train], x[test], y[train], y[test], name="digits",
                   meta={"shape": [8, 8], "source": "sklearn.datasets.load_digits"})


def _images_from_arrays(arrays: dict[str, Any], name: str, source: str) -> Dataset:
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    for split, x in (("x_train", x_train), ("x_test", x_test)):
        if len(x) == 0:
            raise UserError(f"{source}: {split} holds no images; give at least one in each of x_train and x_test")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = int((~np.isfinite(x.reshape(len(x), -1))).any(1).sum())
            raise UserError(f"{source}: {split} has {bad} image(s) with NaN or inf pixels; remove or repair them")
    if x_train.ndim < 2:
        raise UserError(f"{source}: images must have at least 2 dimensions, got shape {x_train.shape}")
    shape = list(x_train.shape[1:]) if x_train.ndim == 3 else None
    max_value = 255.0 if x_train.dtype == np.uint8 or x_train.max() > 1.0 else 1.0
    flat = lambda a: binarize(a.reshape(len(a), -1), max_value)  # noqa: E731
    lab = lambda a: None if a is None else torch.as_tensor(np.asarray(a).astype(np.int64))  # noqa: E731
    return Dataset(flat(x_train), flat(x_test), lab(arrays.get("y_train")), lab(arrays.get("y_test")),
                   name=name, meta={"shape": shape or [int(np.prod(x_train.shape[1:]))], "source": source})


def load_images(spec: str | None, test_points: int = 0) -> Dataset:
    """Resolve an image ``--data SPEC``: None/``digits``, ``fashion-mnist``, an IDX folder, an ``.npz``.
    ``test_points``: keep only the first N held-out images (0: all), for quick held-out numbers."""
    ds = _load_images(spec)
    if test_points and ds.test is not None:
        ds.test = ds.test[:test_points]
        ds.labels_test = None if ds.labels_test is None else ds.labels_test[:test_points]
        ds.meta["test_points"] = len(ds.test)
    return ds


def _load_images(spec: str | None) -> Dataset:
    if spec in (None, "", "digits"):
        return load_digits()
    if spec == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise UserError(f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing); "
                            "install it with: apt-get install dataset-fashion-mnist")
        return _images_from_arrays(read_idx_folder(FASHION_MNIST_DIR), "fashion-mnist", str(FASHION_MNIST_DIR))
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--data {spec!r} is neither a known data set (digits, fashion-mnist) "
                        "nor an existing path; give an IDX folder or an .npz with x_train/x_test")
    if path.is_dir():
        return _images_from_arrays(read_idx_folder(path), path.name, str(path))
    if path.suffix == ".npz":
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # numpy raises several types for a corrupt archive
            raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); replace the file") from None
        missing = {"x_train", "x_test"} - arrays.keys()
        if missing:
            raise UserError(f"{path} lacks {', '.join(sorted(missing))}; an .npz needs arrays "
                            f"x_train and x_test (found: {', '.join(sorted(arrays)) or 'none'})")
        return _images_from_arrays(arrays, path.stem, str(path))
    raise UserError(f"--data {spec!r}: unsupported file type {path.suffix!r}; "
                    "give an IDX folder or an .npz with x_train/x_test")
