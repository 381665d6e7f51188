"""Normal-Normal conjugate model, the test oracle for every ELBO (Pyro's own tests use the same).

    mu ~ N(mu0, tau0^2),   x_n | mu ~ N(mu, sigma^2),  n = 1..N

The posterior is N(mu_N, tau_N^2) with 1/tau_N^2 = 1/tau0^2 + N/sigma^2 and
mu_N = tau_N^2 (mu0/tau0^2 + sum_n x_n / sigma^2) (Murphy 2007, "Conjugate Bayesian
analysis of the Gaussian distribution", sec. 2). Model and guide accept minibatches.
"""

import math

import pyro
import pyro.distributions as dist
import torch

from ppl_gen import data_plate

MU0, TAU0, SIGMA = 0.0, 10.0, 1.0
DEFAULTS = {"steps": 1500, "lr": 0.02}


def data():
    g = torch.Generator().manual_seed(123)
    x = 3.0 + SIGMA * torch.randn(200, generator=g)
    return x[:150], x[150:]


def posterior(x: torch.Tensor) -> tuple[float, float]:
    precision = 1 / TAU0**2 + len(x) / SIGMA**2
    mean = (MU0 / TAU0**2 + x.sum().item() / SIGMA**2) / precision
    return mean, math.sqrt(1 / precision)


def log_evidence(x: torch.Tensor) -> float:
    """log p(x): x is jointly Gaussian with mean mu0 and covariance sigma^2 I + tau0^2 11^T."""
    n = len(x)
    cov = SIGMA**2 * torch.eye(n, dtype=torch.float64) + TAU0**2
    return dist.MultivariateNormal(torch.full((n,), MU0, dtype=torch.float64), cov).log_prob(x.double()).item()


def model(x, idx=None, size=None):
    mu = pyro.sample("mu", dist.Normal(x.new_tensor(MU0), x.new_tensor(TAU0)))
    with data_plate(x, idx, size):
        pyro.sample("x", dist.Normal(mu, SIGMA), obs=x)


def guide(x, idx=None, size=None):
    loc = pyro.param("loc", x.new_tensor(0.0))
    scale = pyro.param("scale", x.new_tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def numpyro_twin(options=None, dataset=None):
    """The same model and guide in NumPyro (``--backend numpyro``): same sites, priors and
    parameter names, so both backends start from and report the same values."""
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate

    def np_model(x, idx=None, size=None):
        mu = numpyro.sample("mu", nd.Normal(MU0, TAU0))
        with data_plate(x, idx, size):
            numpyro.sample("x", nd.Normal(mu, SIGMA), obs=x)

    def np_guide(x, idx=None, size=None):
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 1.0, constraint=nd.constraints.positive)
        numpyro.sample("mu", nd.Normal(loc, scale))

    return NumpyroTwin(model=np_model, guides={"guide": np_guide})
