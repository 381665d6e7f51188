"""PSIS k-hat, the importance-weighted bound and the Renyi/IWAE objective, against closed forms.

Oracle: the conjugate Normal model (tests/inference/conjugate_model.py), whose posterior
N(mu_N, tau_N^2) and log evidence log p(x) are known exactly.
"""

import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import conjugate_model as cm
from ppl_gen.core.posterior import diagnose, verdict

HERE = Path(__file__).parent
CONJ = str(HERE / "conjugate_model.py")


def _gaussian_guide(mean, sd):
    def guide(x, idx=None, size=None):
        pyro.sample("mu", dist.Normal(x.new_tensor(mean), x.new_tensor(sd)))
    return guide


def test_khat_is_small_for_the_exact_posterior_and_large_for_a_too_narrow_guide():
    x, _ = cm.data()
    mean, sd = cm.posterior(x)
    exact = diagnose(cm.model, _gaussian_guide(mean, sd), x, num_draws=1000)
    assert exact["psis_khat"] < 0.5 and exact["psis_verdict"].startswith("good")
    # with q = p(mu | x) every weight is p(x): the estimate is the closed-form log evidence
    assert exact["iw_log_evidence"] == pytest.approx(cm.log_evidence(x) / len(x), abs=1e-5)
    assert exact["is_ess"] > 0.99 * 1000
    narrow = diagnose(cm.model, _gaussian_guide(mean, sd / 4), x, num_draws=1000)   # a quarter of the sd
    assert narrow["psis_khat"] > 0.7 and narrow["psis_verdict"].startswith("unreliable")
    assert narrow["is_ess"] < 0.2 * 1000


def test_verdict_thresholds_are_yao_et_al():
    assert verdict(0.49).startswith("good")
    assert verdict(0.5).startswith("usable") and verdict(0.69).startswith("usable")
    assert verdict(0.71).startswith("unreliable")


