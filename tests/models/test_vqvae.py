"""models/vqvae.py: the quantizer against brute force, the straight-through and codebook
gradients against their formulas, the uniform-prior ELBO identity, the learned prior (a
normalized distribution, a tighter bound), and the model file through the runner."""

import itertools
import json
import math

import numpy as np
import pyro
import pytest
import torch

from inference.svi import main as svi_main
from models import vqvae as vq_file
from ppl_gen import Dataset, UserError, load_images


def _vqvae(H=8, W=8, seed=0, **kw):
    torch.manual_seed(seed)
    opts = vq_file.Options(**{"codes": 5, "code_dim": 3, "hidden": 8, "prior_channels": 8,
                              "prior_layers": 2, **kw})
    vq = vq_file.VQVAE(H, W, opts)
    for m in (vq.encoder, vq.decoder, vq.quantizer, vq.prior_net):
        m.double()
    with torch.no_grad():  # codes spread like encoder outputs, so several are in use
        vq.quantizer.codebook.normal_(0.0, 0.3)
    return vq


def _digits(n=40):
    return load_images(None).train[:n].double()


def test_nearest_code_is_the_brute_force_argmin():
    vq = _vqvae(codes=11, code_dim=5)
    z_e = torch.randn(50, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = vq.quantizer.codebook.detach()
    expected = torch.empty(50, 7, dtype=torch.long)
    for n, j in itertools.product(range(50), range(7)):
        dists = [sum((z_e[n, j, i] - e[k, i]).item() ** 2 for i in range(5)) for k in range(11)]
        expected[n, j] = int(np.argmin(dists))
    assert torch.equal(vq.quantizer.nearest(z_e), expected)


def test_uniform_prior_elbo_is_reconstruction_minus_cells_log_K():
    """Pyro's Trace_ELBO of model and guide, exactly: the guide's point mass has no entropy
    and KL(q || uniform) = cells * log K; the vq_terms factor adds exactly 0."""
    vq = _vqvae()
    x = _digits()
    with torch.no_grad():
        elbo = -pyro.infer.Trace_ELBO().loss(vq.model, vq.guide, x)
        rec = vq.reconstruction(x, vq.codes(x)).sum().item()
    assert vq.cells == 16
    assert elbo == pytest.approx(rec - len(x) * 16 * math.log(5), rel=1e-12)


def test_straight_through_and_codebook_gradients():
    """d(-ELBO + vq terms)/d z_e is the reconstruction's gradient at the decoder's input
    e_{z*} (copied straight through) plus the commitment term's 2 beta (z_e - e); the
    codebook's gradient is the codebook term's 2 (e_k - z_e) summed over k's cells; the
    encoder's weights receive a gradient."""
    vq = _vqvae(beta=0.4)
    x = _digits(12)
    seen = []
    encode = vq.encode

    def recording_encode(xs):
        z = encode(xs)
        z.retain_grad()
        seen.append(z)
        return z

    vq.encode = recording_encode
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vq.model, vq.guide, x)
    loss.backward()
    guide_z_e, model_z_e = seen  # the guide runs first; its z_e only feeds the argmin
    z_star = vq.quantizer.nearest(model_z_e.detach())
    e = vq.quantizer.codebook.detach()[z_star].clone().requires_grad_(True)
    rec = torch.distributions.Bernoulli(logits=vq.decode_logits(e)).log_prob(x).sum()
    (g_rec,) = torch.autograd.grad(-rec, e)
    z_e = model_z_e.detach()
    assert torch.allclose(model_z_e.grad, g_rec + 2 * 0.4 * (z_e - e.detach()), atol=1e-10, rtol=0)
    assert guide_z_e.grad is None
    expected = torch.zeros_like(vq.quantizer.codebook)
    expected.index_add_(0, z_star.reshape(-1), (2 * (e.detach() - z_e)).reshape(-1, e.shape[-1]))
    assert torch.allclose(vq.quantizer.codebook.grad, expected, atol=1e-10, rtol=0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vq.encoder.parameters())


