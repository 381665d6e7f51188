"""A model file whose loss turns NaN at training step 13 (counted by gradient-carrying calls)."""

import pyro
import pyro.distributions as dist
import torch

calls = [0]


def data():
    x = torch.linspace(-1, 1, 20)
    return x[:15], x[15:]


def model(x):
    if torch.is_grad_enabled():  # evaluation runs without gradients and is not counted
        calls[0] += 1
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    bad = x * float("nan") if calls[0] >= 13 else x
    with pyro.plate("obs", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=bad)


def guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 1.0))
