"""Inference backends behind one small interface, which the run pipeline calls:

``check(setup)`` refuses, before any work, what the backend cannot run; ``trainer(setup)``
returns the object with ``step(t) -> -ELBO per point``, ``state_dict(t)``, ``load_state_dict``
and ``schedule``; ``extra_config(setup)`` adds to config.json; ``sync(trainer)`` puts the fitted
values into Pyro's parameter store before anything evaluates them.

* ``pyro_backend``: Pyro's ELBOs and a torch optimizer (``ppl_gen.core.train.Trainer``);
* ``numpyro_backend``: the model file's NumPyro twin, one jitted SVI step (optional extra).
"""

from ppl_gen.core.errors import UserError


def get_backend(name: str):
    if name == "pyro":
        from ppl_gen.backends.pyro_backend import PyroBackend

        return PyroBackend()
    if name == "numpyro":  # imported only when asked for: numpyro and jax are an optional extra
        from ppl_gen.backends.numpyro_backend import NumpyroBackend

        return NumpyroBackend()
    raise UserError(f"unknown --backend {name!r}; choose pyro or numpyro")
