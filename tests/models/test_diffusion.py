"""models/diffusion.py against oracles: the forward process's closed forms, the per-step KL,
the one-t estimator's expectation, a 1-D Gaussian whose log p(x) is known, and the runner."""

import json
import math

import numpy as np
import pyro
import pytest
import torch
from torch import nn
from torch.distributions import Normal

from models import diffusion as dm


def _schedule(name, T):
    return dm.Schedule.named(name, T, dtype=torch.float64)


class TinyEps(nn.Module):
    """A small MLP eps_theta(x_t, t) on flat vectors, for the estimator tests."""

    def __init__(self, dim, T, hidden=16):
        super().__init__()
        self.T = T
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, (t.to(x.dtype) / self.T)[:, None]], -1))


class PerStepLinear(nn.Module):
    """eps_theta(x_t, t) = a_t x_t + b_t (with predict="eps"): for Gaussian data the exact reverse
    steps are in this family."""

    def __init__(self, T):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(T + 1, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(T + 1, dtype=torch.float64))

    def forward(self, x, t):
        return self.a[t][:, None] * x + self.b[t][:, None]


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_xt_closed_form_equals_t_forward_steps(name):
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, 1 - alpha_bar_t) against t steps of
    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): mean c_t x_0 and variance v_t with
    c_t = sqrt(alpha_t) c_{t-1}, v_t = alpha_t v_{t-1} + beta_t, from c_0 = 1, v_0 = 0."""
    T = 50
    s = _schedule(name, T)
    d = dm.Diffusion(TinyEps(3, T).double(), s, levels=None)
    x0 = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    c, v = 1.0, 0.0
    for t in range(1, T + 1):
        beta = dm.SCHEDULES[name](T)[t - 1].item()
        c, v = math.sqrt(1 - beta) * c, (1 - beta) * v + beta
        mean, sd = d.q_xt(x0, torch.tensor([t]))
        assert torch.allclose(mean, c * x0, rtol=1e-12, atol=1e-14), t
        assert torch.allclose(sd ** 2, torch.full_like(x0, v), rtol=1e-12, atol=1e-14), t


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_gaussian_conditioning(name):
    """q(x_{t-1} | x_t, x_0) by Bayes' rule: prior N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}) for x_{t-1},
    likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t): precisions add."""
    T = 30
    s = _schedule(name, T)
    d = dm.Diffusion(TinyEps(2, T).double(), s, levels=None)
    x0 = torch.tensor([[0.5, -0.7]], dtype=torch.float64)
    xt = torch.tensor([[1.1, 0.2]], dtype=torch.float64)
    f = s.float64
    for t in range(2, T + 1):
        prior_mean, prior_var = f["alpha_bar"][t - 1].sqrt() * x0, 1 - f["alpha_bar"][t - 1]
        precision = 1 / prior_var + f["alpha"][t] / f["beta"][t]
        mean = (prior_mean / prior_var + f["alpha"][t].sqrt() * xt / f["beta"][t]) / precision
        got_mean, got_var = d.q_posterior(x0, xt, torch.tensor([t]))
        assert torch.allclose(got_mean, mean, rtol=1e-10, atol=1e-12), t
        assert torch.allclose(got_var, (1 / precision).expand_as(x0), rtol=1e-10), t


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_kl_step_closed_form_matches_monte_carlo(variance):
    """KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) = E_q[log q - log p], estimated with 200k
    draws and torch's Normal densities: within 4 standard errors."""
    torch.manual_seed(0)
    T, dim = 20, 4
    d = dm.Diffusion(TinyEps(dim, T).double(), _schedule("cosine", T), levels=None, variance=variance)
    x0 = torch.randn(3, dim, dtype=torch.float64)
    for step in (2, 7, 19):
        t = torch.full((3,), step)
        mean, sd = d.q_xt(x0, t)
        xt = mean + sd * torch.randn_like(mean)
        with torch.no_grad():
            eps = d.net(xt, t)
            kl = d.kl_step(x0, xt, t, eps)
            mq, vq = d.q_posterior(x0, xt, t)
            q, p = Normal(mq, vq.sqrt()), Normal(d.p_mean(xt, t, eps), d.p_var(t).sqrt())
            z = q.sample((200_000,))
            integrand = (q.log_prob(z) - p.log_prob(z)).sum(-1)
        mc, se = integrand.mean(0), integrand.std(0) / math.sqrt(integrand.shape[0])
        assert (abs(mc - kl) < 4 * se + 1e-9).all(), (step, kl, mc, se)


