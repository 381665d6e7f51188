"""The NumPyro backend against the Pyro path: the same ELBO at the same parameter values
(exactly where the ELBO integrand is constant, within Monte Carlo error elsewhere), the
same optimizer, the same fits after the same budget, and the same run folder.

Oracles: closed forms (log evidence of the conjugate Normal model, of the linear-Gaussian
network, of the Dirichlet-categorical chain; the Normal-Normal ELBO), and Pyro itself.
"""

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

pytest.importorskip("numpyro")

from inference import compare  # noqa: E402
from ppl_gen.backends import numpyro_backend as nb  # noqa: E402
from inference.svi import main  # noqa: E402
from ppl_gen.exact.gaussian import linear_gaussian_joint  # noqa: E402
from ppl_gen.core.optim import RowwiseAdam  # noqa: E402
from ppl_gen.core.protocol import load_model_file  # noqa: E402
from ppl_gen.core.train import Trainer, make_elbo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
CONJ = str(HERE / "conjugate_model.py")
PAIR = str(HERE / "conjugate_pair_model.py")
import conjugate_model as conj  # noqa: E402


def pyro_elbo(model, guide, x, name="trace", num_particles=1, **kw) -> float:
    with torch.no_grad():
        return -make_elbo(name, num_particles=num_particles).loss(model, guide, x, **kw)


def set_pyro_params(values: dict, constraints: dict | None = None):
    pyro.clear_param_store()
    for k, v in values.items():
        c = (constraints or {}).get(k, dist.constraints.real)
        pyro.param(k, torch.as_tensor(np.array(v)), constraint=c)


# ---------------------------------------------------------------- exact identities (1e-5)
def test_conjugate_elbo_at_the_posterior_is_log_evidence_in_both_backends():
    """At q = p(mu | x) the integrand log p(x, mu) - log q(mu) equals log p(x) for every
    draw, so one-particle estimates of both backends equal the closed form exactly."""
    x, _ = conj.data()
    m, s = conj.posterior(x)
    twin = conj.numpyro_twin()
    target = conj.log_evidence(x) / len(x)
    for seed in range(3):
        got = nb.numpyro_elbo(twin.model, twin.guides["guide"], {"loc": np.float32(m), "scale": np.float32(s)},
                              x, num_particles=1, seed=seed)
        assert got / len(x) == pytest.approx(target, abs=1e-5)
    set_pyro_params({"loc": np.float32(m), "scale": np.float32(s)}, {"scale": dist.constraints.positive})
    for _ in range(3):
        assert pyro_elbo(conj.model, conj.guide, x) / len(x) == pytest.approx(target, abs=1e-5)


def test_conjugate_elbo_away_from_the_posterior_matches_the_closed_form():
    """ELBO(loc, s) = sum_n E_q log N(x_n | mu, sigma^2) - KL(N(loc, s^2) || N(mu0, tau0^2)) in closed
    form; meanfield (analytic KL) and trace estimates of both backends, 500 particles,
    within 4 standard errors (the per-particle spread is measured, not assumed)."""
    x, _ = conj.data()
    loc, s = 2.5, 0.3
    xs = x.double()
    expected_ll = (-0.5 * math.log(2 * math.pi * conj.SIGMA**2)
                   - ((xs - loc) ** 2 + s**2) / (2 * conj.SIGMA**2)).sum().item()
    kl = math.log(conj.TAU0 / s) + (s**2 + (loc - conj.MU0) ** 2) / (2 * conj.TAU0**2) - 0.5
    exact = expected_ll - kl
    twin = conj.numpyro_twin()
    params = {"loc": np.float32(loc), "scale": np.float32(s)}
    # the integrand's spread: log p(x|mu) is quadratic in mu, so its sd is about N s |x_bar - loc| / sigma^2
    sd = len(x) * s * abs(xs.mean().item() - loc) / conj.SIGMA**2
    K = 500
    for name in ("trace", "meanfield"):
        got = nb.numpyro_elbo(twin.model, twin.guides["guide"], params, x, elbo_name=name, num_particles=K, seed=1)
        assert abs(got - exact) < 4 * 1.5 * sd / math.sqrt(K), name
    set_pyro_params(params, {"scale": dist.constraints.positive})
    got = pyro_elbo(conj.model, conj.guide, x, num_particles=K)
    assert abs(got - exact) < 4 * 1.5 * sd / math.sqrt(K)


