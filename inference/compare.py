"""Fit several guides of one model file on the same data, seed and budget, side by side.

    python -m inference.compare models/vae.py
    python -m inference.compare models/vae.py --guides amortized,explicit --steps 3000
    python -m inference.compare models/vae.py --data fashion-mnist --device cuda --steps 20000
    python -m inference.compare --resume runs/compare-vae-20261121-120000 --steps 6000
    python -m inference.compare my_model.py --guides AutoNormal,AutoMultivariateNormal --elbos trace,renyi:0.5 --seeds 5
    python -m inference.compare models/vae.py models/pixelcnn.py models/vqvae.py models/diffusion.py models/gan.py

Takes every flag of ``python -m inference.svi`` (they apply to every guide alike) plus
``--guides`` (the file's guides and Pyro's automatic ones), ``--elbos`` (objectives crossed with
the guides: ``trace,renyi:0.5``, ``renyi:0`` with ``--num-particles K`` is IWAE) and ``--seeds N``
(every scheme from N seeds: the table shows mean +- standard error; one seed is luck). Each
scheme's full run folder lands in ``OUT/<scheme>/`` (``OUT/<scheme>/seed-<s>/``); the comparison
itself in ``OUT/``: compare.json, compare.md, compare_elbo.png (ELBO against step and
against training seconds), compare_heldout.png (the model file's declared metrics).
The table's columns are the runner's own numbers and the metrics the model file declares
(``Spec.metrics``); the file may add paragraphs (``Spec.report``).

Given several model files, it fits each with its own defaults on the same data and sets the
generative families side by side instead (``inference.families``: the kind of density, held-out
nats per image and bits per dimension, one sample score, sampling and training seconds).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ppl_gen.core.errors import UserError
from ppl_gen.core.protocol import Metric

from . import svi

# the runner's own columns, for every model file (the diagnostics where the model has global latents)
COLUMNS = (
    Metric("train_elbo", "train ELBO", "{:.3f}", higher_is_better=True),
    Metric("test_elbo", "held-out ELBO", "{:.3f}", higher_is_better=True, bar=True),
    Metric("heldout_lpd", "held-out lpd", "{:.3f}", higher_is_better=True, bar=True),
    Metric("heldout_accuracy", "held-out accuracy", "{:.3f}", higher_is_better=True),
    Metric("psis_khat", "PSIS k-hat", "{:.2f}", higher_is_better=False),
    Metric("iw_log_evidence", "IW log p(x)", "{:.3f}", higher_is_better=True),
    Metric("is_ess", "IS ESS", "{:.0f}", higher_is_better=True),
    Metric("seconds", "train seconds", "{:.1f}", higher_is_better=False),
    Metric("ms_per_step", "ms/step", "{:.2f}", higher_is_better=False),
    Metric("n_parameters", "parameters", "{:,}"),
)


def _guides_flag(parser):
    from ppl_gen.core.settings import positive

    parser.add_argument("--guides", metavar="A,B,...",
                        help="comma-separated guide names, the file's or Pyro's automatic ones such as "
                             "AutoNormal (default: every guide the file declares)")
    parser.add_argument("--elbos", metavar="E,E:ALPHA,...",
                        help="objectives to cross with the guides: trace, meanfield, renyi:ALPHA, tail-adaptive, "
                             "... (default: --elbo)")
    parser.add_argument("--seeds", type=positive(int), metavar="N", default=None,
                        help="fit every scheme from seeds --seed .. --seed+N-1 and report mean and standard "
                             "error (default: 1)")
    from . import mcmc
    mcmc.add_flags(parser)
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the comparison against the posterior the model file declares (its "
                             "exact_posterior or shipped NUTS draws, see python -m inference.reference --help)")
    families = parser.add_argument_group("several model files (the generative families side by side)")
    families.add_argument("--sample-images", type=positive(int), metavar="N", default=None,
                          help="images each fitted model draws for the grid and the sampling time (default: 64)")
    families.add_argument("--score-images", type=positive(int), metavar="N", default=None,
                          help="samples and held-out images the sample score compares (default: 500)")
    families.add_argument("--no-sample-score", action="store_true", help="leave the sample score out")


def choose_guides(requested: str | None, available: list[str], model_name: str, mcmc: bool = False,
                  crossed: bool = False) -> list[str]:
    """The guides to fit; ``crossed``: several objectives or seeds make one guide a comparison."""
    from ppl_gen.core.protocol import AUTOGUIDES

    names = [g.strip() for g in (requested or "").split(",") if g.strip()] or list(available) or ["AutoNormal"]
    unknown = [g for g in names if g not in available and g not in AUTOGUIDES]
    if unknown:
        raise UserError(f"unknown guide {unknown[0]!r} in --guides; {model_name} has: "
                        f"{', '.join(available) or 'none of its own'}; Pyro's automatic guides: {', '.join(AUTOGUIDES)}")
    if mcmc or crossed:  # VI against MCMC, objectives or seeds: one guide is a comparison
        return names
    available = available + [g for g in names if g in AUTOGUIDES]
    if len(available) < 2:
        raise UserError(f"{model_name} declares only {len(available)} guide ({', '.join(available) or 'none'}); "
                        "inference.compare needs at least two schemes: name Pyro's automatic ones (--guides AutoNormal,"
                        "AutoMultivariateNormal), cross objectives (--elbos), repeat seeds (--seeds), "
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
    asked = [g.strip() for g in (guides_flag or "").split(",") if g.strip()]
    # the file's guides and the automatic ones asked for, screened alike before any training
    from ppl_gen.core.protocol import AUTOGUIDES

    screened = [*spec.guides, *(g for g in asked if g in AUTOGUIDES)]  # other names: choose_guides's error
    why = {g: nb.unsupported(spec, twin, g) for g in dict.fromkeys(screened)}
    why = {g: reason for g, reason in why.items() if reason}
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


def parse_elbos(text: str | None, default: str, default_alpha: float) -> list[tuple[str, float]]:
    """``trace,renyi:0.5`` -> [("trace", alpha), ("renyi", 0.5)]; each name checked like --elbo."""
    from ppl_gen.core.settings import ELBO_NAMES

    out = []
    for item in [e.strip() for e in (text or default).split(",") if e.strip()]:
        name, _, alpha = item.partition(":")
        if name not in ELBO_NAMES:
            raise UserError(f"unknown objective {name!r} in --elbos; choose from {', '.join(ELBO_NAMES)} "
                            "(renyi takes its order: renyi:0.5)")
        if alpha and name != "renyi":
            raise UserError(f"--elbos {item}: only renyi takes an order (renyi:ALPHA); write {name}")
        try:
            value = float(alpha) if alpha else default_alpha
        except ValueError:
            raise UserError(f"--elbos {item}: {alpha!r} is not a number; write e.g. renyi:0.5") from None
        out.append((name, value))
    return out


def scheme_name(guide: str, elbo: tuple[str, float], crossed: bool) -> str:
    if not crossed:
        return guide
    name, alpha = elbo
    return f"{guide}+{name}" + (f":{alpha:g}" if name == "renyi" else "")


def mean_and_se(runs: list[dict]) -> dict:
    """One row from several seeds' metrics: each number's mean, ``<key>_se`` its standard error
    s / sqrt(n) (n - 1 in s), ``<key>_values`` the seeds' own; anything else from the first run."""
    import math

    row = dict(runs[0])
    row["seeds"] = [r["seed"] for r in runs]
    for k, v in runs[0].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "seed":
            continue
        vals = [r.get(k) for r in runs]
        if any(x is None or not isinstance(x, (int, float)) or not math.isfinite(x) for x in vals):
            continue
        n = len(vals)
        if max(vals) == min(vals):  # the same in every seed (a parameter count): no interval to show
            continue
        mean = sum(vals) / n
        row[k] = mean
        if n > 1:
            row[f"{k}_se"] = math.sqrt(sum((x - mean) ** 2 for x in vals) / (n - 1) / n)
            row[f"{k}_values"] = vals
    return row


