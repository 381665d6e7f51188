"""ppl_gen: variational inference on generative models, built on Pyro.

The library part: the model-file protocol, data loaders, the training step and ELBO
evaluator, the run folder, plots. Entry points live in ``inference/``.
"""

from ppl_gen.core.dataset import Dataset
from ppl_gen.datasets.images import load_images
from ppl_gen.core.errors import UserError
from ppl_gen.core.protocol import Guide, Metric, Spec, data_plate

__all__ = ["Dataset", "Guide", "Metric", "Spec", "UserError", "data_plate", "load_images"]
__version__ = "0.1.0"


def __getattr__(name):
    # plotting pulls in matplotlib: loaded on first use, not at ``import ppl_gen``
    if name == "plotting":
        import importlib

        return importlib.import_module("ppl_gen.core.plotting")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
