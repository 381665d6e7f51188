"""A NUTS reference posterior for ``inference.compare --mcmc``, and the VI-against-MCMC report.

    python -m inference.compare models/normal_mean.py --mcmc
    python -m inference.compare models/hmm.py --sequences 20 --length 40 --mcmc --mcmc-samples 300

The No-U-Turn Sampler (Hoffman & Gelman 2014, "The No-U-Turn Sampler: adaptively setting
path lengths in Hamiltonian Monte Carlo", JMLR 15:1593-1623; Pyro's ``pyro.infer.NUTS``)
samples the model's posterior over its global latents; its draws are set against the
draws of each fitted guide (``posterior.nc``, see ``ppl_gen.core.posterior``) with ArviZ
(Kumar et al. 2019): a forest plot of both, posterior means and standard deviations side
by side, and for the MCMC run the rank-normalized split R-hat and the bulk and tail
effective sample sizes of Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021),
"Rank-normalization, folding, and localization: an improved R-hat for assessing
convergence of MCMC", Bayesian Analysis 16(2):667-718.

NUTS needs a log density it can differentiate in every latent: discrete latents must be
summed out (the HMM's forward algorithm does this for its hidden states) or marked for
enumeration, and it samples all latents jointly, so a model with one latent per data
point (a VAE) is out of its reach; such models are refused with a one-line reason.

Chains run one after another in this process: model files are loaded by path and
cannot be sent to worker processes, and on a 2-core machine parallel chains would
compete with torch's own threads anyway.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import torch

from ppl_gen.core.dataset import whole
from ppl_gen.core.errors import UserError
from ppl_gen.core.posterior import KHAT_USABLE, import_arviz, site_dims, split_latents, to_inference_data, trace_model

# the forest plot shows at most this many scalar entries (the first ones in model order)
FOREST_MAX = 40
# the markdown table lists at most this many; compare.json holds them all
TABLE_MAX = 60


@dataclass
class MCMCOptions:
    warmup: int = 500    # adaptation of step size and mass matrix (Hoffman & Gelman's dual averaging)
    samples: int = 500   # kept draws per chain
    chains: int = 2      # >= 2 so that R-hat compares chains, not only halves of one


def add_flags(parser) -> None:
    from ppl_gen.core.settings import positive as _positive

    g = parser.add_argument_group("MCMC reference (inference.compare --mcmc)")
    g.add_argument("--mcmc", action="store_true",
                   help="add a NUTS reference run and compare each guide's posterior against it")
    g.add_argument("--mcmc-warmup", type=_positive(int), default=MCMCOptions.warmup,
                   help=f"NUTS warmup (adaptation) steps per chain (default: {MCMCOptions.warmup})")
    g.add_argument("--mcmc-samples", type=_positive(int), default=MCMCOptions.samples,
                   help=f"NUTS draws kept per chain (default: {MCMCOptions.samples})")
    g.add_argument("--mcmc-chains", type=_positive(int), default=MCMCOptions.chains,
                   help=f"NUTS chains, run one after another (default: {MCMCOptions.chains})")


def options_from_args(args) -> MCMCOptions | None:
    if not getattr(args, "mcmc", False):
        return None
    return MCMCOptions(args.mcmc_warmup, args.mcmc_samples, args.mcmc_chains)


# ---------------------------------------------------------------- can NUTS do it?
# NUTS samples every latent number jointly: local ones (one per data point, eight schools' effects)
# are sampled with the global ones up to this many latent numbers in all
NUTS_MAX = 1_000


def check_model(model, x: torch.Tensor, file_name: str) -> dict:
    """The model's latents (global, and local ones up to NUTS_MAX numbers in all), or a
    UserError saying why NUTS cannot sample this model."""
    with torch.no_grad():
        args, kwargs = whole(x)  # the whole data, as NUTS will see them
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    glob, local = split_latents(model_trace)
    if local:
        n = sum(site["value"].numel() for site in (*glob.values(), *local.values()))
        if n > NUTS_MAX:
            names = ", ".join(local)
            raise UserError(f"--mcmc: {file_name} has local latent variables ({names}: one per data point), "
                            f"{n:,} latent numbers in all on these data; NUTS samples them jointly and is "
                            f"offered up to {NUTS_MAX:,}: use fewer data points (--data) or compare guides without --mcmc")
        glob = {**glob, **local}
    params = [name for name, site in model_trace.nodes.items() if site["type"] == "param"]
    if params:
        shown = ", ".join(params[:3]) + (", ..." if len(params) > 3 else "")
        raise UserError(f"--mcmc: {file_name}'s model has learnable parameters ({shown}); NUTS samples "
                        "latent variables only and cannot fit parameters")
    discrete = [name for name, site in glob.items()
                if site["fn"].support.is_discrete and site["infer"].get("enumerate") != "parallel"]
    if discrete:
        raise UserError(f"--mcmc: {file_name} has discrete latent variables ({', '.join(discrete)}) that the "
                        "model does not enumerate; NUTS follows gradients of the log density and samples "
                        "continuous latents only (sum the discrete ones out, as models/hmm.py does, or "
                        "mark them infer={'enumerate': 'parallel'})")
    continuous = {k: v for k, v in glob.items() if not v["fn"].support.is_discrete}
    if not continuous:
        raise UserError(f"--mcmc: {file_name}'s model has no latent variables to sample")
    return continuous


def _plate_nesting(model_trace) -> int:
    dims = [-f.dim for site in model_trace.nodes.values() if site["type"] == "sample"
            for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return max(dims, default=0)


# ---------------------------------------------------------------- the run
def run_nuts(model, x: torch.Tensor, opts: MCMCOptions, seed: int = 0, custom_dims: dict | None = None,
             progress: bool = False, file_name: str = "the model file"):
    """NUTS on the model given all of x; returns (InferenceData, seconds, divergences)."""
    from pyro.infer import MCMC, NUTS

    sites = check_model(model, x, file_name)
    args, kwargs = whole(x)
    with torch.no_grad():
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
    dims, coords = {}, {}
    for name, site in sites.items():
        dims[name], c = site_dims(name, site, custom_dims)
        coords.update(c)
    nesting = _plate_nesting(model_trace)
    chains, diverging, start = [], [], time.perf_counter()
    for c in range(opts.chains):
        pyro.set_rng_seed(seed + c)   # chains differ in their random initial point and momenta
        kernel = NUTS(model, max_plate_nesting=nesting, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=opts.samples, warmup_steps=opts.warmup, num_chains=1,
                    disable_progbar=not progress)
        mcmc.run(*args, **kwargs)
        samples = mcmc.get_samples()
        chains.append({k: samples[k].detach().cpu().numpy().reshape(opts.samples, *sites[k]["value"].shape)
                       for k in sites})
        flags = np.zeros(opts.samples, dtype=bool)
        flags[[i for i in mcmc.diagnostics()["divergences"]["chain 0"] if i < opts.samples]] = True
        diverging.append(flags)
    seconds = time.perf_counter() - start
    draws = {k: np.stack([ch[k] for ch in chains]) for k in sites}
    attrs = {"source": "Pyro NUTS (Hoffman & Gelman 2014)", "warmup": opts.warmup, "samples": opts.samples,
             "chains": opts.chains, "seconds": seconds, "inference_library": "pyro"}
    idata = to_inference_data(draws, dims, coords, attrs, chains=True,
                              sample_stats={"diverging": np.stack(diverging)})
    return idata, seconds, int(np.stack(diverging).sum())


@dataclass
class Reference:
    """The posterior the guides are set against: draws in ``idata`` and where they come from."""

    idata: object
    name: str            # the table's column: "NUTS" or "exact"
    source: str          # the report's sentence on how the draws were made
    sampled: bool        # MCMC draws: their R-hat and ESS belong in the report
    info: dict = dataclasses.field(default_factory=dict)   # compare.json's entry, before the comparison
    key: str = "mcmc"    # compare.json's section


def reference(cfg, model_file, opts: MCMCOptions, out: Path) -> Reference:
    """Build the model on the run's data, run NUTS, write ``out/mcmc/posterior.nc``."""
    from ppl_gen.core.pipeline import RunSetup

    # on the CPU: NUTS's small steps gain nothing on a GPU
    setup = RunSetup.build(dataclasses.replace(cfg, device="cpu"), model_file)
    dataset, spec = setup.dataset, setup.spec
    print(f"== NUTS: {opts.chains} chain(s) x ({opts.warmup} warmup + {opts.samples} draws)", file=sys.stderr)
    idata, seconds, divergences = run_nuts(spec.model, dataset.train, opts, seed=cfg.seed,
                                           custom_dims=spec.posterior_dims, progress=cfg.progress,
                                           file_name=model_file.path.name)
    folder = out / "mcmc"
    folder.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(folder / "posterior.nc"))
    source = (f"Pyro's NUTS (Hoffman & Gelman 2014), {opts.chains} chain(s) x {opts.warmup} warmup + "
              f"{opts.samples} draws, {seconds:.1f} s, {divergences} divergent transition(s); "
              "draws in [mcmc/posterior.nc](mcmc/posterior.nc)")
    info = {"sampler": "NUTS", "library": "pyro", "warmup": opts.warmup, "samples": opts.samples,
            "chains": opts.chains, "seconds": seconds, "divergences": divergences, "posterior": "mcmc/posterior.nc"}
    return Reference(idata, "NUTS", source, sampled=True, info=info)


