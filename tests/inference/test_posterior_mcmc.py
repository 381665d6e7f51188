"""posterior.nc (guide draws as ArviZ InferenceData) and inference.compare --mcmc (NUTS reference).

Oracles: the guide's own parameters for its draws (Monte Carlo error of S draws), the
closed-form Normal-Normal posterior for NUTS (Monte Carlo error from ArviZ's ESS), the
model's plates for the dimension names.
"""

import json
import math
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import compare, mcmc, svi
from inference.mcmc import MCMCOptions, run_nuts
from ppl_gen.core.posterior import guide_draws, import_arviz
from ppl_gen.core.protocol import load_model_file

ROOT = Path(__file__).resolve().parents[2]
NORMAL_MEAN = str(ROOT / "models" / "normal_mean.py")


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return import_arviz()


def test_posterior_nc_matches_the_guide(tmp_path, capsys):
    """1000 draws of mu from q = N(m, s^2): mean within 4 s / sqrt(S), sd within 4 s / sqrt(2 S)."""
    out = tmp_path / "run"
    assert svi.main([NORMAL_MEAN, "--steps", "100", "--no-progress", "--out", str(out)]) == 0
    post = _az().from_netcdf(str(out / "posterior.nc")).posterior
    m, s = pyro.param("m").item(), pyro.param("s").item()
    draws = post["mu"].values.ravel()
    S = len(draws)
    assert post["mu"].dims == ("chain", "draw") and S == 1000
    assert abs(draws.mean() - m) < 4 * s / math.sqrt(S)
    assert abs(draws.std() - s) < 4 * s / math.sqrt(2 * S)


def _plated_model(x):
    with pyro.plate("groups", 3):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(3), 1.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(4)))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(theta.sum() * torch.ones(x.shape[0]), 1.0))  # local: not drawn
        pyro.sample("x", dist.Normal(z + w[0], 1.0), obs=x)


def _plated_guide(x):
    loc = pyro.param("loc", torch.arange(3.0))
    with pyro.plate("groups", 3):
        pyro.sample("theta", dist.Normal(loc, 0.5))
    pyro.sample("w", dist.Dirichlet(pyro.param("conc", torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                                 constraint=dist.constraints.positive)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))


def test_dims_come_from_the_plates_and_local_latents_are_left_out():
    got = guide_draws(_plated_model, _plated_guide, torch.randn(5), num_draws=2000)
    assert set(got["draws"]) == {"theta", "w"}                # z sits in the data plate
    assert got["dims"] == {"theta": ["groups"], "w": ["w_dim_0"]}
    theta, w = got["draws"]["theta"], got["draws"]["w"]
    assert theta.shape == (2000, 3) and w.shape == (2000, 4)
    assert abs(theta.mean(0) - [0.0, 1.0, 2.0]).max() < 4 * 0.5 / math.sqrt(2000)
    assert abs(w.mean(0) - [0.1, 0.2, 0.3, 0.4]).max() < 0.02     # E Dir(c) = c / sum c; sd <= 0.15
    named = guide_draws(_plated_model, _plated_guide, torch.randn(5), num_draws=3,
                        custom_dims={"w": {"outcome": ["a", "b", "c", "d"]}})
    assert named["dims"]["w"] == ["outcome"] and named["coords"] == {"outcome": ["a", "b", "c", "d"]}


def test_hmm_posterior_nc_has_its_plate_dims(tmp_path):
    hmm = str(ROOT / "models" / "hmm.py")
    out = tmp_path / "run"
    assert svi.main([hmm, "--sequences", "6", "--length", "10", "--steps", "3", "--no-progress",
                     "--out", str(out)]) == 0
    post = _az().from_netcdf(str(out / "posterior.nc")).posterior
    assert post["A"].dims == ("chain", "draw", "states", "next_state")
    assert post["B"].dims == ("chain", "draw", "states", "symbol")
    assert post["A"].values.sum(-1) == pytest.approx(1.0, abs=1e-5)   # rows on the simplex


