"""``python -m ppl_gen.bench figures --out DIR [--tiny] [--only NAME,...]``: every figure the
docs show, made again from the code.

Each entry of RUNS is one documented command; its run folder's pictures are copied to
``DIR/<run>/<file>.png`` under the run folder's own file names (``elbo.png``, ``model.png``,
``transitions.png``, ...), so a figure on a page says which command and which file it is. With
``--out docs/figures`` this rewrites the docs' pictures. ``--tiny`` gives every run a few steps
and small evaluation budgets (what the test runs: the pictures exist, their content is noise).
Runs in one process, one after another, each with its own fresh set-up (the runner's).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from ppl_gen.bench import kit

ROOT = Path(__file__).resolve().parents[2]

# run name -> (entry point, argv as the docs show it). Every command also appears on a page.
RUNS: dict[str, tuple[str, list[str]]] = {
    "bayes_net-lecture": ("svi", ["models/bayes_net.py"]),
    "bayes_net-asia": ("svi", ["models/bayes_net.py", "--network", "asia", "--steps", "200"]),
    "gaussian_net-mean_field": ("svi", ["models/gaussian_net.py", "--guide", "mean_field"]),
    "gaussian_net-full_rank": ("svi", ["models/gaussian_net.py", "--guide", "full_rank"]),
    "markov_chain-order2": ("svi", ["models/markov_chain.py", "--order", "2"]),
    "char_rnn": ("svi", ["models/char_rnn.py"]),
    "hmm-casino": ("svi", ["models/hmm.py"]),
    "hmm-nile": ("svi", ["models/hmm.py", "--emission", "gaussian", "--data", "nile", "--states", "2",
                         "--guide", "map", "--steps", "500"]),
    "lda-explicit": ("svi", ["models/lda.py", "--threads", "1", "--infer-docs", "100"]),
    "lda-cavi": ("svi", ["models/lda.py", "--guide", "cavi", "--steps", "50", "--threads", "1"]),
    "compare-lda-synthetic": ("compare", ["models/lda.py", "--data", "synthetic", "--docs", "400", "--vocab", "100",
                                          "--topics", "5", "--words", "50", "--steps", "300", "--batch-size", "80",
                                          "--threads", "1"]),
    "compare-funnel": ("compare", ["models/zoo/funnel.py", "--guides", "AutoNormal,AutoIAFNormal"]),
    "vae": ("svi", ["models/vae.py"]),
    "vae-2d": ("svi", ["models/vae.py", "--latent-dim", "2", "--steps", "5000"]),
    "compare-vae-2d": ("compare", ["models/vae.py", "--latent-dim", "2", "--steps", "3000", "--threads", "1"]),
    "families": ("compare", ["models/vae.py", "models/pixelcnn.py", "models/vqvae.py", "models/diffusion.py",
                             "models/gan.py", "--threads", "1"]),
}
# --tiny: a few steps, and the per-file evaluation budgets of tests/test_docs_commands.py
TINY_STEPS = ["--steps", "3", "--eval-every", "3"]
TINY = {"vae.py": ["--ll-samples", "5", "--ll-points", "20", "--gap-points", "4", "--qstar-steps", "5",
                   "--local-steps", "5", "--test-points", "30"],
        "lda.py": ["--infer-docs", "20", "--local-steps", "20"],
        "char_rnn.py": ["--batch-size", "4"]}


def _entry(name: str):
    if name == "svi":
        from inference.svi import main
    else:
        from inference.compare import main
    return main


def draw_pictures(argv: list[str], dest: Path, out: Path) -> list[str]:
    """model.png and guide.png for the command ``argv`` (until the runner draws them in every run
    folder: the structure of a graph does not depend on the fitted values, so a fresh set-up of
    the same command is drawn)."""
    from inference.svi import parse_args, resolve_config
    from ppl_gen.core.pictures import model_pictures
    from ppl_gen.core.pipeline import RunSetup

    args, model_file, _ = parse_args(argv)
    setup = RunSetup.build(resolve_config(args, model_file, {}), model_file)
    dest.mkdir(parents=True, exist_ok=True)
    drawn = model_pictures(setup.spec, setup.guide, setup.dataset, dest)
    if isinstance(drawn, str):
        print(drawn, file=sys.stderr)
        return []
    return [str(p.relative_to(out)) for p in drawn]


def regenerate(out: Path, tiny: bool = False, only: list[str] | None = None) -> dict[str, list[str]]:
    """Run each selected command into a scratch folder; copy its PNGs to ``out/<run>/``
    (a comparison's per-guide folders to ``out/<run>/<guide>/``). Returns {run: [files]}."""
    from ppl_gen.bench import vi

    made: dict[str, list[str]] = {}
    unknown = set(only or []) - set(RUNS) - {"vi"}
    if unknown:
        raise kit.UserError(f"unknown figure run(s) {', '.join(sorted(unknown))}; known: {', '.join([*RUNS, 'vi'])}")
    with tempfile.TemporaryDirectory() as scratch:
        for name, (entry, argv) in RUNS.items():
            if only and name not in only:
                continue
            run_dir = Path(scratch) / name
            files = [a for a in argv if a.endswith(".py")]
            argv = [str(ROOT / a) if a in files else a for a in argv] + ["--out", str(run_dir), "--no-progress"]
            if tiny:  # several files share the runner's flags only
                argv += TINY_STEPS + (TINY.get(Path(argv[0]).name, []) if len(files) == 1
                                      else ["--sample-images", "16", "--score-images", "40"])
            t = time.perf_counter()
            code = _entry(entry)(argv)
            if code != 0:
                raise RuntimeError(f"{name}: python -m inference.{entry} {' '.join(argv)} exited {code}")
            dest = out / name
            if dest.exists():
                shutil.rmtree(dest)
            files = []
            for png in sorted(run_dir.rglob("*.png")):
                target = dest / png.relative_to(run_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(png, target)
                files.append(str(target.relative_to(out)))
            if entry == "svi":
                files += draw_pictures(argv, dest, out)
            made[name] = files
            print(f"{name}: {len(files)} figures in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if not only or "vi" in only:
            (out / "vi").mkdir(parents=True, exist_ok=True)
            fits = vi.kl_fits()
            grads = vi.vae_gradient_variance(*((20, 2, 20) if tiny else (1000, 8, 200)))
            made["vi"] = [str(p.relative_to(out)) for p in (vi.plot_kl(fits, out / "vi" / "kl-asymmetry.png"),
                                                            vi.plot_gradients(grads, out / "vi" / "gradient-variance.png"))]
    return made


def main(argv=None) -> int:
    p = kit.parser("python -m ppl_gen.bench figures", __doc__)
    p.add_argument("--out", required=True, help="folder for the figures (docs/figures rewrites the docs' own)")
    p.add_argument("--tiny", action="store_true", help="a few steps per run: checks the pictures get made")
    p.add_argument("--only", help="comma-separated run names (see RUNS, and vi)")
    args = p.parse_args(argv)
    only = [s for s in (args.only or "").split(",") if s]
    return kit.run(args, lambda: regenerate(Path(args.out), args.tiny, only),
                   lambda made: "\n".join(f"{k}: {', '.join(v)}" for k, v in made.items()))
