"""models/lda.py's NumPyro twin against its Pyro model (Blei, Ng & Jordan 2003).

Oracles: ``ppl_gen.exact.lda`` (the torch E-step, phi and the closed-form mean-field ELBO
``lda.elbo``, which is the exact expectation of both backends' ELBO estimators) and Pyro's
enumerated ELBO itself (TraceEnum_ELBO, at fixed draws of theta and beta: one number).

* exact: ``ppl_gen.backends.lda_jax``'s E-step, phi and the matrix-product sums over tokens equal the
  torch versions and the sums over (m, v) pairs; at the same draws the twin's ELBO integrand
  equals Pyro's enumerated one;
* Monte Carlo: at the same parameters, the two backends' ELBO estimates and the closed form
  agree within 4 standard errors;
* the runner: the same budget gives the same held-out perplexity and train ELBO per token;
* ``--guide amortized`` on NumPyro: one error line, exit 2.

Helpers (Pyro's ELBO at given values, Monte Carlo means with standard errors, metrics.json)
are test_numpyro_backend.py's, imported."""

import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

pytest.importorskip("numpyro")

from ppl_gen.backends import numpyro_backend as nb  # noqa: E402
from inference.svi import main  # noqa: E402
from ppl_gen.exact import lda  # noqa: E402
from ppl_gen.datasets.corpus import sample_corpus  # noqa: E402
from ppl_gen.core.protocol import load_model_file  # noqa: E402
from ppl_gen.core.train import Trainer, make_elbo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "models" / "lda.py"


import test_numpyro_backend as helpers  # noqa: E402
pyro_elbo, _estimates, _metrics = helpers.pyro_elbo, helpers._estimates, helpers._metrics
TINY = {"docs": 60, "vocab": 20, "topics": 3, "words": 30}      # 48 training documents, 1,440 tokens


@pytest.fixture(autouse=True)
def x64():
    """float64 JAX for these tests (the twin asks for it); the process-wide flag is restored."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def fitted(local_update: str, steps: int = 30):
    """The Pyro side after a few SVI steps (topics and, for adam, the gamma rows away from their
    start), its parameters, the twin, and the guide's gamma as the torch code computes it."""
    mf = load_model_file(FILE)
    options = mf.options({**TINY, "local_update": local_update})
    ds = mf.data("synthetic", options)
    pyro.clear_param_store()
    torch.manual_seed(0)
    spec = mf.build(options, ds, "enum")
    tr = Trainer(spec.model, spec.guides["explicit"], ds.train, make_elbo("enum"), lr=0.05,
                 local_params=spec.resolve("explicit").local_params, local_lr=options.local_lr)
    for t in range(1, steps + 1):
        tr.step(t)
    params = nb.pyro_params()
    lam = torch.from_numpy(params["lambda"])
    gamma = (torch.from_numpy(params["gamma"]) if local_update == "adam"
             else lda.e_step(ds.train, lam, options.alpha, iters=options.cavi_iters)[0])
    return mf, options, ds, spec, params, nb.load_twin(mf, options, ds), gamma


