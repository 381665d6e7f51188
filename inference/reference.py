"""Reference posteriors: the exact one a model file declares, or NUTS draws shipped beside it.

    python -m inference.reference models/zoo/eight_schools.py            # make the shipped file
    python -m inference.compare models/zoo/eight_schools.py --guides AutoNormal,AutoIAFNormal

A scheme's error can only be measured against a posterior known to be right. A model file
gives one in either of two ways (``ppl_gen.core.protocol``):

* ``exact_posterior(n)``: n independent draws from the exact posterior, where it has a closed
  form (a conjugate model's Normal or Dirichlet, the linear-Gaussian network's Gaussian, Neal's
  funnel drawn ancestrally). ``inference.compare`` draws 4 x 1000 of them.
* ``REFERENCE_POSTERIOR = "references/NAME.nc"``: an ArviZ netcdf of NUTS draws on the file's
  default data (Hoffman & Gelman 2014), made by this module's command. The file records the
  command, the seed, the sampler's settings, its divergences, the worst rank-normalized R-hat and
  the smallest bulk and tail ESS (Vehtari et al. 2021), and the fingerprint of the data: a run
  on other data (``--data``, other options) is not compared against it.

``inference.compare`` sets every scheme against it without ``--mcmc`` (``--mcmc`` runs a fresh
NUTS reference instead): per latent, the mean error and the 1-Wasserstein distance between
marginals in reference sds, the sd ratio, and whether PSIS k-hat predicted the worst error
(``inference.mcmc``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyro
import torch

from ppl_gen.core.dataset import whole
from ppl_gen.core.errors import UserError

# independent exact draws, split into chains only so that ArviZ's tools take them as they take MCMC's
EXACT_DRAWS, EXACT_CHAINS = 4000, 4


def _dims(spec, x, sites) -> tuple[dict, dict]:
    """posterior.nc's dimension names and coordinates for these latent sites, as the guides' files
    name them (from the model's plates, or the file's posterior_dims)."""
    from ppl_gen.core.posterior import site_dims, trace_model

    model_trace = trace_model(spec.model, x)
    dims, coords = {}, {}
    for name in sites:
        if name not in model_trace.nodes:
            raise UserError(f"exact_posterior() returned draws of {name!r}, which the model does not sample; "
                            "return the model's latent sites only")
        dims[name], c = site_dims(name, model_trace.nodes[name], spec.posterior_dims)
        coords.update(c)
    return dims, coords


def exact(setup, out: Path, seed: int = 0, n: int = EXACT_DRAWS, chains: int = EXACT_CHAINS):
    """EXACT_DRAWS independent draws from the file's ``exact_posterior``, written to
    ``out/exact/posterior.nc``; an :class:`inference.mcmc.Reference`."""
    from ppl_gen.core.guard import model_code
    from ppl_gen.core.posterior import MAX_VALUES, to_inference_data

    from .mcmc import Reference

    spec, name = setup.spec, setup.mf.path.name

    def draw(k: int) -> dict:
        with torch.random.fork_rng(), torch.no_grad(), model_code(setup.mf.path, "in exact_posterior()"):
            pyro.set_rng_seed(seed)
            got = spec.exact_posterior(k)
        if not isinstance(got, dict) or not got:
            raise UserError(f"{name}'s exact_posterior(n) must return {{site: tensor of n draws}}; it returned "
                            f"{type(got).__name__}")
        return got

    # as many draws as fit the guides' own cap on posterior numbers (a large Markov chain's rows)
    per_draw = sum(torch.as_tensor(v)[0].numel() for v in draw(chains).values())
    n = max(chains, min(n, MAX_VALUES // max(per_draw, 1)) // chains * chains)
    got = draw(n)
    dims, coords = _dims(spec, setup.dataset.train, got)
    draws = {}
    for site, value in got.items():
        value = torch.as_tensor(value).detach().cpu()
        if value.shape[0] != n:
            raise UserError(f"{name}'s exact_posterior({n}) returned {value.shape[0]} draws of {site!r}; "
                            f"return n = {n} (the first dimension)")
        draws[site] = value.numpy().reshape(chains, n // chains, *value.shape[1:])
    attrs = {"source": f"exact_posterior() of {name}: {n} independent draws", "seed": seed}
    idata = to_inference_data(draws, dims, coords, attrs, chains=True)
    (out / "exact").mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(out / "exact" / "posterior.nc"))
    doc = (getattr(spec.exact_posterior, "func", spec.exact_posterior).__doc__ or "").strip().split("\n")[0]
    source = (f"the exact posterior of {name} (`exact_posterior`{': ' + doc.rstrip('.') if doc else ''}), "
              f"{n} independent draws; "
              "draws in [exact/posterior.nc](exact/posterior.nc)")
    return Reference(idata, "exact", source, sampled=False, info={"draws": n, "posterior": "exact/posterior.nc"},
                     key="exact")


def shipped(setup, out: Path):
    """The NUTS draws the file ships, when they were made on the data of this run; else None
    (with a line saying why)."""
    from ppl_gen.core.posterior import import_arviz

    from .mcmc import Reference

    path, name = Path(setup.spec.reference_posterior), setup.mf.path.name
    if not path.is_file():
        print(f"note: {name} declares the reference posterior {path}, which does not exist; make it with "
              f"python -m inference.reference {setup.mf.path}", file=sys.stderr)
        return None
    idata = import_arviz().from_netcdf(str(path))
    attrs = dict(idata.posterior.attrs)
    if attrs.get("data_fingerprint") != setup.fingerprint:
        print(f"note: the reference posterior {path.name} was made on other data than this run's "
              "(another --data or data option); no reference comparison", file=sys.stderr)
        return None
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    source = (f"NUTS draws shipped with {name} (`{shown}`), made by `{attrs.get('command')}`: "
              f"{attrs.get('chains')} chains x {attrs.get('warmup')} warmup + {attrs.get('samples')} draws, "
              f"{attrs.get('divergences')} divergent transition(s)")
    plain = lambda v: v.item() if hasattr(v, "item") else v  # noqa: E731  (netcdf's numpy scalars)
    info = {"sampler": "NUTS", "library": "pyro", "shipped": str(shown), "command": attrs.get("command"),
            **{k: plain(attrs.get(k)) for k in ("warmup", "samples", "chains", "divergences", "sampled_model")},
            "seconds": None}
    return Reference(idata, "NUTS", source, sampled=True, info=info)


def declared(setup, out: Path):
    """The reference the model file declares for this run (exact first), or None."""
    if setup.spec.exact_posterior is not None:
        return exact(setup, out, seed=setup.cfg.seed)
    if setup.spec.reference_posterior is not None:
        return shipped(setup, out)
    return None


# ---------------------------------------------------------------- making a shipped file
def make(model_path: str, out: str | None, opts, seed: int, overwrite: bool, argv: list[str],
         progress: bool = True, via: str | None = None) -> Path:
    """Run NUTS on the file's default data and write the netcdf, its provenance in its attributes.
    ``via``: sample this other model file instead, the same joint distribution written for the
    sampler (the non-centered eight schools for the centered one, Papaspiliopoulos et al. 2007),
    on the same data, and keep the latents of ``model_path`` (deterministic sites of ``via``)."""
    from pyro.infer import Predictive

    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.posterior import import_arviz, latent_sites, to_inference_data, trace_model
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.core.settings import RunConfig

    from .mcmc import run_nuts

    def setup_of(path):
        mf = load_model_file(path)
        return RunSetup.build(RunConfig(model_file=str(mf.path), device="cpu", threads=1, seed=seed), mf)

    target_setup = setup_of(model_path)
    sampler_setup = setup_of(via) if via else target_setup
    name = target_setup.mf.path.name
    if sampler_setup.fingerprint != target_setup.fingerprint:
        raise UserError(f"--via {via}: its data differ from {name}'s; the two files must model the same data")
    declared_path = target_setup.spec.reference_posterior
    target = Path(out) if out else (Path(declared_path) if declared_path else None)
    if target is None:
        raise UserError(f"{name} declares no REFERENCE_POSTERIOR path; give --out FILE.nc "
                        "(and REFERENCE_POSTERIOR = 'FILE.nc' in the file, relative to it, to use it)")
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; give --overwrite to replace it, or --out another file")
    x = target_setup.dataset.train
    wanted = list(latent_sites(trace_model(target_setup.spec.model, x)))
    sampler = sampler_setup.spec.model
    idata, seconds, divergences = run_nuts(sampler, sampler_setup.dataset.train, opts, seed=seed,
                                           progress=progress, file_name=sampler_setup.mf.path.name)
    post = idata.posterior
    draws = {k: post[k].values for k in wanted if k in post}
    missing = [k for k in wanted if k not in draws]
    if missing:  # the target's latents that the sampler's model computes (pyro.deterministic)
        flat = {k: torch.as_tensor(post[k].values.reshape(-1, *post[k].shape[2:])) for k in post.data_vars}
        args, kwargs = whole(sampler_setup.dataset.train)
        got = Predictive(sampler, posterior_samples=flat, return_sites=missing)(*args, **kwargs)
        for k in missing:
            if k not in got:
                raise UserError(f"--via {via} does not compute {name}'s latent {k!r}; add it as "
                                f"pyro.deterministic({k!r}, ...) to {Path(via).name}")
            draws[k] = got[k].detach().numpy().reshape(opts.chains, opts.samples, *got[k].shape[1:])
    dims, coords = _dims(target_setup.spec, x, draws)
    az = import_arviz()
    idata = to_inference_data(draws, dims, coords, chains=True, sample_stats={
        "diverging": idata.sample_stats["diverging"].values})
    post = idata.posterior
    rhat = float(np.nanmax(az.rhat(post).to_array().values))
    ess_bulk = float(np.nanmin(az.ess(post, method="bulk").to_array().values))
    ess_tail = float(np.nanmin(az.ess(post, method="tail").to_array().values))
    post.attrs.update({"command": "python -m inference.reference " + " ".join(argv), "seed": seed,
                       "sampled_model": sampler_setup.mf.path.name,
                       "warmup": opts.warmup, "samples": opts.samples, "chains": opts.chains,
                       "divergences": divergences, "max_r_hat": rhat, "min_ess_bulk": ess_bulk,
                       "min_ess_tail": ess_tail, "data_fingerprint": target_setup.fingerprint,
                       "seconds": seconds, "torch": str(torch.__version__), "pyro": str(pyro.__version__)})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.stem + ".partial.nc")
    idata.to_netcdf(str(tmp))
    tmp.replace(target)
    print(f"{target}: NUTS on {sampler_setup.mf.path.name}, {opts.chains} x ({opts.warmup} + {opts.samples}) in "
          f"{seconds:.1f} s, {divergences} divergences, max R-hat {rhat:.3f}, min bulk ESS {ess_bulk:.0f}, "
          f"min tail ESS {ess_tail:.0f}")
    return target


def main(argv: list[str] | None = None) -> int:
    from ppl_gen.core.settings import positive

    from . import svi
    from .mcmc import MCMCOptions

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m inference.reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file", help="the model file (.py) whose default data the reference is for")
    p.add_argument("--out", help="where to write the draws (default: the file's REFERENCE_POSTERIOR)")
    p.add_argument("--warmup", type=positive(int), default=1000, help="NUTS warmup steps per chain (default: 1000)")
    p.add_argument("--samples", type=positive(int), default=1000, help="NUTS draws kept per chain (default: 1000)")
    p.add_argument("--chains", type=positive(int), default=4, help="chains, one after another (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="chain c starts from seed + c (default: 0)")
    p.add_argument("--via", metavar="FILE.py",
                   help="run NUTS on this model file instead: the same joint distribution on the same data, "
                        "written for the sampler (e.g. non-centered), with the target's latents as sites or "
                        "pyro.deterministic")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    try:
        make(args.model_file, args.out, MCMCOptions(args.warmup, args.samples, args.chains), args.seed,
             args.overwrite, argv, progress=not args.no_progress, via=args.via)
    except UserError as e:
        svi.report_error(e, args.traceback)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
