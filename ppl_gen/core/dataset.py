"""The data a model file's ``data()`` returns, normalized: :class:`Dataset`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ppl_gen.core.errors import UserError


class Rows:
    """Data points given as several tensors that share their first dimension, such as covariates
    and responses (X, y): the model receives them as separate arguments, ``model(X, y)`` (or, from
    a dict, as keywords, ``model(X=..., y=...)``), and a minibatch takes the same rows of each."""

    def __init__(self, *parts: torch.Tensor, names: tuple[str, ...] | None = None):
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise UserError("data() rows must be tensors: (X, y) or {'X': X, 'y': y}")
        if len({p.shape[0] if p.ndim else -1 for p in parts}) != 1 or parts[0].ndim == 0:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise UserError(f"the tensors of one data split must have the same number of rows (first dimension); "
                            f"they have shapes {shapes}")
        self.parts, self.names = tuple(parts), names

    @property
    def shape(self) -> torch.Size:
        return self.parts[0].shape

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def __len__(self) -> int:
        return self.parts[0].shape[0]

    def __getitem__(self, idx) -> "Rows":
        return Rows(*(p[idx] for p in self.parts), names=self.names)

    def _map(self, fn) -> "Rows":
        return Rows(*(fn(p) for p in self.parts), names=self.names)

    def to(self, *args, **kwargs) -> "Rows":
        return self._map(lambda p: p.to(*args, **kwargs))

    def pin_memory(self) -> "Rows":
        return self._map(lambda p: p.pin_memory())

    def call(self, *extra) -> tuple[tuple, dict]:
        """(args, kwargs) to call a model with these rows (and ``extra`` positional arguments)."""
        if self.names:
            return extra, dict(zip(self.names, self.parts))
        return (*self.parts, *extra), {}


class NoData(Rows):
    """Nothing observed: a model file whose ``data()`` returns None defines a target density over
    its latents alone (Neal's funnel, a prior), and its model takes no data arguments. It counts
    as one data point, so per-point figures (ELBO, log p(x)) are the totals."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.parts, self.names, self._device = (), None, torch.device(device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([1])

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.get_default_dtype()

    def __len__(self) -> int:
        return 1

    def __getitem__(self, idx) -> "NoData":
        return self

    def _map(self, fn) -> "NoData":
        return self

    def to(self, device=None, *args, **kwargs) -> "NoData":
        return NoData(device) if isinstance(device, (torch.device, str)) else self

    def call(self, *extra) -> tuple[tuple, dict]:
        return (), {}


def is_row_store(x) -> bool:
    """Whether ``x`` is a row store: data points held in another form than the tensor the model
    takes (sparse counts too large to hold dense). It has ``len``, ``shape``, ``device``,
    ``to(device)`` and ``pin_memory()`` as a tensor has; ``x[idx]`` (row numbers or a slice) gives
    those rows as the tensor the model takes, and ``tensors()`` what it holds, which the runner
    checks and fingerprints."""
    return not isinstance(x, (torch.Tensor, Rows)) and callable(getattr(x, "tensors", None))


def whole(x) -> tuple[tuple, dict]:
    """(args, kwargs) that pass the data set ``x`` whole to a model: ``(x,)``, a Rows' parts, or
    every row of a row store."""
    if isinstance(x, Rows):
        return x.call()
    return ((x[:] if is_row_store(x) else x,), {})


def parts(x) -> tuple:
    """The tensors of ``x``: itself, a Rows' parts, or what a row store holds."""
    if isinstance(x, Rows):
        return x.parts
    return tuple(x.tensors()) if is_row_store(x) else (x,)


@dataclass
class Dataset:
    """What a model file's ``data()`` returns, normalized.

    ``train`` and ``test`` are tensors whose first dimension indexes data points, or
    :class:`Rows` of several such tensors, or row stores (:func:`is_row_store`; ``test`` may be None). ``labels_*`` are optional and
    only used for plots.
    """

    train: torch.Tensor | Rows
    test: torch.Tensor | Rows | None = None
    labels_train: torch.Tensor | None = None
    labels_test: torch.Tensor | None = None
    name: str = "data"
    meta: dict[str, Any] = field(default_factory=dict)
    # NaN marks a missing (unobserved) value, on purpose: the runner's NaN check lets it pass
    nan_is_missing: bool = False
    # where the model computes, when the tensors stay in host memory (--data-on-host)
    compute_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        """The device models compute on: the data's own, or the one batches are copied to."""
        return self.compute_device or self.train.device

    def to(self, device: torch.device) -> "Dataset":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(move(self.train), move(self.test), move(self.labels_train),
                       move(self.labels_test), self.name, dict(self.meta), self.nan_is_missing)

    def on_host(self, device: torch.device) -> "Dataset":
        """The tensors stay in host memory (page-locked when the device is a GPU, so batch
        copies can overlap compute); models compute on ``device``."""
        keep = lambda t: None if t is None else (t.pin_memory() if device.type == "cuda" else t)  # noqa: E731
        return Dataset(keep(self.train), keep(self.test), self.labels_train, self.labels_test, self.name,
                       dict(self.meta), self.nan_is_missing, compute_device=device)


def as_dataset(value: Any) -> Dataset:
    """Accept a Dataset, a tensor (train only) or a (train, test) pair."""
    if isinstance(value, Dataset):
        return value
    if value is None:  # a target density with nothing observed
        return Dataset(train=NoData(), name="none")
    if isinstance(value, torch.Tensor):
        return Dataset(train=value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        train, test = value
        if isinstance(train, torch.Tensor) and (test is None or isinstance(test, torch.Tensor)):
            return Dataset(train=train, test=test)
        if _is_rows(train) and (test is None or _is_rows(test)):  # ((X, y), (X_test, y_test))
            return Dataset(train=_rows(train), test=None if test is None else _rows(test))
    raise UserError("data() must return a tensor, None (nothing observed), a (train, test) pair of tensors, a ((X, y), (X_test, y_test)) "
                    f"pair of row tuples (or dicts) or a ppl_gen.Dataset; it returned {type(value).__name__}")


def _is_rows(value) -> bool:
    if isinstance(value, Rows):
        return True
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else None
    return bool(items) and all(isinstance(t, torch.Tensor) for t in items)


def _rows(value) -> Rows:
    if isinstance(value, Rows):
        return value
    if isinstance(value, dict):
        return Rows(*value.values(), names=tuple(value))
    return Rows(*value)
