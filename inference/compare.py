"""Fit several guides of one model file on the same data, seed and budget, side by side.

    python -m inference.compare models/vae.py
    python -m inference.compare models/vae.py --guides amortized,explicit --steps 3000
    python -m inference.compare models/vae.py --data fashion-mnist --device cuda --steps 20000
    python -m inference.compare --resume runs/compare-vae-20261121-120000 --steps 6000

Takes every flag of ``python -m inference.svi`` (they apply to every guide alike) plus
``--guides``. Each guide's full run folder lands in ``OUT/<guide>/``; the comparison
itself in ``OUT/``: compare.json, compare.md, compare_elbo.png (ELBO against step and
against training seconds), compare_heldout.png (the model file's declared metrics).
The table's columns are the runner's own numbers and the metrics the model file declares
(``Spec.metrics``); the file may add paragraphs (``Spec.report``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ppl_gen.core.errors import UserError
from ppl_gen.core.protocol import Metric

from . import svi

# the runner's own columns, for every model file
COLUMNS = (
    Metric("train_elbo", "train ELBO", "{:.3f}", higher_is_better=True),
    Metric("test_elbo", "held-out ELBO", "{:.3f}", higher_is_better=True, bar=True),
    Metric("seconds", "train seconds", "{:.1f}", higher_is_better=False),
    Metric("ms_per_step", "ms/step", "{:.2f}", higher_is_better=False),
    Metric("n_parameters", "parameters", "{:,}"),
)


def _guides_flag(parser):
    parser.add_argument("--guides", metavar="A,B,...",
                        help="comma-separated guide names (default: every guide the file declares)")
    from . import mcmc
    mcmc.add_flags(parser)


def choose_guides(requested: str | None, available: list[str], model_name: str, mcmc: bool = False) -> list[str]:
    names = [g.strip() for g in (requested or "").split(",") if g.strip()] or list(available)
    unknown = [g for g in names if g not in available]
    if unknown:
        raise UserError(f"unknown guide {unknown[0]!r} in --guides; {model_name} has: {', '.join(available)}")
    if mcmc:  # VI against MCMC: one guide is a comparison
        return names
    if len(available) < 2:
        raise UserError(f"{model_name} declares only {len(available)} guide ({', '.join(available)}); "
                        "inference.compare needs a model file with at least two (guides = {...}), "
                        "or --mcmc to compare it against MCMC")
    if len(names) < 2:
        raise UserError("--guides needs at least two names to compare, e.g. --guides " + ",".join(available[:2]))
    return names


def _numpyro_guides(setup, guides_flag: str | None, mcmc: bool = False) -> list[str]:
    """The file's guides that run on NumPyro: a twin, and no closed-form updates. Named in
    --guides but not runnable: the backend's own one-line reason. Not named: left out, with a note."""
    from ppl_gen.backends import numpyro_backend as nb

    nb.require_numpyro()
    spec, name = setup.spec, setup.mf.path.name
    twin = nb.load_twin(setup.mf, setup.options, setup.dataset)
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


def columns(declared=()) -> list[Metric]:
    seen, out = set(), []
    for m in (*COLUMNS, *declared):
        if m.key not in seen:
            seen.add(m.key)
            out.append(m)
    return out


