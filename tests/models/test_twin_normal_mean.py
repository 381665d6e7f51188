"""models/normal_mean.py's NumPyro twin against its Pyro model and against the closed forms
of the conjugate Normal-Normal model (Murphy 2007, sec. 2): log evidence, the ELBO of any
Gaussian q, the MAP objective, and the same fit after the same budget through the runner.

Helpers (Pyro's ELBO at given values, setting Pyro's store, Monte Carlo means with their
standard errors, reading metrics.json) are test_numpyro_backend.py's, imported."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("numpyro")

from ppl_gen.backends import numpyro_backend as nb  # noqa: E402
from inference.svi import main  # noqa: E402
from ppl_gen.core.protocol import load_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "models" / "normal_mean.py"
import test_numpyro_backend as helpers  # noqa: E402
pyro_elbo, set_pyro_params, _estimates, _metrics = (helpers.pyro_elbo, helpers.set_pyro_params,
                                                    helpers._estimates, helpers._metrics)
POSITIVE = {"s": torch.distributions.constraints.positive}


@pytest.fixture(autouse=True)
def restore_x64():
    """The twin runs in float64 (jax_enable_x64 is process-wide): leave JAX as it was."""
    import jax

    before = jax.config.read("jax_enable_x64")
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def setup():
    mf = load_model_file(FILE)
    options = mf.options({})
    ds = mf.data(None, options)
    spec = mf.build(options, ds)
    twin = nb.load_twin(mf, options, ds)  # switches JAX to float64, as the runner does
    assert twin.x64 and ds.train.dtype == torch.float64
    return options, ds, spec, twin, spec.model.__self__


def closed_form_elbo(o, x: torch.Tensor, m: float, s: float) -> float:
    """ELBO(m, s) = sum_n E_q log N(x_n | mu, sigma^2) - KL(N(m, s^2) || N(mu_0, tau_0^2)), exact."""
    expected_ll = (-0.5 * math.log(2 * math.pi * o.sigma ** 2) - ((x - m) ** 2 + s ** 2) / (2 * o.sigma ** 2)).sum()
    kl = math.log(o.prior_sd / s) + (s ** 2 + (m - o.prior_mean) ** 2) / (2 * o.prior_sd ** 2) - 0.5
    return expected_ll.item() - kl


# ---------------------------------------------------------------- exact identities (1e-5)
def test_elbo_at_the_posterior_is_log_evidence_in_both_backends(setup):
    """At q = N(mu_N, tau_N^2), the exact posterior, log p(x, mu) - log q(mu) = log p(x) for
    every draw: one-particle ELBOs of both backends equal the closed-form evidence to 1e-5 nats."""
    o, ds, spec, twin, nm = setup
    x = ds.train
    m, s = nm.posterior(x)
    log_px = nm.log_evidence(x)
    for seed in range(3):
        got = nb.numpyro_elbo(twin.model, twin.guides["normal"], {"m": np.float64(m), "s": np.float64(s)}, x,
                              num_particles=1, seed=seed)
        assert got == pytest.approx(log_px, abs=1e-5)
    set_pyro_params({"m": np.float64(m), "s": np.float64(s)}, POSITIVE)
    for _ in range(3):
        assert pyro_elbo(spec.model, spec.guides["normal"], x) == pytest.approx(log_px, abs=1e-5)


def test_map_objective_is_the_log_joint_in_both_backends(setup):
    """With a point mass q = delta(mu - m) the ELBO is log N(m | mu_0, tau_0^2) + sum_n log N(x_n | m, sigma^2),
    with no randomness: both backends equal it to 1e-5 nats, at the prior mean and away from it."""
    o, ds, spec, twin, nm = setup
    x = ds.train
    for m in (o.prior_mean, 2.7):
        log_joint = (torch.distributions.Normal(o.prior_mean, o.prior_sd).log_prob(torch.tensor(m, dtype=torch.float64))
                     + torch.distributions.Normal(m, o.sigma).log_prob(x).sum()).item()
        got = nb.numpyro_elbo(twin.model, twin.guides["map"], {"map_m": np.float64(m)}, x, num_particles=1)
        assert got == pytest.approx(log_joint, abs=1e-5)
        set_pyro_params({"map_m": np.float64(m)})
        assert pyro_elbo(spec.model, spec.guides["map"], x) == pytest.approx(log_joint, abs=1e-5)


# ---------------------------------------------------------------- Monte Carlo agreement
def test_elbo_away_from_the_posterior_matches_the_closed_form(setup):
    """At (m, s) = (2.5, 0.3), far from (mu_N, tau_N) = (1.63, 0.16): 200 one-particle ELBO
    estimates per estimator (NumPyro Trace_ELBO and TraceMeanField_ELBO, whose KL is analytic;
    Pyro Trace_ELBO), each mean within 4 of its measured standard errors of the closed form,
    and the two backends' means within 4 standard errors of their difference. The standard
    error is also held below 1 nat (about 0.5% of |ELBO|), so the checks can fail."""
    o, ds, spec, twin, _ = setup
    x = ds.train
    m, s = 2.5, 0.3
    exact = closed_form_elbo(o, x, m, s)
    params = {"m": np.float64(m), "s": np.float64(s)}
    M = 200
    means = {}
    for name in ("trace", "meanfield"):
        means[name] = _estimates(lambda i: nb.numpyro_elbo(twin.model, twin.guides["normal"], params, x,
                                                           elbo_name=name, num_particles=1, seed=i), M)
    set_pyro_params(params, POSITIVE)
    means["pyro"] = _estimates(lambda i: pyro_elbo(spec.model, spec.guides["normal"], x), M)
    for name, (mean, se) in means.items():
        assert 0 < se < 1.0, (name, se)
        assert abs(mean - exact) < 4 * se, (name, mean, exact, se)
    (a, sa), (b, sb) = means["trace"], means["pyro"]
    assert abs(a - b) < 4 * math.hypot(sa, sb)


# ---------------------------------------------------------------- the runner
def test_same_budget_same_fit_through_the_runner(tmp_path):
    """The file's defaults (1500 full-batch steps, lr 0.05), seed 0, both backends.

    * ``normal`` (8 particles per step, 200 per held-out ELBO, so the final iterate's own
      noise is small: over seeds 0-3 on both backends its mean spread 1.604-1.664 and its
      held-out ELBO -1.993 to -2.041): both means within 0.06 of mu_N and 0.08 of each other,
      sds within 10% of tau_N, held-out ELBOs within 0.06 nats per point;
    * ``map``: the objective has no randomness, so both backends take the same Adam steps:
      map_m equal to 1e-6 and within 1e-3 of the mode mu_N; held-out ELBOs equal to 1e-6."""
    out = {}
    for guide, extra in (("normal", ["--num-particles", "8", "--eval-particles", "200"]), ("map", [])):
        for backend in ("pyro", "numpyro"):
            folder = tmp_path / f"{guide}-{backend}"
            assert main([str(FILE), "--guide", guide, "--backend", backend, *extra, "--threads", "1",
                         "--no-progress", "--out", str(folder)]) == 0
            out[guide, backend] = _metrics(folder)
    a, b = out["normal", "pyro"], out["normal", "numpyro"]
    mu_n, tau_n = a["posterior_mean"], a["posterior_sd"]
    for r in (a, b):
        assert abs(r["vi_mean"] - mu_n) < 0.06
        assert abs(r["vi_sd"] / tau_n - 1) < 0.10
    assert abs(a["vi_mean"] - b["vi_mean"]) < 0.08
    assert abs(a["test_elbo"] - b["test_elbo"]) < 0.06
    a, b = out["map", "pyro"], out["map", "numpyro"]
    assert b["vi_mean"] == pytest.approx(a["vi_mean"], abs=1e-6)
    assert abs(a["vi_mean"] - mu_n) < 1e-3
    assert b["test_elbo"] == pytest.approx(a["test_elbo"], abs=1e-6)
