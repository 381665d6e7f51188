"""Pyro's automatic guides for a model file without a guide, and their refusals.

Oracle: the closed-form posterior of tests/inference/conjugate_pair_model.py (two conjugate
Normal means). Budgets are tiny; tolerances are stated against the posterior sd (0.1).
"""

import json
from pathlib import Path

import pytest
import torch

from inference import svi
from ppl_gen.core.pipeline import run
from ppl_gen.core.settings import RunConfig

HERE = Path(__file__).parent
PAIR = str(HERE / "conjugate_pair_model.py")
CONJ = str(HERE / "conjugate_model.py")
ROOT = HERE.parents[1]


def _fit(tmp_path, guide, **settings):
    cfg = RunConfig(model_file=PAIR, guide=guide, out=str(tmp_path / guide), device="cpu", threads=1,
                    progress=False, diagnostic_draws=400, **settings)
    return run(cfg)


# (guide, steps, how close the mean must come in posterior sds, how close the sd: ratio bounds)
# (the sds are of 400 guide draws: their own sampling error is about 4%)
CASES = [("AutoNormal", 800, 0.02, 0.5, (0.8, 1.25)),
         ("AutoMultivariateNormal", 600, 0.03, 0.5, (0.8, 1.25)),
         ("AutoLowRankMultivariateNormal", 600, 0.03, 0.5, (0.8, 1.25)),
         # a flow with a network to train moves slowest; this budget gets it within 1.5 sds
         ("AutoIAFNormal", 600, 0.03, 1.5, (0.7, 1.5)),
         ("AutoDelta", 400, 0.1, 0.05, None),                   # MAP = posterior mean for a Gaussian posterior
         ("AutoLaplaceApproximation", 400, 0.1, 0.2, (0.85, 1.15))]   # Laplace: exact for a Gaussian


@pytest.mark.parametrize("guide,steps,lr,mean_tol,sd_ratio", CASES, ids=[c[0] for c in CASES])
def test_each_autoguide_reaches_the_closed_form_posterior(tmp_path, guide, steps, lr, mean_tol, sd_ratio):
    import conjugate_pair_model as pair  # noqa: F401  (tests/inference is on sys.path under pytest)

    fitted, metrics = _fit(tmp_path, guide, steps=steps, lr=lr)
    x = fitted.dataset.train
    mean, sd = pair.posterior(x)
    post = metrics["posterior_summary"]
    got_mean = torch.tensor([post["mu[0]"]["mean"], post["mu[1]"]["mean"]])
    assert (got_mean - mean).abs().max() < mean_tol * sd, (got_mean, mean)
    if sd_ratio:
        for d in ("mu[0]", "mu[1]"):
            assert sd_ratio[0] < post[d]["sd"] / sd < sd_ratio[1], (d, post[d]["sd"], sd)
    assert (fitted.out / "posterior.nc").is_file() and (fitted.out / "posterior_summary.csv").is_file()
    if guide == "AutoDelta":  # a point mass has no density to weigh draws by
        assert "point-mass" in metrics["diagnostics_skipped"]
    elif guide == "AutoLaplaceApproximation":
        # exact for a Gaussian posterior: its covariance is the closed form's, and every importance
        # weight is p(x), so the importance-weighted log p(x) is the closed-form log evidence
        cov = fitted.guide_obj.fn.get_posterior().covariance_matrix
        assert torch.allclose(cov, sd**2 * torch.eye(2), rtol=1e-3), cov
        assert metrics["psis_verdict"].startswith("good")
        assert metrics["iw_log_evidence"] == pytest.approx(pair.log_evidence(x) / len(x), abs=1e-4)
    else:
        assert metrics["psis_khat"] < 0.7, metrics["psis_verdict"]


def test_low_rank_takes_the_rank_flag(tmp_path):
    fitted, _ = _fit(tmp_path, "AutoLowRankMultivariateNormal", steps=2, rank=1)
    import pyro

    assert pyro.get_param_store()["AutoLowRankMultivariateNormal.cov_factor"].shape == (2, 1)


def test_a_file_without_a_guide_runs_end_to_end(tmp_path, cli):
    code = (ROOT / "README.md").read_text()
    path = tmp_path / "no_guide.py"
    path.write_text(
        "import torch, pyro, pyro.distributions as dist\n\n"
        "def data():\n    x = torch.randn(200, generator=torch.Generator().manual_seed(3)) + 3.0\n"
        "    return x[:150], x[150:]\n\n"
        "def model(x):\n    mu = pyro.sample('mu', dist.Normal(0.0, 10.0))\n"
        "    with pyro.plate('obs', len(x)):\n        pyro.sample('x', dist.Normal(mu, 1.0), obs=x)\n")
    assert code  # the README stays the place a user learns the file shape from
    out = tmp_path / "run"
    r = cli("inference.svi", str(path), "--steps", "300", "--lr", "0.1", "--diagnostic-draws", "300",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "guide AutoNormal" in r.stdout and "PSIS (300 draws): good" in r.stdout and "mu " in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    x = torch.randn(200, generator=torch.Generator().manual_seed(3)) + 3.0
    n = 150
    precision = 1 / 100 + n
    assert abs(metrics["posterior_summary"]["mu"]["mean"] - x[:n].sum().item() / precision) < 0.05
    helptext = cli("inference.svi", str(path), "--help").stdout
    assert "no_guide.py defines no guide of its own" in helptext and "AutoNormal (default)" in helptext
    assert "AutoLaplaceApproximation" in helptext


def _error(argv, capsys) -> str:
    code = svi.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_refusals(tmp_path, capsys):
    common = ["--steps", "2", "--no-progress", "--out", str(tmp_path / "r"), "--overwrite"]
    bayes_net = str(ROOT / "models" / "bayes_net.py")
    err = _error([bayes_net, "--guide", "AutoNormal", *common], capsys)
    assert "are discrete" in err and "write a guide" in err
    assert "needs at least two latent numbers" in _error([CONJ, "--guide", "AutoIAFNormal", *common], capsys)
    assert "Pyro's automatic guides: AutoNormal" in _error([CONJ, "--guide", "AutoNope", *common], capsys)
    pytest.importorskip("numpyro")
    assert "use --backend pyro" in _error([PAIR, "--backend", "numpyro", *common], capsys)


def test_local_latents_with_minibatches_are_refused(tmp_path, capsys):
    path = tmp_path / "local.py"
    path.write_text(
        "import torch, pyro, pyro.distributions as dist\nfrom ppl_gen import data_plate\n\n"
        "def data():\n    return torch.randn(20)\n\n"
        "def model(x, idx=None, size=None):\n    m = pyro.sample('m', dist.Normal(0.0, 1.0))\n"
        "    with data_plate(x, idx, size):\n        z = pyro.sample('z', dist.Normal(m, 1.0))\n"
        "        pyro.sample('x', dist.Normal(z, 1.0), obs=x)\n")
    err = _error([str(path), "--batch-size", "5", "--steps", "2", "--no-progress", "--out", str(tmp_path / "o")],
                 capsys)
    assert "cannot follow a minibatch" in err and "drop --batch-size" in err