def test_gaussian_net_full_rank_at_the_exact_posterior_gives_log_evidence():
    mf = load_model_file(ROOT / "models" / "gaussian_net.py")
    options = mf.options({})
    ds = mf.data(None, options)
    spec = mf.build(options, ds)
    net = spec.model.__self__
    mu, Sigma = net.exact()
    L = torch.linalg.cholesky(Sigma).float()
    mean, cov = linear_gaussian_joint(net.b, net.W, net.v)
    d = net.observed[0]
    log_pD = dist.Normal(mean[d], cov[d, d].sqrt()).log_prob(torch.tensor(2.0, dtype=torch.float64)).item()
    twin = mf.module.numpyro_twin(options, ds)
    params = {"loc": mu.float().numpy(), "scale_tril": L.numpy()}
    for seed in range(3):
        got = nb.numpyro_elbo(twin.model, twin.guides["full_rank"], params, ds.train, num_particles=1, seed=seed)
        assert got == pytest.approx(log_pD, abs=1e-5)
    set_pyro_params(params, {"scale_tril": dist.constraints.lower_cholesky})
    assert pyro_elbo(spec.model, spec.guides["full_rank"], ds.train) == pytest.approx(log_pD, abs=1e-5)


def test_markov_chain_elbo_at_the_conjugate_posterior_is_log_evidence():
    """lambda_c = alpha + N_c is the exact posterior: every draw gives
    log p(x) = sum_c log B(alpha + N_c) - log B(alpha 1), with B the multivariate Beta function."""
    mf = load_model_file(ROOT / "models" / "markov_chain.py")
    options = mf.options({"sequences": 60})
    torch.manual_seed(0)  # data("sample") draws its table from the global generator
    ds = mf.data("sample", options)
    spec = mf.build(options, ds)
    chain = spec.model.__self__
    lam = chain.exact_posterior(ds.train)
    log_B = lambda a: (torch.lgamma(a).sum(-1) - torch.lgamma(a.sum(-1)))  # noqa: E731
    log_px = (log_B(lam) - log_B(torch.full_like(lam, options.alpha))).sum().item()
    twin = mf.module.numpyro_twin(options, ds)
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        # Trace_ELBO only: the meanfield estimator takes the KL in closed form, which removes
        # the cancellation that makes each draw exact
        got = nb.numpyro_elbo(twin.model, twin.guides["dirichlet"], {"lambda": lam.numpy()}, ds.train,
                              num_particles=2, seed=3)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert got == pytest.approx(log_px, abs=1e-5)
    set_pyro_params({"lambda": lam}, {"lambda": dist.constraints.positive})
    assert pyro_elbo(spec.model, spec.guides["dirichlet"], ds.train) == pytest.approx(log_px, abs=1e-5)


# ---------------------------------------------------------------- Monte Carlo agreement
def _estimates(fn, M):
    v = np.array([fn(i) for i in range(M)])
    return v.mean(), v.std(ddof=1) / math.sqrt(M)


@pytest.mark.parametrize("guide", ["amortized", "explicit"])
def test_vae_elbo_at_the_same_weights_agrees_within_monte_carlo_error(guide):
    """The Pyro side's initial weights (random), copied into NumPyro: 40 one-particle
    estimates of the full-data ELBO per backend; the means agree within 4 standard errors
    of their difference, and that standard error is small (< 0.1 nat per point), so the
    check can fail."""
    mf = load_model_file(ROOT / "models" / "vae.py")
    options = mf.options({"latent_dim": 2, "hidden_dim": 16})
    ds = mf.data(None, options)
    x = ds.train[:400]
    spec = mf.build(options, ds)
    tr = Trainer(spec.model, spec.guides[guide], x, make_elbo("trace"), lr=1e-3)
    tr.init_params()
    if guide == "explicit":  # spread the local parameters so the guide is not the prior
        store = pyro.get_param_store()
        with torch.no_grad():
            dict(store.named_parameters())["q_mu"].normal_()
    params = nb.pyro_params()
    twin = mf.module.numpyro_twin(options, ds)
    M = 40
    a, sa = _estimates(lambda i: nb.numpyro_elbo(twin.model, twin.guides[guide], params, x,
                                                 num_particles=1, seed=i) / len(x), M)
    b, sb = _estimates(lambda i: pyro_elbo(spec.model, spec.guides[guide], x) / len(x), M)
    se = math.hypot(sa, sb)
    assert se < 0.1
    assert abs(a - b) < 4 * se, (a, b, se)


