"""The generative families of the lecture side by side: several model files, one data set.

    python -m inference.compare models/vae.py models/pixelcnn.py models/vqvae.py models/diffusion.py models/gan.py
    python -m inference.compare models/pixelcnn.py models/gan.py --data digits --steps 300 --out runs/families
    python -m inference.compare --resume runs/families

CS231n's taxonomy and the CMU deck's three ways to learn p_theta(x), as numbers: each file is fitted
with its own defaults (or the given ``--steps``; every runner flag applies to every file) on the same
data and seed, and each fitted model then draws images. The table gives, per family:

* the kind of density: exact (a tractable log-likelihood, PixelCNN), bound (a variational lower
  bound on it: VAE, VQ-VAE, diffusion) or implicit (samples only: a GAN, which has no number here);
* held-out negative log density in nats per image and bits per dimension (-log p(x) / (D ln 2)),
  where the family has one; for a bound, the bound's value, which overstates -log p(x);
* one sample score for every family (``ppl_gen.core.sample_score``): the Fréchet distance and the MMD
  p-value between a classifier's features of held-out images and of samples, and the mean distance
  of a sample to its nearest training image, beside the held-out images' own (a reference row scores
  half of the held-out images against the other half);
* seconds to draw ``--sample-images`` images, training seconds, parameters.

``OUT/<file>/`` holds each file's full run folder; ``OUT/`` the comparison: compare.json,
compare.md and families_samples.png (a grid of samples from each family).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from ppl_gen.core.errors import UserError

from . import svi

FLAGS = {"--sample-images": 64, "--score-images": 500}
HOW = {"exact": "exact log-likelihood", "bound": "variational bound", "implicit": "none: no density"}


def split_argv(argv: list[str]) -> tuple[list[str], list[str], dict]:
    """(model files, the runner flags for each, this mode's own flags)."""
    files = [w for w in argv if w.endswith(".py") and not w.startswith("-")]
    rest = [w for w in argv if w not in files]
    own: dict = {"no_score": False, "resume": None, "out": None, "overwrite": False}
    for key, default in FLAGS.items():
        own[key[2:].replace("-", "_")] = default
    runner = []
    it = iter(rest)
    for word in it:
        name, eq, value = word.partition("=")
        if name in FLAGS:
            value = value if eq else next(it, None)
            try:
                own[name[2:].replace("-", "_")] = int(value)
                assert own[name[2:].replace("-", "_")] >= 2
            except (TypeError, ValueError, AssertionError):
                raise UserError(f"{name} takes a whole number of at least 2, got {value!r}") from None
        elif name == "--no-sample-score":
            own["no_score"] = True
        elif name in ("--resume", "--out"):
            own[name[2:]] = value if eq else next(it, None)
            if own[name[2:]] is None:
                raise UserError(f"{name} takes a folder")
        elif name == "--overwrite":
            own["overwrite"] = True
        else:
            runner.append(word)
    return files, runner, own


def train_hash(dataset) -> str:
    """The runner's data fingerprint of the training split alone (held-out splits may differ)."""
    from ppl_gen.core.dataset import Dataset
    from ppl_gen.core.pipeline import data_fingerprint

    return data_fingerprint(Dataset(train=dataset.train))


def check_files(files: list[str], runner: list[str]):
    """Each file parsed with the shared flags and set up on its data: every file can sample, and
    all train on the same images. Returns [(file, cfg, model file)]."""
    from ppl_gen.core.pipeline import RunSetup

    if len(files) < 2:
        raise UserError("the families comparison needs at least two model files, e.g. "
                        "python -m inference.compare models/pixelcnn.py models/gan.py")
    if len({Path(f).resolve() for f in files}) < len(files):
        raise UserError("a model file is named twice; name each once")
    out, first = [], None
    for f in files:
        args, mf, _ = svi.parse_args([f, *runner], prog="python -m inference.compare")
        cfg = svi.resolve_config(args, mf, {})
        setup = RunSetup.build(dataclasses.replace(cfg, progress=False), mf)
        if setup.spec.sample is None:
            raise UserError(f"{mf.path.name} cannot draw samples (its Spec has no sample); the families "
                            "comparison scores samples of every file: leave it out")
        ds = setup.dataset
        here = (train_hash(ds), tuple(ds.train.shape), ds.name)
        if first is None:
            first = (f, *here)
        elif here[0] != first[1]:
            raise UserError(f"{mf.path.name}'s training data ({here[2]}, {here[1][0]} x {here[1][1]}) differ from "
                            f"{Path(first[0]).name}'s ({first[3]}, {first[2][0]} x {first[2][1]}); give every file the "
                            "same --data (and the same options that shape the data)")
        out.append((f, cfg, mf))
        del setup
    return out


def draw(spec, n: int, seed: int, device) -> tuple:
    """(n samples, seconds): under their own seed, leaving the caller's random state as it was."""
    import torch

    from ppl_gen.core.device import seed_everything

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_everything(seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        x = spec.sample(n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return x, time.perf_counter() - t


def family_row(name: str, fitted, metrics: dict, own: dict, seed: int) -> tuple[dict, object]:
    from ppl_gen.core.sample_score import sample_score

    spec, ds = fitted.spec, fitted.dataset
    D = ds.train.shape[-1]
    key = next((k for k in spec.heldout_log_density if metrics.get(k) is not None), None)
    nats = None if spec.density == "implicit" or key is None else -float(metrics[key])
    row = {"model": name, "density": spec.density, "how": HOW[spec.density] + (f" ({key})" if nats is not None else ""),
           "heldout_nats_per_image": nats, "bits_per_dim": None if nats is None else nats / (D * math.log(2)),
           "train_seconds": metrics.get("seconds"), "n_parameters": metrics.get("n_parameters"), "folder": name}
    grid, row["sample_seconds"] = draw(spec, own["sample_images"], seed, ds.device)
    if not own["no_score"]:
        x, _ = draw(spec, own["score_images"], seed + 1, ds.device)
        row.update(sample_score(x, ds, n=own["score_images"]))
        row["score_images"] = "/".join(map(str, row["sample_score_images"]))
    return row, grid


def reference_row(dataset, own: dict) -> dict:
    """Held-out images scored against held-out images (the second half against the first): what
    a sampler of the data distribution itself would get, at its own, smaller image counts."""
    from ppl_gen.core.dataset import Dataset
    from ppl_gen.core.sample_score import sample_score

    real = dataset.test
    half = len(real) // 2
    first = Dataset(dataset.train, real[:half], dataset.labels_train, None, name=dataset.name, meta=dataset.meta)
    row = {"model": "held-out images (reference)", "density": "", "how": "half of the held-out images against "
            "the other half"}
    row.update(sample_score(real[half:], first, n=own["score_images"]))
    row["score_images"] = "/".join(map(str, row["sample_score_images"]))
    return row


COLUMNS = (("density", "density", "{}"), ("heldout_nats_per_image", "held-out -log p(x) (nats/image)", "{:.2f}"),
           ("bits_per_dim", "bits/dim", "{:.4f}"), ("sample_fd", "sample FD", "{:.2f}"),
           ("sample_mmd_p_value", "MMD p-value", "{:.3f}"), ("nearest_train_distance", "nearest train (L2)", "{:.3f}"),
           ("score_images", "images scored (held-out/samples)", "{}"),
           ("sample_seconds", "s to sample {n}", "{:.3f}"), ("train_seconds", "train s", "{:.1f}"),
           ("n_parameters", "parameters", "{:,}"))


def table(rows: list[dict], n: int) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) not in (None, "") for r in rows)]
    fmt = lambda v, f: "n/a" if v in (None, "") else f.format(v)  # noqa: E731
    head = "| model | " + " | ".join(h.format(n=n) for _, h, _ in cols) + " |"
    body = ["| " + r["model"] + " | " + " | ".join(fmt(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, "|---|" + "---:|" * len(cols), *body])


def report(out: Path, rows: list[dict], grids: dict, shape, argv: list[str], own: dict, settings: dict) -> None:
    from ppl_gen.core import plotting

    plotting.sample_panels(grids, shape, out / "families_samples.png",
                           f"{own['sample_images']} samples from each fitted model")
    lines = ["# Generative families side by side", "",
             "Command: `python -m inference.compare " + " ".join(argv) + "`", "",
             f"Data {settings['data']}, seed {settings['seed']}; each model file with its own defaults"
             + (f" and {settings['steps']} steps" if settings.get("steps") else "") + ". Held-out -log p(x) is exact "
             "for an exact density and the bound's value (an overestimate) for a bound; an implicit model has none. "
             f"The sample score compares {own['score_images']} samples with as many held-out images in the features "
             "of a classifier trained on the training set (ppl_gen.core.sample_score); FD estimated from few images "
             "is biased upwards, so compare rows, not runs with other image counts.", "",
             table(rows, own["sample_images"]), "", "![samples](families_samples.png)", ""]
    for r in rows:
        if r.get("folder"):
            lines.append(f"- {r['model']} ({r['how']}): [run folder]({r['folder']}/)")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({"families": settings["files"], "settings": settings, "rows": rows},
                                                 indent=2, default=str) + "\n")


