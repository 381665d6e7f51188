"""models/hmm.py's NumPyro twin against its Pyro model: the marginal likelihood with the
hidden states summed out (forward algorithm, Rabiner 1989) against brute-force enumeration
of every path on a tiny series, on both backends; the ELBO at the same parameter values;
minibatch scaling; and the same fit after the same budget through the runner.

Helpers (Pyro's ELBO at given values, setting Pyro's store, Monte Carlo means with their
standard errors, reading metrics.json) are test_numpyro_backend.py's, and the brute-force
enumeration is test_hmm.py's: imported, not copied."""

import math
from pathlib import Path

import numpy as np
import pyro.poutine as poutine
import pytest
import torch

pytest.importorskip("numpyro")

from ppl_gen.backends import numpyro_backend as nb  # noqa: E402
from inference.svi import main  # noqa: E402
from ppl_gen import Dataset  # noqa: E402
from ppl_gen.core.protocol import load_model_file  # noqa: E402
from ppl_gen.core.train import Trainer, make_elbo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "models" / "hmm.py"


import test_hmm as hmm_tests  # noqa: E402
import test_numpyro_backend as helpers  # noqa: E402
pyro_elbo, _estimates, _metrics = helpers.pyro_elbo, helpers._estimates, helpers._metrics
K, V = hmm_tests.K, hmm_tests.V            # brute_force enumerates K^T paths with test_hmm's K = 3
EMISSIONS = ("categorical", "gaussian")


def tiny(emission: str):
    """Four sequences of lengths 5, 1, 3, 4 (padded), K = 3 states, and fixed parameters."""
    x, mask = hmm_tests.batch(seed=1)
    pi, A, B = hmm_tests.random_hmm(seed=0)                        # float64
    theta = {"pi": pi, "A": A}
    if emission == "categorical":
        theta["B"] = B
        log_b = hmm_tests.log_b_of(B, x)
    else:
        g = torch.Generator().manual_seed(2)
        x = (2 * torch.randn(x.shape, generator=g)).masked_fill(~mask, float("nan"))
        theta["mu"], theta["sigma"] = torch.tensor([-1.0, 0.5, 2.0]).double(), torch.tensor([0.5, 1.0, 0.8]).double()
        normal = torch.distributions.Normal(theta["mu"], theta["sigma"])
        log_b = normal.log_prob(torch.nan_to_num(x).double()[..., None])
    mf = load_model_file(FILE)
    options = mf.options({"states": K, "emission": emission})
    ds = Dataset(x, x[:2], name="tiny")
    return mf, options, ds, mask, theta, log_b


def brute_force_log_px(theta, log_b, mask) -> torch.Tensor:
    """log p(x_n) = log sum over all K^T_n paths of p(x_n, z): [n], float64."""
    return torch.stack([torch.logsumexp(hmm_tests.brute_force(theta["pi"], theta["A"], log_b[n, :T])[0], 0)
                        for n, T in enumerate(mask.sum(1).tolist())])


def log_prior(theta, ds, emission) -> float:
    """log p(pi, A, theta) in closed form: Dirichlet(1_d) has density Gamma(d) on its simplex."""
    lp = math.lgamma(K) + K * math.lgamma(K)
    if emission == "categorical":
        return lp + K * math.lgamma(V)
    obs = ds.train[~torch.isnan(ds.train)].double()
    m, s = obs.mean(), obs.std()
    return (lp + torch.distributions.Normal(m, 2 * s).log_prob(theta["mu"]).sum()
            + torch.distributions.LogNormal(s.log(), 1.0).log_prob(theta["sigma"]).sum()).item()


