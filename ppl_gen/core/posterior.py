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

import warnings
from pathlib import Path
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

from ppl_gen.core.errors import UserError
from ppl_gen.core.protocol import takes_minibatches

NUM_DRAWS = 1000
# a cap on the values stored per file (draws x values per draw): a large table of global
# latents (a high-order Markov chain) gets fewer draws rather than a file of gigabytes
MAX_VALUES = 5_000_000
# rows of the training data the guide is called on when it takes minibatches: global
# latents do not depend on which rows a batch holds, and the local ones are not drawn
PROBE_ROWS = 8


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
        return (x[idx].to(device), idx.to(device)), {"size": n}
    return (x.to(device),), {}


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
        args, kwargs = (x if device is None else x.to(device),), {}
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, (args, kwargs)


def guide_draws(model: Callable, guide: Callable, x: torch.Tensor, num_draws: int = NUM_DRAWS,
                custom_dims: dict | None = None, device: torch.device | None = None) -> dict[str, Any] | None:
    """S draws of every global latent from the guide, with their dims; None without any.

    Returns ``{"draws": {site: array [S, ...]}, "dims": {site: [...]}, "coords": {...}}``.
    The guide is run once per draw (a loop, not a vectorizing plate: a guide written for
    one draw need not broadcast over a leading dimension).
    """
    model_trace, (args, kwargs) = trace_with_guide(model, guide, x, device)
    glob, _ = split_latents(model_trace)
    if not glob:
        return None
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


def save_guide_posterior(run, path: str | Path, num_draws: int = NUM_DRAWS, seed: int = 0) -> Path | None:
    """Write ``posterior.nc`` for a fitted run (a :class:`~ppl_gen.core.train.FittedRun`); None
    (and no file) when the model has no global latents. Draws use their own random stream,
    so writing the file changes nothing else in the run."""
    spec = run.spec
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pyro.set_rng_seed(seed)
        got = guide_draws(spec.model, run.guide, run.dataset.train, num_draws,
                          getattr(spec, "posterior_dims", None), device=run.dataset.device)
    if got is None:
        return None
    attrs = {"source": "draws from the fitted variational guide", "guide": run.guide_name,
             "model": str(run.config.get("model", "")), "num_draws": got["num_draws"],
             "inference_library": "pyro"}
    idata = to_inference_data(got["draws"], got["dims"], got["coords"], attrs)
    path = Path(path)
    idata.to_netcdf(str(path))
    return path
