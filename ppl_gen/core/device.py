"""Device and seed: chosen once per run, here, and nowhere else."""

import pyro
import torch

from ppl_gen.core.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``--device`` into a :class:`torch.device`; ``auto`` picks CUDA when present."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UserError(f"unknown --device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible to torch; "
                        "use --device cpu (or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random through Pyro's one call."""
    pyro.set_rng_seed(seed)