def run_families(argv: list[str]) -> tuple[Path, list[dict], int]:
    from ppl_gen.core.pipeline import check_new_out
    from ppl_gen.core.rundir import RunFolder, default_out_dir

    files, runner, own = split_argv(argv)
    resumed = None
    if own["resume"]:
        path = Path(own["resume"]) / "compare.json"
        if not path.is_file():
            raise UserError(f"--resume {own['resume']}: no compare.json there; give the folder of a comparison")
        resumed = json.loads(path.read_text())
        if "families" not in resumed:
            raise UserError(f"--resume {own['resume']} is a comparison of one file's guides; resume it with "
                            f"python -m inference.compare --resume {own['resume']} alone")
        if files and [str(Path(f).resolve()) for f in files] != resumed["families"]:
            raise UserError(f"--resume {own['resume']} compared {', '.join(resumed['families'])}; drop the model "
                            "files or resume another comparison")
        saved = resumed["settings"]
        files, runner = saved["files"], saved["runner"] + [w for w in runner if w not in saved["runner"]]
        for key in FLAGS:
            own[key[2:].replace("-", "_")] = saved["own"][key[2:].replace("-", "_")]
        own["no_score"] = saved["own"]["no_score"]
    plan = check_files(files, runner)
    out = Path(own["resume"] or own["out"] or default_out_dir("compare-families"))
    if not resumed:
        check_new_out(out, own["overwrite"], what="comparison")
    first_cfg = plan[0][1]
    settings = {"files": [str(Path(f).resolve()) for f in files], "runner": runner,
                "own": {k: own[k] for k in ("sample_images", "score_images", "no_score")},
                "data": first_cfg.data or "the files' default", "seed": first_cfg.seed,
                "steps": next((runner[i + 1] for i, w in enumerate(runner[:-1]) if w == "--steps"), None)}
    RunFolder(out).create()
    (out / "compare.json").write_text(json.dumps({"families": settings["files"], "settings": settings, "rows": []},
                                                 indent=2, default=str) + "\n")
    rows, grids, shape, dataset = [], {}, None, None
    for f, cfg, mf in plan:
        print(f"== {mf.name}", file=sys.stderr)
        sub = out / mf.name
        resume = (sub / "checkpoint.pt").is_file()
        one = dataclasses.replace(cfg, out=str(sub), resume=str(sub) if resume else None,
                                  overwrite=bool(resumed) and not resume)
        fitted, metrics = svi.run(one, mf)
        row, grid = family_row(mf.name, fitted, metrics, own, cfg.seed)
        rows.append(row)
        grids[f"{mf.name} ({fitted.spec.density})"] = grid
        dataset = fitted.dataset
        shape = list(dataset.meta.get("shape", [int(math.isqrt(dataset.train.shape[-1]))] * 2))
    if not own["no_score"] and dataset is not None and dataset.test is not None:
        rows.append(reference_row(dataset, own))
    report(out, rows, grids, shape, argv, own, settings)
    return out, rows, own["sample_images"]


def main(argv: list[str]) -> int:
    try:
        out, rows, n = run_families(argv)
    except UserError as e:
        svi.report_error(e, svi.wants_traceback(argv))
        return 2
    print(table(rows, n))
    print(f"comparison: {out / 'compare.md'}")
    return 0


def is_families(argv: list[str]) -> bool:
    """Two or more model files, or --resume of a families comparison."""
    files, _, own = split_argv([w for w in argv if w != "-h" and w != "--help"]) if argv else ([], [], {})
    if len(files) >= 2:
        return True
    if own.get("resume"):
        path = Path(own["resume"]) / "compare.json"
        try:
            return "families" in json.loads(path.read_text())
        except (OSError, ValueError):
            return False
    return False

