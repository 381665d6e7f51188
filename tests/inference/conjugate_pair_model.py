"""Two Normal means with conjugate priors and no guide: the oracle for Pyro's automatic guides.

    mu_d ~ N(0, tau0^2),   x_nd | mu ~ N(mu_d, sigma^2),   d = 1, 2,  n = 1..N

Each mu_d has the posterior N(mu_N, tau_N^2) of tests/inference/conjugate_model.py (1/tau_N^2 =
1/tau0^2 + N/sigma^2, mu_N = tau_N^2 sum_n x_nd / sigma^2), independently of the other. Two
numbers, so that a flow (AutoIAFNormal) has something to be autoregressive over.
"""

import math

import pyro
import pyro.distributions as dist
import torch

TAU0, SIGMA = 10.0, 1.0
DEFAULTS = {"steps": 600, "lr": 0.05}


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.tensor([3.0, -1.0]) + SIGMA * torch.randn(120, 2, generator=g)
    return x[:100], x[100:]


def posterior(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    precision = 1 / TAU0**2 + len(x) / SIGMA**2
    return x.sum(0) / SIGMA**2 / precision, math.sqrt(1 / precision)


def log_evidence(x: torch.Tensor) -> float:
    """log p(x): each column is jointly Gaussian, mean 0, covariance sigma^2 I + tau0^2 11^T."""
    n = len(x)
    cov = SIGMA**2 * torch.eye(n, dtype=torch.float64) + TAU0**2
    mvn = dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
    return sum(mvn.log_prob(x[:, d].double()).item() for d in range(x.shape[1]))


def model(x):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(2), TAU0).to_event(1))
    with pyro.plate("obs", len(x)):
        pyro.sample("x", dist.Normal(mu, SIGMA).to_event(1), obs=x)
