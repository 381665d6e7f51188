"""Fit a model file with stochastic variational inference.

    python -m inference.svi models/vae.py
    python -m inference.svi models/vae.py --data fashion-mnist --device cuda --steps 20000
    python -m inference.svi my_model.py --steps 2000 --lr 0.01
    python -m inference.svi models/vae.py --resume runs/vae-20261121-120000 --steps 4000

The model file says *what* (model, guides, data, options); this runner decides *how*
(ELBO estimator, optimizer, device, steps) and writes the run folder: config.json,
trace.csv, metrics.json, checkpoint.pt and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppl_gen.core.errors import TrainingDiverged, UserError

# Settings a run can have, with the defaults used when neither the command line, the
# resumed run nor the model file's DEFAULTS gives one.
RUNNER_DEFAULTS: dict[str, Any] = {
    "guide": None,          # None: the model file's first (or declared default) guide
    "elbo": "trace",
    "jit": False,
    "steps": 1000,
    "batch_size": None,     # None: the whole data set per step
    "lr": 1e-3,
    "seed": 0,
    "device": "auto",
    "data": None,           # None: the model file's default data
    "eval_every": None,     # None: 10 evaluations per run
    "backend": "pyro",
    "num_particles": 1,
    "eval_particles": 10,
    "validate": False,
    "threads": None,        # None: torch's default for this machine
    "data_on_host": False,  # True: data stay in host memory, batches are copied to --device
}
# What a resumed run must keep, or it would not continue the same optimization.
LOCKED_ON_RESUME = ("model_file", "guide", "elbo", "jit", "batch_size", "seed", "data",
                    "num_particles", "backend")
BACKENDS = ("pyro", "numpyro")


@dataclass
class RunConfig:
    model_file: str
    guide: str | None = None
    elbo: str = "trace"
    jit: bool = False
    steps: int = 1000
    batch_size: int | None = None
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    data: str | None = None
    out: str | None = None
    eval_every: int | None = None
    resume: str | None = None
    backend: str = "pyro"
    num_particles: int = 1
    eval_particles: int = 10
    validate: bool = False
    threads: int | None = None
    data_on_host: bool = False
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, ``error: ...``, exit 2 (the project's convention)."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_runner_flags(p: argparse.ArgumentParser) -> None:
    from ppl_gen.core.device import DEVICES
    from ppl_gen.core.train import ELBOS

    g = p.add_argument_group("inference (how)")
    g.add_argument("--guide", help="which of the model file's guides to fit (default: its first)")
    g.add_argument("--elbo", choices=list(ELBOS),
                   help="ELBO estimator: trace = Monte Carlo; meanfield = analytic KL where known; "
                        "tracegraph = variance-reduced score function for discrete latents; "
                        "enum = sum out enumerated discrete latents (default: trace)")
    g.add_argument("--jit", action="store_true", default=None, help="JIT-compile the ELBO (PyTorch tracing)")
    g.add_argument("--steps", type=_positive(int), help="total optimization steps (default: model's, else 1000)")
    g.add_argument("--batch-size", type=_positive(int), help="data points per step (default: model's, else all)")
    g.add_argument("--lr", type=_positive(float), help="Adam learning rate (default: model's, else 1e-3)")
    g.add_argument("--seed", type=int, help="random seed for initialization, batches and sampling (default: 0)")
    g.add_argument("--device", choices=list(DEVICES), help="auto picks CUDA when present (default: auto)")
    g.add_argument("--data", help="data set name or path, as the model file understands it (default: its own)")
    g.add_argument("--out", help="run folder (default: runs/<model>-<timestamp>/)")
    g.add_argument("--eval-every", type=_positive(int),
                   help="held-out ELBO and checkpoint every N steps (default: steps/10)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR up to --steps (same settings)")
    g.add_argument("--backend", choices=BACKENDS, help="inference engine (default: pyro)")
    g.add_argument("--num-particles", type=_positive(int), help="ELBO samples per training step (default: 1)")
    g.add_argument("--eval-particles", type=_positive(int),
                   help="ELBO samples per data point for the reported ELBOs (default: 10)")
    g.add_argument("--validate", action="store_true", default=None,
                   help="keep Pyro's distribution checks on after the first step (slower)")
    g.add_argument("--threads", type=_positive(int),
                   help="CPU threads for torch (default: torch's choice); 1 is often fastest for "
                        "small models, and on a machine shared with other jobs")
    g.add_argument("--data-on-host", action="store_true", default=None,
                   help="keep the data in host memory and copy each minibatch (and each evaluation "
                        "chunk) to --device: for data sets larger than the GPU's memory; needs "
                        "--batch-size and a model file that supports it (models/lda.py)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar")


def parse_args(argv: list[str] | None = None, prog: str = "python -m inference.svi",
               description: str | None = None, extra_flags=None):
    """Parse in two passes: the model file first, so its options become flags in --help."""
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.core.rundir import RunFolder

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(add_help=False)
    pre.add_argument("model_file", nargs="?")
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    wants_help = "-h" in argv or "--help" in argv

    resumed: dict = {}
    if known.resume:
        resumed = RunFolder(known.resume).read_json("config.json")
    path = known.model_file or resumed.get("settings", {}).get("model_file")
    model_file = None
    if path and not (wants_help and not Path(path).is_file()):
        model_file = load_model_file(path)

    parser = _Parser(prog=prog, description=description or __doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_file", nargs="?", help="a model file, e.g. models/vae.py")
    add_runner_flags(parser)
    if extra_flags:
        extra_flags(parser)
    if model_file:
        model_file.add_option_flags(parser)
    args = parser.parse_args(argv)
    if model_file is None:
        raise UserError("give a model file, e.g. python -m inference.svi models/vae.py")
    return args, model_file, resumed


def resolve_config(args: argparse.Namespace, model_file, resumed: dict) -> RunConfig:
    """Each setting from: the command line, else the resumed run, else the model file's
    DEFAULTS, else RUNNER_DEFAULTS."""
    cli = {k: getattr(args, k) for k in RUNNER_DEFAULTS if getattr(args, k, None) is not None}
    cli["model_file"] = str(model_file.path)
    cli_options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    old = resumed.get("settings", {})
    if resumed:
        for key in LOCKED_ON_RESUME:
            if key in cli and cli[key] != old.get(key):
                raise UserError(f"--{key.replace('_', '-')} cannot change on --resume "
                                f"(the run used {old.get(key)!r}); drop the flag")
        changed = {k for k, v in cli_options.items() if v != old.get("options", {}).get(k)}
        if changed:
            raise UserError(f"model options cannot change on --resume ({', '.join(sorted(changed))}); drop them")
    values = dict(RUNNER_DEFAULTS)
    values.update({k: v for k, v in model_file.defaults.items() if k in RUNNER_DEFAULTS})
    values.update({k: v for k, v in old.items() if k in RUNNER_DEFAULTS})
    values.update(cli)
    options = dict(old.get("options", {}))
    options.update(cli_options)
    return RunConfig(model_file=str(model_file.path), out=args.resume or args.out, resume=args.resume,
                     progress=args.progress, options=options,
                     **{k: values[k] for k in RUNNER_DEFAULTS})


# ---------------------------------------------------------------- the run
# run() is four phases; the NumPyro backend reuses all but the training step itself.
def prepare(cfg: RunConfig, mf):
    """Device, options, data (on the device), the built Spec and the chosen guide."""
    import pyro
    import torch

    from ppl_gen.core.device import resolve_device, seed_everything

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    options = mf.options(cfg.options)
    if cfg.data_on_host and cfg.batch_size is None:
        raise UserError("--data-on-host copies one minibatch at a time to the device: give --batch-size")
    dataset = mf.data(cfg.data, options)
    # the data move to the device once, or (--data-on-host) stay where they are, batch by batch
    dataset = dataset.on_host(device) if cfg.data_on_host else dataset.to(device)
    pyro.clear_param_store()  # no parameters leak in from an earlier run in this process
    seed_everything(cfg.seed)
    spec = mf.build(options, dataset, elbo=cfg.elbo)
    if cfg.data_on_host and not spec.streams:
        raise UserError(f"{mf.path.name} evaluates on its whole data set at once and does not support "
                        "--data-on-host; drop the flag")
    guide_name = cfg.guide or spec.default_guide
    return device, options, dataset, spec, guide_name, spec.guide(guide_name)


def open_run(cfg: RunConfig, mf, trainer, guide_name: str, device, dataset, options, batch_size: int,
             extra_config: dict | None = None):
    """Create (or, with --resume, reopen) the run folder; returns (folder, start step,
    training seconds so far, config). ``trainer.load_state_dict(checkpoint) -> step``."""
    import torch

    from ppl_gen.core.rundir import RunFolder, default_out_dir, package_versions

    folder = RunFolder(cfg.out or default_out_dir(mf.name)).create()
    start, seconds0 = 0, 0.0
    if cfg.resume:
        start = trainer.load_state_dict(folder.load_checkpoint(map_location=device))
        if start >= cfg.steps:
            raise UserError(f"the run in {folder.path} already has {start} steps; "
                            f"give --steps larger than {start}")
        folder.start_trace(keep_until_step=start)
        seconds0 = _last_seconds(folder) or 0.0
        config = folder.read_json("config.json")
        config.setdefault("resumed", []).append({"from_step": start, "to_step": cfg.steps,
                                                 "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        config["settings"]["steps"] = cfg.steps
        config["settings"]["lr"] = cfg.lr
    else:
        folder.start_trace()
        config = {"settings": dataclasses.asdict(cfg), "model": mf.name, "guide": guide_name,
                  "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  **(extra_config or {}),
                  "data": {"name": dataset.name, "train": len(dataset.train),
                           "test": 0 if dataset.test is None else len(dataset.test), **dataset.meta},
                  "batch_size_used": batch_size,
                  "versions": package_versions(), "argv": sys.argv,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        config["settings"]["options"] = dataclasses.asdict(options) if options else {}
    folder.write_json("config.json", config)
    return folder, start, seconds0, config


def train_loop(cfg: RunConfig, trainer, folder, evaluate, start: int, seconds0: float, desc: str) -> float:
    """Steps start+1..cfg.steps with a progress bar; every --eval-every steps the held-out
    ELBO goes into trace.csv and a checkpoint is written. Returns the training seconds.
    ``trainer.step(t) -> -ELBO per point``; ``trainer.state_dict(t)`` is what is checkpointed."""
    from tqdm.auto import tqdm

    eval_every = cfg.eval_every or max(cfg.steps // 10, 1)
    rows, last_ckpt, t = [], (start if cfg.resume else None), start
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not cfg.progress,
               dynamic_ncols=True, mininterval=0.25)
    clock, paused, running = time.perf_counter(), 0.0, None
    try:
        for t in range(start + 1, cfg.steps + 1):
            loss = trainer.step(t)
            running = -loss if running is None else 0.98 * running - 0.02 * loss
            # seconds count training only: evaluation and checkpoints are excluded, so that
            # guides with costly held-out evaluation are timed fairly
            row = {"step": t, "loss": loss, "seconds": seconds0 + time.perf_counter() - clock - paused,
                   "test_elbo": ""}
            if t % eval_every == 0 or t == cfg.steps:
                pause = time.perf_counter()
                row["test_elbo"] = evaluate()
                row["test_elbo"] = "" if row["test_elbo"] is None else row["test_elbo"]
                folder.save_checkpoint(trainer.state_dict(t))
                last_ckpt = t
                paused += time.perf_counter() - pause
                folder.append_trace(rows + [row])
                rows = []
            else:
                rows.append(row)
            if t % 10 == 0 or t == cfg.steps:
                bar.set_postfix(elbo=f"{running:.3f}", refresh=False)
            bar.update(1)
    except TrainingDiverged as e:
        folder.append_trace(rows)
        where = (f"the last good checkpoint (step {last_ckpt}) is in {folder.checkpoint_path}"
                 if last_ckpt else "no checkpoint had been written yet")
        raise UserError(f"{e}; the run stopped and {where}; try a smaller --lr") from None
    except KeyboardInterrupt:
        folder.append_trace(rows)
        print(f"\ninterrupted at step {t}; checkpoint of step {last_ckpt} in {folder.path}; "
              f"continue with --resume {folder.path}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        bar.close()
    return _last_seconds(folder) or 0.0  # training time, all sessions of a resumed run


def finish(cfg: RunConfig, mf, spec, guide_name: str, guide, dataset, options, device, config, folder,
           seconds: float, title: str):
    """metrics.json (the runner's ELBOs and the model's own metrics), plots, posterior.nc.
    The held-out ELBO is the one train_loop computed at the final step (read back from
    trace.csv, exactly), so a costly held-out evaluation is not run twice."""
    import pyro
    import torch

    from ppl_gen.core import plotting
    from ppl_gen.core.device import seed_everything
    from ppl_gen.core.posterior import save_guide_posterior
    from ppl_gen.core.train import FittedRun, evaluate_elbo

    fitted = FittedRun(spec=spec, guide_name=guide_name, dataset=dataset, options=options, device=device,
                       config=config, out=folder.path, trace=folder.read_trace())
    metrics = {
        "model": mf.name, "guide": guide_name, "elbo": cfg.elbo, "jit": cfg.jit, "steps": cfg.steps,
        "seconds": seconds, "seconds_per_step": seconds / cfg.steps,
        "n_parameters": sum(p.numel() for _, p in pyro.get_param_store().named_parameters()),
        "device": str(device), "seed": cfg.seed,
        "train_elbo": evaluate_elbo(spec.model, guide, dataset.train, cfg.elbo, cfg.eval_particles, seed=cfg.seed,
                                    device=device),
        "test_elbo": float(fitted.trace[-1]["test_elbo"]) if fitted.trace[-1]["test_elbo"] else None,
        "elbo_units": "nats per data point",
        "eval_particles": cfg.eval_particles,
    }
    devices = [device] if device.type == "cuda" else []
    if spec.evaluate:
        with torch.random.fork_rng(devices=devices):
            seed_everything(cfg.seed)
            metrics.update(spec.evaluate(fitted) or {})
    folder.write_json("metrics.json", metrics)

    plotting.elbo_curve(fitted.trace, folder.path / "elbo.png", title=title)
    if spec.plots:
        with torch.random.fork_rng(devices=devices):
            seed_everything(cfg.seed)
            spec.plots(fitted, folder.path)
    # draws of the global latents from the fitted guide, for ArviZ (none: no posterior.nc)
    save_guide_posterior(fitted, folder.path / "posterior.nc", seed=cfg.seed)
    return fitted, metrics


def heldout_evaluator(cfg: RunConfig, spec, guide_name: str, guide, dataset, before=None):
    """The held-out ELBO per point; guides that cannot see new data get their held-out form."""
    from ppl_gen.core.train import evaluate_elbo

    def evaluate():
        if dataset.test is None:
            return None
        if before:
            before()
        test_guide = spec.heldout_guide(guide_name, dataset.test) if spec.heldout_guide else guide
        return evaluate_elbo(spec.model, test_guide, dataset.test, cfg.elbo, cfg.eval_particles, seed=cfg.seed,
                             device=dataset.device)
    return evaluate


def run(cfg: RunConfig, model_file=None):
    """Fit cfg.model_file and write the run folder; returns (FittedRun, metrics)."""
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.core.train import Trainer, make_elbo

    mf = model_file or load_model_file(cfg.model_file)
    if cfg.backend == "numpyro":  # imported only when asked for: numpyro and jax are an optional extra
        from inference import numpyro_backend

        return numpyro_backend.run(cfg, mf)
    device, options, dataset, spec, guide_name, guide = prepare(cfg, mf)
    elbo = make_elbo(cfg.elbo, jit=cfg.jit, num_particles=cfg.num_particles)
    trainer = Trainer(spec.model, guide, dataset.train, elbo, lr=cfg.lr, batch_size=cfg.batch_size,
                      seed=cfg.seed, validate=cfg.validate, local_params=spec.local_params,
                      local_lr=spec.local_lr, update=spec.updates.get(guide_name), param_lr=spec.param_lr,
                      buffers=spec.buffers, device=device)
    folder, start, seconds0, config = open_run(cfg, mf, trainer, guide_name, device, dataset, options,
                                               trainer.schedule.batch_size)
    evaluate = heldout_evaluator(cfg, spec, guide_name, guide, dataset)
    seconds = train_loop(cfg, trainer, folder, evaluate, start, seconds0, desc=f"{mf.name}/{guide_name}")
    return finish(cfg, mf, spec, guide_name, guide, dataset, options, device, config, folder, seconds,
                  title=f"{mf.name} / {guide_name} / {cfg.elbo}")


SUMMARY_SKIP = {"model", "guide", "elbo", "jit", "steps", "seconds", "seconds_per_step", "device", "seed", "n_parameters",
                "train_elbo", "test_elbo", "elbo_units", "eval_particles"}


def _last_seconds(folder) -> float | None:
    rows = folder.read_trace()
    return float(rows[-1]["seconds"]) if rows else None


def summary(metrics: dict, out: Path) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"{metrics['model']} / guide {metrics['guide']} / elbo {metrics['elbo']} / "
             f"{metrics['steps']} steps in {metrics['seconds']:.1f} s on {metrics['device']}",
             f"  train ELBO {fmt(metrics['train_elbo'])}   held-out ELBO {fmt(metrics['test_elbo'])}"
             "   (nats per data point)"]
    # the model's own headline numbers: every scalar it reported
    extra = [(k, v) for k, v in metrics.items()
             if k not in SUMMARY_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k, v in extra[:12]:
        lines.append(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    lines.append(f"  run folder: {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args, model_file, resumed = parse_args(argv)
        cfg = resolve_config(args, model_file, resumed)
        fitted, metrics = run(cfg, model_file)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(metrics, fitted.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
