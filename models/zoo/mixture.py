"""A two-component Gaussian mixture: a posterior with two modes (label switching).

    mu_1, mu_2 ~ N(0, 5^2),  x_n ~ (1/2) N(mu_1, 1) + (1/2) N(mu_2, 1),  n = 1..200

The assignments are summed out exactly (``MixtureSameFamily``), so the latents are the two
continuous means. The components are exchangeable: (mu_1, mu_2) = (a, b) and (b, a) explain the
data equally well, and the posterior has two mirror-image modes, far apart. A Gaussian guide can
sit in one of them only, and which one depends on where it starts; NUTS chains rarely cross from
one to the other either. Two fits can then disagree by a relabelling while each is a good fit of
one mode: errors against a reference must be read up to the symmetry. The data are 200 draws with
true means -2 and 2 from a fixed seed (``data()``); the last 50 are held out.

The posterior of two numbers can be computed by brute force: ``exact_posterior`` evaluates it on
a grid over [-4, 4]^2 (step 0.01, against posterior sds near 0.12; the prior mass outside is
negligible next to the likelihood's) and draws cells in proportion to it, jittered uniformly
within the cell. Its draws hold both modes, in equal measure: the reference every scheme is
measured against, so a guide that finds one mode is half a posterior away from it.
"""

import math

import pyro
import pyro.distributions as dist
import torch

TRUE_MEANS = (-2.0, 2.0)
GRID = (-4.0, 4.0, 801)   # the brute-force posterior's square and points per side
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


def grid_log_posterior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid points g, unnormalized log p(mu_1 = g_i, mu_2 = g_j | x) on the GRID x GRID square)."""
    x = x.double()
    g = torch.linspace(*GRID, dtype=torch.float64)
    prior = dist.Normal(0.0, 5.0).log_prob(g)
    comp = dist.Normal(g[:, None], 1.0).log_prob(x)                  # [grid, N]: log N(x_n; g, 1)
    # log sum_n log((N(x_n; a) + N(x_n; b)) / 2), one row of a at a time to bound memory
    log_lik = torch.stack([torch.logaddexp(comp[i], comp).sum(-1) for i in range(len(g))]) - len(x) * math.log(2)
    return g, prior[:, None] + prior[None, :] + log_lik


def exact_posterior(n: int, dataset) -> dict:
    """n draws of (mu_1, mu_2) from the grid posterior of the training data (both modes)."""
    g, log_post = grid_log_posterior(dataset.train.cpu())
    cell = torch.multinomial(torch.softmax(log_post.flatten(), 0), n, replacement=True)
    step = (GRID[1] - GRID[0]) / (GRID[2] - 1)
    jitter = (torch.rand(n, 2, dtype=torch.float64) - 0.5) * step
    mu = torch.stack([g[cell // len(g)], g[cell % len(g)]], -1) + jitter
    return {"mu": mu.float()}
