"""Eight schools, centered: the hierarchical model as a statistician writes it (a model and its
data, no guide; Pyro's automatic guides fit it, ``--guide AutoNormal`` by default).

    mu ~ N(0, 5^2),  tau ~ HalfCauchy(5),  theta_j ~ N(mu, tau^2),  y_j ~ N(theta_j, sigma_j^2),  j = 1..8

y_j and sigma_j are the estimated coaching effects and their standard errors in eight schools
(Rubin 1981, "Estimation in parallel randomized experiments", J. Educ. Stat. 6; Gelman et al.,
Bayesian Data Analysis, 3rd ed., sec. 5.5). The priors are those of the Stan and PyMC case
studies. In this centered form the posterior is Neal's funnel in (tau, theta): small tau pins
every theta_j to mu, a geometry a Gaussian guide cannot follow and NUTS reports as divergences;
``eight_schools_noncentered.py`` is the same model written so that it goes away.
"""

import pyro
import pyro.distributions as dist
import torch

Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
REFERENCE_POSTERIOR = "references/eight_schools.nc"
# ^ NUTS on the non-centered form, the same posterior without the funnel (its divergences):
#   python -m inference.reference models/zoo/eight_schools.py --via models/zoo/eight_schools_noncentered.py --seed 100
#   (its own seed: a run apart from the non-centered file's reference, so the two check each other)
DEFAULTS = {"steps": 3000, "lr": 0.02}


def data():
    """The eight estimates, all of them the training data (there is nothing to hold out)."""
    return torch.tensor(Y)


def model(y):
    sigma = y.new_tensor(SIGMA)
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("school", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
