"""Draws from a fitted guide as an ArviZ ``InferenceData`` (``posterior.nc`` in the run folder).

Which latent variables are *global*? The model is traced (with the guide's values
replayed into it) and every plate that holds an observed site is a *data plate*; a
latent site inside a data plate is local (one per data point, like a VAE's z), every
other latent is global (a mean, a CPT, a transition matrix). Only global latents are
drawn: their number does not grow with the data, and they are what an MCMC reference
run can be compared against (``inference/mcmc.py``). A model with local latents only
writes no ``posterior.nc``.

Dimension names come from the model's plates: a site sampled inside
``pyro.plate("states", K)`` gets the dimension ``states``; dimensions no plate names
(event dimensions, e.g. the simplex of a Dirichlet) are called ``<site>_dim_<i>`` as
ArviZ itself would. A model file that wants other names declares them in its Spec:
``posterior_dims={"theta": ("contexts", "next_symbol")}``, or with coordinate labels
``{"theta_C": {"A": ["a0", "a1"], "B": ["b0", "b1"], "C": ["c0", "c1"]}}``.

ArviZ and its file format: Kumar, Carroll, Hartikainen & Martin (2019), "ArviZ a unified
library for exploratory analysis of Bayesian models in Python", JOSS 4(33):1143.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

from ppl_gen.core.dataset import whole

from ppl_gen.core.errors import UserError
from ppl_gen.core.protocol import takes_minibatches

NUM_DRAWS = 1000
# a cap on the values stored per file (draws x values per draw): a large table of global
# latents (a high-order Markov chain) gets fewer draws rather than a file of gigabytes
MAX_VALUES = 5_000_000
# rows of the training data the guide is called on when it takes minibatches: global
# latents do not depend on which rows a batch holds, and the local ones are not drawn
PROBE_ROWS = 8
# local latents (one per data point) join posterior.nc up to this many numbers in all
LOCAL_MAX = 10_000


def import_arviz():
    """ArviZ, imported where used (its import is slow and announces a refactor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def probe_args(fn: Callable, x: torch.Tensor, device: torch.device | None = None) -> tuple[tuple, dict]:
    """Arguments to trace ``fn`` with: a few rows as a minibatch where it takes them, else all;
    copied to ``device`` where the data stay in host memory (--data-on-host)."""
    n = x.shape[0]
    device = x.device if device is None else device
    if takes_minibatches(fn) and n > PROBE_ROWS:
        idx = torch.arange(PROBE_ROWS, device=x.device)
        from ppl_gen.core.train import call_args

        return call_args(fn, x, idx, n, True, device)
    return whole(x.to(device))


def data_plates(model_trace) -> set[str]:
    """Names of the plates that hold an observed site (``obs=`` or ``pyro.factor``)."""
    names = set()
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            names.update(f.name for f in site["cond_indep_stack"])
    return names


def latent_sites(model_trace) -> dict[str, dict]:
    """The model's latent sample sites (not observed, not auxiliary), in trace order."""
    return {name: site for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site["infer"].get("is_auxiliary") and not site_is_subsample(site)}


def split_latents(model_trace) -> tuple[dict[str, dict], dict[str, dict]]:
    """(global, local) latent sites: local ones sit inside a data plate."""
    plates = data_plates(model_trace)
    glob, local = {}, {}
    for name, site in latent_sites(model_trace).items():
        inside = any(f.name in plates for f in site["cond_indep_stack"])
        (local if inside else glob)[name] = site
    return glob, local


def site_dims(name: str, site: dict, custom: dict | None = None) -> tuple[list[str], dict[str, list]]:
    """Dimension names of one site's value (and coordinate labels where declared)."""
    shape = tuple(site["value"].shape)
    if custom and name in custom:
        spec = custom[name]
        names = list(spec) if not isinstance(spec, str) else [spec]
        if len(names) != len(shape):
            raise UserError(f"posterior_dims[{name!r}] names {len(names)} dimension(s), the site {name} "
                            f"has {len(shape)} (shape {shape}); give one name per dimension")
        coords = {}
        if isinstance(spec, dict):
            for dim, size in zip(names, shape):
                labels = spec[dim]
                if labels is None:
                    continue
                if len(labels) != size:
                    raise UserError(f"posterior_dims[{name!r}][{dim!r}] has {len(labels)} labels, "
                                    f"the dimension has {size}")
                coords[dim] = [str(v) for v in labels]
        return names, coords
    event_dim = site["fn"].event_dim
    batch_ndim = len(shape) - event_dim
    by_dim = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
    names = [by_dim.get(i - batch_ndim, f"{name}_dim_{i}") for i in range(batch_ndim)]
    names += [f"{name}_dim_{i}" for i in range(batch_ndim, len(shape))]
    return names, {}


def trace_model(model: Callable, x: torch.Tensor):
    """The model's trace on (a probe of) the training data, latents drawn from the prior."""
    args, kwargs = probe_args(model, x)
    with torch.no_grad():
        return poutine.trace(model).get_trace(*args, **kwargs)


def trace_with_guide(model: Callable, guide: Callable, x: torch.Tensor, device: torch.device | None = None):
    """(model trace with the guide's values replayed into it, the arguments used)."""
    # a minibatch probe only where both take one, so that their plates agree
    if takes_minibatches(model) and takes_minibatches(guide):
        args, kwargs = probe_args(model, x, device)
    else:
        args, kwargs = whole(x if device is None else x.to(device))
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, (args, kwargs)


def guide_draws(model: Callable, guide: Callable, x: torch.Tensor, num_draws: int = NUM_DRAWS,
                custom_dims: dict | None = None, device: torch.device | None = None,
                local_max: int = 0) -> dict[str, Any] | None:
    """S draws of every global latent from the guide, with their dims; None without any.
    ``local_max``: the local latents join them when they hold at most this many numbers on the
    whole training set (eight schools' effects; not a VAE's code per image).

    Returns ``{"draws": {site: array [S, ...]}, "dims": {site: [...]}, "coords": {...}}``.
    The guide is run once per draw (a loop, not a vectorizing plate: a guide written for
    one draw need not broadcast over a leading dimension).
    """
    model_trace, (args, kwargs) = trace_with_guide(model, guide, x, device)
    glob, local = split_latents(model_trace)
    if not glob:
        return None
    # local latents where the guide already sees the whole data set (not a minibatch probe, which
    # would hold a few rows of them), up to local_max numbers
    if local and local_max and args[0].shape[0] == x.shape[0]:
        if sum(s["value"].numel() for s in local.values()) <= local_max:
            glob = {**glob, **local}
    dims, coords = {}, {}
    for name, site in glob.items():
        dims[name], c = site_dims(name, site, custom_dims)
        coords.update(c)
    per_draw = sum(site["value"].numel() for site in glob.values())
    num_draws = max(1, min(num_draws, MAX_VALUES // max(per_draw, 1)))
    out: dict[str, list] = {name: [] for name in glob}
    with torch.no_grad():
        for _ in range(num_draws):
            tr = poutine.trace(guide).get_trace(*args, **kwargs)
            for name, site in glob.items():
                out[name].append(tr.nodes[name]["value"].detach().reshape(site["value"].shape))
    draws = {name: torch.stack(v).cpu().numpy() for name, v in out.items()}
    return {"draws": draws, "dims": dims, "coords": coords, "num_draws": num_draws}


def to_inference_data(draws: dict, dims: dict, coords: dict, attrs: dict | None = None, chains: bool = False,
                      sample_stats: dict | None = None):
    """An ArviZ InferenceData; arrays are [S, ...] (one chain) or [chains, S, ...] with ``chains``."""
    az = import_arviz()
    posterior = {k: (v if chains else v[None]) for k, v in draws.items()}
    return az.from_dict(posterior=posterior, dims=dims, coords=coords or None,
                        sample_stats=sample_stats, attrs=attrs or {})


def save_guide_posterior(run, path: str | Path, num_draws: int = NUM_DRAWS, seed: int = 0,
                         local_max: int = LOCAL_MAX):
    """Write ``posterior.nc`` for a fitted run (a :class:`~ppl_gen.core.train.FittedRun`) and
    ``posterior_summary.csv`` beside it; returns the summary (a DataFrame), or None (and no file)
    when the model has no global latents. Draws use their own random stream, so writing the
    file changes nothing else in the run."""
    spec = run.spec
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pyro.set_rng_seed(seed)
        got = guide_draws(spec.model, run.guide, run.dataset.train, num_draws,
                          getattr(spec, "posterior_dims", None), device=run.dataset.device, local_max=local_max)
    if got is None:
        return None
    attrs = {"source": "draws from the fitted variational guide", "guide": run.guide_name,
             "model": str(run.config.get("model", "")), "num_draws": got["num_draws"],
             "inference_library": "pyro"}
    idata = to_inference_data(got["draws"], got["dims"], got["coords"], attrs)
    path = Path(path)
    idata.to_netcdf(str(path))
    table = posterior_summary(idata)
    table.to_csv(path.with_name("posterior_summary.csv"))
    return table


# ---------------------------------------------------------------- does the fit work? (PSIS)
# A guide q is checked against the model by importance sampling: draws z_s ~ q give weights
# w_s = p(x, z_s) / q(z_s). Their mean estimates p(x) (a consistent estimate, whatever q is);
# Pareto-smoothed importance sampling fits a generalized Pareto distribution to the largest
# weights, and its shape k-hat says how heavy their tail is, that is how far q is from the
# posterior in the direction that matters (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it
# work?: Evaluating variational inference", ICML; Vehtari, Simpson, Gelman, Yao & Gabry 2024,
# "Pareto smoothed importance sampling", JMLR). Their thresholds:
KHAT_GOOD, KHAT_USABLE = 0.5, 0.7
# the diagnostic weighs every latent number of the whole training set at once; beyond this many
# the weights of any guide are degenerate and the check says nothing, so it is skipped
DIAGNOSE_MAX = 10_000
# a guide that cannot be vectorized over draws is run one draw at a time, for at most this long
LOOP_SECONDS = 2.0
MIN_DRAWS = 100


def verdict(khat: float | None) -> str:
    """Yao et al. (2018)'s reading of k-hat, as one line."""
    if khat == float("-inf"):
        return "good: the importance weights are all equal, the guide is the posterior up to rounding"
    if khat is None or khat != khat:
        return "no verdict (k-hat could not be estimated)"
    if khat < KHAT_GOOD:
        return f"good: k-hat {khat:.2f} < {KHAT_GOOD}, the guide is close to the posterior"
    if khat < KHAT_USABLE:
        return (f"usable: k-hat {khat:.2f} in {KHAT_GOOD}-{KHAT_USABLE}; importance-weighted estimates "
                "converge slowly")
    return (f"unreliable: k-hat {khat:.2f} > {KHAT_USABLE}; the guide misses posterior mass, do not trust "
            "its means and sds (Yao et al. 2018)")


def _plate_nesting(model_trace) -> int:
    dims = [-f.dim for s in model_trace.nodes.values() if s["type"] == "sample"
            for f in s["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return max(dims, default=0)


def log_importance_weights(model: Callable, guide: Callable, x: torch.Tensor, num_draws: int) -> torch.Tensor:
    """log w_s = log p(x, z_s) - log q(z_s) for S draws z_s ~ q, on the whole of ``x``.

    Vectorized over draws (Pyro's ``vectorized_importance_weights``, which ``psis_diagnostic``
    also uses) where model and guide broadcast; otherwise one draw at a time."""
    from pyro.infer.importance import vectorized_importance_weights

    with torch.no_grad():
        a, k = whole(x)
        tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(*a, **k))).get_trace(*a, **k)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lw, _, _ = vectorized_importance_weights(model, guide, *a, **k, num_samples=num_draws,
                                                         max_plate_nesting=_plate_nesting(tr), normalized=False)
            if lw.shape == (num_draws,) and bool(torch.isfinite(lw).any()):
                return lw
        except Exception:  # a guide written for one draw need not broadcast over a leading dimension
            pass
        out, deadline = [], time.perf_counter() + LOOP_SECONDS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(num_draws):
                g = poutine.trace(guide).get_trace(*a, **k)
                m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*a, **k)
                out.append(m.log_prob_sum() - g.log_prob_sum())
                if time.perf_counter() > deadline:  # fewer draws rather than a slow finish
                    break
        return torch.stack(out)


def psis(log_weights) -> dict[str, float]:
    """k-hat (ArviZ's ``psislw``, the implementation of Vehtari et al.), the importance-weighted
    log p(x) = log (1/S) sum_s w_s and the weights' effective sample size 1 / sum_s w~_s^2
    (w~ the self-normalized raw weights: Kong 1992's estimate)."""
    import numpy as np

    az = import_arviz()
    lw = np.asarray(log_weights, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, khat = az.psislw(lw.copy())
    khat = float(khat)
    if not math.isfinite(khat) and lw.max() - lw.min() < 1e-6 * max(1.0, abs(lw.max())):
        # equal weights: q is the posterior up to rounding (a Gaussian posterior under its Laplace
        # approximation); the tail has no spread to fit, the Pareto shape is -infinity
        khat = float("-inf")
    S = len(lw)
    log_px = float(np.logaddexp.reduce(lw) - np.log(S))
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return {"khat": float(khat), "log_px": log_px, "ess": float(1.0 / np.sum(w ** 2)), "draws": S}


def pointwise_khat(log_weights: torch.Tensor) -> dict[str, float] | None:
    """PSIS per data point, for a guide of local latents (Yao et al. 2018, sec. 4): each point's
    own K importance weights ``log_weights`` (K draws, n points) -> {"khat_median": ...,
    "khat_above_0.7": the fraction of points whose weights are unreliable}; None under
    MIN_DRAWS draws (too few for a tail to fit)."""
    import numpy as np

    if log_weights.shape[0] < MIN_DRAWS:
        return None
    az = import_arviz()
    lw = log_weights.detach().double().cpu().numpy().T.copy()  # ArviZ: draws on the last axis
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, khat = az.psislw(lw)
    khat = np.asarray(khat, dtype=np.float64)
    return {"khat_median": float(np.median(khat)), "khat_above_0.7": float(np.mean(khat > KHAT_USABLE))}


def predictive_scores(model: Callable, guide: Callable, x, num_draws: int = 200, seed: int = 0) -> dict:
    """The held-out score of a model with covariates (``x`` a :class:`~ppl_gen.core.dataset.Rows`
    of held-out (X, y)): the log pointwise predictive density

        lpd = (1/N) sum_n log (1/S) sum_s p(y_n | X_n, theta_s),   theta_s ~ q

    (Gelman, Hwang & Vehtari 2014, "Understanding predictive information criteria for Bayesian
    models", Stat. Comput.), and, where the observed site is a Bernoulli or Categorical, the
    accuracy of the predictive mean (1/S) sum_s p(y_n | X_n, theta_s). Keys ``heldout_lpd``,
    ``heldout_accuracy``, ``predictive_draws``; ``predictive_skipped`` with the reason instead."""
    args, kwargs = whole(x)
    n = len(x)
    log_p, probs = [], []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        pyro.set_rng_seed(seed)
        for _ in range(num_draws):
            g = poutine.trace(guide).get_trace(*args, **kwargs)
            m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args, **kwargs)
            observed = [s for s in m.nodes.values() if s["type"] == "sample" and s["is_observed"]
                        and not site_is_subsample(s)]
            terms = [s["fn"].log_prob(s["value"]) for s in observed]
            if not terms or any(t.shape != (n,) for t in terms):
                return {"predictive_skipped": "the observed sites are not one value per held-out row"}
            log_p.append(sum(terms))
            fn = observed[0]["fn"] if len(observed) == 1 else None
            base = getattr(fn, "base_dist", fn)
            if isinstance(base, (torch.distributions.Bernoulli, torch.distributions.Categorical)):
                probs.append(base.probs)
    lp = torch.stack(log_p)                                            # [S, N]
    out = {"heldout_lpd": (torch.logsumexp(lp, 0) - math.log(len(lp))).mean().item(), "predictive_draws": len(lp)}
    if len(probs) == len(lp):
        p, y = torch.stack(probs).mean(0), observed[0]["value"]
        guess = (p > 0.5).to(y.dtype) if p.shape == y.shape else p.argmax(-1).to(y.dtype)
        out["heldout_accuracy"] = (guess == y).double().mean().item()
    return out


def diagnose(model: Callable, guide: Callable, x: torch.Tensor, num_draws: int = NUM_DRAWS,
             seed: int = 0) -> dict[str, Any]:
    """The PSIS check of a fitted guide against its model on the training data ``x``, as the
    keys metrics.json holds: ``psis_khat``, ``iw_log_evidence`` (nats per data point), ``is_ess``,
    ``is_draws`` and ``psis_verdict``; or ``diagnostics_skipped`` with the reason."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        pyro.set_rng_seed(seed)
        a, k = whole(x)
        g = poutine.trace(guide).get_trace(*a, **k)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*a, **k)
        latent = latent_sites(m)
        if not split_latents(m)[0]:
            return {"diagnostics_skipped": "no global latent variables"}
        sites = [s for s in g.nodes.values() if s["type"] == "sample"]
        if sites and all(type(s["fn"]).__name__ == "Delta" for s in sites):
            return {"diagnostics_skipped": "a point-mass guide (MAP) has no spread for importance sampling to check"}
        missing = [k for k in latent if k not in g.nodes]
        if missing:
            return {"diagnostics_skipped": f"the guide leaves {', '.join(missing[:3])} to enumeration"}
        size = sum(s["value"].numel() for s in latent.values())
        if size > DIAGNOSE_MAX:
            return {"diagnostics_skipped": f"{size} latent numbers on the training set, more than {DIAGNOSE_MAX}"}
        lw = log_importance_weights(model, guide, x, num_draws)
    if len(lw) < min(MIN_DRAWS, num_draws):
        return {"diagnostics_skipped": f"only {len(lw)} draws in {LOOP_SECONDS:.0f} s (the guide is run one draw "
                                       "at a time)"}
    d = psis(lw.cpu())
    return {"psis_khat": d["khat"] if d["khat"] > float("-inf") else None, "iw_log_evidence": d["log_px"] / x.shape[0], "is_ess": d["ess"],
            "is_draws": d["draws"], "psis_verdict": verdict(d["khat"])}


def posterior_summary(idata, max_rows: int = 200):
    """ArviZ's ``summary`` of the draws (mean, sd, the 5%, 50% and 95% quantiles) as a pandas
    DataFrame, one row per latent number (the first ``max_rows``)."""
    import numpy as np

    az = import_arviz()
    q = {"q5%": lambda v: np.quantile(v, 0.05), "q50%": lambda v: np.quantile(v, 0.5),
         "q95%": lambda v: np.quantile(v, 0.95)}
    idata = first_numbers(idata, max_rows)  # ArviZ's stat_funcs visit one number at a time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = az.summary(idata, kind="stats", stat_funcs=q, extend=False, round_to="none")
        stats = az.summary(idata, kind="stats", round_to="none")[["mean", "sd"]]
    return stats.join(table).head(max_rows)


def first_numbers(idata, count: int):
    """The posterior cut to (at least) its first ``count`` latent numbers in the summary's order
    (variables in turn, each in row-major order), cut along each variable's first dimension."""
    post, keep, left = idata.posterior, {}, count
    for name, var in post.data_vars.items():
        if left <= 0:
            break
        dims = [d for d in var.dims if d not in ("chain", "draw")]
        size = math.prod(var.sizes[d] for d in dims)
        if size <= left or not dims:
            keep[name] = var
        else:
            per_row = size // var.sizes[dims[0]]
            keep[name] = var.isel({dims[0]: slice(0, -(-left // per_row))})
        left -= min(size, left)
    if len(keep) == len(post.data_vars) and all(keep[k].size == post[k].size for k in keep):
        return idata
    import xarray as xr

    return idata.__class__(posterior=xr.Dataset(keep, attrs=post.attrs))
