"""models/vae.py: the ELBO estimators agree, and importance sampling bounds behave as theory says."""

import math

import pyro
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from models import vae as vae_file
from ppl_gen.datasets.images import load_digits
from ppl_gen.core.train import make_elbo


def _vae(device="cpu", latent_dim=4):
    x = load_digits().train[:100].to(device)
    vae = vae_file.VAE(x.shape[1], vae_file.Options(latent_dim=latent_dim, hidden_dim=32), device)
    return vae, x


def _estimates(elbo_name, vae, x, n=200):
    elbo = make_elbo(elbo_name)
    with torch.no_grad(), pyro.validation_enabled(False):  # checks are not under test here
        v = torch.tensor([-elbo.loss(vae.model, vae.amortized, x) for _ in range(n)], dtype=torch.float64)
    return v.mean().item(), (v.std() / math.sqrt(n)).item()


def test_meanfield_and_trace_elbo_agree_within_mc_error():
    """Analytic-KL ELBO and all-Monte-Carlo ELBO at the same parameters: same expectation."""
    vae, x = _vae()
    m_trace, se_trace = _estimates("trace", vae, x)
    m_mf, se_mf = _estimates("meanfield", vae, x)
    assert abs(m_trace - m_mf) < 4 * math.hypot(se_trace, se_mf), (m_trace, m_mf, se_trace, se_mf)
    assert se_mf < se_trace  # the closed-form KL removes variance


def test_elbo_matches_a_hand_written_formula():
    """Independent oracle: E_q[log p(x|z)] by MC (many samples) - KL(q || N(0, I)) by torch."""
    vae, x = _vae()
    with torch.no_grad():
        mu, sigma = vae.encoder(x)
        q = Normal(mu, sigma)
        z = q.sample((2000,))
        expected_loglik = vae.likelihood(z).log_prob(x).mean(0)
        kl = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(sigma))).sum(-1)
        hand = (expected_loglik - kl).sum().item()
    m_mf, se_mf = _estimates("meanfield", vae, x)
    assert abs(hand - m_mf) < 4 * se_mf + 0.05, (hand, m_mf, se_mf)


def test_importance_sampled_log_likelihood_bounds():
    """log p_hat_K(x) >= ELBO in expectation, and grows with K (Burda et al. 2016, Thm 1)."""
    # train briefly so that q(z|x) and p(z|x) differ in an interesting way (at random
    # initialisation the decoder ignores z and every bound is already tight)
    from ppl_gen.core.train import Trainer

    vae, _ = _vae()
    data = load_digits()
    trainer = Trainer(vae.model, vae.amortized, data.train, make_elbo("meanfield"), lr=3e-3, batch_size=128)
    for t in range(1, 301):
        trainer.step(t)
    x = data.test[:300]
    with torch.no_grad():
        loc, scale = vae.encoder(x)
    ll = {K: vae.log_likelihood(x, loc, scale, K).mean().item() for K in (1, 10, 100, 1000)}
    elbo, se = _estimates("meanfield", vae, x)
    elbo_per_point = elbo / len(x)
    # K = 1 is a one-sample ELBO estimate: equal in expectation (100 points of MC noise)
    assert abs(ll[1] - elbo_per_point) < 0.5
    assert ll[10] > ll[1] and ll[100] > ll[10] and ll[1000] > ll[100], ll
    assert ll[1000] > elbo_per_point + 4 * se / len(x)


def test_vae_runs_on_each_device(device, tmp_path):
    """The whole run on CPU, and on CUDA when the machine has one (skipped otherwise)."""
    from inference.svi import RunConfig, run

    cfg = RunConfig(model_file=vae_file.__file__, steps=20, device=device.type, out=str(tmp_path / "r"),
                    progress=False, options={"latent_dim": 2, "hidden_dim": 32, "ll_samples": 20,
                                             "ll_points": 50})
    fitted, metrics = run(cfg)
    assert metrics["device"].startswith(device.type)
    assert fitted.dataset.train.device.type == device.type
    assert all(p.device.type == device.type for _, p in pyro.get_param_store().named_parameters())
    assert math.isfinite(metrics["test_log_likelihood"]) and math.isfinite(metrics["test_elbo"])
    assert (tmp_path / "r" / "manifold.png").is_file()