# ---------------------------------------------------------------- VI against MCMC
def flatten(dataset) -> dict[str, np.ndarray]:
    """{label: array over (chain, draw) or scalar} for every scalar entry of an xarray Dataset,
    labelled as ArviZ does: ``theta[a0, b1]`` (coordinate values of the non-sample dims)."""
    out = {}
    for var in dataset.data_vars:
        da = dataset[var]
        inner = [d for d in da.dims if d not in ("chain", "draw")]
        da = da.transpose(*[d for d in ("chain", "draw") if d in da.dims], *inner)
        values = da.values
        if not inner:
            out[str(var)] = values
            continue
        lead = values.ndim - len(inner)
        labels = [list(da[d].values) for d in inner]
        for index in np.ndindex(*values.shape[lead:]):
            name = ", ".join(str(labels[j][i]) for j, i in enumerate(index))
            out[f"{var}[{name}]"] = values[(slice(None),) * lead + index]
    return out


def comparison(vi: dict[str, object], mcmc_idata) -> dict:
    """Per entry: MCMC mean, sd, R-hat, ESS; each guide's mean and sd, its mean error in reference
    sds, |mean(VI) - mean(MCMC)| / sd(MCMC), and the 1-Wasserstein distance between its marginal
    and the reference's (of the draws, scipy's ``wasserstein_distance``), also in reference sds;
    and headline numbers."""
    from scipy.stats import wasserstein_distance

    az = import_arviz()
    post = mcmc_idata.posterior
    m = flatten(post)
    rhat, ess_bulk, ess_tail = (flatten(az.rhat(post)), flatten(az.ess(post, method="bulk")),
                                flatten(az.ess(post, method="tail")))
    v = {g: flatten(idata.posterior) for g, idata in vi.items()}
    rows = []
    for label, draws in m.items():
        row = {"parameter": label, "mcmc_mean": float(draws.mean()), "mcmc_sd": float(draws.std(ddof=1)),
               "r_hat": float(rhat[label]), "ess_bulk": float(ess_bulk[label]), "ess_tail": float(ess_tail[label])}
        for g, flat in v.items():
            if label in flat:
                row[f"{g}_mean"] = float(flat[label].mean())
                row[f"{g}_sd"] = float(flat[label].std(ddof=1))
                if row["mcmc_sd"] > 0:
                    row[f"{g}_mean_error_sds"] = abs(row[f"{g}_mean"] - row["mcmc_mean"]) / row["mcmc_sd"]
                    row[f"{g}_w1_sds"] = float(wasserstein_distance(np.ravel(flat[label]), np.ravel(draws))
                                               / row["mcmc_sd"])
        rows.append(row)
    finite = lambda xs: [x for x in xs if math.isfinite(x)]  # noqa: E731  (a constant entry has R-hat NaN)
    head = {"max_r_hat": max(finite([r["r_hat"] for r in rows]), default=None),
            "min_ess_bulk": min(finite([r["ess_bulk"] for r in rows]), default=None),
            "min_ess_tail": min(finite([r["ess_tail"] for r in rows]), default=None),
            "guides": {}}
    for g in v:
        both = [r for r in rows if f"{g}_mean" in r]
        diffs = [abs(r[f"{g}_mean"] - r["mcmc_mean"]) for r in both]
        ratios = finite([r[f"{g}_sd"] / r["mcmc_sd"] for r in both if r["mcmc_sd"] > 0])
        head["guides"][g] = {"max_abs_mean_difference": max(diffs, default=None),
                             "median_sd_ratio_vi_to_mcmc": float(np.median(ratios)) if ratios else None,
                             "min_sd_ratio_vi_to_mcmc": min(ratios, default=None),
                             "max_mean_error_sds": max((r[f"{g}_mean_error_sds"] for r in both
                                                        if f"{g}_mean_error_sds" in r), default=None),
                             "max_w1_sds": max((r[f"{g}_w1_sds"] for r in both if f"{g}_w1_sds" in r), default=None)}
    # JSON has no NaN: a constant entry (R-hat undefined) reads null
    rows = [{k: (None if isinstance(x, float) and not math.isfinite(x) else x) for k, x in r.items()} for r in rows]
    return {"rows": rows, "summary": head}


