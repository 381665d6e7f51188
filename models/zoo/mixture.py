"""A two-component Gaussian mixture: a posterior with two modes (label switching).

    mu_1, mu_2 ~ N(0, 5^2),  x_n ~ (1/2) N(mu_1, 1) + (1/2) N(mu_2, 1),  n = 1..200

The assignments are summed out exactly (``MixtureSameFamily``), so the latents are the two
continuous means. The components are exchangeable: (mu_1, mu_2) = (a, b) and (b, a) explain the
data equally well, and the posterior has two mirror-image modes, far apart. A Gaussian guide can
sit in one of them only, and which one depends on where it starts; NUTS chains rarely cross from
one to the other either. Two fits can then disagree by a relabelling while each is a good fit of
one mode: errors against a reference must be read up to the symmetry. The data are 200 draws with
true means -2 and 2 from a fixed seed (``data()``); the last 50 are held out.
"""

import pyro
import pyro.distributions as dist
import torch

TRUE_MEANS = (-2.0, 2.0)
DEFAULTS = {"steps": 3000, "lr": 0.02}


def data():
    """(training, held-out) draws of the mixture with means -2 and 2, seed 0."""
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 2, (200,), generator=g)
    x = torch.tensor(TRUE_MEANS)[z] + torch.randn(200, generator=g)
    return x[:150], x[150:]


def model(x):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(2), 5.0).to_event(1))
    mix = dist.MixtureSameFamily(dist.Categorical(probs=x.new_full((2,), 0.5)), dist.Normal(mu, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", mix, obs=x)
