"""The NumPyro twin of a model file: the same model and guides, written for NumPyro/JAX.

NumPyro (Phan, Pradhan & Jankowiak 2019, "Composable Effects for Flexible and Accelerated
Probabilistic Programming in NumPyro", arXiv:1912.11554) runs Pyro's programming model on
JAX, so a whole SVI step (model, guide, ELBO, gradient, Adam) compiles into one XLA program.

A model file declares its twin with a function at its end::

    def numpyro_twin(options, dataset):
        import numpyro, numpyro.distributions as nd          # imported here, never at the top
        from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate
        def model(x, idx=None, size=None): ...
        def guide(x, idx=None, size=None): ...
        return NumpyroTwin(model=model, guides={"guide": guide})

The contract that makes the two backends comparable (``ppl_gen.backends.numpyro_backend``):

* the same site names, priors and likelihoods as the Pyro model, and the same guide names;
* every ``numpyro.param`` carries the *name, shape and constraint of its Pyro counterpart*
  (for ``pyro.module("decoder", net)`` that is ``"decoder$$$hidden.weight"`` with torch's
  ``[out, in]`` layout, see :func:`linear`). The runner starts NumPyro from the Pyro
  side's initial values and copies the fitted values back, so both backends start at the
  same point and are evaluated by one code path; ``init_value`` in a twin only gives shapes
  (and values for standalone use);
* minibatch twins take ``(x, idx=None, size=None)`` like the Pyro ones: ``x`` holds the
  batch rows and :func:`data_plate` scales their log-densities by ``size / len(x)``.

Nothing here imports jax or numpyro at module level: ``ppl_gen`` works without them.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class NumpyroTwin:
    """What ``numpyro_twin(options, dataset)`` returns.

    ``model`` and ``guides`` mirror the Pyro Spec's (same names). ``x64`` asks JAX for
    float64 (``jax_enable_x64``), for models whose Pyro side computes in float64.
    ``local_params`` names per-data-point parameters (one row per training example): the
    backend updates only the rows a step touched, like ``ppl_gen.core.optim.RowwiseAdam``.
    ``enum_as`` names the estimator that stands for ``--elbo enum`` in a twin with nothing to
    enumerate (no discrete latent site), where Pyro's TraceEnum_ELBO computes exactly
    Trace_ELBO's estimate: ``"trace"``. Left None, ``--elbo enum`` is refused (NumPyro's
    TraceEnum_ELBO needs funsor). ``refused`` maps a Pyro guide the twin does not mirror to
    why not, for the backend's error line.
    """

    model: Callable
    guides: dict[str, Callable]
    x64: bool = False
    local_params: tuple[str, ...] = ()
    enum_as: str | None = None
    refused: dict[str, str] = field(default_factory=dict)
    description: str = ""
    extras: dict = field(default_factory=dict)


@contextlib.contextmanager
def data_plate(x, idx=None, size: int | None = None, name: str = "data", dim: int | None = None):
    """NumPyro's counterpart of :func:`ppl_gen.data_plate`.

    ``x`` holds the batch rows already. With ``idx`` (their row numbers) and ``size``
    (rows of the full set), every log-density inside is scaled by ``size / len(x)``:
    the unbiased minibatch estimate of the full-data ELBO (Hoffman et al. 2013), the
    same scaling Pyro's subsampled plate applies. (NumPyro's own ``subsample_size``
    would draw its own indices; here the runner's batch schedule decides them.)
    """
    import numpyro
    from numpyro import handlers

    n = x.shape[0]
    with numpyro.plate(name, n, dim=dim) as ix:
        if idx is None or size is None or size == n:
            yield ix
        else:
            with handlers.scale(scale=size / n):
                yield ix


@functools.lru_cache(maxsize=None)
def softmax_simplex():
    """A NumPyro simplex constraint unconstrained the way Pyro's parameter store does it.

    Pyro keeps a ``constraint=simplex`` parameter as K free values u with p = softmax(u)
    (torch's ``transform_to(simplex)``); NumPyro's ``biject_to(simplex)`` is the (K-1)-value
    stick-breaking map. Adam is not invariant to the parametrization, so the MAP guide's
    simplex rows would take other steps on NumPyro than on Pyro. This constraint is the
    simplex, registered with the softmax map, so both backends optimize the same u: use it
    for every simplex-constrained ``numpyro.param`` of a twin (``models/hmm.py`` does)."""
    import jax
    import jax.numpy as jnp
    from numpyro.distributions import constraints
    from numpyro.distributions.transforms import Transform, biject_to

    class SoftmaxTransform(Transform):
        domain, codomain = constraints.real_vector, constraints.simplex

        def __call__(self, u):
            return jax.nn.softmax(u, axis=-1)

        def _inverse(self, p):  # torch's SoftmaxTransform.inv: one of the u with softmax(u) = p
            return jnp.log(p)

    class SoftmaxSimplex(type(constraints.simplex)):
        pass

    biject_to.register(SoftmaxSimplex, lambda constraint: SoftmaxTransform())
    return SoftmaxSimplex()


def linear(prefix: str, x, in_dim: int, out_dim: int):
    """``torch.nn.Linear`` as NumPyro params named like Pyro's ``pyro.module`` store entries:
    ``{prefix}.weight`` of shape [out, in] and ``{prefix}.bias`` of shape [out]."""
    import jax.numpy as jnp
    import numpyro

    w = numpyro.param(f"{prefix}.weight", jnp.zeros((out_dim, in_dim), x.dtype))
    b = numpyro.param(f"{prefix}.bias", jnp.zeros((out_dim,), x.dtype))
    return x @ w.T + b


def to_numpy(value):
    """A torch tensor (any device) or array as a numpy array; None stays None."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    import numpy as np

    return np.asarray(value)