def _fmt(value, fmt: str, se=None) -> str:
    if value is None:
        return "n/a"
    try:
        text = fmt.format(value)
        return text if se is None else f"{text} ± {fmt.format(se)}"
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
    body = ["| " + r["guide"] + " | " + " | ".join(_fmt(r.get(c.key), c.fmt, r.get(f"{c.key}_se")) for c in cols)
            + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(out: Path, rows: list[dict], settings: dict, argv: list[str], spec, ref=None):
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
             "ELBOs and log-likelihoods are nats per data point (the reported ELBO is the standard one whatever "
             "the objective); ms/step leaves out each run's first step (start-up).", "", table(rows, declared), ""]
    if len(first.get("seeds", [])) > 1:
        lines[-2:-2] = [f"Each number is the mean ± standard error over {len(first['seeds'])} seeds "
                        f"({', '.join(map(str, first['seeds']))}): a difference within a few standard errors "
                        "is not a difference.", ""]
    if spec.report:
        lines += [*spec.report(rows), ""]
    lines += ["![ELBO against step and seconds](compare_elbo.png)", ""]
    # with several seeds: each scheme's mean +- its standard error, and every seed as a dot
    bars = plotting.compare_bars(rows, [c for c in columns(declared) if c.bar], out / "compare_heldout.png")
    if bars:
        lines += ["![held-out metrics](compare_heldout.png)", ""]
    elif (out / "compare_heldout.png").exists():
        (out / "compare_heldout.png").unlink()  # left by an earlier session of a resumed comparison
    for r in rows:
        folder = r.get("folder", r["guide"])
        pngs = sorted(p.name for p in (out / folder).glob("*.png"))
        lines.append(f"- {r['guide']}: " + ", ".join(f"[{p}]({folder}/{p})" for p in pngs))
    if ref is not None:  # VI against the exact posterior or NUTS draws, with ArviZ
        from . import mcmc

        section, info = mcmc.report(out, rows, ref)
        lines += ["", *section]
        mcmc.write_json_section(out / "compare.json", info, ref.key)
        ref.info = info
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    plotting.compare_curves({r["guide"]: RunFolder(out / r.get("folder", r["guide"])).read_trace() for r in rows},
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


def run_compare(cfg: svi.RunConfig, model_file, guides_flag: str | None, argv: list[str], mcmc_opts=None,
                elbos_flag: str | None = None, seeds: int | None = None, use_reference: bool = True):
    import torch

    from ppl_gen.core.pipeline import RunSetup, check_new_out
    from ppl_gen.core.rundir import RunFolder, default_out_dir

    # the guide names come from a build on the real data, as the runs will see them
    setup = RunSetup.build(cfg, model_file)
    spec = setup.spec
    available = list(spec.guides)
    if cfg.backend == "numpyro":  # refuse before any training a guide NumPyro cannot run
        available = _numpyro_guides(setup, guides_flag, mcmc_opts is not None)
    elbos = parse_elbos(elbos_flag, cfg.elbo, cfg.renyi_alpha)
    seeds = seeds or 1
    declared = use_reference and (spec.exact_posterior is not None or spec.reference_posterior is not None)
    guides = choose_guides(guides_flag, available, model_file.path.name, mcmc=mcmc_opts is not None or declared,
                           crossed=len(elbos) > 1 or seeds > 1)
    if mcmc_opts is not None:  # refuse before any training: can NUTS sample this model at all?
        from . import mcmc

        mcmc.check_model(spec.model, setup.dataset.train, model_file.path.name)
    del setup

    if cfg.resume:
        out = Path(cfg.resume)
    else:
        out = Path(cfg.out) if cfg.out else default_out_dir(f"compare-{model_file.name}")
        check_new_out(out, cfg.overwrite, what="comparison")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "overwrite", "progress")}
    settings.update(elbos=elbos_flag, seeds=seeds)
    if not cfg.resume:  # what --resume needs, on disk before the first guide trains
        RunFolder(out).create()
        (out / "compare.json").write_text(json.dumps({"settings": settings, "guides": guides, "rows": []},
                                                     indent=2, default=str) + "\n")
    warm_up(cfg, model_file, guides[0])
    rows = []
    crossed = len(elbos) > 1
    for name in guides:
        for elbo, alpha in elbos:
            label = scheme_name(name, (elbo, alpha), crossed)
            print(f"== {label}", file=sys.stderr)
            runs = []
            for seed in range(cfg.seed, cfg.seed + seeds):
                # no ':' in a folder name: a Markdown link would read "renyi:" as a URL scheme
                safe = label.replace(":", "_")
                folder = safe if seeds == 1 else f"{safe}/seed-{seed}"
                sub = out / folder
                resume = cfg.resume and (sub / "checkpoint.pt").is_file()
                one = dataclasses.replace(cfg, guide=name, elbo=elbo, renyi_alpha=alpha, seed=seed, out=str(sub),
                                          resume=str(sub) if resume else None,
                                          overwrite=cfg.overwrite or bool(cfg.resume and not resume))
                fitted, metrics = svi.run(one, model_file)
                metrics["ms_per_step"] = (None if metrics["seconds_per_step"] is None
                                          else 1e3 * metrics["seconds_per_step"])
                metrics["guide"], metrics["folder"] = label, folder
                runs.append(metrics)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows.append(mean_and_se(runs) if seeds > 1 else runs[0])
    ref = None
    try:
        if mcmc_opts is not None:
            from . import mcmc

            ref = mcmc.reference(cfg, model_file, mcmc_opts, out)
        elif declared:
            from . import reference

            # a fresh set-up on the CPU: the first one was let go before training, so that its copy
            # of the data did not sit in device memory beside the runs'
            ref = reference.declared(RunSetup.build(dataclasses.replace(cfg, device="cpu"), model_file), out)
    except UserError:  # the schemes' report is kept; the error line says what went wrong with the reference
        write_report(out, rows, settings, argv, spec)
        raise
    write_report(out, rows, settings, argv, spec, ref)
    if ref is not None:
        from . import mcmc

        print(mcmc.summary_line(ref.info), file=sys.stderr)
    return out, rows, spec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import families

    try:
        several = families.is_families(argv)
    except UserError as e:
        svi.report_error(e, svi.wants_traceback(argv))
        return 2
    from ppl_gen.core.distributed import world_size

    if world_size() > 1:  # every rank would run every scheme, and only rank 0 would know the table
        svi.report_error(UserError("inference.compare runs its schemes one after another in one process; "
                                   "run it without torchrun, or run one scheme with torchrun -m inference.svi"),
                         False)
        return 2
    if several:  # several model files: the generative families side by side
        return families.main(argv)
    try:
        args, model_file, resumed = svi.parse_args(argv, prog="python -m inference.compare",
                                                   description=__doc__, extra_flags=_guides_flag)
        if args.guide:
            raise UserError("inference.compare takes --guides (a list), not --guide")
        if args.sample_images or args.score_images or args.no_sample_score:
            raise UserError("--sample-images, --score-images and --no-sample-score belong to a comparison of several "
                            "model files (python -m inference.compare A.py B.py ...); drop them for one file")
        if args.resume and not resumed.get("guides"):
            raise UserError(f"--resume {args.resume} is not a comparison folder (no compare.json with its guides); "
                            "resume one guide's run with python -m inference.svi --resume DIR")
        cfg = svi.resolve_config(args, model_file, resumed)
        guides_flag = args.guides or (",".join(resumed["guides"]) if resumed else None)
        from . import mcmc

        elbos_flag = args.elbos or (resumed.get("settings", {}).get("elbos") if resumed else None)
        seeds = args.seeds or (resumed.get("settings", {}).get("seeds") if resumed else None)
        cfg_settings = {"elbos": elbos_flag, "seeds": seeds}
        out, rows, spec = run_compare(cfg, model_file, guides_flag, argv, mcmc.options_from_args(args),
                                      elbos_flag=cfg_settings["elbos"], seeds=cfg_settings["seeds"],
                                      use_reference=not args.no_reference)
    except UserError as e:
        svi.report_error(e, svi.wants_traceback(argv))
        return 2
    print(table(rows, spec.metrics))
    print(f"comparison: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
