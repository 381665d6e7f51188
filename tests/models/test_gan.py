"""models/gan.py: the discriminator's optimum (Goodfellow et al. 2014, Proposition 1) on a 1-D
toy problem, the saturating gradient of the minimax loss, and the model file through the
runner (no ELBO, resume equals uninterrupted, bad input, each device)."""

import json
import math

import numpy as np
import pyro
import pytest
import torch

from inference.svi import main as svi_main
from models import gan as gan_file

TINY = ["--width", "4", "--latent-dim", "2", "--samples", "4", "--snapshot-images", "2", "--no-score", "--threads", "1"]


def _normal_pdf(x, mu, sd):
    return torch.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def test_trained_discriminator_is_p_data_over_p_data_plus_p_g():
    """Proposition 1: for a fixed G the D that maximizes V is D*(x) = p_data / (p_data + p_g).
    p_data = N(0, 1), p_g = N(1.5, 0.7^2): log D*/(1 - D*) = log p_data - log p_g is quadratic in
    x, so D(x) = sigmoid(w . (1, x, x^2)) can reach D* and the fit is convex. D is trained by
    gan.py's discriminator loss on 20,000 draws of each; sampling error in D is about 1/sqrt(n),
    so the tolerance is 0.02 on [-2, 3], where both densities have mass."""
    g = torch.Generator().manual_seed(0)
    n, (mu_d, sd_d), (mu_g, sd_g) = 20_000, (0.0, 1.0), (1.5, 0.7)
    x_real = mu_d + sd_d * torch.randn(n, generator=g, dtype=torch.float64)
    x_fake = mu_g + sd_g * torch.randn(n, generator=g, dtype=torch.float64)
    feats = lambda x: torch.stack([torch.ones_like(x), x, x ** 2], -1)  # noqa: E731
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = gan_file.discriminator_loss(feats(x_real) @ w, feats(x_fake) @ w)
        loss.backward()
        return loss

    opt.step(closure)
    grid = torch.linspace(-2.0, 3.0, 201, dtype=torch.float64)
    p_data, p_g = _normal_pdf(grid, mu_d, sd_d), _normal_pdf(grid, mu_g, sd_g)
    d_star = p_data / (p_data + p_g)
    d_trained = torch.sigmoid(feats(grid) @ w.detach())
    assert (d_trained - d_star).abs().max().item() < 0.02
    assert d_star.min() < 0.1 and d_star.max() > 0.9  # far from the trivial D = 1/2


def test_minimax_loss_saturates_where_the_non_saturating_one_does_not():
    """d loss / d logit at a confidently rejected fake (D(G(z)) = sigmoid(-6)): -D(G(z)) ~ 0 for
    log(1 - D), -(1 - D(G(z))) ~ -1 for -log D; both losses have their minimum where D is fooled."""
    logit = torch.tensor([-6.0, 0.0, 6.0], dtype=torch.float64, requires_grad=True)
    grads = {}
    for kind in gan_file.LOSSES:
        (grad,) = torch.autograd.grad(gan_file.generator_loss(logit, kind) * 3, logit)
        grads[kind] = grad
    d = torch.sigmoid(logit.detach())
    assert torch.allclose(grads["minimax"], -d, atol=1e-12)
    assert torch.allclose(grads["non-saturating"], -(1 - d), atol=1e-12)
    assert abs(grads["minimax"][0]) < 3e-3 and abs(grads["non-saturating"][0]) > 0.99


def test_snapshot_steps_are_half_decades():
    assert [t for t in range(1, 400) if gan_file.snapshot_steps(t)] == [1, 3, 10, 30, 100, 300]