# ---------------------------------------------------------------- the optimizer
def test_adam_matches_torch_adam_and_rowwise_adam():
    """The backend's Adam against torch.optim.Adam (global parameter) and RowwiseAdam
    (local parameter, rows without gradient untouched), five steps of the same gradients."""
    import jax.numpy as jnp

    g = torch.Generator().manual_seed(0)
    w0, q0 = torch.randn(3, 2, generator=g), torch.randn(6, 2, generator=g)
    grads = [(torch.randn(3, 2, generator=g), torch.randn(6, 2, generator=g)) for _ in range(5)]
    for t, (_, gq) in enumerate(grads):
        gq[t % 3::3] = 0.0  # a third of the rows sits out each step
        gq[5] = 0.0         # and row 5 never gets a gradient
    opt = nb.adam(0.1, local_names=("q",), local_lr=0.05)
    state = opt.init_fn({"w": jnp.asarray(w0.numpy()), "q": jnp.asarray(q0.numpy())})
    w, q = w0.clone().requires_grad_(), q0.clone().requires_grad_()
    tw, tq = torch.optim.Adam([w], lr=0.1), RowwiseAdam([q], lr=0.05)
    for i, (gw, gq) in enumerate(grads):
        state = opt.update_fn(i, {"w": jnp.asarray(gw.numpy()), "q": jnp.asarray(gq.numpy())}, state)
        w.grad, q.grad = gw.clone(), gq.clone()
        tw.step()
        tq.step()
    got = opt.params_fn(state)
    # float32, and torch orders the bias corrections differently: a few ulps of |x| ~ 2
    np.testing.assert_allclose(np.asarray(got["w"]), w.detach().numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got["q"]), q.detach().numpy(), rtol=0, atol=2e-5)
    assert np.array_equal(np.asarray(got["q"])[5], q0[5].numpy())


# ---------------------------------------------------------------- the runner
def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_cli_same_files_keys_and_fit_as_pyro(tmp_path):
    """Same budget, seed and batches: the same run-folder files and metrics keys, both fits
    within 0.1 (1.2 posterior sd) of the exact posterior mean and of each other, held-out
    ELBOs within 0.05 nats per point."""
    common = [CONJ, "--steps", "1500", "--batch-size", "50", "--eval-every", "500", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "pyro")]) == 0
    assert main([*common, "--backend", "numpyro", "--out", str(tmp_path / "numpyro")]) == 0
    files = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert files(tmp_path / "numpyro") == files(tmp_path / "pyro")
    a, b = _metrics(tmp_path / "pyro"), _metrics(tmp_path / "numpyro")
    assert sorted(a) == sorted(b)
    assert abs(a["test_elbo"] - b["test_elbo"]) < 0.05
    config = json.loads((tmp_path / "numpyro" / "config.json").read_text())
    assert config["settings"]["backend"] == "numpyro"
    exact_mean, _ = conj.posterior(conj.data()[0])
    locs = []
    for name in ("pyro", "numpyro"):
        ckpt = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == 1500 and set(ckpt["params"]) == {"loc", "scale"}
        locs.append(ckpt["params"]["loc"].item())
        assert abs(locs[-1] - exact_mean) < 0.1
    assert abs(locs[0] - locs[1]) < 0.1


