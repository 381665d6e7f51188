"""The data a model file's ``data()`` returns, normalized: :class:`Dataset`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ppl_gen.core.errors import UserError


@dataclass
class Dataset:
    """What a model file's ``data()`` returns, normalized.

    ``train`` and ``test`` are tensors whose first dimension indexes data points
    (``test`` may be None). ``labels_*`` are optional and only used for plots.
    """

    train: torch.Tensor
    test: torch.Tensor | None = None
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
    if isinstance(value, torch.Tensor):
        return Dataset(train=value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        train, test = value
        if isinstance(train, torch.Tensor) and (test is None or isinstance(test, torch.Tensor)):
            return Dataset(train=train, test=test)
    raise UserError("data() must return a tensor, a (train, test) pair of tensors or a "
                    f"ppl_gen.Dataset; it returned {type(value).__name__}")