def test_code_prior_is_a_normalized_distribution():
    """All 3^4 grids of a 2x2 grid of K = 3 codes: probabilities sum to one; samples are
    valid grids; and Pyro's ELBO under it is reconstruction + log p_psi(z*)."""
    vq = _vqvae(H=4, W=4, codes=3)
    with torch.no_grad():  # away from its uniform start
        for p in vq.prior_net.parameters():
            p.normal_(0.0, 0.8)
    grids = torch.tensor(list(itertools.product(range(3), repeat=4)))
    lp = vq.prior_log_prob(grids)
    assert abs(torch.logsumexp(lp, 0).item()) < 1e-12 and lp.max() - lp.min() > 1.0
    draws = vq.learned_prior(grids).sample((7,))
    assert draws.shape == (7, 4) and draws.min() >= 0 and draws.max() <= 2
    x = torch.bernoulli(torch.full((9, 16), 0.4, dtype=torch.float64))
    with torch.no_grad():
        elbo = -pyro.infer.Trace_ELBO().loss(vq.model_learned_prior, vq.guide, x)
        z = vq.codes(x)
        expected = (vq.reconstruction(x, z) + vq.prior_log_prob(z)).sum().item()
    assert elbo == pytest.approx(expected, rel=1e-12)


def test_learned_prior_bound_is_at_least_the_uniform_one_on_training_codes():
    """It starts exactly uniform (zero output layer); maximum likelihood can only raise the
    training codes' log-probability above -cells log K (200 Adam steps, fixed seed)."""
    vq = _vqvae(codes=8, prior_lr=1e-2)
    z = vq.codes(_digits(200))
    uniform = -vq.cells * math.log(8)
    assert vq.prior_log_prob(z).mean().item() == pytest.approx(uniform, abs=1e-10)
    vq.fit_prior(z, steps=200)
    assert vq.prior_fitted
    assert vq.prior_log_prob(z).mean().item() > uniform + 1.0


def test_non_binary_images_are_refused():
    grey = torch.rand(20, 16)
    with pytest.raises(UserError, match=r"binary pixels.*x > 0.5"):
        vq_file.build(vq_file.Options(), Dataset(grey, grey[:5], meta={"shape": [4, 4]}))


def test_runs_through_the_runner(cli, tmp_path):
    """The model file as a user runs it, tiny budget: the runner's held-out ELBO is the
    uniform-prior bound; every declared number is in metrics.json; the figures exist."""
    out = tmp_path / "run"
    r = cli("inference.svi", "models/vqvae.py", "--steps", "3", "--no-progress", "--out", str(out),
            "--hidden", "8", "--prior-steps", "3", "--prior-channels", "8", "--prior-layers", "2",
            "--samples", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_elbo_uniform_prior"] == pytest.approx(m["test_elbo"], abs=1e-4)
    assert m["test_elbo_uniform_prior"] == pytest.approx(m["test_reconstruction"] - 16 * math.log(8), abs=1e-9)
    assert m["test_bits_per_dim_learned_prior"] == pytest.approx(
        -m["test_elbo_learned_prior"] / (64 * math.log(2)), rel=1e-9)
    assert 1 <= m["codebook_perplexity"] <= 8 and 0 <= m["dead_codes"] < 8
    for png in ("reconstructions.png", "codes.png", "samples_learned_prior.png", "samples_uniform_prior.png"):
        assert (out / png).is_file(), png


@pytest.mark.parametrize("bad,expect", [
    ("codes", "--codes must be at least 2"),
    ("size", "must be multiples of 2"),
    ("flat", "needs 2-D images"),
])
def test_bad_input_is_one_error_line(bad, expect, tmp_path, capsys):
    argv = ["models/vqvae.py", "--steps", "1", "--no-progress", "--out", str(tmp_path / "r")]
    rng = np.random.default_rng(0)
    if bad == "codes":
        argv += ["--codes", "1"]
    else:
        shape = (7, 7) if bad == "size" else (49,)
        np.savez(tmp_path / "x.npz", x_train=rng.integers(0, 2, (30, *shape)), x_test=rng.integers(0, 2, (10, *shape)))
        argv += ["--data", str(tmp_path / "x.npz")]
    code = svi_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expect in err[0], err


def test_runs_on_each_device(device, tmp_path):
    """Data, parameters, the prior and its samples on the device (CUDA case skips without a GPU)."""
    from inference.svi import RunConfig, run

    cfg = RunConfig(model_file=vq_file.__file__, steps=2, device=device.type, out=str(tmp_path / "r"),
                    progress=False, batch_size=32,
                    options={"hidden": 8, "prior_steps": 2, "prior_channels": 8, "prior_layers": 2, "samples": 2})
    fitted, metrics = run(cfg)
    assert all(p.device.type == device.type for _, p in pyro.get_param_store().named_parameters())
    assert metrics["device"].startswith(device.type)
    assert math.isfinite(metrics["test_elbo_learned_prior"])
