"""models/bayes_net.py's NumPyro twin against Pyro and closed forms, in both modes.

CPT learning: at the conjugate posterior kappa = alpha + counts the ELBO integrand is the
log evidence for every draw (sum of log multivariate Beta ratios), on both backends.
Inference: Pyro's enumerated ELBO is exact; the twin runs NumPyro's TraceGraph_ELBO, whose
ELBO and score-function gradient must match the exact ones within Monte Carlo error
(spread computed exactly by summing over the four latent states), and NumPyro's
Trace_ELBO, whose gradient for a discrete guide is zero in expectation, is refused.
"""

import itertools
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

pytest.importorskip("numpyro")

from ppl_gen.backends import numpyro_backend as nb  # noqa: E402
from inference.svi import main  # noqa: E402
from ppl_gen.exact import bayesnet as bn  # noqa: E402
from ppl_gen.core.protocol import load_model_file  # noqa: E402
from ppl_gen.core.train import make_elbo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "bayes_net.py"
CSV = ROOT / "models" / "networks" / "lecture_500.csv"
import test_numpyro_backend as backend_tests  # noqa: E402  (pyro_elbo, set_pyro_params, _estimates, _metrics)

EVIDENCE = "C=c0,D=d1"
# a mean-field q away from the optimum, so the ELBO's gradient is far from zero
LOGITS = {"q_A": [0.4, -0.3], "q_B": [-0.9, 0.6]}


def setup(**options):
    mf = load_model_file(MODEL)
    opts = mf.options(options)
    ds = mf.data(None, opts)
    return mf, opts, ds, mf.build(opts, ds), mf.module.numpyro_twin(opts, ds)


# ---------------------------------------------------------------- CPT learning: exact (1e-5)
def test_learning_elbo_at_the_conjugate_posterior_is_the_log_evidence_on_both_backends():
    """q(theta_vj) = Dirichlet(alpha + n_vj) is the exact posterior, so every draw gives
    log p(x) = sum_{v,j} log B(alpha + n_vj) - log B(alpha 1), B the multivariate Beta
    function: the ELBO estimates of both backends (and Pyro's default enum) equal it,
    1e-5 nats per row (float32 on both sides)."""
    mf, opts, ds, spec, twin = setup(learn_from=str(CSV))
    kappa = spec.evaluate.__self__.conjugate(ds.train)  # float64 alpha + counts
    log_B = lambda a: torch.lgamma(a).sum(-1) - torch.lgamma(a.sum(-1))  # noqa: E731
    log_px = sum((log_B(k) - log_B(torch.full_like(k, opts.prior_count))).sum().item() for k in kappa.values())
    N = len(ds.train)
    params = {f"kappa_{v}": k.float().numpy() for v, k in kappa.items()}
    # three draws (vectorized particles), each exact: so is their mean
    got = nb.numpyro_elbo(twin.model, twin.guides["dirichlet"], params, ds.train, num_particles=3, seed=0)
    assert got / N == pytest.approx(log_px / N, abs=1e-5)
    backend_tests.set_pyro_params(params, {k: dist.constraints.positive for k in params})
    for name in ("trace", "enum"):
        got = backend_tests.pyro_elbo(spec.model, spec.guides["dirichlet"], ds.train, name=name)
        assert got / N == pytest.approx(log_px / N, abs=1e-5), name
    assert twin.enum_as == "trace"  # the Dirichlet guide has nothing to enumerate


# ---------------------------------------------------------------- inference: exact and Monte Carlo
def integrand(inf, q):
    """log P(a, b, e) - log q(a) - log q(b) on each of the 2 x 2 latent states, with its
    probability under q: the exact distribution of a one-particle ELBO estimate."""
    net, ev = inf.net, inf.evidence
    values, weights = [], []
    for a, b in itertools.product(range(2), range(2)):
        x = {"A": a, "B": b, **ev}
        log_joint = sum(math.log(net.cpt[v][tuple(x[u] for u in net.parents[v]) + (x[v],)].item())
                        for v in net.order)
        values.append(log_joint - math.log(q["A"][a]) - math.log(q["B"][b]))
        weights.append(q["A"][a] * q["B"][b])
    mean = sum(w * f for w, f in zip(weights, values))
    sd = math.sqrt(sum(w * (f - mean) ** 2 for w, f in zip(weights, values)))
    return mean, sd


def test_inference_elbo_enumerated_on_pyro_sampled_on_numpyro():
    """At the same logits: Pyro's enum ELBO equals the closed-form mean-field ELBO (1e-5);
    NumPyro's TraceGraph_ELBO with K = 4000 particles lies within 4 standard errors of it
    (the integrand's sd summed exactly over the latent states, about 0.7 nats)."""
    mf, opts, ds, spec, twin = setup(evidence=EVIDENCE)
    inf = spec.evaluate.__self__
    q = {v: torch.softmax(torch.tensor(LOGITS[f"q_{v}"], dtype=torch.float64), -1).tolist() for v in "AB"}
    exact, sd = integrand(inf, q)
    assert exact == pytest.approx(bn.mean_field_elbo(inf.net, inf.evidence, {v: torch.tensor(q[v], dtype=torch.float64) for v in q}),
                                  abs=1e-9)  # the two oracles agree
    params = {k: np.float32(v) for k, v in LOGITS.items()}
    backend_tests.set_pyro_params(params)
    assert backend_tests.pyro_elbo(spec.model, spec.guides["mean_field"], ds.train, name="enum") == pytest.approx(
        exact, abs=1e-5)
    K = 4000
    got = nb.numpyro_elbo(twin.model, twin.guides["mean_field"], params, ds.train, elbo_name="tracegraph",
                          num_particles=K, seed=1)
    assert sd > 0.1 and abs(got - exact) < 4 * sd / math.sqrt(K), (got, exact, sd)


