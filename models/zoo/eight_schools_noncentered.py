"""Eight schools, non-centered: the model of ``eight_schools.py`` with theta_j = mu + tau eta_j.

    mu ~ N(0, 5^2),  tau ~ HalfCauchy(5),  eta_j ~ N(0, 1),  y_j ~ N(mu + tau eta_j, sigma_j^2)

The same joint distribution of (mu, tau, theta); the latents the sampler and the guide see,
(mu, tau, eta), are a priori independent, so the funnel of the centered form is gone (Papaspiliopoulos,
Roberts & Skold 2007, "A general framework for the parametrization of hierarchical models",
Statistical Science 22). theta is kept as a deterministic site, so posterior summaries show it.
"""

import pyro
import pyro.distributions as dist

# the same data, the same runner defaults: only the parametrization differs
from models.zoo.eight_schools import DEFAULTS, SIGMA, Y, data  # noqa: F401

REFERENCE_POSTERIOR = "references/eight_schools_noncentered.nc"   # python -m inference.reference models/zoo/eight_schools_noncentered.py


def model(y):
    sigma = y.new_tensor(SIGMA)
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("school", len(y)):
        eta = pyro.sample("eta", dist.Normal(y.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