def forest_plot(vi: dict[str, object], mcmc_idata, path: Path, title: str = "", ref_name: str = "NUTS") -> Path:
    """az.plot_forest of every guide's draws and the reference draws (94% HDI, quartiles, mean)."""
    az = import_arviz()
    from ppl_gen.core import plotting  # noqa: F401  (sets the Agg backend)
    import matplotlib.pyplot as plt

    m = flatten(mcmc_idata.posterior)
    labels = list(m)[:FOREST_MAX]
    datas, names = [], []
    for g, idata in vi.items():
        flat = flatten(idata.posterior)
        datas.append(az.from_dict(posterior={k: np.atleast_2d(flat[k]) for k in labels if k in flat}))
        names.append(f"VI: {g}")
    datas.append(az.from_dict(posterior={k: m[k] for k in labels}))
    names.append(ref_name)
    height = 1.4 + 0.22 * len(labels) * (len(datas) + 1)
    axes = az.plot_forest(datas, model_names=names, var_names=labels, combined=True, hdi_prob=0.94,
                          figsize=(8.0, height), textsize=9)
    ax = np.ravel(axes)[0]
    fig = ax.figure
    legend = ax.get_legend()   # ArviZ's, inside the plot: move it to the right of the entries
    if legend is not None:
        handles, texts = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
        legend.remove()
        ax.legend(handles, texts, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    more = f"; the first {len(labels)} of {len(m)} entries" if len(m) > len(labels) else ""
    fig.suptitle((title + "\n" if title else "") + f"lines: 94% HDI; thick: quartiles; dot: mean{more}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def report(out: Path, rows: list[dict], ref: Reference) -> tuple[list[str], dict]:
    """The VI-against-reference section of compare.md (and its compare.json entry); writes the plot."""
    az = import_arviz()
    vi, missing = {}, []
    for r in rows:
        p = out / r.get("folder", r["guide"]) / "posterior.nc"
        if p.is_file():
            vi[r["guide"]] = az.from_netcdf(str(p))
        else:
            missing.append(r["guide"])
    cmp = comparison(vi, ref.idata)
    plot = "vi_vs_mcmc.png" if ref.sampled else f"vi_vs_{ref.name}.png"
    forest_plot(vi, ref.idata, out / plot, title=f"{rows[0]['model']}: VI against {ref.name}", ref_name=ref.name)
    s = cmp["summary"]

    def fmt(x, f="{:.3f}"):
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)

    lines = ["## VI against MCMC" if ref.sampled else f"## VI against the {ref.name} posterior", "",
             f"Reference: {ref.source}. Each guide: its posterior.nc draws."]
    if ref.sampled:
        lines[-1] += (f" Convergence (Vehtari et al. 2021): max R-hat {fmt(s['max_r_hat'])}, min bulk ESS "
                      f"{fmt(s['min_ess_bulk'], '{:.0f}')}, min tail ESS {fmt(s['min_ess_tail'], '{:.0f}')} "
                      "(R-hat below 1.01 and ESS above 400 are the usual marks of a reliable reference).")
    lines.append("")
    khats = {r["guide"]: r.get("psis_khat") for r in rows}
    for g, h in s["guides"].items():
        lines.append(f"- {g}: max |mean(VI) - mean({ref.name})| = {fmt(h['max_abs_mean_difference'])} "
                     f"({fmt(h['max_mean_error_sds'], '{:.2f}')} reference sds); max 1-Wasserstein distance of a "
                     f"marginal {fmt(h['max_w1_sds'], '{:.2f}')} reference sds; sd(VI) / sd({ref.name}): median "
                     f"{fmt(h['median_sd_ratio_vi_to_mcmc'], '{:.2f}')}, min {fmt(h['min_sd_ratio_vi_to_mcmc'], '{:.2f}')}"
                     + predicted(khats.get(g), h["max_w1_sds"]))
    for g in missing:
        lines.append(f"- {g}: no posterior.nc in its run folder, left out")
    lines += ["", f"![VI against {ref.name}: forest plot]({plot})", ""]
    guides = list(vi)
    tail = " R-hat | ESS bulk | ESS tail |" if ref.sampled else ""
    head = (f"| parameter | {ref.name} mean | {ref.name} sd | " + " | ".join(f"{g} mean | {g} sd" for g in guides)
            + " |" + tail)
    lines += [head, "|---|" + "---:|" * (2 + 2 * len(guides) + (3 if ref.sampled else 0))]
    for r in cmp["rows"][:TABLE_MAX]:
        cells = [fmt(r["mcmc_mean"]), fmt(r["mcmc_sd"])]
        for g in guides:
            cells += [fmt(r.get(f"{g}_mean")), fmt(r.get(f"{g}_sd"))]
        if ref.sampled:
            cells += [fmt(r["r_hat"]), fmt(r["ess_bulk"], "{:.0f}"), fmt(r["ess_tail"], "{:.0f}")]
        lines.append(f"| {r['parameter']} | " + " | ".join(cells) + " |")
    if len(cmp["rows"]) > TABLE_MAX:
        lines.append(f"\n(first {TABLE_MAX} of {len(cmp['rows'])} entries; compare.json has all)")
    lines.append("")
    info = {**ref.info, "reference": ref.name, "forest_plot": plot, **cmp}
    return lines, info


# a marginal this far from the reference's, in reference sds, is an error worth a warning
W1_LARGE = 0.5


def predicted(khat: float | None, w1: float | None) -> str:
    """Did the PSIS k-hat (computed without the reference) say what the reference shows?"""
    if khat is None or w1 is None or not math.isfinite(w1):
        return ""
    warned, wrong = khat > KHAT_USABLE, w1 > W1_LARGE
    verdict = {(True, True): "k-hat warned, rightly", (False, False): "k-hat gave no warning, rightly",
               (False, True): "k-hat gave no warning: it missed this error",
               (True, False): "k-hat warned of an error the marginals do not show"}[warned, wrong]
    return f"; k-hat {khat:.2f}, worst marginal {w1:.2f} sds off (large: > {W1_LARGE}): {verdict}"


def summary_line(info: dict) -> str:
    f = lambda x, spec=".3f": "n/a" if x is None else format(x, spec)  # noqa: E731
    s = info["summary"]
    if info.get("sampler") == "NUTS":
        made = f"in {info['seconds']:.1f} s" if info.get("seconds") is not None else "shipped"
        parts = [f"NUTS {info['chains']}x{info['samples']} {made}, max R-hat "
                 f"{f(s['max_r_hat'])}, min bulk ESS {f(s['min_ess_bulk'], '.0f')}"]
    else:
        parts = [f"against the {info['reference']} posterior ({info.get('draws', '?')} independent draws)"]
    for g, h in s["guides"].items():
        parts.append(f"{g}: max |mean diff| {f(h['max_abs_mean_difference'])}, "
                     f"worst marginal {f(h['max_w1_sds'], '.2f')} sds off (1-Wasserstein), "
                     f"median sd ratio {f(h['median_sd_ratio_vi_to_mcmc'], '.2f')}")
    return "; ".join(parts)


def write_json_section(path: Path, info: dict, key: str = "mcmc") -> None:
    """Add the reference's section ("mcmc" or "exact") to an existing compare.json."""
    data = json.loads(path.read_text())
    data[key] = info
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