def test_simplified_weight_turns_each_kl_into_the_noise_error():
    """With sigma_t^2 = beta~_t, KL_t / w_t = ||eps - eps_theta||^2 exactly (the weights that
    make Ho et al.'s L_simple a reweighting of the bound's terms)."""
    torch.manual_seed(1)
    T, dim = 25, 5
    d = dm.Diffusion(TinyEps(dim, T).double(), _schedule("linear", T), levels=None, variance="posterior")
    x0, eps = torch.randn(6, dim, dtype=torch.float64), torch.randn(6, dim, dtype=torch.float64)
    t = torch.tensor([2, 3, 8, 13, 21, 25])
    mean, sd = d.q_xt(x0, t)
    xt = mean + sd * eps
    with torch.no_grad():
        eps_hat = d.net(xt, t)
        kl = d.kl_step(x0, xt, t, eps_hat)
    assert torch.allclose(kl / d.eps_weight(t), (eps - eps_hat).pow(2).sum(-1), rtol=1e-8)


def test_kl_is_half_the_snr_drop_times_the_x0_error():
    """With sigma_t^2 = beta~_t, KL_t = (SNR(t-1) - SNR(t)) / 2 * ||x_0 - x0_hat||^2 (Kingma et al.
    2021), for the x0-predicting form on binary data, where x0_hat = tanh(...)."""
    torch.manual_seed(2)
    T, dim = 40, 5
    d = dm.Diffusion(TinyEps(dim, T).double(), _schedule("cosine", T), levels=2, variance="posterior",
                     predict="x0")
    y0 = 2 * torch.bernoulli(torch.full((4, dim), 0.5, dtype=torch.float64)) - 1
    t = torch.tensor([2, 9, 25, 40])
    mean, sd = d.q_xt(y0, t)
    xt = mean + sd * torch.randn_like(mean)
    ab = d.s.alpha_bar
    with torch.no_grad():
        eps = d.eps(xt, t)
        x0_hat = (xt - (1 - ab[t])[:, None].sqrt() * eps) / ab[t][:, None].sqrt()
        kl = d.kl_step(y0, xt, t, eps)
    assert (x0_hat.abs() <= 1 + 1e-9).all()  # a tanh: inside [-1, 1]
    snr = ab / (1 - ab)
    want = 0.5 * (snr[t - 1] - snr[t]) * (y0 - x0_hat).pow(2).sum(-1)
    assert torch.allclose(kl, want, rtol=1e-8)


def _one_t_estimates(d, x, elbo, calls, copies):
    """ELBO per image from Pyro's ELBO of the model/guide pair, each call on ``copies`` copies of x."""
    rows = x.repeat(copies, 1)
    with torch.no_grad():
        v = torch.tensor([-elbo.loss(d.model, d.guide, rows) / len(rows) for _ in range(calls)],
                         dtype=torch.float64)
    return v.mean().item(), (v.std() / math.sqrt(calls)).item()


@pytest.mark.parametrize("elbo_name", ["meanfield", "trace"])
def test_one_t_estimator_is_unbiased(elbo_name):
    """The runner's objective (one t per image, scaled by T) averages to the exact sum over t."""
    torch.manual_seed(0)
    T, dim = 8, 6
    net = TinyEps(dim, T)
    with torch.no_grad():  # a network far from zero noise, so that every step's term differs
        for p in net.parameters():
            p.mul_(3.0)
    d = dm.Diffusion(net, dm.Schedule.named("cosine", T), levels=2)
    x = torch.bernoulli(torch.full((5, dim), 0.5))
    L, prior = d.terms(x.repeat(4000, 1))  # every step t, one x_t draw per row
    neg = (L.sum(1) + prior).double()
    exact, se_exact = -neg.mean().item(), (neg.std() / math.sqrt(len(neg))).item()
    elbo = (pyro.infer.TraceMeanField_ELBO() if elbo_name == "meanfield" else pyro.infer.Trace_ELBO())
    with pyro.validation_enabled(False):  # Pyro's checks are not under test here
        estimate, se = _one_t_estimates(d, x, elbo, calls=40, copies=400)
    assert abs(estimate - exact) < 4 * math.hypot(se, se_exact), (estimate, exact, se, se_exact)
    assert se < 0.02 * abs(exact)  # tight enough to tell a wrong scale (T - 1 or T + 1 for T) apart


