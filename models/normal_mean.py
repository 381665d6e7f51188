"""The mean of a Normal with known variance: the conjugate Normal-Normal model, solved in closed form.

    mu ~ N(mu_0, tau_0^2)                      prior on the unknown mean
    x_n | mu ~ N(mu, sigma^2),  n = 1..N       observations, sigma known

The posterior is again Normal (Murphy 2007, "Conjugate Bayesian analysis of the Gaussian
distribution", sec. 2; Bishop 2006, eq. 2.141-2.142):

    p(mu | x) = N(mu_N, tau_N^2),   1 / tau_N^2 = 1 / tau_0^2 + N / sigma^2,
                                    mu_N = tau_N^2 (mu_0 / tau_0^2 + sum_n x_n / sigma^2)

so every inference method can be checked against the exact answer. Two guides:

* ``normal``: q(mu) = N(m, s^2). The family holds the posterior: the ELBO's optimum is
  m = mu_N, s = tau_N, and the ELBO there equals log p(x).
* ``map``: q(mu) = delta(mu - m), a point mass; maximizing the ELBO maximizes the log
  joint, so m goes to the posterior mode (here also mu_N) and carries no uncertainty.

``python -m inference.compare models/normal_mean.py --mcmc`` sets both against NUTS.
Data: N draws (``--n``) from N(``--true-mean``, sigma^2) with a fixed seed; a fifth held out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pyro
import pyro.distributions as dist
import torch

from ppl_gen import Dataset, Spec, UserError, data_plate
from ppl_gen.core.protocol import Guide


@dataclass
class Options:
    n: int = field(default=50, metadata={"help": "N, observations drawn (a fifth held out)"})
    true_mean: float = field(default=1.5, metadata={"help": "the mean the data are drawn with"})
    sigma: float = field(default=1.0, metadata={"help": "sigma, the known standard deviation of x_n"})
    prior_mean: float = field(default=0.0, metadata={"help": "mu_0, the prior mean of mu"})
    prior_sd: float = field(default=2.0, metadata={"help": "tau_0, the prior standard deviation of mu"})

    def validate(self):
        if self.n < 2:
            raise UserError(f"--n must be at least 2 (train and held-out), got {self.n}")
        for name in ("sigma", "prior_sd"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


# one global latent: full-batch steps, a fast learning rate
DEFAULTS = {"elbo": "trace", "steps": 1500, "lr": 0.05}


def data(options: Options) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = options.true_mean + options.sigma * torch.randn(options.n, generator=g, dtype=torch.float64)
    n_test = max(options.n // 5, 1)
    return Dataset(x[n_test:], x[:n_test], name="normal", meta={"true_mean": options.true_mean})


class NormalMean:
    def __init__(self, options: Options):
        self.o = options

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        o = self.o
        mu = pyro.sample("mu", dist.Normal(x.new_tensor(o.prior_mean), x.new_tensor(o.prior_sd)))
        with data_plate(x, idx, size):
            pyro.sample("x", dist.Normal(mu, o.sigma), obs=x)

    def normal(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(mu) = N(m, s^2), started at the prior."""
        m = pyro.param("m", lambda: x.new_tensor(self.o.prior_mean))
        s = pyro.param("s", lambda: x.new_tensor(self.o.prior_sd), constraint=dist.constraints.positive)
        pyro.sample("mu", dist.Normal(m, s))

    def map(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(mu) = delta(mu - m): MAP estimation."""
        m = pyro.param("map_m", lambda: x.new_tensor(self.o.prior_mean))
        pyro.sample("mu", dist.Delta(m))

    # -- each fitted guide's (m, s), read from Pyro's store ---------------------------------
    def q_normal(self) -> tuple[float, float]:
        """q(mu) = N(m, s^2): mean m, standard deviation s."""
        return pyro.param("m").item(), pyro.param("s").item()

    def q_map(self) -> tuple[float, float]:
        """A point mass: mean m, no spread."""
        return pyro.param("map_m").item(), 0.0

    def guides(self) -> dict[str, NormalGuide]:
        return {"normal": NormalGuide(self.normal, q=self.q_normal), "map": NormalGuide(self.map, q=self.q_map)}

    def posterior(self, x: torch.Tensor) -> tuple[float, float]:
        """(mu_N, tau_N) in closed form."""
        o = self.o
        precision = 1 / o.prior_sd ** 2 + len(x) / o.sigma ** 2
        mean = (o.prior_mean / o.prior_sd ** 2 + x.sum().item() / o.sigma ** 2) / precision
        return mean, math.sqrt(1 / precision)

    def log_evidence(self, x: torch.Tensor) -> float:
        """log p(x): x is jointly Gaussian, mean mu_0 1, covariance sigma^2 I + tau_0^2 1 1^T."""
        o, n = self.o, len(x)
        cov = o.sigma ** 2 * torch.eye(n, dtype=torch.float64) + o.prior_sd ** 2
        return dist.MultivariateNormal(torch.full((n,), o.prior_mean, dtype=torch.float64),
                                       cov).log_prob(x.double().cpu()).item()

    def draw_posterior(self, x: torch.Tensor, n: int) -> dict:
        """n exact draws of mu ~ N(mu_N, tau_N^2)."""
        mean, sd = self.posterior(x)
        return {"mu": dist.Normal(x.new_tensor(mean), x.new_tensor(sd)).sample((n,))}

    def evaluate(self, run) -> dict:
        x = run.dataset.train
        mean, sd = self.posterior(x)
        out = {"posterior_mean": mean, "posterior_sd": sd, "log_evidence_per_point": self.log_evidence(x) / len(x)}
        if getattr(run.guide, "q", None) is None:  # an automatic guide: its summary and the reference report it
            return out
        m, s = run.guide.q()
        return {**out, "vi_mean": m, "vi_sd": s, "abs_error_mean": abs(m - mean), "sd_ratio_vi_to_exact": s / sd}


@dataclass
class NormalGuide(Guide):
    """A guide of this file and the q(mu) it has fitted, ``q() -> (m, s)``: its mean and standard
    deviation, for comparison with the exact posterior N(mu_N, tau_N^2)."""

    q: Callable[[], tuple[float, float]] | None = None


def build(options: Options, dataset: Dataset) -> Spec:
    nm = NormalMean(options)
    return Spec(model=nm.model, guides=nm.guides(), evaluate=nm.evaluate,
                exact_posterior=lambda n: nm.draw_posterior(dataset.train, n),
                description=__doc__.split("\n")[0])


def numpyro_twin(options: Options, dataset: Dataset):
    """The NumPyro twin (``--backend numpyro``, Phan et al. 2019): the same conjugate model,
    both guides with the Pyro store's parameter names (``m``, ``s``; ``map_m``), and float64
    like the Pyro side's data."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate

    o = options

    def model(x, idx=None, size=None):
        mu = numpyro.sample("mu", nd.Normal(jnp.asarray(o.prior_mean, x.dtype), jnp.asarray(o.prior_sd, x.dtype)))
        with data_plate(x, idx, size):
            numpyro.sample("x", nd.Normal(mu, o.sigma), obs=x)

    def normal(x, idx=None, size=None):
        """q(mu) = N(m, s^2), started at the prior."""
        m = numpyro.param("m", jnp.asarray(o.prior_mean, x.dtype))
        s = numpyro.param("s", jnp.asarray(o.prior_sd, x.dtype), constraint=nd.constraints.positive)
        numpyro.sample("mu", nd.Normal(m, s))

    def map_guide(x, idx=None, size=None):
        """q(mu) = delta(mu - m): MAP estimation."""
        numpyro.sample("mu", nd.Delta(numpyro.param("map_m", jnp.asarray(o.prior_mean, x.dtype))))

    return NumpyroTwin(model=model, guides={"normal": normal, "map": map_guide}, x64=True)