def test_vae_writes_no_posterior_nc(tmp_path):
    vae = str(ROOT / "models" / "vae.py")
    out = tmp_path / "run"
    assert svi.main([vae, "--steps", "2", "--no-progress", "--ll-samples", "2", "--ll-points", "5",
                     "--gap-points", "0", "--test-points", "20", "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file() and not (out / "posterior.nc").exists()


def test_nuts_matches_the_closed_form():
    """2 chains x 300 draws: mean within 4 MC standard errors (sd / sqrt(ESS)), sd within 15%."""
    mf = load_model_file(NORMAL_MEAN)
    options = mf.options({})
    ds = mf.data(None, options)
    spec = mf.build(options, ds)
    exact_mean, exact_sd = mf.module.NormalMean(options).posterior(ds.train)
    idata, seconds, divergences = run_nuts(spec.model, ds.train, MCMCOptions(warmup=200, samples=300, chains=2))
    az = _az()
    mu = idata.posterior["mu"].values
    ess = float(az.ess(idata)["mu"])
    assert mu.shape == (2, 300) and divergences == 0
    assert abs(mu.mean() - exact_mean) < 4 * exact_sd / math.sqrt(ess)
    assert mu.std() == pytest.approx(exact_sd, rel=0.15)
    assert float(az.rhat(idata)["mu"]) < 1.05


def _documented_compare_commands():
    seen = set()
    for page in ("vi-vs-mcmc.md", "choosing-a-vi-scheme.md"):
        text = (ROOT / "docs" / page).read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("python -m inference.compare") and "--mcmc" in line and line not in seen:
                    seen.add(line)
                    yield line


def test_the_docs_show_compare_mcmc_commands():
    assert len(list(_documented_compare_commands())) >= 5


@pytest.mark.parametrize("command", list(_documented_compare_commands()))
def test_documented_compare_mcmc_command_runs(command, tmp_path, capsys):
    """Each --mcmc command of docs/vi-vs-mcmc.md and docs/choosing-a-vi-scheme.md with tiny budgets: the report, the plot and finite diagnostics."""
    argv = shlex.split(command)[3:]
    argv = [str(ROOT / a) if a.startswith(("models/", "tests/")) else a for a in argv]
    out = tmp_path / "cmp"
    budget = ["--steps", "5", "--mcmc-warmup", "30", "--mcmc-samples", "30", "--no-progress", "--out", str(out)]
    assert compare.main([*argv, *budget]) == 0, capsys.readouterr().err
    report = json.loads((out / "compare.json").read_text())["mcmc"]
    assert report["rows"] and report["chains"] == 2
    for row in report["rows"]:
        if row["mcmc_sd"] > 0:
            assert math.isfinite(row["r_hat"]) and row["ess_bulk"] > 0
    assert (out / "vi_vs_mcmc.png").is_file() and (out / "mcmc" / "posterior.nc").is_file()
    md = (out / "compare.md").read_text()
    assert "## VI against MCMC" in md and "| R-hat |" not in md.split("## VI against MCMC")[0]


@pytest.mark.parametrize("args, why", [
    (["models/vae.py"], "local latent variables (z"),
    (["models/bayes_net.py"], "discrete latent variables (A, B)"),
])
def test_mcmc_refuses_what_nuts_cannot_sample(args, why, tmp_path, capsys):
    argv = [str(ROOT / args[0]), *args[1:], "--mcmc", "--steps", "2", "--no-progress", "--out", str(tmp_path / "c")]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mcmc: ") and why in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "c").exists()                      # refused before any training


def test_one_guide_needs_a_reference(tmp_path, capsys):
    """One guide is a comparison against the file's exact posterior (the Markov chain's Dirichlet
    rows), or against NUTS; without either it is refused."""
    markov = str(ROOT / "models" / "markov_chain.py")
    assert compare.main([markov, "--data", "sample", "--steps", "2", "--no-reference", "--out", str(tmp_path / "c")]) == 2
    assert "or --mcmc" in capsys.readouterr().err
    assert compare.main([markov, "--data", "sample", "--steps", "2", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    assert "exact" in json.loads((tmp_path / "d" / "compare.json").read_text())


def test_per_latent_errors_against_the_reference_and_whether_khat_saw_them():
    """Draws with known answers: a guide shifted by half a reference sd has mean error 0.5 sds and
    1-Wasserstein distance 0.5 sds (a shift moves every quantile by it), one with the right mean
    and twice the sd has mean error 0 and W1 = E|Z| (2 - 1) = sqrt(2/pi) sds; k-hat's verdicts."""
    from ppl_gen.core.posterior import to_inference_data

    g = np.random.default_rng(0)
    ref = to_inference_data({"mu": g.normal(0.0, 1.0, size=(2, 20000))}, {}, {}, chains=True)
    vi = {"shifted": to_inference_data({"mu": g.normal(0.5, 1.0, size=20000)}, {}, {}),
          "wide": to_inference_data({"mu": g.normal(0.0, 2.0, size=20000)}, {}, {})}
    head = mcmc.comparison(vi, ref)["summary"]["guides"]
    assert head["shifted"]["max_mean_error_sds"] == pytest.approx(0.5, abs=0.03)
    assert head["shifted"]["max_w1_sds"] == pytest.approx(0.5, abs=0.03)
    assert head["wide"]["max_mean_error_sds"] == pytest.approx(0.0, abs=0.03)
    assert head["wide"]["max_w1_sds"] == pytest.approx(math.sqrt(2 / math.pi), abs=0.03)
    assert "missed this error" in mcmc.predicted(0.3, 0.8) and "warned, rightly" in mcmc.predicted(0.9, 0.8)
    assert "no warning, rightly" in mcmc.predicted(0.3, 0.1) and mcmc.predicted(None, 0.1) == ""