def table(rows: list[dict], declared=()) -> str:
    cols = [c for c in columns(declared) if any(r.get(c.key) is not None for r in rows)]
    head = "| guide | " + " | ".join(c.header for c in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    body = ["| " + r["guide"] + " | " + " | ".join(_fmt(r.get(c.key), c.fmt) for c in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(out: Path, rows: list[dict], settings: dict, argv: list[str], spec, mcmc_ref: dict | None = None):
    from ppl_gen.core import plotting
    from ppl_gen.core.rundir import RunFolder

    declared = tuple(spec.metrics)
    (out / "compare.json").write_text(json.dumps(
        {"settings": settings, "guides": [r["guide"] for r in rows], "rows": rows,
         "columns": [dataclasses.asdict(c) for c in columns(declared)]}, indent=2, default=str) + "\n")
    first = rows[0]
    lines = [f"# {first['model']}: {', '.join(r['guide'] for r in rows)}", "",
             "Command: `python -m inference.compare " + " ".join(argv) + "`", "",
             f"Same data, seed ({settings['seed']}), ELBO estimator ({settings['elbo']}) and budget "
             f"({settings['steps']} steps) for every guide; device {first['device']}. "
             "ELBOs and log-likelihoods are nats per data point; ms/step leaves out each run's first step "
             "(start-up).", "", table(rows, declared), ""]
    if spec.report:
        lines += [*spec.report(rows), ""]
    lines += ["![ELBO against step and seconds](compare_elbo.png)", ""]
    bars = plotting.compare_bars(rows, [c for c in columns(declared) if c.bar], out / "compare_heldout.png")
    if bars:
        lines += ["![held-out metrics](compare_heldout.png)", ""]
    elif (out / "compare_heldout.png").exists():
        (out / "compare_heldout.png").unlink()  # left by an earlier session of a resumed comparison
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
    plotting.compare_curves({r["guide"]: RunFolder(out / r["guide"]).read_trace() for r in rows},
                            out / "compare_elbo.png")


def warm_up(cfg: svi.RunConfig, model_file, guide: str) -> None:
    """Two steps of the first guide, thrown away, before anything is timed: the process's one-off
    costs (lazy imports, first kernels, allocator) would otherwise be charged to that guide."""
    import pyro
    import torch

    from ppl_gen.backends import get_backend
    from ppl_gen.core.pipeline import RunSetup

    with torch.random.fork_rng():
        setup = RunSetup.build(dataclasses.replace(cfg, progress=False), model_file, guide=guide)
        backend = get_backend(cfg.backend)
        backend.check(setup)
        trainer = backend.trainer(setup)
        for t in (1, 2):
            trainer.step(t)
    pyro.clear_param_store()


def run_compare(cfg: svi.RunConfig, model_file, guides_flag: str | None, argv: list[str], mcmc_opts=None):
    import torch

    from ppl_gen.core.pipeline import RunSetup, check_writable, is_run_folder
    from ppl_gen.core.rundir import RunFolder, default_out_dir

    # the guide names come from a build on the real data, as the runs will see them
    setup = RunSetup.build(cfg, model_file)
    spec = setup.spec
    available = list(spec.guides)
    if cfg.backend == "numpyro":  # refuse before any training a guide NumPyro cannot run
        available = _numpyro_guides(setup, guides_flag, mcmc_opts is not None)
    guides = choose_guides(guides_flag, available, model_file.path.name, mcmc=mcmc_opts is not None)
    if mcmc_opts is not None:  # refuse before any training: can NUTS sample this model at all?
        from . import mcmc

        mcmc.check_model(spec.model, setup.dataset.train, model_file.path.name)
    del setup

    if cfg.resume:
        out = Path(cfg.resume)
    else:
        out = Path(cfg.out) if cfg.out else default_out_dir(f"compare-{model_file.name}")
        if out.exists() and any(out.iterdir()):
            if not is_run_folder(out):
                raise UserError(f"--out {out} holds files that are not a comparison; choose a new or empty folder")
            if not cfg.overwrite:
                raise UserError(f"--out {out} already holds a comparison; continue it with --resume {out}, "
                                "replace it with --overwrite, or choose another --out")
        check_writable(out)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "overwrite", "progress")}
    if not cfg.resume:  # what --resume needs, on disk before the first guide trains
        RunFolder(out).create()
        (out / "compare.json").write_text(json.dumps({"settings": settings, "guides": guides, "rows": []},
                                                     indent=2, default=str) + "\n")
    warm_up(cfg, model_file, guides[0])
    rows = []
    for name in guides:
        print(f"== {name}", file=sys.stderr)
        sub = out / name
        resume = cfg.resume and (sub / "checkpoint.pt").is_file()
        one = dataclasses.replace(cfg, guide=name, out=str(sub), resume=str(sub) if resume else None,
                                  overwrite=cfg.overwrite or bool(cfg.resume and not resume))
        fitted, metrics = svi.run(one, model_file)
        metrics["ms_per_step"] = None if metrics["seconds_per_step"] is None else 1e3 * metrics["seconds_per_step"]
        rows.append(metrics)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    mcmc_ref = None
    if mcmc_opts is not None:
        from . import mcmc

        mcmc_ref = mcmc.reference(cfg, model_file, mcmc_opts, out)
    write_report(out, rows, settings, argv, spec, mcmc_ref)
    if mcmc_ref is not None:
        print(mcmc.summary_line(mcmc_ref["info"]), file=sys.stderr)
    return out, rows, spec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, model_file, resumed = svi.parse_args(argv, prog="python -m inference.compare",
                                                   description=__doc__, extra_flags=_guides_flag)
        if args.guide:
            raise UserError("inference.compare takes --guides (a list), not --guide")
        if args.resume and not resumed.get("guides"):
            raise UserError(f"--resume {args.resume} is not a comparison folder (no compare.json with its guides); "
                            "resume one guide's run with python -m inference.svi --resume DIR")
        cfg = svi.resolve_config(args, model_file, resumed)
        guides_flag = args.guides or (",".join(resumed["guides"]) if resumed else None)
        from . import mcmc

        out, rows, spec = run_compare(cfg, model_file, guides_flag, argv, mcmc.options_from_args(args))
    except UserError as e:
        svi.report_error(e, svi.wants_traceback(argv))
        return 2
    print(table(rows, spec.metrics))
    print(f"comparison: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