def test_numpyro_tracegraph_gradient_is_unbiased_and_trace_elbo_gradient_is_not():
    """The score-function gradient of NumPyro's TraceGraph_ELBO, mean of M = 30 estimates of
    200 particles, matches the exact gradient (autograd through Pyro's enumerated ELBO)
    within 4 standard errors per coordinate. NumPyro's Trace_ELBO drops the score term: its
    mean gradient is within 4 standard errors of zero where the exact one is far from it;
    that is why the backend refuses it for discrete latents."""
    import jax
    import jax.numpy as jnp
    from numpyro.infer import Trace_ELBO, TraceGraph_ELBO

    mf, opts, ds, spec, twin = setup(evidence=EVIDENCE)
    backend_tests.set_pyro_params({k: np.float32(v) for k, v in LOGITS.items()})
    loss = make_elbo("enum").differentiable_loss(spec.model, spec.guides["mean_field"], ds.train)
    store = dict(pyro.get_param_store().named_parameters())
    grads = torch.autograd.grad(loss, [store[k] for k in LOGITS])
    exact = np.concatenate([g.numpy() for g in grads])  # d(-ELBO)/d logits

    x = nb.to_jax(ds.train)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in LOGITS.items()}

    def mean_gradient(elbo):
        grad = jax.jit(jax.grad(lambda p, key: elbo.loss(key, p, twin.model, twin.guides["mean_field"], x)))
        g = []
        for key in jax.random.split(jax.random.PRNGKey(0), 30):
            d = grad(params, key)
            g.append(np.concatenate([np.asarray(d[k]) for k in LOGITS]))
        g = np.stack(g)
        return g.mean(0), g.std(0, ddof=1) / math.sqrt(len(g))

    mean, se = mean_gradient(TraceGraph_ELBO(num_particles=200))
    assert np.all(np.abs(mean - exact) < 4 * se), (mean, exact, se)
    biased, bse = mean_gradient(Trace_ELBO(num_particles=200))
    assert np.all(np.abs(biased) < 4 * bse + 1e-6), biased
    assert np.all(np.abs(exact) > 4 * (se + bse))  # so both checks can fail


# ---------------------------------------------------------------- the runner: same budget, same fit
def test_learning_fits_agree_after_the_same_budget(tmp_path):
    """The file's defaults (300 steps, lr 0.05, --elbo enum = trace here) from the same start:
    both backends' CPT posterior means within 0.08 of the conjugate ones and 0.08 of each
    other (the 0.07 is Pyro's own distance at seed 0), train ELBOs within 0.05 nats per row."""
    common = [str(MODEL), "--learn-from", str(CSV), "--eval-every", "300", "--eval-particles", "20",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "pyro")]) == 0
    assert main([*common, "--backend", "numpyro", "--out", str(tmp_path / "numpyro")]) == 0
    a, b = backend_tests._metrics(tmp_path / "pyro"), backend_tests._metrics(tmp_path / "numpyro")
    for m in (a, b):
        assert m["max_abs_error_vs_conjugate"] < 0.08
    va, vb = a["cpt_posterior_mean"]["vi"], b["cpt_posterior_mean"]["vi"]
    for v in va:
        assert np.abs(np.array(va[v]) - np.array(vb[v])).max() < 0.08, v
    assert abs(a["train_elbo"] - b["train_elbo"]) < 0.05


def test_inference_fits_agree_after_the_same_budget(tmp_path):
    """300 steps at lr 0.05 from uniform q: Pyro's exact enum gradients and NumPyro's
    score-function ones reach the same mean-field optimum: KL(q || posterior) within 0.005
    nats of each other and below 0.025 (the optimum is 0.0186), marginals within 0.03."""
    common = [str(MODEL), "--evidence", EVIDENCE, "--eval-every", "300", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "pyro")]) == 0
    assert main([*common, "--backend", "numpyro", "--elbo", "tracegraph", "--out", str(tmp_path / "numpyro")]) == 0
    a, b = backend_tests._metrics(tmp_path / "pyro"), backend_tests._metrics(tmp_path / "numpyro")
    assert max(a["kl_vi_to_exact"], b["kl_vi_to_exact"]) < 0.025
    assert abs(a["kl_vi_to_exact"] - b["kl_vi_to_exact"]) < 0.005
    for v, m in a["marginals"]["vi"].items():
        for s, p in m.items():
            assert p == pytest.approx(b["marginals"]["vi"][v][s], abs=0.03)


@pytest.mark.parametrize("elbo,message", [
    ("trace", "NumPyro's Trace_ELBO has no score-function term"),
    ("enum", "--elbo enum has no NumPyro counterpart"),
])
def test_inference_mode_refuses_estimators_without_a_score_function_term(tmp_path, capsys, elbo, message):
    assert main([str(MODEL), "--backend", "numpyro", "--elbo", elbo, "--steps", "1",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    if elbo != "enum":
        assert "--elbo tracegraph" in err[0]
