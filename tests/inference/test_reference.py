"""Reference posteriors (inference.reference): exact draws a model file declares, NUTS draws shipped
with the zoo, and a model with nothing observed. Oracles: closed forms (the Wasserstein distance of
a point mass to a Normal, a normalized density's log Z = 0), a brute-force grid, published posterior
means, and two independent NUTS runs of the same posterior."""

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "zoo"
SHIPPED = ("eight_schools", "eight_schools_noncentered", "logistic_regression")


def _load(path):
    from ppl_gen.core.protocol import load_model_file

    return load_model_file(path)


def test_nothing_observed_a_normalized_target_has_log_z_zero(tmp_path):
    """data() returns None: the model is a normalized density over its latents (here Gaussian, so
    AutoMultivariateNormal holds it exactly), log Z = 0: the importance-weighted estimate of log Z is
    0 within 0.02 nats, the ELBO (a Monte Carlo estimate, noisier) within 0.1, and the fitted moments
    are the target's within an eighth of an sd."""
    from inference.svi import main

    f = tmp_path / "target.py"
    f.write_text("import pyro, pyro.distributions as dist\n"
                 "def data():\n    return None\n"
                 "def model():\n"
                 "    a = pyro.sample('a', dist.Normal(1.0, 2.0))\n"
                 "    pyro.sample('b', dist.Normal(0.5 * a, 1.0))\n")
    assert main([str(f), "--guide", "AutoMultivariateNormal", "--steps", "2500", "--lr", "0.02", "--threads", "1",
                 "--no-progress", "--diagnostic-draws", "2000", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert abs(m["train_elbo"]) < 0.1 and abs(m["iw_log_evidence"]) < 0.02, m
    s = m["posterior_summary"]
    # b = a/2 + e: mean 0.5, sd sqrt(1 + 1) = 1.414
    assert abs(s["a"]["mean"] - 1.0) < 0.25 and abs(s["a"]["sd"] - 2.0) < 0.25, s["a"]
    assert abs(s["b"]["mean"] - 0.5) < 0.18 and abs(s["b"]["sd"] - math.sqrt(2)) < 0.18, s["b"]


def test_exact_reference_measures_a_point_mass_against_the_conjugate_posterior(tmp_path):
    """normal_mean.py declares its exact posterior N(mu_N, tau_N^2). The MAP guide's point mass at
    mu_N is at 1-Wasserstein distance tau_N E|Z| = sqrt(2/pi) tau_N = 0.798 reference sds from it
    (+-0.03). The Normal guide's mean error, from 1000 guide and 4000 exact draws, is its closed-form
    |m - mu_N| / tau_N (the file's own evaluate) within 0.12, about 3 Monte Carlo standard errors."""
    from inference.compare import main

    out = tmp_path / "cmp"
    assert main([str(ROOT / "models" / "normal_mean.py"), "--guides", "normal,map", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    exact = json.loads((out / "compare.json").read_text())["exact"]
    g = exact["summary"]["guides"]
    assert abs(g["map"]["max_w1_sds"] - math.sqrt(2 / math.pi)) < 0.03, g["map"]
    assert g["map"]["median_sd_ratio_vi_to_mcmc"] == 0.0
    m = json.loads((out / "normal" / "metrics.json").read_text())
    closed_form = abs(m["vi_mean"] - m["posterior_mean"]) / m["posterior_sd"]
    assert abs(g["normal"]["max_mean_error_sds"] - closed_form) < 0.12, (g["normal"], closed_form)
    assert (out / "exact" / "posterior.nc").is_file() and (out / "vi_vs_exact.png").is_file()
    assert "## VI against the exact posterior" in (out / "compare.md").read_text()


def test_mixture_exact_draws_hold_both_modes_of_the_grid_posterior():
    """The mixture's exact_posterior draws against an independent brute-force posterior
    (tests/oracles.py: numpy and scipy, a coarser 401 x 401 grid): half the draws in each mirror-image mode (+-0.02), and that
    mode's means within 0.01."""
    from oracles import mixture_grid_posterior

    from ppl_gen.core.dataset import Dataset

    mf = _load(ZOO / "mixture.py")
    a, b, w = mixture_grid_posterior(mf.module.data()[0].numpy())
    w = w * (a < b)
    w /= w.sum()
    torch.manual_seed(0)
    mu = mf.module.exact_posterior(20000, Dataset(*mf.module.data()))["mu"].double()
    low = mu[:, 0] < mu[:, 1]
    assert abs(low.double().mean().item() - 0.5) < 0.02
    for j, grid in enumerate((a, b)):
        assert abs(mu[low, j].mean().item() - (w * grid).sum()) < 0.01


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_reference_is_converged_and_made_on_the_files_data(name):
    """Each zoo file's shipped NUTS draws: R-hat below 1.01 and bulk and tail ESS above 400
    (Vehtari et al. 2021) in every entry, made on exactly the data data() returns today (the
    fingerprint), with every latent site of the model and the command that made them."""
    import arviz as az

    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.posterior import latent_sites, trace_model
    from ppl_gen.core.settings import RunConfig

    mf = _load(ZOO / f"{name}.py")
    setup = RunSetup.build(RunConfig(model_file=str(mf.path), threads=1), mf)
    post = az.from_netcdf(str(setup.spec.reference_posterior)).posterior
    assert post.attrs["data_fingerprint"] == setup.fingerprint
    assert set(post.data_vars) == set(latent_sites(trace_model(setup.spec.model, setup.dataset.train)))
    assert post.attrs["command"].startswith("python -m inference.reference models/zoo/")
    assert float(az.rhat(post).to_array().max()) < 1.01
    assert float(az.ess(post, method="bulk").to_array().min()) > 400
    assert float(az.ess(post, method="tail").to_array().min()) > 400


def test_eight_schools_references_agree_with_each_other_and_the_case_studies():
    """The centered file's reference (NUTS on the non-centered form, theta computed from it) and the
    non-centered file's (a separate NUTS run, other latents) describe one posterior: mu and tau
    agree within 4 Monte Carlo standard errors of the difference, and both are the case studies'
    E[mu | y] = 4.4, E[tau | y] = 3.6 within 0.3."""
    import arviz as az

    def load(name):
        return az.from_netcdf(str(ZOO / "references" / f"{name}.nc")).posterior

    c, nc = load("eight_schools"), load("eight_schools_noncentered")
    for var, published in (("mu", 4.4), ("tau", 3.6)):
        mcse = math.hypot(float(az.mcse(c[[var]])[var]), float(az.mcse(nc[[var]])[var]))
        assert abs(float(c[var].mean()) - float(nc[var].mean())) < 4 * mcse, var
        assert abs(float(c[var].mean()) - published) < 0.3 and abs(float(nc[var].mean()) - published) < 0.3, var
    assert c["theta"].shape[-1] == 8


def test_shipped_reference_is_not_used_on_other_data(tmp_path, capsys):
    """A file that declares the eight schools' reference but models other data gets no comparison,
    and a line that says why."""
    f = tmp_path / "other.py"
    f.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                 "import torch\nfrom models.zoo.eight_schools import model  # noqa: F401\n"
                 f"REFERENCE_POSTERIOR = {str(ZOO / 'references' / 'eight_schools.nc')!r}\n"
                 "def data():\n    return torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])\n")
    from inference.compare import main

    out = tmp_path / "cmp"
    assert main([str(f), "--guides", "AutoNormal", "--steps", "5", "--no-progress", "--out", str(out)]) == 0
    assert "was made on other data" in capsys.readouterr().err
    report = json.loads((out / "compare.json").read_text())
    assert "mcmc" not in report and "VI against" not in (out / "compare.md").read_text()


def test_reference_command_via_another_parametrization_and_its_refusals(tmp_path, capsys):
    """--via samples the non-centered file and keeps the centered file's latents (theta from its
    deterministic site); an existing file is not overwritten; --via on other data is refused."""
    import arviz as az

    from inference.reference import main

    target = tmp_path / "ref.nc"
    args = [str(ZOO / "eight_schools.py"), "--via", str(ZOO / "eight_schools_noncentered.py"),
            "--warmup", "20", "--samples", "20", "--chains", "2", "--no-progress", "--out", str(target)]
    assert main(args) == 0
    post = az.from_netcdf(str(target)).posterior
    assert set(post.data_vars) == {"mu", "tau", "theta"} and post["theta"].shape == (2, 20, 8)
    assert post.attrs["sampled_model"] == "eight_schools_noncentered.py"
    before = target.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error:") and "--overwrite" in err
    assert target.read_bytes() == before
    assert main([str(ZOO / "eight_schools.py"), "--via", str(ZOO / "mixture.py"), "--out", str(tmp_path / "x.nc")]) == 2
    err = capsys.readouterr().err
    assert "its data differ" in err and "Traceback" not in err


def test_funnel_k_hat_flags_the_gaussian_guide(tmp_path):
    """Neal's funnel, nothing observed, against its exact (ancestral) draws: AutoNormal's worst
    marginal is more than 0.5 reference sds off and k-hat is above 0.7, so it warned rightly."""
    from inference.compare import main

    out = tmp_path / "cmp"
    assert main([str(ZOO / "funnel.py"), "--guides", "AutoNormal", "--steps", "1000", "--threads", "1",
                 "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    g = report["exact"]["summary"]["guides"]["AutoNormal"]
    assert report["rows"][0]["psis_khat"] > 0.7 and g["max_w1_sds"] > 0.5, (report["rows"][0]["psis_khat"], g)
    assert "k-hat warned, rightly" in (out / "compare.md").read_text()


def test_a_failing_exact_posterior_is_one_error_line_and_keeps_the_report(tmp_path, cli):
    f = tmp_path / "bad.py"
    f.write_text("import pyro, pyro.distributions as dist\n"
                 "def data():\n    return None\n"
                 "def model():\n    pyro.sample('a', dist.Normal(0.0, 1.0))\n"
                 "def exact_posterior(n):\n    return {'a': undefined_name}\n")
    out = tmp_path / "cmp"
    r = cli("inference.compare", str(f), "--guides", "AutoNormal", "--steps", "5", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bad.py:7 (exact_posterior") and "NameError" in last, last
    assert (out / "compare.md").is_file() and (out / "AutoNormal" / "metrics.json").is_file()
