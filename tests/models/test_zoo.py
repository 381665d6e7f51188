"""The zoo's eight schools against published posteriors, and --mcmc on a model with local latents.

Reference: the non-centered eight schools posterior of the Stan and PyMC case studies (same data,
mu ~ N(0, 5), tau ~ HalfCauchy(5)): E[mu | y] = 4.4 (sd 3.3), E[tau | y] = 3.6 (sd 3.2), from long
NUTS runs. Tiny NUTS budget here: the tolerance (1.5) is about 4 Monte Carlo standard errors of
mu's mean at the 100 draws kept.
"""

import json
from pathlib import Path

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