def test_iwae_bound_is_above_the_elbo_and_grows_with_k():
    """E log (1/K) sum_k w_k grows with K towards log p(x) (Burda et al. 2016, thm. 1); K = 1 is
    the ELBO. A guide two posterior sds off and twice as wide leaves room to grow."""
    x, _ = cm.data()
    mean, sd = cm.posterior(x)
    guide = _gaussian_guide(mean + 2 * sd, 2 * sd)
    log_px = cm.log_evidence(x)
    elbo = -pyro.infer.Trace_ELBO(num_particles=4000, vectorize_particles=True,
                                  max_plate_nesting=1).loss(cm.model, guide, x)
    bounds, ses = [], []
    for K in (1, 4, 16, 64):
        renyi = pyro.infer.RenyiELBO(alpha=0.0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
        est = torch.tensor([-renyi.loss(cm.model, guide, x) for _ in range(200)])
        bounds.append(est.mean().item())
        ses.append(est.std().item() / math.sqrt(len(est)))
    # K = 1 is the ELBO, within 4 standard errors of the 200-estimate mean
    assert abs(bounds[0] - elbo) < 4 * ses[0] + 0.01, (bounds[0], elbo, ses[0])
    assert all(b1 - b0 > -4 * math.hypot(s0, s1) for b0, b1, s0, s1 in zip(bounds, bounds[1:], ses, ses[1:]))
    assert bounds[-1] - bounds[0] > 5 * ses[0], (bounds, ses)
    assert bounds[-1] <= log_px + 4 * ses[-1] and log_px - bounds[-1] < 0.1 * (log_px - elbo), (bounds, log_px, elbo)


def _run(tmp_path, name, **settings):
    from ppl_gen.core.pipeline import run
    from ppl_gen.core.settings import RunConfig

    cfg = RunConfig(model_file=CONJ, out=str(tmp_path / name), device="cpu", threads=1, progress=False,
                    diagnostic_draws=300, **settings)
    return run(cfg)


def test_renyi_and_tail_adaptive_runs_report_the_standard_elbo(tmp_path):
    from ppl_gen.core.pipeline import summary

    fitted, m = _run(tmp_path, "renyi", elbo="renyi", renyi_alpha=0.0, num_particles=4, steps=300, lr=0.1)
    x, _ = cm.data()
    log_px = cm.log_evidence(x) / len(x)
    # the standard ELBO of the final guide, and the IWAE bound of the same guide above it, both below log p(x)
    assert m["train_elbo"] <= m["train_bound"] + 1e-3 <= log_px + 0.01, (m["train_elbo"], m["train_bound"], log_px)
    assert "Renyi bound (alpha 0.0, K 4)" in summary(m, fitted.out)
    _, m = _run(tmp_path, "tail", elbo="tail-adaptive", num_particles=4, steps=300, lr=0.1)
    mean, sd = cm.posterior(x)
    assert abs(m["posterior_summary"]["mu"]["mean"] - mean) < sd and math.isfinite(m["train_elbo"])


def test_objective_refusals(tmp_path, capsys):
    from inference import svi

    def error(*argv):
        assert svi.main([CONJ, "--steps", "2", "--no-progress", "--out", str(tmp_path / "o"), "--overwrite",
                         *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "--num-particles 2 or more" in error("--elbo", "tail-adaptive")
    assert "use --elbo trace" in error("--elbo", "renyi", "--renyi-alpha", "1")
    assert "drop --jit" in error("--elbo", "renyi", "--jit")


def test_posterior_summary_of_many_latent_numbers_is_numpys_on_the_first_rows():
    """A latent table too big to summarize whole: the first 200 rows, in ArviZ's order, with
    numpy's mean, sd (ddof 1, as ArviZ) and quantiles of the same draws as the oracle."""
    import numpy as np

    from ppl_gen.core.posterior import posterior_summary, to_inference_data

    rng = np.random.default_rng(0)
    draws = {"a": rng.normal(size=(50, 3)), "theta": rng.gamma(2.0, size=(50, 60, 40))}
    table = posterior_summary(to_inference_data(draws, {"a": ["i"], "theta": ["c", "k"]}, {}))
    assert len(table) == 200 and table.index[3] == "theta[0, 0]" and table.index[-1] == "theta[4, 36]"
    for label, values in (("a[2]", draws["a"][:, 2]), ("theta[4, 36]", draws["theta"][:, 4, 36])):
        row = table.loc[label]
        np.testing.assert_allclose([row["mean"], row["sd"], row["q5%"], row["q50%"], row["q95%"]],
                                   [values.mean(), values.std(ddof=1), *np.quantile(values, [0.05, 0.5, 0.95])],
                                   rtol=1e-9)


def test_pointwise_khat_flags_too_narrow_proposals_point_by_point():
    """Target N(0, 1), proposal N(0, s^2) for each of 100 points, 1000 draws each: the weights'
    tail shape is k = 1 - s^2 (a Normal proposal narrower than the target has heavy-tailed
    weights; Vehtari et al. 2024), so s = 0.5 gives k = 0.75 (unreliable) and s = 1.5 bounded
    weights (k < 0)."""
    from ppl_gen.core.posterior import pointwise_khat

    g = torch.Generator().manual_seed(0)
    out = {}
    for s in (0.5, 1.5):
        z = s * torch.randn(1000, 100, generator=g, dtype=torch.float64)
        log_w = dist.Normal(0.0, 1.0).log_prob(z) - dist.Normal(0.0, s).log_prob(z)
        out[s] = pointwise_khat(log_w)
    assert 0.6 < out[0.5]["khat_median"] < 0.95 and out[0.5]["khat_above_0.7"] > 0.4
    assert out[1.5]["khat_median"] < 0.3 and out[1.5]["khat_above_0.7"] == 0.0
    assert pointwise_khat(torch.zeros(10, 5)) is None  # too few draws for a tail