def test_runs_through_the_runner_and_resumes_exactly(cli, tmp_path, capsys):
    """Four steps in one go (a subprocess, as a user runs it) equal two steps and a resume to four
    (in this process): the same parameters, optimizer state, losses and snapshots. metrics.json
    reports no ELBO and says why."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    r = cli("inference.svi", "models/gan.py", "--steps", "4", "--no-progress", "--out", str(whole), *TINY)
    assert r.returncode == 0, r.stderr
    argv = ["models/gan.py", "--no-progress", "--out", str(parts), *TINY]
    assert svi_main(argv + ["--steps", "2"]) == 0
    assert svi_main(["models/gan.py", "--resume", str(parts), "--steps", "4", "--no-progress", *TINY]) == 0
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert set(a["params"]) == set(b["params"])
    assert any(k.startswith("generator$$$") for k in a["params"])
    assert any(k.startswith("discriminator$$$") for k in a["params"])
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for k in a["update"]["history"]:
        assert torch.equal(a["update"]["history"][k], b["update"]["history"][k]), k
        assert len(a["update"]["history"][k]) == 4
    assert a["update"]["snapshot_steps"].tolist() == b["update"]["snapshot_steps"].tolist() == [1, 3]
    assert torch.equal(a["update"]["snapshots"], b["update"]["snapshots"])
    for opt in ("opt_g", "opt_d"):
        for i, s in a["update"][opt]["state"].items():
            assert torch.equal(s["exp_avg"], b["update"][opt]["state"][i]["exp_avg"])
    m = json.loads((whole / "metrics.json").read_text())
    assert m["train_elbo"] is None and m["test_elbo"] is None
    assert m["elbo_units"].startswith("none") and m["likelihood"].startswith("none (implicit model)")
    assert 0 < m["d_real_heldout"] < 1 and 0 < m["d_fake"] < 1
    assert m["d_loss_at_equilibrium"] == pytest.approx(math.log(4), abs=1e-12)
    trace = (whole / "trace.csv").read_text().splitlines()
    assert len(trace) == 5  # a header and 4 steps; the loss column is D's loss, the history's
    assert float(trace[-1].split(",")[1]) == pytest.approx(a["update"]["history"]["d_loss"][-1].item(), rel=1e-6)
    for png in ("samples.png", "training_samples.png", "interpolation.png", "losses.png"):
        assert (whole / png).is_file(), png


@pytest.mark.parametrize("bad,expect", [
    ("latent", "--latent-dim must be at least 1"),
    ("size", "multiples of 4"),
])
def test_bad_input_is_one_error_line(bad, expect, tmp_path, capsys):
    argv = ["models/gan.py", "--steps", "1", "--no-progress", "--out", str(tmp_path / "r")]
    if bad == "latent":
        argv += ["--latent-dim", "-3"]
    else:
        path = tmp_path / "six.npz"
        rng = np.random.default_rng(0)
        np.savez(path, x_train=rng.integers(0, 2, (30, 6, 6)), x_test=rng.integers(0, 2, (10, 6, 6)))
        argv += ["--data", str(path)]
    code = svi_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expect in err[0], err


def test_runs_on_each_device(device, tmp_path):
    """Data, both networks and the samples on the device (the CUDA case skips without a GPU)."""
    from inference.svi import RunConfig, run

    cfg = RunConfig(model_file=gan_file.__file__, steps=2, device=device.type, out=str(tmp_path / "r"),
                    progress=False,
                    options={"width": 4, "latent_dim": 2, "samples": 4, "snapshot_images": 2, "score": False})
    fitted, metrics = run(cfg)
    assert all(p.device.type == device.type for _, p in pyro.get_param_store().named_parameters())
    assert metrics["device"].startswith(device.type) and metrics["test_elbo"] is None
    assert 0 < metrics["d_fake"] < 1


@pytest.mark.parametrize("H,W", [(8, 8), (28, 28), (12, 20)])
def test_generator_and_discriminator_fit_the_image_size(H, W):
    """G maps z to (n, H*W) intensities in [0, 1] and D maps them to one logit each, for the digits'
    8x8, Fashion-MNIST's 28x28 and a non-square size."""
    gan = gan_file.GAN(H, W, gan_file.Options(width=8, latent_dim=3))
    x = gan.sample(5, torch.zeros(1))
    assert x.shape == (5, H * W) and 0 <= x.min() and x.max() <= 1
    assert gan.D(x).shape == (5,)


def test_settings_that_need_a_likelihood_are_refused(tmp_path, capsys):
    """A GAN has no density: --elbo, --eval-particles, --lr ... are one error line each, before any work."""
    for flag, value in (("--elbo", "meanfield"), ("--eval-particles", "5"), ("--diagnostic-draws", "50"),
                        ("--lr", "0.01")):
        code = svi_main([gan_file.__file__, flag, value, "--steps", "2", "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: gan.py is an implicit model") and f"{flag} (" in err, err
        assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_an_implicit_run_draws_no_elbo_curve(tmp_path):
    """A GAN's trace holds the game's loss, not an ELBO: no elbo.png, and its own losses.png."""
    out = tmp_path / "r"
    assert svi_main([gan_file.__file__, "--steps", "2", "--no-score", "--samples", "4", "--no-progress",
                     "--out", str(out)]) == 0
    assert not (out / "elbo.png").exists() and (out / "losses.png").is_file()
