"""Explicit, amortized and semi-amortized guides of models/vae.py, the gap decomposition of
Cremer, Li & Duvenaud (2018), the grid posterior, and inference.compare end to end."""

import json
import math
from pathlib import Path

import pyro
import pytest
import torch

from inference.compare import main as compare_main
from models import vae as vae_file
from ppl_gen.datasets.images import load_digits
from ppl_gen.core.train import Trainer, make_elbo

ROOT = Path(__file__).resolve().parents[2]
VAE = str(ROOT / "models" / "vae.py")


@pytest.fixture(scope="module")
def trained():
    """A small amortized VAE trained for 600 steps on the digits (seed 0), shared read-only."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    data = load_digits()
    vae = vae_file.VAE(64, vae_file.Options(latent_dim=2, hidden_dim=64, qstar_steps=400, ll_samples=2000))
    trainer = Trainer(vae.model, vae.amortized, data.train, make_elbo("meanfield"), lr=3e-3, batch_size=128)
    for t in range(1, 601):
        trainer.step(t)
    return vae, data.test[:100]


def test_gap_ordering_on_the_same_decoder(trained):
    """log p_hat(x) >= ELBO(q*) >= ELBO(q_amortized), per data point, on the same points.
    Tolerance 0.02 nats: the Monte Carlo error of 100-sample ELBOs averaged over 100 points."""
    vae, x = trained
    g = vae.gaps(x, vae.q_amortized(x))
    assert g["gap_log_px"] >= g["gap_elbo_q_star"] - 0.02, g
    assert g["gap_elbo_q_star"] >= g["gap_elbo_q"] - 0.02, g
    assert g["approximation_gap"] + g["amortization_gap"] == pytest.approx(g["gap_log_px"] - g["gap_elbo_q"], abs=1e-9)
    assert g["amortization_gap"] > 0.05  # a briefly trained encoder leaves a visible gap


def test_semi_amortized_refinement_raises_the_elbo(trained):
    vae, x = trained
    with torch.no_grad():
        mu, sigma = vae.encoder(x)
        refined = vae.refine(x, mu, sigma.log(), steps=10)
        before = vae.local_elbo(x, mu, sigma.log(), samples=500).mean().item()
        after = vae.local_elbo(x, *refined, samples=500).mean().item()
    assert after > before + 0.01, (before, after)


def test_grid_posterior_integrates_to_one_and_matches_importance_sampling(trained):
    """Quadrature on a 151x151 grid against importance sampling with q* (K = 20,000):
    agreement within 0.03 nats per point (the grid's error plus IS noise)."""
    vae, x = trained
    x = x[:3]
    q_star = vae.fit_gaussians(x, 400, init=vae.q_amortized(x))
    log_px_is = vae.log_likelihood(x, *q_star, K=20_000)
    for i in range(len(x)):
        half_width = 5.0 * q_star[1][i].max().item()
        z1, z2, density, log_norm = vae.grid_posterior(x[i], q_star[0][i], half_width)
        cell = (z1[1] - z1[0]) * (z2[1] - z2[0])
        assert (density.sum() * cell).item() == pytest.approx(1.0, abs=1e-5)
        assert log_norm == pytest.approx(log_px_is[i].item(), abs=0.03)


def test_explicit_guide_updates_only_the_sampled_rows():
    """Under subsampling a step changes exactly the batch's rows of (mu_n, sigma_n), even after
    earlier steps have given the optimizer momentum for every row."""
    x = load_digits().train[:40]
    vae = vae_file.VAE(64, vae_file.Options(latent_dim=3, hidden_dim=16))
    trainer = Trainer(vae.model, vae.explicit, x, make_elbo("trace"), lr=1e-2, batch_size=10,
                      local_params=("q_mu", "q_sigma"), local_lr=0.05)
    for t in range(1, 9):  # two epochs: every row has been updated twice
        trainer.step(t)
    store = pyro.get_param_store()
    before = {k: store.get_param(k).detach().clone() for k in ("q_mu", "q_sigma")}
    decoder_before = vae.decoder.logits.weight.detach().clone()
    batch = set(trainer.schedule(9).tolist())
    trainer.step(9)
    for k in ("q_mu", "q_sigma"):
        after = store.get_param(k).detach()
        changed = {i for i in range(len(x)) if not torch.equal(after[i], before[k][i])}
        assert changed == batch, k
    assert not torch.equal(vae.decoder.logits.weight, decoder_before)  # global parameters do move


def test_compare_end_to_end_in_a_subprocess(cli, tmp_path):
    out = tmp_path / "cmp"
    r = cli("inference.compare", VAE, "--steps", "20", "--latent-dim", "2", "--hidden-dim", "16",
            "--ll-samples", "20", "--ll-points", "30", "--gap-points", "10", "--qstar-steps", "20",
            "--local-steps", "20", "--test-points", "40", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name in ["compare.json", "compare.md", "compare_elbo.png", "compare_heldout.png"]:
        assert (out / name).is_file(), name
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["guide"] for row in rows] == ["amortized", "explicit", "semi-amortized"]
    for row in rows:
        for key in ["train_elbo", "test_elbo", "test_log_likelihood", "seconds", "ms_per_step", "n_parameters",
                    "approximation_gap", "amortization_gap", "gap_log_px"]:
            assert math.isfinite(row[key]), (row["guide"], key)
        assert (out / row["guide"] / "posterior_grid.png").is_file()
    # the explicit guide carries (mu_n, sigma_n) for each of the 1,438 training images
    by = {row["guide"]: row for row in rows}
    assert by["explicit"]["n_parameters"] - by["amortized"]["n_parameters"] == (
        2 * 1438 * 2 - sum(p.numel() for p in vae_file.Encoder(64, 16, 2).parameters()))
    assert "amortization gap" in (out / "compare.md").read_text()


def _error(argv, capsys) -> str:
    code = compare_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_compare_bad_input(tmp_path, capsys):
    err = _error([VAE, "--guides", "amortized,nope"], capsys)
    assert "'nope'" in err and "amortized, explicit, semi-amortized" in err
    one = tmp_path / "one_guide.py"
    one.write_text("import torch\ndef data():\n    return torch.zeros(3)\ndef model(x):\n    pass\n"
                   "def guide(x):\n    pass\n")
    assert "at least two" in _error([str(one)], capsys)