# ---------------------------------------------------------------- exact identities
@pytest.mark.parametrize("emission", EMISSIONS)
def test_marginal_likelihood_equals_brute_force_enumeration_on_both_backends(emission):
    """At fixed (pi, A, B or mu/sigma), the model's likelihood factor (the forward algorithm,
    hidden states summed out) equals log sum_z p(x, z) by enumerating all K^T paths, per
    sequence, to 1e-5 nats, on both backends (float32 models, float64 oracle). The log joint
    (priors included, closed form) agrees to 1e-4 nats (float32 over ~40 nats)."""
    import jax
    import numpyro.infer.util
    from numpyro import handlers

    mf, options, ds, mask, theta, log_b = tiny(emission)
    x = ds.train
    exact = brute_force_log_px(theta, log_b, mask)
    exact_joint = exact.sum().item() + log_prior(theta, ds, emission)

    twin = nb.load_twin(mf, options, ds)
    params32 = {k: np.asarray(v.numpy(), np.float32) for k, v in theta.items()}
    xj = nb.to_jax(x)
    tr = handlers.trace(handlers.condition(handlers.seed(twin.model, jax.random.PRNGKey(0)), params32)).get_trace(xj)
    got = np.asarray(tr["x"]["fn"].log_prob(tr["x"]["value"]))
    np.testing.assert_allclose(got, exact.numpy(), rtol=0, atol=1e-5)
    joint, _ = numpyro.infer.util.log_density(twin.model, (xj,), {}, params32)
    assert float(joint) == pytest.approx(exact_joint, abs=1e-4)

    spec = mf.build(options, ds)
    cond = {k: torch.from_numpy(v) for k, v in params32.items()}
    tr = poutine.trace(poutine.condition(spec.model, data=cond)).get_trace(x)
    got = tr.nodes["x"]["fn"].log_prob(tr.nodes["x"]["value"]).detach()
    np.testing.assert_allclose(got.numpy(), exact.numpy(), rtol=0, atol=1e-5)
    assert tr.log_prob_sum().item() == pytest.approx(exact_joint, abs=1e-4)


def _at_pyro_start(emission: str, guide: str):
    """30 casino sequences; the guide's parameters as a Pyro run creates them, and the twin."""
    mf = load_model_file(FILE)
    options = mf.options({"sequences": 30, "length": 12, "emission": emission})
    ds = mf.data(None, options)
    spec = mf.build(options, ds)
    Trainer(spec.model, spec.guides[guide], ds.train, make_elbo("meanfield"), lr=1e-3).init_params()
    return spec, ds, nb.pyro_params(), nb.load_twin(mf, options, ds)


@pytest.mark.parametrize("emission", EMISSIONS)
def test_map_elbo_is_the_same_number_on_both_backends_full_and_minibatch(emission):
    """The MAP guide has no randomness: its ELBO is log p(x, pi, A, theta) at the point. At the
    Pyro side's starting point, both backends give the same value to 1e-5 nats per sequence
    (float32), on the whole set and on a minibatch of 5 rows scaled by N / 5 (data_plate)."""
    spec, ds, params, twin = _at_pyro_start(emission, "map")
    x, n = ds.train, len(ds.train)
    idx = torch.tensor([0, 3, 7, 11, 20])
    for batch in (None, idx):            # numpyro_elbo takes the whole set and picks the rows itself
        a = nb.numpyro_elbo(twin.model, twin.guides["map"], params, x, idx=batch, size=None if batch is None else n,
                            elbo_name="meanfield", num_particles=1)
        b = pyro_elbo(spec.model, spec.guides["map"], x, name="meanfield") if batch is None else \
            pyro_elbo(spec.model, spec.guides["map"], x[batch], name="meanfield", idx=batch, size=n)
        assert abs(a - b) / n < 1e-5, (batch, a, b)
    # the scaling itself: ELBO(batch) = log prior + (N / 5) sum_{n in batch} log p(x_n | ...)
    L = _likelihood(twin, params, x)
    full = nb.numpyro_elbo(twin.model, twin.guides["map"], params, x, num_particles=1)
    scaled = nb.numpyro_elbo(twin.model, twin.guides["map"], params, x, idx=idx, size=n, num_particles=1)
    assert abs(scaled - (full - L.sum() + n / 5 * L[idx.numpy()].sum())) / n < 1e-5


def _likelihood(twin, params, x):
    """log p(x_n | pi, A, theta) per sequence from the twin's model, at a point."""
    import jax
    from numpyro import handlers

    point = {k[len("map_"):]: v for k, v in params.items()}
    tr = handlers.trace(handlers.condition(handlers.seed(twin.model, jax.random.PRNGKey(0)), point)
                        ).get_trace(nb.to_jax(x))
    return np.asarray(tr["x"]["fn"].log_prob(tr["x"]["value"]), np.float64)


