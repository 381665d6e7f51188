"""The VI page's measurements against closed forms: KL fits on the bimodal target and both
gradient estimators on a conjugate Normal-Normal model whose ELBO gradient is exact."""

import math

import pytest
import torch

from ppl_gen.bench import vi


def test_kl_directions():
    fits = vi.kl_fits()
    rev, fwd = fits["KL(q||p)"], fits["KL(p||q)"]
    # KL(p || q) over Gaussians: moment matching, mean 0 and variance 2^2 + 0.6^2 (closed form)
    assert fwd["mean"] == pytest.approx(0.0, abs=1e-6)
    assert fwd["sd"] == pytest.approx(math.sqrt(4 + 0.36), abs=1e-4)
    # KL(q || p): q sits on one bump; with well-separated bumps, KL -> log 2 (q misses half of p)
    assert abs(rev["mean"]) == pytest.approx(2.0, abs=0.01) and rev["sd"] == pytest.approx(0.6, abs=0.01)
    assert rev["KL(q||p)"] == pytest.approx(math.log(2), abs=0.01)
    # each fit is best in its own direction; every KL is non-negative; the two directions differ
    assert rev["KL(q||p)"] < fwd["KL(q||p)"] and fwd["KL(p||q)"] < rev["KL(p||q)"]
    assert min(f[k] for f in fits.values() for k in ("KL(q||p)", "KL(p||q)")) > 0
    # quadrature oracle: KL between two Gaussians in closed form
    q, p = vi._normal_pdf(vi.GRID, 0.3, 1.2), vi._normal_pdf(vi.GRID, -0.5, 0.8)
    exact = math.log(0.8 / 1.2) + (1.2 ** 2 + 0.8 ** 2) / (2 * 0.8 ** 2) - 0.5
    assert vi.kl(q, p) == pytest.approx(exact, abs=1e-8)


def test_both_estimators_unbiased_reparam_lower_variance():
    x, mu, log_sigma = 1.5, 0.2, math.log(0.9)
    normal = torch.distributions.Normal
    log_joint = lambda z: (normal(0.0, 1.0).log_prob(z) + normal(z, 1.0).log_prob(torch.tensor(x))).sum(-1)  # noqa
    g = vi.gradient_draws(log_joint, torch.tensor([mu], dtype=torch.float64),
                          torch.tensor([log_sigma], dtype=torch.float64), draws=4000, samples=1,
                          generator=torch.Generator().manual_seed(0))
    exact = torch.tensor(vi.normal_normal_gradient(x, mu, log_sigma), dtype=torch.float64)
    for how in ("score", "reparam"):
        mean, se = g[how].mean(0), g[how].std(0) / math.sqrt(4000)
        assert ((mean - exact).abs() < 4 * se).all(), (how, mean, exact, se)
    assert (g["reparam"].var(0) < g["score"].var(0) / 3).all()
