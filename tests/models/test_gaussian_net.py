"""models/gaussian_net.py: the closed-form posterior, and both guides against it."""

import json
import math
from pathlib import Path

import pyro
import pyro.infer
import pytest
import torch

from ppl_gen import UserError
from ppl_gen.core.protocol import load_model_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mf():
    return load_model_file(ROOT / "models" / "gaussian_net.py")


def build(mf, **options):
    opts = mf.options(options)
    ds = mf.data(None, opts)
    return mf.build(opts, ds), ds


@pytest.mark.parametrize("evidence", ["D=2.0", "C=1.0", "A=0.5,D=-1", "none"])
def test_conditioning_matches_the_precision_form(mf, evidence):
    """Oracle: the joint precision Lambda = (I - W)^T diag(1/v) (I - W) read off the
    factorization; p(h | o) has precision Lambda_hh and mean mu_h - Lambda_hh^-1 Lambda_ho (x_o - mu_o)."""
    spec, _ = build(mf, evidence=evidence, mu_a=0.3, mu_b=-0.2, mu_d=1.0, var_a=2.0)
    net = spec.evaluate.__self__
    mu, Sigma = net.exact()
    I_W = torch.eye(4, dtype=torch.float64) - net.W
    Lam = I_W.T @ torch.diag(1 / net.v) @ I_W
    m = torch.linalg.solve(I_W, net.b)
    o = net.observed
    h = [i for i in range(4) if i not in o]
    x_o = torch.tensor([net.evidence[["A", "B", "C", "D"][i]] for i in o], dtype=torch.float64)
    L_hh = Lam[h][:, h]
    ref_mu = m[h] - (torch.linalg.solve(L_hh, Lam[h][:, o] @ (x_o - m[o])) if o else 0)
    assert torch.allclose(mu, ref_mu, atol=1e-10)
    assert torch.allclose(Sigma, torch.linalg.inv(L_hh), atol=1e-10)


def fit(spec, x, guide_name, steps=800):
    """Adam with 16 vectorized particles and lr decaying 0.05 -> 0.005: a fixed budget that
    brings both guides within the tolerances below of their optima (seed 0)."""
    elbo = pyro.infer.Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    guide = spec.guides[guide_name]
    elbo.loss(spec.model, guide, x)  # create the parameters
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    optim = torch.optim.Adam(params, lr=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=0.1 ** (1 / steps))
    for _ in range(steps):
        loss = elbo.differentiable_loss(spec.model, guide, x)
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()


def test_full_rank_recovers_the_posterior_and_mean_field_shrinks_variances(mf):
    spec, ds = build(mf, evidence="D=2.0")
    net = spec.evaluate.__self__
    mu, Sigma = net.exact()
    fit(spec, ds.train, "full_rank")
    m, S = spec.guides["full_rank"].q()
    assert m.tolist() == pytest.approx(mu.tolist(), abs=0.05)
    assert S.flatten().tolist() == pytest.approx(Sigma.flatten().tolist(), abs=0.05)

    pyro.clear_param_store()
    fit(spec, ds.train, "mean_field")
    m, S = spec.guides["mean_field"].q()
    assert m.tolist() == pytest.approx(mu.tolist(), abs=0.05)  # mean field matches the means
    optimum = 1 / torch.diagonal(torch.linalg.inv(Sigma))     # s_v^2 = 1 / Lambda_vv
    assert torch.diagonal(S).tolist() == pytest.approx(optimum.tolist(), abs=0.03)
    corr = Sigma / torch.outer(Sigma.diagonal().sqrt(), Sigma.diagonal().sqrt())
    for i in range(len(mu)):
        if (corr[i].abs() > 1e-3).sum() > 1:  # correlated with another latent a posteriori
            assert S[i, i] < Sigma[i, i] - 0.05


def test_bad_evidence(mf):
    with pytest.raises(UserError, match="unknown variable 'E'; the variables are A, B, C, D"):
        build(mf, evidence="E=1")
    with pytest.raises(UserError, match="the value of D must be a number"):
        build(mf, evidence="D=high")
    with pytest.raises(UserError, match="--var-c must be positive"):
        build(mf, var_c=0.0)


def test_cli(cli, tmp_path):
    out = tmp_path / "r"
    r = cli("inference.svi", "models/gaussian_net.py", "--guide", "mean_field", "--steps", "50",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(m["kl_vi_to_exact"]) and m["latents"] == ["A", "B", "C"]
    assert (out / "posterior_pairs.png").is_file()
    r = cli("inference.svi", "models/gaussian_net.py", "--evidence", "Q=1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: --evidence: unknown variable 'Q'")