def _linear_gaussian_log_marginal(d, x):
    """log p_theta(x_0) of the chain when eps_theta is per-step linear: every step is an affine
    map plus Gaussian noise, so the marginal is Gaussian; propagate its mean and variance."""
    s, net = d.s.float64, d.net
    mean, var = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    for t in range(d.T, 0, -1):
        beta, alpha, ab = s["beta"][t], s["alpha"][t], s["alpha_bar"][t]
        k = beta / (1 - ab).sqrt()
        c = (1 - k * net.a[t]) / alpha.sqrt()     # mu_theta = c x_t + e
        e = -k * net.b[t] / alpha.sqrt()
        noise = s["beta"][1] if t == 1 else (s["beta"][t] if d.variance == "beta" else s["beta_tilde"][t])
        mean, var = c * mean + e, c ** 2 * var + noise
    return Normal(mean, var.sqrt()).log_prob(x[:, 0])


def test_gaussian_data_elbo_is_below_and_close_to_log_p():
    """x ~ N(0.7, 1) in 1-D: the exact reverse steps are Gaussian with linear means and
    variance beta_t, so a per-step linear eps_theta can make the bound tight (up to
    KL(q(x_T) || N(0, 1)), here 5e-4 nats). After 400 steps on the runner's objective, on 200
    held-out points with 400 draws of x_t per point and step:
    * the ELBO is at most the model's own log p_theta(x) (Jensen; closed form for this linear
      chain), per point within 4.5 standard errors and on average within 3;
    * the ELBO is within 0.02 nats of the data's log p(x) on average."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    T, m = 30, 0.7
    schedule = dm.Schedule(torch.linspace(0.01, 0.4, T, dtype=torch.float64), dtype=torch.float64)
    d = dm.Diffusion(PerStepLinear(T), schedule, levels=None, variance="beta", predict="eps")
    elbo = pyro.infer.TraceMeanField_ELBO()
    optim = torch.optim.Adam(d.net.parameters(), lr=0.05)
    with pyro.validation_enabled(False):
        for step in range(400):
            if step == 280:
                optim.param_groups[0]["lr"] = 0.01
            x = m + torch.randn(1024, 1, dtype=torch.float64)  # fresh data each step: no overfitting
            optim.zero_grad()
            (elbo.differentiable_loss(d.model, d.guide, x) / len(x)).backward()
            optim.step()
    n, draws = 200, 400
    x = m + torch.randn(n, 1, dtype=torch.float64)
    L, prior = d.terms(x.repeat(draws, 1))  # every t; row r is point r % n
    neg = (L.sum(1) + prior).reshape(draws, n)
    elbo_x, se_x = -neg.mean(0), neg.std(0) / math.sqrt(draws)
    with torch.no_grad():
        log_p_model = _linear_gaussian_log_marginal(d, x)
    log_p_data = Normal(m, 1.0).log_prob(x[:, 0])
    se_mean = se_x.square().mean().sqrt().item() / math.sqrt(n)
    assert ((elbo_x - log_p_model) / se_x).max() < 4.5
    assert (elbo_x - log_p_model).mean().item() < 3 * se_mean
    gap = (log_p_data - elbo_x).mean().item()
    assert -3 * se_mean < gap < 0.02, (gap, se_mean)


def test_discretized_decoder_is_a_distribution_and_bernoulli_at_two_levels():
    torch.manual_seed(0)
    loc = torch.tensor([-1.3, -0.2, 0.0, 0.5, 0.999, 2.0], dtype=torch.float64)
    for scale in (0.003, 0.05, 0.7):
        g = dm.DiscretizedGaussian(loc, scale, 256)
        levels = torch.arange(256, dtype=torch.float64)[:, None] / 255
        total = g.log_prob(levels.expand(256, len(loc))).exp().sum(0)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-9), (scale, total)
        # an interior bin against Phi(b) - Phi(a) written out
        k = 100
        y = 2 * k / 255 - 1
        n = Normal(loc, scale)
        direct = n.cdf(torch.tensor(y + 1 / 255, dtype=torch.float64)) - n.cdf(torch.tensor(y - 1 / 255,
                                                                                          dtype=torch.float64))
        got = g.log_prob(torch.full_like(loc, k / 255)).exp()
        assert torch.allclose(got, direct, atol=1e-12, rtol=1e-7)
    # two levels: P(x = 1) = Phi(loc / scale), the Bernoulli decoder of the binarized images
    d = dm.Diffusion(TinyEps(6, 10).double(), _schedule("linear", 10), levels=2)
    sd = d.s.beta[1].sqrt()
    bern = d.decoder(loc[None])
    two = dm.DiscretizedGaussian(loc[None], sd, 2)
    ones = torch.ones(1, 6, dtype=torch.float64)
    assert torch.allclose(bern.log_prob(ones), two.log_prob(ones).sum(-1), rtol=1e-9)
    assert torch.allclose(bern.log_prob(0 * ones), two.log_prob(0 * ones).sum(-1), rtol=1e-9)
    assert torch.allclose(two.log_prob(ones)[0].exp(), Normal(0.0, 1.0).cdf(loc / sd), atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules(name):
    """Linear: Ho et al.'s endpoints at T = 1000; cosine: alpha_bar_t = f(t)/f(0). Both in (0, 0.999]."""
    s = _schedule(name, 1000).float64
    assert (s["beta"][1:] > 0).all() and (s["beta"][1:] <= 0.999).all()
    if name == "linear":
        assert s["beta"][1].item() == pytest.approx(1e-4) and s["beta"][1000].item() == pytest.approx(0.02)
    else:
        f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        assert s["alpha_bar"][500].item() == pytest.approx(f(500) / f(0), rel=1e-9)


