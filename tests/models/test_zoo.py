"""The zoo's eight schools against published posteriors, and --mcmc on a model with local latents.

Reference: the non-centered eight schools posterior of the Stan and PyMC case studies (same data,
mu ~ N(0, 5), tau ~ HalfCauchy(5)): E[mu | y] = 4.4 (sd 3.3), E[tau | y] = 3.6 (sd 3.2), from long
NUTS runs. Tiny NUTS budget here: the tolerance (1.5) is about 4 Monte Carlo standard errors of
mu's mean at the 100 draws kept.
"""

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
NONCENTERED = str(ROOT / "models" / "zoo" / "eight_schools_noncentered.py")


def test_eight_schools_runs_without_a_guide_and_nuts_samples_its_school_effects(tmp_path, cli):
    out = tmp_path / "cmp"
    r = cli("inference.compare", NONCENTERED, "--guides", "AutoNormal", "--steps", "300", "--lr", "0.05",
            "--diagnostic-draws", "200", "--mcmc", "--mcmc-warmup", "100", "--mcmc-samples", "100",
            "--mcmc-chains", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    import arviz as az

    post = az.from_netcdf(str(out / "mcmc" / "posterior.nc")).posterior
    assert set(post.data_vars) >= {"mu", "tau", "eta"} and post["eta"].shape[-1] == 8   # local latents included
    assert abs(float(post["mu"].mean()) - 4.4) < 1.5 and 0 < float(post["tau"].mean()) < 8
    vi = az.from_netcdf(str(out / "AutoNormal" / "posterior.nc")).posterior
    assert "eta" in vi.data_vars and vi["eta"].shape[-1] == 8
    metrics = json.loads((out / "AutoNormal" / "metrics.json").read_text())
    assert metrics["psis_khat"] is not None and "psis_verdict" in metrics


def test_mixture_guide_finds_one_mode_of_the_grid_posterior(tmp_path):
    """models/zoo/mixture.py: the posterior of (mu_1, mu_2) by brute force on a 401 x 401 grid,
    restricted to the half-plane of the mode the guide found (the other is its mirror image),
    is the oracle: AutoNormal's means within 0.05, its sds within 30% (a mean-field fit)."""
    import importlib.util
    import json

    import numpy as np
    from oracles import mixture_grid_posterior

    from inference.svi import main

    path = Path(__file__).resolve().parents[2] / "models" / "zoo" / "mixture.py"
    spec = importlib.util.spec_from_file_location("zoo_mixture", path)
    mixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mixture)
    a, b, w_all = mixture_grid_posterior(mixture.data()[0].numpy())
    assert main([str(path), "--steps", "2000", "--threads", "1", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    fit = json.loads((tmp_path / "r" / "metrics.json").read_text())["posterior_summary"]
    first_low = fit["mu[0]"]["mean"] < fit["mu[1]"]["mean"]
    w = w_all * ((a < b) if first_low else (a > b))
    w = w / w.sum()
    for name, grid in (("mu[0]", a), ("mu[1]", b)):
        mean = float((w * grid).sum())
        sd = float(np.sqrt((w * (grid - mean) ** 2).sum()))
        assert abs(fit[name]["mean"] - mean) < 0.05, (name, fit[name], mean)
        assert abs(fit[name]["sd"] / sd - 1) < 0.3, (name, fit[name], sd)


def _load_zoo(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"zoo_{name}", ROOT / "models" / "zoo" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_logistic_regression_map_is_scikit_learns_and_scores_the_held_out_rows(tmp_path):
    """(X, y) data: the runner passes model(X, y). The MAP under w ~ N(0, 1) is L2-penalized
    logistic regression with C = 1 (scikit-learn, an independent implementation; its intercept is
    unpenalized, ours has a N(0, 5^2) prior): weights within 0.02, and the point mass's held-out
    accuracy and lpd are scikit-learn's accuracy and mean log-likelihood on the same rows."""
    from sklearn.linear_model import LogisticRegression

    from inference.svi import main

    (X, y), (Xt, yt) = _load_zoo("logistic_regression").data()
    clf = LogisticRegression(C=1.0, max_iter=10000, tol=1e-10).fit(X.numpy(), y.numpy())
    out = tmp_path / "map"
    assert main([str(ROOT / "models" / "zoo" / "logistic_regression.py"), "--guide", "AutoDelta", "--steps", "2000",
                 "--lr", "0.05", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    params = torch.load(out / "checkpoint.pt", weights_only=False)["params"]
    assert (params["AutoDelta.w"] - torch.tensor(clf.coef_[0], dtype=torch.float32)).abs().max() < 0.02
    assert abs(params["AutoDelta.b"].item() - clf.intercept_[0]) < 0.02
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_accuracy"] == clf.score(Xt.numpy(), yt.numpy())
    p = clf.predict_proba(Xt.numpy())[:, 1]
    log_lik = float((yt.numpy() * torch.tensor(p).log().numpy() + (1 - yt.numpy()) * torch.tensor(1 - p).log().numpy()).mean())
    assert abs(metrics["heldout_lpd"] - log_lik) < 0.01, (metrics["heldout_lpd"], log_lik)


def test_rows_minibatch_and_mismatched_rows(tmp_path, capsys):
    """Minibatches take the same rows of X and y; rows of different lengths are one error line."""
    from inference.svi import main

    path = str(ROOT / "models" / "zoo" / "logistic_regression.py")
    assert main([path, "--steps", "20", "--batch-size", "64", "--threads", "1", "--no-progress",
                 "--diagnostic-draws", "50", "--out", str(tmp_path / "mb")]) == 0
    assert json.loads((tmp_path / "mb" / "config.json").read_text())["batch_size_used"] == 64
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom models.zoo.logistic_regression import model  # noqa: F401\n\n\n"
                   "def data():\n    return (torch.randn(10, 3), torch.ones(9)), None\n")
    capsys.readouterr()
    assert main([str(bad), "--steps", "2", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the same number of rows" in err and "(10, 3), (9,)" in err and len(err.splitlines()) == 1, err