def test_gaussian_decoder_is_the_l2_loss():
    """--decoder gaussian: log p(x | z) = -||x - m(z)||^2 / (2 s^2) - D/2 log(2 pi s^2), the L2
    reconstruction loss up to a constant; the default stays Bernoulli."""
    x = load_digits().train[:5]
    opts = vae_file.Options(latent_dim=3, hidden_dim=16, decoder="gaussian", decoder_sd=0.3)
    vae = vae_file.VAE(x.shape[1], opts)
    z = torch.randn(5, 3)
    with torch.no_grad():
        m = torch.sigmoid(vae.decoder(z))
        d = x.shape[1]
        formula = -((x - m) ** 2).sum(-1) / (2 * 0.3 ** 2) - d / 2 * math.log(2 * math.pi * 0.3 ** 2)
        assert torch.allclose(vae.likelihood(z).log_prob(x), formula, atol=1e-4)
    assert isinstance(vae_file.VAE(x.shape[1], vae_file.Options()).likelihood(z[:, :1].repeat(1, 20)).base_dist,
                      pyro.distributions.Bernoulli)
    with pytest.raises(vae_file.UserError, match="--decoder must be"):
        vae_file.Options(decoder="poisson").validate()


@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("minibatch", [False, True])
def test_fused_loss_is_trace_elbos_value_and_gradients(decoder, minibatch):
    """The amortized guide's written-out -ELBO (Guide.loss, the training step's loss after step 1)
    against Pyro's Trace_ELBO on (model, amortized) at the same parameters and the same draw, in
    float64: value and every gradient to 1e-6 (relative)."""
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = vae_file.VAE(20, vae_file.Options(latent_dim=3, hidden_dim=16, decoder=decoder))
        x = torch.bernoulli(torch.full((12, 20), 0.3))
        args, kwargs = ((x[:5], torch.arange(5)), {"size": 12}) if minibatch else ((x,), {})
        params = list(vae.encoder.parameters()) + list(vae.decoder.parameters())
        results = []
        for loss in (lambda: make_elbo("trace").differentiable_loss(vae.model, vae.amortized, *args, **kwargs),
                     lambda: vae.guides()["amortized"].loss(*args, **kwargs)):
            pyro.set_rng_seed(1)
            value = loss()
            grads = torch.autograd.grad(value, params)
            results.append((value, grads))
        (a, ga), (b, gb) = results
        assert vae.guides()["amortized"].loss_elbo == "trace"
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
        for u, v in zip(gb, ga):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def test_trace_logs_the_elbos_two_terms_and_resume_keeps_them(tmp_path):
    """trace.csv's reconstruction and kl columns (the amortized guide's fused steps) add up to
    the step's loss, -ELBO = -(reconstruction - KL), at every step after the first; a resumed run
    keeps the columns and equals the uninterrupted one."""
    import csv

    from inference.svi import main

    budget = ["--ll-samples", "2", "--ll-points", "5", "--gap-points", "4", "--qstar-steps", "2",
              "--local-steps", "2", "--test-points", "20", "--threads", "1", "--no-progress"]
    file = vae_file.__file__
    assert main([file, "--steps", "12", "--out", str(tmp_path / "full"), *budget]) == 0
    assert main([file, "--steps", "6", "--out", str(tmp_path / "half"), *budget]) == 0
    assert main(["--resume", str(tmp_path / "half"), "--steps", "12", *budget]) == 0
    rows = {}
    for name in ("full", "half"):
        with open(tmp_path / name / "trace.csv", newline="") as f:
            rows[name] = list(csv.DictReader(f))
    assert rows["full"][0]["reconstruction"] == ""  # step 1 is Pyro's traced ELBO
    for a, b in zip(rows["full"], rows["half"]):
        assert a["loss"] == b["loss"] and a["reconstruction"] == b["reconstruction"] and a["kl"] == b["kl"]
        if a["reconstruction"]:
            assert float(a["loss"]) == pytest.approx(-(float(a["reconstruction"]) - float(a["kl"])), rel=1e-5)
    assert (tmp_path / "full" / "elbo_terms.png").is_file()
