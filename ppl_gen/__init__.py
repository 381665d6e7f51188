"""ppl_gen: variational inference on generative models, built on Pyro.

The library part: the model-file protocol, data loaders, the training step and ELBO
evaluator, the run folder, plots. Entry points live in ``inference/``.
"""

from .data import Dataset
from .errors import UserError
from .protocol import Spec, data_plate

__all__ = ["Dataset", "Spec", "UserError", "data_plate"]
__version__ = "0.1.0"