# ---------------------------------------------------------------- Monte Carlo agreement
_compiled = {}


def jitted_elbo(twin, guide: str, params: dict, x):
    """seed -> one-particle TraceMeanField_ELBO estimate (total nats), compiled once (the
    forward recursion's lax.scan would otherwise be traced and compiled on every call)."""
    import jax
    import jax.numpy as jnp

    key = (id(twin), guide)
    if key not in _compiled:
        elbo = nb.elbo_class("meanfield")(num_particles=1)
        p, xj = {k: jnp.asarray(v) for k, v in params.items()}, nb.to_jax(x)
        loss = jax.jit(lambda rng: elbo.loss(rng, p, twin.model, twin.guides[guide], xj))
        _compiled[key] = lambda seed: -float(loss(jax.random.PRNGKey(seed)))
    return _compiled[key]


@pytest.mark.parametrize("emission", EMISSIONS)
def test_meanfield_elbo_at_the_same_parameters_agrees_within_monte_carlo_error(emission):
    """The Pyro side's starting point (random B rows, sticky A, data-quantile means), copied
    into NumPyro: 100 one-particle TraceMeanField_ELBO estimates per backend; the means
    agree within 4 standard errors of their difference, which is held below 0.25 nats per
    sequence so the check can fail (a wrong prior or emission shifts the ELBO by more)."""
    spec, ds, params, twin = _at_pyro_start(emission, "meanfield")
    x, n, M = ds.train, len(ds.train), 100
    a, sa = _estimates(lambda i: jitted_elbo(twin, "meanfield", params, x)(i) / n, M)
    b, sb = _estimates(lambda i: pyro_elbo(spec.model, spec.guides["meanfield"], x, name="meanfield") / n, M)
    se = math.hypot(sa, sb)
    assert se < 0.25
    assert abs(a - b) < 4 * se, (a, b, se)


# ---------------------------------------------------------------- the runner
def test_same_budget_same_fit_through_the_runner(tmp_path):
    """The dishonest casino (20 sequences of length 10-20, 4 held out), 150 steps, seed 0,
    the same batches on both backends:

    * ``meanfield`` (full batch, 50 particles per held-out ELBO): held-out ELBO within 0.5
      nats per sequence and held-out log-likelihood within 0.05 nats per step. Measured over
      seeds 0-3 on both backends, the eight runs spread over 0.39 and 0.044: the final
      iterate's Monte Carlo noise, which the tolerances exceed;
    * ``map`` with minibatches of 4: no randomness but the batches, and the twin's simplex
      rows are unconstrained by softmax as in Pyro's store, so both backends take the same
      Adam steps: held-out metrics and the recovered tables equal to 1e-3 (float32 rounding
      only; the seed-to-seed spread is 0.04-0.2)."""
    common = [str(FILE), "--sequences", "20", "--length", "20", "--steps", "150", "--threads", "1",
              "--no-progress"]
    out = {}
    for guide, extra in (("meanfield", ["--eval-particles", "50"]), ("map", ["--batch-size", "4"])):
        for backend in ("pyro", "numpyro"):
            folder = tmp_path / f"{guide}-{backend}"
            assert main([*common, "--guide", guide, *extra, "--backend", backend, "--out", str(folder)]) == 0
            out[guide, backend] = _metrics(folder)
    a, b = out["meanfield", "pyro"], out["meanfield", "numpyro"]
    assert abs(a["test_elbo"] - b["test_elbo"]) < 0.5
    assert abs(a["test_log_likelihood_per_step"] - b["test_log_likelihood_per_step"]) < 0.05
    a, b = out["map", "pyro"], out["map", "numpyro"]
    for key in ("test_elbo", "test_log_likelihood_per_step", "recovery_max_abs_error_A", "recovery_max_abs_error_B"):
        assert b[key] == pytest.approx(a[key], abs=1e-3), key