def _write_npz(path, size):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (20, size, size), dtype=np.uint8),
             x_test=rng.integers(0, 256, (10, size, size), dtype=np.uint8))


def test_through_the_runner(cli, tmp_path):
    """The model file as a user runs it: exit 0, the metrics and the four figures."""
    out = tmp_path / "run"
    r = cli("inference.svi", "models/diffusion.py", "--steps", "3", "--no-progress", "--out", str(out),
            "--T", "10", "--channels", "8", "--test-points", "16", "--samples", "4")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["elbo"] == "meanfield" and metrics["T"] == 10
    assert len(metrics["test_nats_by_t"]) == 10
    nats = -metrics["test_elbo_full"]
    assert nats == pytest.approx(sum(metrics["test_nats_by_t"]) + metrics["test_nats_prior"], rel=1e-6)
    assert metrics["test_bits_per_dim"] == pytest.approx(nats / (64 * math.log(2)), rel=1e-6)
    assert math.isfinite(metrics["test_elbo"]) and metrics["sample_seconds_per_image"] > 0
    for png in ("forward_chain", "reverse_chain", "samples", "elbo_terms"):
        assert (out / f"{png}.png").is_file(), png


def test_bad_input_exits_2_with_one_error_line(cli, tmp_path, capsys):
    from inference.svi import main

    r = cli("inference.svi", "models/diffusion.py", "--T", "0", "--steps", "1", "--out", str(tmp_path / "a"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "--T" in r.stderr, r.stderr
    _write_npz(tmp_path / "seven.npz", 7)
    cases = [(["--schedule", "quadratic"], "choose one of: linear, cosine"),
             (["--loss", "kl"], "choose one of: elbo, simple"),
             (["--data", str(tmp_path / "seven.npz")], "multiples of 4"),
             (["--data", str(tmp_path / "seven.npz"), "--levels", "3"], "multiples of 8")]
    for i, (flags, text) in enumerate(cases):
        code = main(["models/diffusion.py", "--steps", "1", "--no-progress", "--out", str(tmp_path / f"r{i}"),
                     *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and "\n" not in err and text in err, (flags, err)


def test_runs_on_each_device(device):
    """Data, parameters, the training loss, the sum over t and sampling on the device (CUDA
    cases skip without a GPU); the runner's own device handling is tested with the VAE."""
    opts = dm.Options(T=5, channels=8, test_points=8, samples=2)
    ds = dm.data(options=opts).to(device)
    spec = dm.build(opts, ds)
    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(spec.model, spec.guides["forward"], ds.train[:16])
    loss.backward()
    params = dict(pyro.get_param_store().named_parameters())
    assert params and all(p.device.type == device.type and p.grad is not None for p in params.values())

    class Run:
        dataset = ds

    metrics = spec.evaluate(Run())
    assert math.isfinite(metrics["test_elbo_full"]) and math.isfinite(metrics["test_bits_per_dim"])
