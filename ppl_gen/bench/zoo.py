"""Every scheme on every model of the zoo, against each model's reference posterior: one table.

    python -m ppl_gen.bench zoo [--guides AutoNormal,AutoMultivariateNormal,AutoIAFNormal] [--steps N]
                                [--models eight_schools,funnel,...] [--out DIR] [--threads 1]

For each model file of ``models/zoo`` (eight schools centered and non-centered, logistic
regression on breast cancer, Neal's funnel, the two-component mixture) it runs
``python -m inference.compare FILE --guides ...`` with the file's own defaults (or ``--steps``)
into ``DIR/NAME`` and gathers, per scheme: PSIS k-hat (Yao et al. 2018) with its verdict, the
error against the file's reference posterior (its exact posterior, or the NUTS draws shipped in
``models/zoo/references``: the worst marginal's mean error and 1-Wasserstein distance in
reference sds, the median sd ratio), whether k-hat predicted that error, the held-out score
(log pointwise predictive density where there are covariates, else the held-out ELBO) and the
time per step (first step left out). ``DIR/zoo.md`` holds the table; every number in it comes
from the compare folders beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ppl_gen.bench import kit as benchkit

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
MODELS = ("eight_schools", "eight_schools_noncentered", "logistic_regression", "funnel", "mixture")
GUIDES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal")


def _one(name: str, guides: list[str], steps: int | None, out: Path, threads: int, seed: int) -> list[dict]:
    from inference import compare

    argv = [str(ZOO / f"{name}.py"), "--guides", ",".join(guides), "--out", str(out / name),
            "--threads", str(threads), "--seed", str(seed), "--no-progress"]
    if steps:
        argv += ["--steps", str(steps)]
    print(f"== {name}", file=sys.stderr)
    if compare.main(argv) != 0:
        raise RuntimeError(f"inference.compare {' '.join(argv)} failed")
    report = json.loads((out / name / "compare.json").read_text())
    ref = report.get("exact") or report.get("mcmc")
    rows = []
    for r in report["rows"]:
        g = r["guide"]
        err = (ref or {}).get("summary", {}).get("guides", {}).get(g, {})
        heldout = ("lpd", r["heldout_lpd"]) if r.get("heldout_lpd") is not None else ("ELBO", r.get("test_elbo"))
        rows.append({"model": name, "guide": g, "steps": report["settings"]["steps"],
                     "psis_khat": r.get("psis_khat"), "reference": (ref or {}).get("reference"),
                     "reference_detail": (ref or {}).get("shipped") or (ref or {}).get("posterior"),
                     "max_mean_error_sds": err.get("max_mean_error_sds"), "max_w1_sds": err.get("max_w1_sds"),
                     "median_sd_ratio": err.get("median_sd_ratio_vi_to_mcmc"),
                     "heldout": heldout[0] if heldout[1] is not None else None, "heldout_value": heldout[1],
                     "ms_per_step": r.get("ms_per_step"), "train_elbo": r.get("train_elbo")})
    return rows


def bench(guides: list[str], models: list[str], steps: int | None, out: Path, threads: int, seed: int = 0) -> dict:
    from ppl_gen.core.errors import UserError

    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise UserError(f"unknown zoo model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if out.exists():
        raise UserError(f"{out} exists; give --out a new folder (nothing in it is overwritten)")
    out.mkdir(parents=True)
    rows = [row for m in models for row in _one(m, guides, steps, out, threads, seed)]
    result = {"benchmark": "zoo", "guides": guides, "models": models, "steps": steps, "threads": threads,
              "seed": seed, "out": str(out), "rows": rows}
    (out / "zoo.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "zoo.md").write_text(table(result) + "\n")
    return result


def _f(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(r: dict) -> str:
    from inference.mcmc import W1_LARGE
    from ppl_gen.core.posterior import KHAT_USABLE

    lines = ["| model | guide | PSIS k-hat | worst mean error (ref. sds) | worst W1 (ref. sds) | median sd ratio "
             "| k-hat predicted? | held-out | ms/step |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for row in r["rows"]:
        k, w = row["psis_khat"], row["max_w1_sds"]
        said = ("n/a" if k is None or w is None else
                {(True, True): "warned, rightly", (False, False): "no warning, rightly",
                 (False, True): "missed it", (True, False): "false alarm"}[k > KHAT_USABLE, w > W1_LARGE])
        held = "n/a" if row["heldout"] is None else f"{row['heldout']} {row['heldout_value']:.3f}"
        lines.append(f"| {row['model']} | {row['guide']} | {_f(k, '.2f')} | {_f(row['max_mean_error_sds'], '.2f')} "
                     f"| {_f(w, '.2f')} | {_f(row['median_sd_ratio'], '.2f')} | {said} | {held} "
                     f"| {_f(row['ms_per_step'], '.2f')} |")
    refs = {row["model"]: f"{row['reference']} ({row['reference_detail']})" for row in r["rows"] if row["reference"]}
    lines += ["", "References: " + "; ".join(f"{m}: {ref}" for m, ref in refs.items()) + ".",
              f"k-hat warns above {KHAT_USABLE}; an error is large above {W1_LARGE} reference sds (W1). "
              f"Folders: {r['out']}/MODEL/compare.md"]
    return "\n".join(lines)


def main(argv=None) -> int:
    from ppl_gen.core.rundir import default_out_dir

    p = benchkit.parser("python -m ppl_gen.bench zoo", __doc__)
    p.add_argument("--guides", default=",".join(GUIDES), help=f"schemes to fit (default: {','.join(GUIDES)})")
    p.add_argument("--models", default=",".join(MODELS), help=f"zoo files (default: {','.join(MODELS)})")
    p.add_argument("--steps", type=int, help="SVI steps per scheme (default: each file's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--out", help="a new folder for the comparisons and zoo.md (default: runs/bench-zoo-TIME)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else default_out_dir("bench-zoo")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    return benchkit.run(args, lambda: bench(split(args.guides), split(args.models), args.steps, out,
                                            args.threads or 1, args.seed), table)


if __name__ == "__main__":
    sys.exit(main())
