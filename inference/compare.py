"""Fit several guides of one model file on the same data, seed and budget, side by side.

    python -m inference.compare models/vae.py
    python -m inference.compare models/vae.py --guides amortized,explicit --steps 3000
    python -m inference.compare models/vae.py --data fashion-mnist --device cuda --steps 20000

Takes every flag of ``python -m inference.svi`` (they apply to every guide alike) plus
``--guides``. Each guide's full run folder lands in ``OUT/<guide>/``; the comparison
itself in ``OUT/``: compare.json, compare.md, compare_elbo.png (ELBO against step and
against training seconds), compare_heldout.png (held-out metrics as bars).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ppl_gen.core.errors import UserError

from . import svi

# columns of the table: (metrics key, header, format)
COLUMNS = [
    ("train_elbo", "train ELBO", "{:.3f}"),
    ("test_elbo", "held-out ELBO", "{:.3f}"),
    ("test_log_likelihood", "held-out log p(x)", "{:.3f}"),
    ("seconds", "train seconds", "{:.1f}"),
    ("ms_per_step", "ms/step", "{:.2f}"),
    ("n_parameters", "parameters", "{:,}"),
    ("train_elbo_per_token", "train ELBO/token", "{:.3f}"),
    ("test_perplexity", "held-out perplexity", "{:.1f}"),
    ("npmi", "mean NPMI", "{:.3f}"),
    ("variational_parameters", "variational parameters", "{:,}"),
    ("topic_tv", "topic TV", "{:.3f}"),
    ("infer_seconds_1000", "s to infer 1,000 docs", "{:.3f}"),
]
GAP_COLUMNS = [
    ("gap_log_px", "log p(x)", "{:.3f}"),
    ("gap_elbo_q_star", "ELBO(q*)", "{:.3f}"),
    ("gap_elbo_q", "ELBO(q)", "{:.3f}"),
    ("approximation_gap", "approximation gap", "{:.3f}"),
    ("amortization_gap", "amortization gap", "{:.3f}"),
]


def _guides_flag(parser):
    parser.add_argument("--guides", help="comma-separated guide names (default: every guide the file declares)")
    from . import mcmc
    mcmc.add_flags(parser)


def choose_guides(requested: str | None, available: list[str], model_name: str, mcmc: bool = False) -> list[str]:
    if mcmc:  # VI against MCMC: one guide is a comparison
        names = [g.strip() for g in (requested or "").split(",") if g.strip()] or list(available)
        unknown = [g for g in names if g not in available]
        if unknown:
            raise UserError(f"unknown guide {unknown[0]!r} in --guides; {model_name} has: {', '.join(available)}")
        return names
    if len(available) < 2:
        raise UserError(f"{model_name} declares only {len(available)} guide ({', '.join(available)}); "
                        "inference.compare needs a model file with at least two (guides = {...}), "
                        "or --mcmc to compare it against MCMC")
    if not requested:
        return list(available)
    names = [g.strip() for g in requested.split(",") if g.strip()]
    unknown = [g for g in names if g not in available]
    if unknown:
        raise UserError(f"unknown guide {unknown[0]!r} in --guides; {model_name} has: {', '.join(available)}")
    if len(names) < 2:
        raise UserError("--guides needs at least two names to compare, e.g. --guides "
                        + ",".join(available[:2]))
    return names


def _numpyro_guides(model_file, options, dataset, spec, guides_flag: str | None, mcmc: bool = False) -> list[str]:
    """The file's guides that run on NumPyro: a twin, and no closed-form updates. Named in
    --guides but not runnable: the backend's own one-line reason. Not named: left out, with a note."""
    from . import numpyro_backend as nb

    nb.require_numpyro()
    twin = nb.load_twin(model_file, options, dataset)
    name = model_file.path.name
    why = {g: nb.unsupported(spec, twin, g) for g in spec.guides}
    why = {g: reason for g, reason in why.items() if reason}
    asked = [g.strip() for g in (guides_flag or "").split(",") if g.strip()]
    for g in asked:
        if g in why:
            raise UserError(f"guide {g!r} of {name} cannot run with --backend numpyro ({why[g]}); "
                            "leave it out of --guides or use --backend pyro")
    runnable = [g for g in spec.guides if g not in why]
    if why and not asked:
        print(f"note: --backend numpyro leaves out {', '.join(f'{g} ({r})' for g, r in why.items())}",
              file=sys.stderr)
        if len(runnable) < (1 if mcmc else 2):
            raise UserError(f"with --backend numpyro only {', '.join(runnable) or 'no guide'} of {name} can run, and "
                            "inference.compare needs two; use --backend pyro to compare every guide")
    # names in --guides are all runnable by now; choose_guides checks them against every guide
    return runnable if not asked else list(spec.guides)


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table(rows: list[dict]) -> str:
    cols = list(COLUMNS) + ([c for c in GAP_COLUMNS if any(c[0] in r for r in rows)])
    cols = [c for c in cols if any(r.get(c[0]) is not None for r in rows)]
    head = "| guide | " + " | ".join(h for _, h, _ in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    body = ["| " + r["guide"] + " | " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(out: Path, rows: list[dict], settings: dict, argv: list[str], mcmc_ref: dict | None = None) -> None:
    from ppl_gen.core import plotting

    (out / "compare.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=str) + "\n")
    first = rows[0]
    lines = [f"# {first['model']}: {', '.join(r['guide'] for r in rows)}", "",
             "Command: `python -m inference.compare " + " ".join(argv) + "`", "",
             f"Same data, seed ({settings['seed']}), ELBO estimator ({settings['elbo']}) and budget "
             f"({settings['steps']} steps) for every guide; device {first['device']}. "
             "ELBOs and log-likelihoods are nats per data point.", "", table(rows), ""]
    if any("approximation_gap" in r for r in rows):
        r0 = next(r for r in rows if "approximation_gap" in r)
        lines += [f"Gap decomposition (Cremer, Li & Duvenaud 2018) on the first {r0['gap_points']} held-out "
                  f"points with each guide's own decoder: log p(x) is importance-sampled with K = "
                  f"{r0.get('log_likelihood_samples')} samples from q*, the best Gaussian for each point "
                  f"(the guide's q refined for {r0.get('qstar_steps')} Adam steps); approximation gap = "
                  "log p(x) - ELBO(q*), amortization gap = ELBO(q*) - ELBO(q).", ""]
    lines += ["![ELBO against step and seconds](compare_elbo.png)", "",
              "![held-out metrics](compare_heldout.png)", ""]
    for r in rows:
        pngs = sorted(p.name for p in (out / r["guide"]).glob("*.png"))
        lines.append(f"- {r['guide']}: " + ", ".join(f"[{p}]({r['guide']}/{p})" for p in pngs))
    if mcmc_ref is not None:  # VI against a NUTS reference, with ArviZ
        from . import mcmc

        section, info = mcmc.report(out, rows, mcmc_ref)
        lines += ["", *section]
        mcmc.write_json_section(out / "compare.json", info)
        mcmc_ref["info"] = info
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    plotting.compare_curves({r["guide"]: _read_trace(out / r["guide"]) for r in rows}, out / "compare_elbo.png")
    plotting.compare_bars(rows, out / "compare_heldout.png")


def _read_trace(folder: Path) -> list[dict]:
    from ppl_gen.core.rundir import RunFolder

    return RunFolder(folder).read_trace()


def run_compare(cfg: svi.RunConfig, model_file, guides_flag: str | None, argv: list[str], mcmc_opts=None):
    import torch

    from ppl_gen.core.device import seed_everything
    from ppl_gen.core.rundir import RunFolder, default_out_dir

    if cfg.resume:
        raise UserError("inference.compare does not resume; resume one guide's run with inference.svi --resume")
    # the guide names come from a build on the real data, as the runs will see them
    options = model_file.options(cfg.options)
    dataset = model_file.data(cfg.data, options)
    seed_everything(cfg.seed)
    spec = model_file.build(options, dataset, elbo=cfg.elbo)
    available = list(spec.guides)
    if cfg.backend == "numpyro":  # refuse before any training a guide NumPyro cannot run
        available = _numpyro_guides(model_file, options, dataset, spec, guides_flag, mcmc_opts is not None)
    guides = choose_guides(guides_flag, available, model_file.path.name, mcmc=mcmc_opts is not None)
    if mcmc_opts is not None:  # refuse before any training: can NUTS sample this model at all?
        from . import mcmc

        mcmc.check_model(spec.model, dataset.train, model_file.path.name)
    del spec
    del dataset

    out = RunFolder(cfg.out or default_out_dir(f"compare-{model_file.name}")).create().path
    rows = []
    for name in guides:
        print(f"== {name}", file=sys.stderr)
        one = dataclasses.replace(cfg, guide=name, out=str(out / name))
        fitted, metrics = svi.run(one, model_file)
        metrics["ms_per_step"] = 1e3 * metrics["seconds_per_step"]
        rows.append(metrics)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    mcmc_ref = None
    if mcmc_opts is not None:
        from . import mcmc

        mcmc_ref = mcmc.reference(cfg, model_file, mcmc_opts, out)
    write_report(out, rows, dataclasses.asdict(cfg), argv, mcmc_ref)
    if mcmc_ref is not None:
        print(mcmc.summary_line(mcmc_ref["info"]), file=sys.stderr)
    return out, rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, model_file, resumed = svi.parse_args(argv, prog="python -m inference.compare",
                                                   description=__doc__, extra_flags=_guides_flag)
        if args.guide:
            raise UserError("inference.compare takes --guides (a list), not --guide")
        cfg = svi.resolve_config(args, model_file, resumed)
        from . import mcmc

        out, rows = run_compare(cfg, model_file, args.guides, argv, mcmc.options_from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    print(f"comparison: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