# ---------------------------------------------------------------- exact identities
def test_jax_e_step_phi_and_token_sums_equal_the_torch_ones():
    """float64, a 12-document corpus: lda_jax.e_step equals lda.e_step (gamma and the topic
    statistics) to 1e-6, stopped by the tolerance, by the sweep cap, and from a warm start;
    phi_optimal equals the torch one; and phi_expectation / phi_log_phi, which sum over tokens by
    matrix products, equal the sums over the nonzero (m, v) pairs with torch's phi."""
    import jax.numpy as jnp

    from ppl_gen.backends import lda_jax

    x, _ = sample_corpus(docs=12, vocab=15, topics=3, words=25, alpha=0.3, eta=0.2, seed=3)
    x = x.double()
    g = torch.Generator().manual_seed(0)
    lam = 0.2 + 3 * torch.rand(3, 15, generator=g, dtype=torch.float64)
    warm = 0.5 + torch.rand(12, 3, generator=g, dtype=torch.float64)
    J = lambda t: jnp.asarray(t.numpy())  # noqa: E731
    for kw in ({}, {"iters": 3}, {"gamma": warm}, {"tol": 1e-8, "iters": 500}):
        want_gamma, want_stats = lda.e_step(x, lam, 0.3, **kw)
        jkw = {k: J(v) if torch.is_tensor(v) else v for k, v in kw.items()}
        got_gamma, got_stats = lda_jax.e_step(J(x), J(lam), 0.3, **jkw)
        np.testing.assert_allclose(np.asarray(got_gamma), want_gamma.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_stats), want_stats.numpy(), rtol=0, atol=1e-6)

    gamma = want_gamma
    m, v, n = lda.word_pairs(x)
    phi = lda.phi_optimal(gamma, lam, m, v)                                        # [P, K]
    np.testing.assert_allclose(np.asarray(lda_jax.phi_optimal(J(gamma), J(lam), J(m), J(v))), phi.numpy(),
                               rtol=0, atol=1e-12)
    G = torch.randn(12, 3, generator=g, dtype=torch.float64)                      # any theta_term
    F = torch.randn(3, 15, generator=g, dtype=torch.float64)                      # any topic_term
    per_pair = n * (phi * (G[m] + F[:, v].T)).sum(-1)
    want = torch.zeros(12, dtype=torch.float64).index_add_(0, m, per_pair)
    log_a, log_b = lda_jax.phi_factors(J(gamma), J(lam))
    got = lda_jax.phi_expectation(J(x), log_a, log_b, J(G), J(F))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-10, atol=1e-10)
    want = torch.zeros(12, dtype=torch.float64).index_add_(0, m, n * (phi * phi.log()).sum(-1))
    np.testing.assert_allclose(np.asarray(lda_jax.phi_log_phi(J(x), log_a, log_b)), want.numpy(),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("local_update", ["estep", "adam"])
def test_twin_integrand_equals_pyros_enumerated_elbo_at_the_same_draws(local_update):
    """theta and beta fixed (conditioned in model and guide), so nothing is random: Pyro's
    TraceEnum_ELBO (z summed by enumeration) and the twin's Trace_ELBO (z summed in closed form,
    as factors) are one number each, on the whole set and on a minibatch scaled by D / B.
    They agree to 1e-9 relative with ``adam`` (the same float32 gamma on both sides, float64
    draws and phi). With ``estep`` gamma is the float32 E-step's, whose sweeps torch and XLA round
    differently (gamma differs by up to ~4e-7 relative here), so 1e-6: still a thousandth of
    what a wrong term would move (0.1 nats per token or more, over 1,440 tokens)."""
    import jax
    import jax.numpy as jnp
    from numpyro import handlers

    mf, options, ds, spec, params, twin, _ = fitted(local_update, steps=5)
    x, D = ds.train, len(ds.train)
    torch.manual_seed(5)
    draws = {"beta": torch.distributions.Dirichlet(torch.from_numpy(params["lambda"]).double()).sample(),
             "theta": torch.distributions.Dirichlet(torch.ones(D, options.topics, dtype=torch.float64)).sample()}
    elbo = nb.elbo_class("trace")(num_particles=1)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    for idx in (None, torch.tensor([0, 5, 9, 17, 30, 47])):
        rows = {"beta": draws["beta"], "theta": draws["theta"] if idx is None else draws["theta"][idx]}
        kw = {} if idx is None else {"idx": idx, "size": D}
        xb = x if idx is None else x[idx]
        want = -make_elbo("enum").loss(poutine.condition(spec.model, rows),
                                       poutine.condition(spec.guides["explicit"], rows), xb, **kw)
        jrows = {k: jnp.asarray(v.numpy()) for k, v in rows.items()}
        jkw = {} if idx is None else {"idx": jnp.asarray(idx.numpy()), "size": D}
        got = -float(elbo.loss(jax.random.PRNGKey(0), p, handlers.condition(twin.model, jrows),
                               handlers.condition(twin.guides["explicit"], jrows), nb.to_jax(xb), **jkw))
        assert got == pytest.approx(want, rel=1e-9 if local_update == "adam" else 1e-6), (idx, got, want)


# ---------------------------------------------------------------- Monte Carlo agreement
@pytest.mark.parametrize("local_update", ["estep", "adam"])
def test_elbo_estimates_agree_with_each_other_and_the_closed_form(local_update):
    """The Pyro side's parameters after 30 steps, copied into NumPyro: 300 one-particle ELBO
    estimates per backend (Pyro's TraceEnum_ELBO, the twin's Trace_ELBO). Their means agree
    within 4 standard errors of the difference, and each agrees with lda.elbo (the exact
    expectation: E[log theta] = psi(gamma) - psi(sum gamma), likewise for beta) within 4 of its
    own. The standard error is held below 0.003 nats per token so the checks can fail: dropping
    q(z)'s entropy, or one of the z and x terms, moves the estimate by 0.1 to several nats per token."""
    import jax
    import jax.numpy as jnp

    mf, options, ds, spec, params, twin, gamma = fitted(local_update)
    x = ds.train
    tokens = x.sum().item()
    exact = lda.elbo(x.double(), gamma.double(), torch.from_numpy(params["lambda"]).double(),
                     options.alpha, options.eta).item() / tokens
    elbo = nb.elbo_class("trace")(num_particles=1)
    p, xj = {k: jnp.asarray(v) for k, v in params.items()}, nb.to_jax(x)
    loss = jax.jit(lambda key: elbo.loss(key, p, twin.model, twin.guides["explicit"], xj))
    M = 300
    a, sa = _estimates(lambda i: -float(loss(jax.random.PRNGKey(i))) / tokens, M)
    b, sb = _estimates(lambda i: pyro_elbo(spec.model, spec.guides["explicit"], x, name="enum") / tokens, M)
    se = math.hypot(sa, sb)
    assert se < 0.003
    assert abs(a - b) < 4 * se, (a, b, se)
    assert abs(a - exact) < 4 * sa, (a, exact, sa)
    assert abs(b - exact) < 4 * sb, (b, exact, sb)


# ---------------------------------------------------------------- the runner
@pytest.mark.parametrize("local_update,extra", [("estep", []), ("adam", ["--batch-size", "16"])])
def test_same_budget_same_fit_through_the_runner(tmp_path, local_update, extra):
    """80 synthetic documents (64 for training), V = 20, K = 3, 150 steps, seed 0, the same
    starting topics and batches on both backends (``adam``: minibatches of 16, row-wise Adam on
    gamma). Held-out perplexity within 0.005 and train ELBO within 0.01 nats per token.
    Measured over seeds 0-2: the backends differed by at most 0.0010 / 0.0011 (estep) and
    0.0017 / 0.0040 (adam), the final iterate's Monte Carlo noise; the seeds themselves spread
    over 0.0011-0.007 in perplexity and 0.005-0.006 in ELBO per token. Both recover the true
    topics (TV < 0.05 after matching)."""
    common = [str(FILE), "--data", "synthetic", "--docs", "80", "--vocab", "20", "--topics", "3", "--words", "30",
              "--steps", "150", "--threads", "1", "--no-progress", "--local-update", local_update, *extra]
    out = {}
    for backend in ("pyro", "numpyro"):
        assert main([*common, "--backend", backend, "--out", str(tmp_path / backend)]) == 0
        out[backend] = _metrics(tmp_path / backend)
    a, b = out["pyro"], out["numpyro"]
    assert abs(a["test_perplexity"] - b["test_perplexity"]) < 0.005, (a["test_perplexity"], b["test_perplexity"])
    assert abs(a["train_elbo_per_token"] - b["train_elbo_per_token"]) < 0.01
    assert a["topic_tv"] < 0.05 and b["topic_tv"] < 0.05


# ---------------------------------------------------------------- errors
def test_amortized_guide_on_numpyro_is_one_line_exit_2(tmp_path, capsys):
    """The encoder's BatchNorm1d running statistics would not be updated by NumPyro's SVI state:
    the twin declines the guide, and the error says why and where to go."""
    assert main([str(FILE), "--data", "synthetic", "--docs", "20", "--vocab", "10", "--topics", "2",
                 "--backend", "numpyro", "--guide", "amortized", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: guide 'amortized' has no NumPyro twin in lda.py")
    assert "BatchNorm1d" in err[0] and "use --backend pyro" in err[0]


def test_compare_on_numpyro_refuses_before_training_what_numpyro_cannot_run(tmp_path, capsys):
    """inference.compare --backend numpyro checks every guide before the first run: named in
    --guides and not runnable (cavi: closed-form updates) -> one error line; not named -> a note
    says which are left out, and with fewer than two left the comparison is refused. No run
    folder is created either way."""
    from inference.compare import main as compare

    common = [str(FILE), "--data", "synthetic", "--docs", "20", "--vocab", "10", "--topics", "2", "--steps", "2",
              "--backend", "numpyro", "--no-progress"]
    assert compare([*common, "--guides", "explicit,cavi", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: guide 'cavi' of lda.py cannot run with --backend numpyro (fitted by closed-form "
                   "updates, which run on Pyro only); leave it out of --guides or use --backend pyro"]
    assert compare([*common, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("note: --backend numpyro leaves out amortized (") and "cavi (fitted" in err[0]
    assert err[1] == ("error: with --backend numpyro only explicit of lda.py can run, and inference.compare "
                      "needs two; use --backend pyro to compare every guide")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