def test_resume_equals_an_uninterrupted_numpyro_run(tmp_path):
    common = [CONJ, "--backend", "numpyro", "--batch-size", "50", "--eval-every", "10", "--no-progress"]
    assert main([*common, "--steps", "40", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--steps", "20", "--out", str(tmp_path / "part")]) == 0
    assert main([CONJ, "--resume", str(tmp_path / "part"), "--steps", "40", "--no-progress"]) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for k, v in whole["params"].items():
        torch.testing.assert_close(part["params"][k], v, rtol=0, atol=1e-6)


def test_vae_fits_agree_after_the_same_budget(tmp_path):
    """120 steps of a tiny VAE (batch 128) from the same weights and batches: held-out ELBOs
    of the two backends within 0.5 nats per point (seed-to-seed spread at this budget is
    about 0.1-0.2), and the explicit guide's untouched rows stay at their start."""
    tiny = [str(ROOT / "models" / "vae.py"), "--latent-dim", "2", "--hidden-dim", "16", "--steps", "120",
            "--ll-samples", "20", "--ll-points", "50", "--gap-points", "0", "--test-points", "200",
            "--no-progress"]
    assert main([*tiny, "--out", str(tmp_path / "pyro")]) == 0
    assert main([*tiny, "--backend", "numpyro", "--out", str(tmp_path / "numpyro")]) == 0
    a, b = _metrics(tmp_path / "pyro"), _metrics(tmp_path / "numpyro")
    assert abs(a["test_elbo"] - b["test_elbo"]) < 0.5, (a["test_elbo"], b["test_elbo"])
    assert abs(a["test_log_likelihood"] - b["test_log_likelihood"]) < 0.5


def test_explicit_guide_moves_only_the_batch_rows(tmp_path):
    vae = str(ROOT / "models" / "vae.py")
    assert main([vae, "--backend", "numpyro", "--guide", "explicit", "--latent-dim", "2", "--hidden-dim", "8",
                 "--steps", "1", "--batch-size", "64", "--ll-samples", "2", "--ll-points", "2",
                 "--gap-points", "0", "--local-steps", "1", "--test-points", "4", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 0
    q = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["params"]["q_mu"]
    moved = (q != 0).any(-1)
    assert int(moved.sum()) == 64  # the first batch's rows, and no other


def test_compare_runs_every_guide_on_numpyro(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main([str(ROOT / "models" / "gaussian_net.py"), "--backend", "numpyro", "--steps", "300",
                         "--no-progress", "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["guide"] for r in rows] == ["mean_field", "full_rank"]
    # mean-field cannot reach the exact posterior; full-rank can: after 300 steps at lr 0.02 the
    # full-rank KL is smaller (the oracle is the closed-form posterior)
    assert rows[1]["kl_vi_to_exact"] < rows[0]["kl_vi_to_exact"]


# ---------------------------------------------------------------- errors
def test_model_file_without_a_twin_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "m.py").write_text(
        "import torch, pyro, pyro.distributions as dist\n"
        "def data():\n    return torch.randn(20)\n"
        "def model(x):\n    pyro.sample('mu', dist.Normal(0., 1.))\n"
        "def guide(x):\n    pyro.sample('mu', dist.Normal(pyro.param('l', torch.tensor(0.)), 1.))\n")
    assert main([str(tmp_path / "m.py"), "--backend", "numpyro", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: m.py declares no NumPyro twin")


def test_enum_elbo_is_refused_with_numpyro(tmp_path, capsys):
    assert main([CONJ, "--backend", "numpyro", "--elbo", "enum", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--elbo enum has no NumPyro counterpart" in err[0]


@pytest.mark.parametrize("guide, mean_tol, sd_ratio", [("AutoNormal", 0.5, (0.8, 1.25)), ("AutoDelta", 0.05, None)])
def test_pyros_automatic_guides_run_as_numpyros_and_reach_the_closed_form(tmp_path, capsys, guide, mean_tol,
                                                                          sd_ratio):
    """--backend numpyro fits NumPyro's class of the same name on the twin's model, its parameters
    under the Pyro store's names: the posterior summary (drawn from Pyro's guide at the NumPyro
    values) against the conjugate closed form, mean within ``mean_tol`` posterior sds."""
    out = tmp_path / guide
    assert main([CONJ, "--backend", "numpyro", "--guide", guide, "--steps", "800", "--lr", "0.05", "--no-progress",
                 "--diagnostic-draws", "400", "--out", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    x = conj.data()[0]
    mean, sd = conj.posterior(x)
    post = metrics["posterior_summary"]["mu"]
    assert abs(post["mean"] - mean) < mean_tol * sd, (post, mean, sd)
    if sd_ratio:
        assert sd_ratio[0] < post["sd"] / sd < sd_ratio[1], (post, sd)
    assert metrics["backend"] == "numpyro"


def test_automatic_guides_numpyro_lacks_are_refused(tmp_path, capsys):
    """AutoIAFNormal stays on Pyro (its random input order has no NumPyro counterpart): one line
    naming why and which classes are carried over. (The two-number model: Pyro's IAF needs two.)"""
    code = main([PAIR, "--backend", "numpyro", "--guide", "AutoIAFNormal", "--steps", "2",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "AutoIAFNormal is not carried over to NumPyro's: Pyro's AutoIAFNormal orders" in err, err
    assert ("AutoNormal, AutoDelta, AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoLaplaceApproximation "
            "are carried over") in err, err


# ---------------------------------------------------------------- the full-covariance automatic guides
# A model file with correlated latents and its twin: Bayesian linear regression with known noise,
#   b ~ N(0, tau0^2),  a ~ N(0, tau0^2),  y_n | a, b ~ N(a + b t_n, sigma^2),
# the sites in the order b, a (not alphabetical: a layout that sorted them would show).
REGRESSION = """
import pyro, pyro.distributions as dist, torch

TAU0, SIGMA = 10.0, 1.0


def data():  # rows [t_n, y_n]; t has mean 1, so the intercept and the slope are correlated
    g = torch.Generator().manual_seed(11)
    t = 1.0 + torch.randn(60, generator=g)
    y = 0.5 + 2.0 * t + SIGMA * torch.randn(60, generator=g)
    xy = torch.stack([t, y], -1)
    return xy[:50], xy[50:]


def model(xy):
    b = pyro.sample("b", dist.Normal(xy.new_tensor(0.0), TAU0))
    a = pyro.sample("a", dist.Normal(xy.new_tensor(0.0), TAU0))
    with pyro.plate("obs", len(xy)):
        pyro.sample("y", dist.Normal(a + b * xy[:, 0], SIGMA), obs=xy[:, 1])


def numpyro_twin(options=None, dataset=None):
    import numpyro, numpyro.distributions as nd
    from ppl_gen.backends.numpyro_twin import NumpyroTwin

    def np_model(xy):
        b = numpyro.sample("b", nd.Normal(0.0, TAU0))
        a = numpyro.sample("a", nd.Normal(0.0, TAU0))
        with numpyro.plate("obs", xy.shape[0]):
            numpyro.sample("y", nd.Normal(a + b * xy[:, 0], SIGMA), obs=xy[:, 1])

    return NumpyroTwin(model=np_model, guides={})
"""


def regression_posterior(xy: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (b, a) (the model's order): with X = [t, 1], Sigma^-1 = I / tau0^2 +
    X^T X / sigma^2 and m = Sigma X^T y / sigma^2 (Bishop 2006, PRML eqs. 3.53-3.54, prior mean 0)."""
    t, y = xy[:, 0].double().numpy(), xy[:, 1].double().numpy()
    X = np.stack([t, np.ones_like(t)], -1)
    S = np.linalg.inv(np.eye(2) / 10.0**2 + X.T @ X / 1.0**2)
    return S @ X.T @ y / 1.0**2, S


def regression_log_evidence(xy: torch.Tensor) -> float:
    """log p(y) = log N(y | 0, sigma^2 I + tau0^2 X X^T)."""
    t, y = xy[:, 0].double(), xy[:, 1].double()
    X = torch.stack([t, torch.ones_like(t)], -1)
    cov = torch.eye(len(y), dtype=torch.float64) + 10.0**2 * X @ X.T
    return dist.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y).item()


def _numpyro_run(tmp_path, guide, **settings):
    from ppl_gen.core.pipeline import run
    from ppl_gen.core.settings import RunConfig

    path = tmp_path / "regression.py"
    path.write_text(REGRESSION)
    cfg = RunConfig(model_file=str(path), guide=guide, backend="numpyro", out=str(tmp_path / guide), device="cpu",
                    threads=1, progress=False, diagnostic_draws=200, **settings)
    return run(cfg)


# (guide, settings): the steps are cheap (one jitted update); eight particles a step keep the
# stochastic-gradient noise about the optimum small enough for the tolerances below
GAUSSIANS = [("AutoMultivariateNormal", dict(steps=1000, lr=0.05, num_particles=8, eval_every=1000)),
             ("AutoLowRankMultivariateNormal", dict(steps=1000, lr=0.05, num_particles=8, eval_every=1000))]


@pytest.mark.parametrize("guide, settings", GAUSSIANS, ids=[g for g, _ in GAUSSIANS])
def test_full_covariance_guides_on_numpyro_reach_the_closed_form(tmp_path, guide, settings):
    """--backend numpyro fits NumPyro's class; Pyro's guide of the same class, at the converted
    values, is the distribution the run reports. Against the closed-form posterior of the
    regression (correlation -0.69): means within 0.4 posterior sds, sds within 25%, the
    correlation within 0.1. (Seeds 0-3 at this budget: means within 0.12 sd, sds 0.87-1.11 of
    the closed form's, correlations within 0.04.)"""
    fitted, metrics = _numpyro_run(tmp_path, guide, **settings)
    m, S = regression_posterior(fitted.dataset.train)
    q = fitted.guide_obj.fn.get_posterior()
    loc, C = q.loc.detach().double().numpy(), q.covariance_matrix.detach().double().numpy()
    sd, q_sd = np.sqrt(np.diag(S)), np.sqrt(np.diag(C))
    assert np.all(np.abs(loc - m) < 0.4 * sd), (loc, m, sd)
    assert np.all((0.8 < q_sd / sd) & (q_sd / sd < 1.25)), (q_sd, sd)
    corr, q_corr = S[0, 1] / (sd[0] * sd[1]), C[0, 1] / (q_sd[0] * q_sd[1])
    assert abs(q_corr - corr) < 0.1, (q_corr, corr)
    assert metrics["backend"] == "numpyro" and metrics["psis_khat"] < 0.7, metrics["psis_verdict"]


def test_laplace_on_numpyro_is_the_closed_form(tmp_path):
    """NumPyro fits the MAP, Pyro's laplace_approximation forms the Gaussian at it. The posterior is
    Gaussian, so the MAP is its mean (within 0.05 posterior sds after this budget), the inverse
    Hessian its covariance (1e-4), and every importance weight p(x, z) / q(z) is p(x): the
    importance-weighted log p(x) is the closed-form log evidence."""
    fitted, metrics = _numpyro_run(tmp_path, "AutoLaplaceApproximation", steps=1500, lr=0.05, eval_every=1500)
    x = fitted.dataset.train
    m, S = regression_posterior(x)
    q = fitted.guide_obj.fn.get_posterior()
    sd = np.sqrt(np.diag(S))
    assert np.all(np.abs(q.loc.detach().double().numpy() - m) < 0.05 * sd), (q.loc, m)
    np.testing.assert_allclose(q.covariance_matrix.detach().double().numpy(), S, rtol=1e-4)
    assert metrics["iw_log_evidence"] == pytest.approx(regression_log_evidence(x) / len(x), abs=1e-3)


# ---------------------------------------------------------------- the conversions are exact (1e-6)
# three sites in an order that is not alphabetical, with three supports (real, positive, simplex),
# so the oracle sees the flattening order and each site's unconstrained space
def _three_sites_pyro():
    f = torch.float64
    pyro.sample("z", dist.Normal(torch.zeros(2, dtype=f), 1.0).to_event(1))
    pyro.sample("a", dist.Gamma(torch.tensor(2.0, dtype=f), 1.0))
    pyro.sample("p", dist.Dirichlet(torch.ones(3, dtype=f)))


def _three_sites_numpyro():
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    numpyro.sample("z", nd.Normal(jnp.zeros(2), 1.0).to_event(1))
    numpyro.sample("a", nd.Gamma(2.0, 1.0))
    numpyro.sample("p", nd.Dirichlet(jnp.ones(3)))


@pytest.fixture
def x64():
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _random_numpyro_params(guide, seed: int) -> dict:
    """Every parameter of the NumPyro guide, random: a standard normal draw in its unconstrained
    space, mapped through biject_to(its constraint) (so a scale_tril is a valid Cholesky factor)."""
    import jax
    from numpyro import handlers
    from numpyro.distributions import constraints
    from numpyro.distributions.transforms import biject_to

    rng = np.random.default_rng(seed)
    tr = handlers.trace(handlers.seed(guide, jax.random.PRNGKey(0))).get_trace()
    out = {}
    for k, site in tr.items():
        if site["type"] == "param":
            t = biject_to(site["kwargs"].get("constraint", constraints.real))
            shape = t.inverse_shape(np.shape(site["value"]))
            out[k] = np.asarray(t(rng.standard_normal(shape)))
    return out


FLAT = ["AutoMultivariateNormal", "AutoLowRankMultivariateNormal", "AutoLaplaceApproximation"]


@pytest.mark.parametrize("name", FLAT)
def test_numpyro_values_become_the_same_pyro_guide(x64, name):
    """Random NumPyro parameters (seed 0), converted into Pyro's store: Pyro's guide of the same
    class is NumPyro's distribution, to 1e-6: the latent vector's mean and covariance (the Laplace
    Gaussian for AutoLaplaceApproximation, each library forming it at the same MAP), and the
    latent values both guides make of the same latent vector; the values read back from Pyro's
    store convert back to the NumPyro parameters."""
    import jax
    import pyro.infer.autoguide as ag
    import pyro.poutine as poutine
    from numpyro import handlers

    rank = {"rank": 2} if name == "AutoLowRankMultivariateNormal" else {}
    pyro_guide = getattr(ag, name)(_three_sites_pyro, **rank)
    pyro_guide()  # creates its parameters in Pyro's store
    ours = nb.numpyro_autoguide(name, _three_sites_numpyro, **rank)
    ours.check_layout(pyro_guide)
    params = _random_numpyro_params(ours, seed=0)
    if rank:  # --rank reaches NumPyro's class: its own cov_factor has that many columns
        assert params["AutoLowRankMultivariateNormal.cov_factor"].shape == (5, 2)
    nb.copy_to_pyro(ours.to_pyro(params))

    # NumPyro's guide at these values, its latent vector fixed to u: its distribution over the vector
    # and the latent values it makes of u
    u = np.random.default_rng(1).standard_normal(5)
    theirs = handlers.trace(handlers.condition(handlers.substitute(handlers.seed(ours, jax.random.PRNGKey(0)),
                                                                   data=params), data={"_auto_latent": u})).get_trace()
    with torch.no_grad():
        mine = poutine.trace(poutine.condition(pyro_guide, {f"_{name}_latent": torch.from_numpy(u)})).get_trace()
    if name == "AutoLaplaceApproximation":
        pyro_q = pyro_guide.laplace_approximation().get_posterior()
        # NumPyro's own Laplace Gaussian at the same MAP (jitted: one compiled Hessian, not hundreds of eager ops)
        numpyro_q = jax.jit(lambda loc: ours.auto.get_posterior({"auto_loc": loc}))(
            params["AutoLaplaceApproximation.loc"])
    else:
        pyro_q, numpyro_q = pyro_guide.get_posterior(), theirs["_auto_latent"]["fn"]
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)  # noqa: E731
    close(pyro_q.mean.detach(), numpyro_q.mean)
    close(pyro_q.covariance_matrix.detach(), numpyro_q.covariance_matrix)
    for site in ("z", "a", "p"):
        close(mine.nodes[site]["value"], theirs[site]["value"])

    back = ours.from_pyro({k: v for k, v in nb.pyro_params().items()})
    assert set(back) == set(params)
    for k in params:
        close(back[k], params[k])


def test_a_twin_sampling_the_latents_in_another_order_is_refused(x64):
    """The latent vector's layout follows each model's order; a twin that samples them in another
    order would pair Pyro's covariance entries with the wrong sites: one error line, before training."""
    import pyro.infer.autoguide as ag

    from ppl_gen.core.errors import UserError

    def swapped():
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as nd

        numpyro.sample("a", nd.Gamma(2.0, 1.0))
        numpyro.sample("z", nd.Normal(jnp.zeros(2), 1.0).to_event(1))
        numpyro.sample("p", nd.Dirichlet(jnp.ones(3)))

    pyro_guide = ag.AutoMultivariateNormal(_three_sites_pyro)
    pyro_guide()
    with pytest.raises(UserError, match="the model's latents come in the order z, a, p, the twin's in a, z, p"):
        nb.numpyro_autoguide("AutoMultivariateNormal", swapped).check_layout(pyro_guide)


def test_resume_equals_an_uninterrupted_run_of_a_converted_guide(tmp_path):
    """AutoMultivariateNormal's checkpoint holds Pyro's converted values and NumPyro's own
    optimizer state: 20 + 20 steps end where 40 do."""
    path = tmp_path / "regression.py"
    path.write_text(REGRESSION)
    common = [str(path), "--backend", "numpyro", "--guide", "AutoMultivariateNormal", "--eval-every", "20",
              "--diagnostic-draws", "20", "--no-progress"]
    assert main([*common, "--steps", "40", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--steps", "20", "--out", str(tmp_path / "part")]) == 0
    assert main([str(path), "--resume", str(tmp_path / "part"), "--steps", "40", "--no-progress"]) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert set(whole["params"]) == {"AutoMultivariateNormal.loc", "AutoMultivariateNormal.scale",
                                    "AutoMultivariateNormal.scale_tril"}
    for k, v in whole["params"].items():
        torch.testing.assert_close(part["params"][k], v, rtol=0, atol=1e-6)
