"""Neal's funnel: a target density with nothing observed, the hardest simple geometry for VI.

    v ~ N(0, 3^2),   x_i | v ~ N(0, e^v),  i = 1..9

(Neal 2003, "Slice sampling", Annals of Statistics 31(3):705-767, sec. 8). The scale of x
spans e^{-4.5} to e^{4.5} across the central 95% of v: a narrow neck where v is small and a
wide mouth where it is large, the shape of the centered eight schools' posterior in (tau, theta)
drawn plainly. Nothing is observed (``data()`` returns None), so the "posterior" is this joint
itself and it can be drawn exactly (``exact_posterior``): every scheme's error is measured
against the truth, with no sampler in between. A Gaussian guide cannot bend with the neck: it
shrinks v's spread and misses the tails, and PSIS k-hat should say so (Yao et al. 2018).
"""

import pyro
import pyro.distributions as dist
import torch

D = 9   # the dimension of x in Neal's example
DEFAULTS = {"steps": 2000, "lr": 0.02}


def data():
    """Nothing is observed."""
    return None


def model():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("i", D):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


def exact_posterior(n: int) -> dict:
    """n independent draws of (v, x) from the funnel itself (ancestral sampling)."""
    v = dist.Normal(0.0, 3.0).sample((n,))
    x = dist.Normal(0.0, torch.exp(v / 2)).expand((D, n)).sample().T
    return {"v": v, "x": x}
