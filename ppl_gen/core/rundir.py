"""The run folder: the files a run leaves behind, and the only code that writes them.

``config.json`` (every setting, seed, versions, device), ``trace.csv`` (step, loss,
seconds, and the held-out ELBO at evaluation steps), ``metrics.json``,
``checkpoint.pt`` and PNG plots. Checkpoints hold tensors and plain numbers only,
so ``torch.load(path, weights_only=True)`` reads them without running any code.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ppl_gen.core.errors import UserError

TRACE_FIELDS = ["step", "loss", "seconds", "test_elbo"]


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "pyro-ppl", "numpy", "matplotlib", "arviz", "numpyro", "jax", "ppl-gen"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def default_out_dir(model_name: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(root) / f"{model_name}-{stamp}"
    n = 1
    while out.exists():  # two runs in the same second get their own folders
        n += 1
        out = Path(root) / f"{model_name}-{stamp}-{n}"
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; null says "not a number" honestly
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


class RunFolder:
    """Reads and writes one run folder."""

    def __init__(self, path: str | Path, terms: tuple[str, ...] = ()):
        self.path = Path(path)
        # trace.csv's columns: the runner's, then the guide's own ELBO terms (Guide.trace_terms)
        self.fields = [*TRACE_FIELDS, *terms]

    def create(self) -> "RunFolder":
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} exists and is not a folder; choose another path")
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # -- json files ------------------------------------------------------------
    def write_json(self, name: str, obj: dict) -> Path:
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
        os.replace(tmp, target)
        return target

    def read_json(self, name: str) -> dict:
        target = self.path / name
        if not target.is_file():
            raise UserError(f"{self.path} has no {name}; is it a run folder?")
        try:
            return json.loads(target.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{target} is not valid JSON ({e}); the run folder is damaged") from None

    # -- trace.csv -------------------------------------------------------------
    def start_trace(self, keep_until_step: int | None = None) -> None:
        """A fresh trace, or (on resume) the old one cut back to the checkpoint's step."""
        target = self.path / "trace.csv"
        rows = []
        if keep_until_step is not None and target.is_file():
            rows = [r for r in self.read_trace() if int(r["step"]) <= keep_until_step]
        with open(target, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append_trace(self, rows: list[dict]) -> None:
        if not rows:
            return
        with open(self.path / "trace.csv", "a", newline="") as f:
            csv.DictWriter(f, self.fields, restval="", extrasaction="ignore").writerows(rows)

    def set_test_elbo(self, step: int, value: float) -> None:
        """Add the held-out ELBO to the row of ``step``, after that row (and the checkpoint) are
        on disk: an evaluation that fails or is interrupted loses nothing."""
        rows = self.read_trace()
        self.fields += [k for k in (rows[0] if rows else {}) if k not in self.fields]  # keep every column
        for r in rows:
            if int(r["step"]) == step:
                r["test_elbo"] = value
        tmp = self.path / "trace.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path / "trace.csv")

    def read_trace(self) -> list[dict]:
        if not (self.path / "trace.csv").is_file():
            return []
        with open(self.path / "trace.csv", newline="") as f:
            return list(csv.DictReader(f))

    # -- checkpoint.pt ---------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        """Write atomically, so a crash mid-write never destroys the last good checkpoint."""
        tmp = self.path / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self, map_location=None) -> dict:
        if not self.checkpoint_path.is_file():
            raise UserError(f"{self.path} has no checkpoint.pt to resume from")
        try:
            state = torch.load(self.checkpoint_path, map_location=map_location, weights_only=True)
        except Exception as e:  # torch raises several types for damaged files
            raise UserError(f"cannot load {self.checkpoint_path} ({type(e).__name__}); "
                            "the checkpoint is damaged, start a new run") from None
        missing = [k for k in ("step", "params") if not isinstance(state, dict) or k not in state]
        if missing:
            raise UserError(f"{self.checkpoint_path} lacks {' and '.join(missing)}: it is damaged or not a "
                            "ppl_gen checkpoint; start a new run")
        return state
