"""The run pipeline: one object sets a run up, one loop trains it, one function finishes it.

:meth:`RunSetup.build` is the only place a run is set up, in one order, for every entry point
(``inference.svi``, ``inference.compare``, the MCMC reference), benchmark and test:

    settings resolved -> threads -> seed -> data() -> data checked -> options -> device
    -> a fresh parameter store -> seed again -> build() -> the guide

The seed is set before ``data()`` so that a file whose data are random draws reproduces; it is
set again before ``build()`` so that the networks' starting values do not depend on how many
random numbers ``data()`` happened to draw.

:func:`run` then trains through a backend (``ppl_gen.backends``: Pyro's or NumPyro's, one small
interface) and writes the run folder (``ppl_gen.core.rundir``). What it guarantees:

* an existing run folder is never replaced without ``--overwrite`` (a folder that holds no run
  is never replaced), and nothing is written until the first step has succeeded;
* every trace row and the checkpoint are on disk before any evaluation; an exception or Ctrl-C
  during evaluation keeps them, and ``--resume DIR`` on a finished run redoes the final
  evaluation and plots;
* a resumed run equals an uninterrupted one: same data (checked by fingerprint), same batches,
  same random state;
* a failure in the model file's own code is one ``error:`` line naming the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyro
import torch

from ppl_gen.core.dataset import Dataset
from ppl_gen.core.errors import TrainingDiverged, UserError
from ppl_gen.core.guard import model_code
from ppl_gen.core.protocol import AUTOGUIDES, Guide, ModelFile, Spec, autoguide, load_model_file
from ppl_gen.core.settings import NOT_SAVED, RunConfig

# the running ELBO on the progress bar: the mean of the last steps' estimates, so that it ends
# where the final evaluation lands (an exponential average started at step 1 lags far behind)
WINDOW = 20


def quiet_libraries() -> None:
    """No INFO lines from Pyro (``Guessed max_plate_nesting``) on a user's console."""
    logging.getLogger("pyro").setLevel(logging.WARNING)


def data_fingerprint(dataset: Dataset) -> str:
    """sha256 of the training and held-out tensors (shape, dtype and bytes)."""
    from ppl_gen.core.dataset import parts

    h = hashlib.sha256()
    for split in (dataset.train, dataset.test):
        if split is None:
            h.update(b"none")
            continue
        for t in parts(split):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def check_data(dataset: Dataset, file_name: str) -> None:
    """Empty data and NaN or inf values stop the run before any work, naming the split."""
    if dataset.train.shape[0] == 0:
        raise UserError(f"{file_name}'s data() returned an empty training set; return at least one data point")
    from ppl_gen.core.dataset import parts

    splits = [(split, t) for split, s in (("training", dataset.train), ("held-out", dataset.test))
              if s is not None for t in parts(s)]
    for split, t in splits:
        if t is None or not torch.is_floating_point(t) or (dataset.nan_is_missing and not torch.isinf(t).any()):
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            rows = bad.reshape(t.shape[0], -1).any(1).nonzero().flatten()[:3].tolist() if t.ndim else []
            what = ", ".join(w for w in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if w)
            raise UserError(f"the {split} data from {file_name}'s data() hold {what} value(s) (first rows "
                            f"{rows}); remove or impute them in data()")
    if dataset.test is not None and dataset.test.shape[0] == 0:
        dataset.test = None  # an empty held-out split is no held-out split


@dataclass
class RunSetup:
    """A run, set up: what every backend, entry point, benchmark and test starts from."""

    cfg: RunConfig
    mf: ModelFile
    device: torch.device
    options: Any
    dataset: Dataset
    spec: Spec
    guide_name: str
    guide: Guide
    fingerprint: str
    # the guide was replaced after training by its fitted form (Guide.fitted: the Laplace approximation)
    refitted: bool = False

    @classmethod
    def build(cls, cfg: RunConfig, mf: ModelFile | None = None, guide: str | None = None,
              dataset: Dataset | None = None) -> "RunSetup":
        """``guide``: set up this guide instead of cfg's; ``dataset``: use these data instead of
        calling ``data()`` (a benchmark's synthetic data), checked and fingerprinted alike."""
        from ppl_gen.core import distributed
        from ppl_gen.core.device import resolve_device, seed_everything

        quiet_libraries()
        mf = mf or load_model_file(cfg.model_file)
        device = distributed.rank_device(resolve_device(cfg.device))  # under torchrun: this rank's GPU
        torch.set_num_threads(cfg.threads or (1 if device.type == "cpu" else torch.get_num_threads()))
        if cfg.data_on_host and cfg.batch_size is None:
            raise UserError("--data-on-host copies one minibatch at a time to the device: give --batch-size")
        with model_code(mf.path, "checking its Options"):
            options = mf.options(cfg.options)
        seed_everything(cfg.seed)
        if dataset is None:
            with model_code(mf.path, "in data()"):
                dataset = mf.data(cfg.data, options)
        check_data(dataset, mf.path.name)
        fingerprint = data_fingerprint(dataset)
        # the data move to the device once, or (--data-on-host) stay where they are, batch by batch
        dataset = dataset.on_host(device) if cfg.data_on_host else dataset.to(device)
        pyro.clear_param_store()  # no parameters leak in from an earlier run in this process
        seed_everything(cfg.seed)
        with model_code(mf.path, "in build()"):
            spec = mf.build(options, dataset, elbo=cfg.elbo)
        if cfg.data_on_host and not spec.streams:
            raise UserError(f"{mf.path.name} evaluates on its whole data set at once and does not support "
                            "--data-on-host; drop the flag")
        if not spec.likelihood:
            refuse_density_settings(cfg, mf)
        name = guide or cfg.guide or spec.default_guide
        if name in AUTOGUIDES and name not in spec.guides:
            with model_code(mf.path, f"tracing the model for {name}"):
                spec.auto[name] = autoguide(name, spec.model, dataset.train, mf.path.name, rank=cfg.rank,
                                            batched=distributed.world() is not None or cfg.batch_size is not None
                                            and cfg.batch_size < dataset.train.shape[0])
        return cls(cfg=cfg, mf=mf, device=device, options=options, dataset=dataset, spec=spec,
                   guide_name=name, guide=spec.resolve(name), fingerprint=fingerprint)

    @property
    def title(self) -> str:
        return f"{self.mf.name} / {self.guide_name} / {self.cfg.elbo}"


# settings that mean something only for a model with a density: what each would have set
DENSITY_SETTINGS = {"elbo": "the ELBO estimator", "renyi_alpha": "the Renyi bound's order",
                    "num_particles": "ELBO samples per step", "eval_particles": "the held-out ELBO's samples",
                    "diagnostic_draws": "the PSIS check of p(x, z) / q(z)", "lr": "the one Adam rate"}


def refuse_density_settings(cfg: RunConfig, mf: ModelFile) -> None:
    """An implicit model has no log-likelihood: a setting that only means something for one,
    changed from its default, is refused rather than silently ignored."""
    from ppl_gen.core.settings import DEFAULTS

    for key, what in DENSITY_SETTINGS.items():
        if getattr(cfg, key) != mf.defaults.get(key, DEFAULTS[key]):
            fix = ("its own options set its optimizers' rates (see --help)" if key == "lr" else "drop it")
            raise UserError(f"{mf.path.name} is an implicit model (it draws samples; no density is written down), "
                            f"so it has no log-likelihood and --{key.replace('_', '-')} ({what}) does not apply; {fix}")


# ---------------------------------------------------------------- the model and guide agree
MISMATCH = {"Found non-auxiliary vars in guide but not model": "guide {guide!r} samples {sites}, which the model "
                                                               "does not have",
            "Found vars in model but not guide": "the model's latent site(s) {sites} have no counterpart in "
                                                 "guide {guide!r}"}


@contextmanager
def site_check(file_name: str, guide_name: str):
    """Pyro's own model/guide check (``pyro.util.check_model_guide_match``, run while validation
    is on, as it is for the first step) only warns; here its findings stop the run at step 1,
    naming the sites, instead of training on and failing far from the cause."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    found = []
    for w in caught:
        text = str(w.message)
        for start, what in MISMATCH.items():
            if text.startswith(start):
                sets = re.findall(r"\{([^{}]*)\}", text)  # the last {...} is the set of sites
                found.append(what.format(guide=guide_name, sites=sets[-1].replace("'", "") if sets else "?"))
    if found:
        raise UserError(f"{file_name}: " + "; ".join(found) + "; give the guide the model's latent site names")
    for w in caught:  # every other warning is the user's to see, as it would have been
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ---------------------------------------------------------------- the run folder
def check_writable(path: Path) -> None:
    """An --out that cannot be written is refused before any work, not after it."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {path}: {probe} is a file, not a folder; choose another path")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as e:
        raise UserError(f"--out {path} cannot be written ({e.strerror or e}); choose a folder you can write") from None


def is_run_folder(path: Path) -> bool:
    return any((path / f).exists() for f in ("config.json", "compare.json", "trace.csv", "checkpoint.pt"))


def plan_folder(cfg: RunConfig, mf: ModelFile):
    """The run folder this run will write, checked now, created only after the first step."""
    from ppl_gen.core.rundir import RunFolder, default_out_dir

    if cfg.resume:
        folder = RunFolder(cfg.resume)
        if not folder.checkpoint_path.is_file():
            raise UserError(f"--resume {cfg.resume}: no checkpoint.pt there (the run never reached its first "
                            "checkpoint); start it again without --resume")
        return folder
    path = Path(cfg.out) if cfg.out else default_out_dir(mf.name)
    check_new_out(path, cfg.overwrite)
    return RunFolder(path)


def check_new_out(path: Path, overwrite: bool, what: str = "run") -> None:
    """A new run (or comparison) may go to ``path``: it is new or empty, or holds a run and
    --overwrite says to replace it; and it can be written. Anything else is one error line."""
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--out {path} exists and is not a folder; choose another path")
        if any(path.iterdir()):
            if not is_run_folder(path):
                raise UserError(f"--out {path} holds files that are not a {what}; choose a new or empty folder")
            if not overwrite:
                raise UserError(f"--out {path} already holds a {what}; continue it with --resume {path}, "
                                "replace it with --overwrite, or choose another --out")
    check_writable(path)


def new_config(setup: RunSetup, batch_size: int, extra: dict | None = None) -> dict:
    from ppl_gen.core.distributed import world_size
    from ppl_gen.core.rundir import package_versions

    cfg, device, ds = setup.cfg, setup.device, setup.dataset
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED}
    settings["options"] = dataclasses.asdict(setup.options) if setup.options else {}
    return {"settings": settings, "model": setup.mf.name, "guide": setup.guide_name, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), **(extra or {}),
            "data": {"name": ds.name, "train": len(ds.train), "test": 0 if ds.test is None else len(ds.test),
                     "fingerprint": setup.fingerprint, **ds.meta},
            "batch_size_used": batch_size, "world_size": world_size(), "versions": package_versions(), "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def resumed_config(folder, setup: RunSetup, start: int) -> dict:
    from ppl_gen.core.distributed import world_size

    config = folder.read_json("config.json")
    old = config.get("data", {}).get("fingerprint")
    if old and old != setup.fingerprint:
        raise UserError(f"the data differ from the run in {folder.path} (fingerprint {setup.fingerprint}, the run "
                        f"was trained on {old}); resume with the same data, or start a new run")
    if start < setup.cfg.steps:
        config.setdefault("resumed", []).append({"from_step": start, "to_step": setup.cfg.steps, "argv": sys.argv,
                                                 "world_size": world_size(),
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    config["settings"]["steps"] = setup.cfg.steps
    config["settings"]["lr"] = setup.cfg.lr
    return config


# ---------------------------------------------------------------- evaluation
def heldout_evaluator(setup: RunSetup, before: Callable | None = None) -> Callable[[], float | None]:
    """The held-out ELBO per point; guides that cannot see new data use their held-out form."""
    from ppl_gen.core.train import evaluate_elbo

    cfg, spec, guide, ds = setup.cfg, setup.spec, setup.guide, setup.dataset

    def evaluate():
        if ds.test is None or not spec.likelihood:
            return None
        if before:
            before()
        with model_code(setup.mf.path, "in the held-out evaluation"):
            test_guide = guide.heldout(ds.test) if guide.heldout else guide
            return evaluate_elbo(spec.model, test_guide, ds.test, cfg.elbo, cfg.eval_particles, seed=cfg.seed,
                                 device=ds.device)
    return evaluate


def per_step_seconds(trace: list[dict], session_starts: list[int]) -> tuple[float | None, float | None]:
    """(seconds per step, seconds of the first step): the median step time, robust to the pauses a
    shared machine puts into a few steps; the first step of every session (creating parameters,
    Pyro's checks, compilation) is one-off start-up, reported on its own."""
    seconds = [(int(r["step"]), float(r["seconds"])) for r in trace if r.get("seconds") not in (None, "")]
    if not seconds:
        return None, None
    firsts = {s + 1 for s in session_starts}
    prev, steady, startup = 0.0, [], None
    for step, s in seconds:
        d = s - prev
        prev = s
        if step in firsts:
            startup = d if startup is None else startup
        else:
            steady.append(d)
    return (statistics.median(steady) if steady else None), startup


# ---------------------------------------------------------------- the run
def run(cfg: RunConfig, mf: ModelFile | None = None):
    """Fit ``cfg.model_file`` and write the run folder; returns (FittedRun, metrics). Under
    torchrun (ppl_gen.core.distributed) every rank trains its shard, rank 0 alone writes the
    folder and finishes the run; the other ranks return (None, None)."""
    from ppl_gen.backends import get_backend
    from ppl_gen.core import distributed

    world = distributed.world()
    if world:
        cfg = distributed.check_config(cfg, world)
    mf = mf or load_model_file(cfg.model_file)
    backend = get_backend(cfg.backend)
    folder = plan_folder(cfg, mf)
    setup = RunSetup.build(cfg, mf)
    folder.fields += [k for k in setup.guide.trace_terms if k not in folder.fields]
    backend.check(setup)
    trainer = backend.trainer(setup)
    if world:
        trainer = distributed.start(setup, trainer, world)
    writer = folder if not world or world.main else distributed.NullFolder(folder)
    start, config = 0, None
    if cfg.resume:
        state = folder.load_checkpoint(map_location=setup.device)
        check = site_check(mf.path.name, setup.guide_name) if setup.spec.likelihood else nullcontext()
        with model_code(mf.path, "loading the checkpoint"), check:
            start = trainer.load_state_dict(state)
        if start > cfg.steps:
            raise UserError(f"the run in {folder.path} already has {start} steps; give --steps {start} (to redo "
                            f"its final evaluation) or more")
        config = resumed_config(folder, setup, start)
        if start < cfg.steps:
            writer.start_trace(keep_until_step=start)
        writer.write_json("config.json", config)
    else:
        config = new_config(setup, trainer.schedule.batch_size, backend.extra_config(setup))
    evaluate = (distributed.heldout_evaluator(setup, trainer) if world else
                heldout_evaluator(setup, before=lambda: backend.sync(trainer)))
    if start < cfg.steps:
        train_loop(setup, trainer, writer, evaluate, start, config, desc=f"{mf.name}/{setup.guide_name}"
                   + backend.suffix)
    backend.sync(trainer)
    if world:  # rank 0 finishes alone, with the full tables of per-point parameters
        trainer.unshard()
        if not world.main:
            return None, None
        evaluate = heldout_evaluator(setup)
    if setup.guide.fitted is not None:
        with model_code(mf.path, f"forming the fitted {setup.guide_name}"):
            setup.guide = Guide(fn=setup.guide.fitted(setup.dataset.train))
        setup.refitted = True
        evaluate = heldout_evaluator(setup, before=lambda: backend.sync(trainer))
    return finish(setup, folder, config, evaluate, title=setup.title + backend.suffix)


def _open_new(folder, config: dict) -> None:
    """Create the run folder once the first step has succeeded (replacing a run only with --overwrite)."""
    if not getattr(folder, "writes", True):  # a rank other than 0 under torchrun
        return
    if folder.path.exists() and any(folder.path.iterdir()):
        shutil.rmtree(folder.path)  # plan_folder allowed this: a run folder, and --overwrite
    folder.create()
    folder.write_json("config.json", config)
    folder.start_trace()


def train_loop(setup: RunSetup, trainer, folder, evaluate, start: int, config: dict, desc: str) -> None:
    """Steps start+1..steps with a progress bar. Every --eval-every steps: the trace rows and a
    checkpoint go to disk, then the held-out ELBO is computed and added to the trace."""
    from tqdm.auto import tqdm

    cfg = setup.cfg
    eval_every = cfg.eval_every or max(cfg.steps // 10, 1)
    trace = folder.read_trace() if cfg.resume else []
    seconds = float(trace[-1]["seconds"]) if trace else 0.0
    rows, last_ckpt, t, opened = [], (start if cfg.resume else None), start, bool(cfg.resume)
    window: deque[float] = deque(maxlen=WINDOW)
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not cfg.progress, dynamic_ncols=True,
               mininterval=0.25, file=sys.stderr)

    def flush():
        nonlocal rows
        if opened and rows:
            folder.append_trace(rows)
        rows = []

    try:
        for t in range(start + 1, cfg.steps + 1):
            clock = time.perf_counter()
            with model_code(setup.mf.path, f"at step {t}"):
                if t == start + 1 and setup.spec.likelihood:  # an implicit model's guide mirrors nothing
                    with site_check(setup.mf.path.name, setup.guide_name):
                        loss = trainer.step(t)
                else:
                    loss = trainer.step(t)
            # seconds count training only: evaluation and checkpoints are left out, so that guides
            # with a costly held-out evaluation are timed fairly
            seconds += time.perf_counter() - clock
            window.append(-loss)
            rows.append({"step": t, "loss": loss, "seconds": seconds, "test_elbo": "",
                         **(setup.guide.terms() if setup.guide.terms else {})})
            if not opened:
                _open_new(folder, config)
                opened = True
            if t % eval_every == 0 or t == cfg.steps:
                flush()
                folder.save_checkpoint(trainer.state_dict(t))
                last_ckpt = t
                value = evaluate()
                if value is not None:
                    folder.set_test_elbo(t, value)
            if t % 10 == 0 or t == cfg.steps:
                bar.set_postfix(elbo=f"{sum(window) / len(window):.4g}", refresh=False)
            bar.update(1)
    except (TrainingDiverged, UserError) as e:
        flush()
        if not opened:
            raise
        where = (f"the last checkpoint (step {last_ckpt}) is in {folder.checkpoint_path}" if last_ckpt
                 else f"no checkpoint had been written yet; the trace is in {folder.path}")
        fix = "; try a smaller --lr" if isinstance(e, TrainingDiverged) else ""
        raise type(e)(f"{e}; the run stopped at step {t} and {where}{fix}") from e.__cause__
    except KeyboardInterrupt:
        flush()
        bar.close()
        if not opened:
            print("\ninterrupted before the first step finished; nothing was written", file=sys.stderr)
        else:
            print(f"\ninterrupted at step {t}; checkpoint of step {last_ckpt} in {folder.path}; "
                  f"continue with --resume {folder.path}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        bar.close()


def finish(setup: RunSetup, folder, config: dict, evaluate: Callable, title: str):
    """metrics.json (the runner's numbers and the model's own), plots, posterior.nc. The held-out
    ELBO of the final step is read back from the trace (it was computed there); a run interrupted
    during that evaluation gets it computed now. Ctrl-C here keeps every file already written."""
    try:
        return _finish(setup, folder, config, evaluate, title)
    except KeyboardInterrupt:
        print(f"\ninterrupted during the final evaluation; the checkpoint and trace are in {folder.path}; "
              f"finish it with --resume {folder.path}", file=sys.stderr)
        raise SystemExit(130) from None


def _finish(setup: RunSetup, folder, config: dict, evaluate: Callable, title: str):
    from ppl_gen.core.device import seed_everything
    from ppl_gen.core.plotting import elbo_curve
    from ppl_gen.core.train import FittedRun, evaluate_elbo

    cfg, spec, ds, device = setup.cfg, setup.spec, setup.dataset, setup.device
    trace = folder.read_trace()
    last = trace[-1] if trace else {}
    test_elbo = float(last["test_elbo"]) if last.get("test_elbo") not in (None, "") else None
    if setup.refitted:  # the trace scored the guide as trained; the run reports the fitted one
        test_elbo = evaluate()
    elif test_elbo is None and ds.test is not None:
        test_elbo = evaluate()
        if test_elbo is not None and trace:
            folder.set_test_elbo(int(last["step"]), test_elbo)
            trace = folder.read_trace()
    fitted = FittedRun(spec=spec, guide_name=setup.guide_name, dataset=ds, options=setup.options, device=device,
                       config=config, out=folder.path, trace=trace, guide_obj=setup.guide)
    sessions = [0] + [r["from_step"] for r in config.get("resumed", [])]
    per_step, startup = per_step_seconds(trace, sessions)
    seconds = float(last.get("seconds") or 0.0)
    train_elbo = None
    if spec.likelihood:
        with model_code(setup.mf.path, "in the final training-set evaluation"):
            train_elbo = evaluate_elbo(spec.model, setup.guide, ds.train, cfg.elbo, cfg.eval_particles,
                                       seed=cfg.seed, device=device)
    losses = [-float(r["loss"]) for r in trace[-WINDOW:]]
    metrics = {
        "model": setup.mf.name, "guide": setup.guide_name, "elbo": cfg.elbo, "jit": cfg.jit, "steps": cfg.steps,
        "seconds": seconds, "seconds_per_step": per_step, "startup_seconds": startup,
        "n_parameters": sum(p.numel() for _, p in pyro.get_param_store().named_parameters()),
        "device": str(device), "seed": cfg.seed, "backend": cfg.backend,
        "train_elbo": train_elbo, "test_elbo": test_elbo,
        "running_elbo": sum(losses) / len(losses) if losses else None,
        "elbo_units": "nats per data point" if spec.likelihood else "none: an implicit model has no likelihood",
        "eval_particles": cfg.eval_particles,
        "num_particles": cfg.num_particles, "renyi_alpha": cfg.renyi_alpha if cfg.elbo == "renyi" else None,
    }
    devices = [device] if device.type == "cuda" else []
    if spec.evaluate:
        with torch.random.fork_rng(devices=devices), model_code(setup.mf.path, "in evaluate()"):
            seed_everything(cfg.seed)
            metrics.update(spec.evaluate(fitted) or {})
    if cfg.elbo == "renyi":  # the objective's own value, beside the standard ELBO
        metrics["train_bound"] = renyi_bound(setup)
    folder.write_json("metrics.json", metrics)

    if spec.likelihood:  # an implicit model's loss is a game's, not an ELBO: its file plots it itself
        elbo_curve(trace, folder.path / "elbo.png", title=title)
    if spec.plots:
        with torch.random.fork_rng(devices=devices), model_code(setup.mf.path, "in plots()"):
            seed_everything(cfg.seed)
            spec.plots(fitted, folder.path)
    from ppl_gen.core.pictures import model_pictures

    # model.png and guide.png, drawn from the code (pyro.render_model); without graphviz, one note
    pictures = model_pictures(spec, setup.guide, ds, folder.path)
    if isinstance(pictures, str):
        print(f"note: {pictures}", file=sys.stderr)
    from ppl_gen.core.dataset import Rows
    from ppl_gen.core.posterior import diagnose, predictive_scores, save_guide_posterior

    if isinstance(ds.test, Rows) and spec.likelihood:  # covariates: the held-out score is predictive
        with model_code(setup.mf.path, "scoring the held-out rows"):
            metrics.update(predictive_scores(spec.model, setup.guide, ds.test, seed=cfg.seed))

    # does the fit work? PSIS against the model (Yao et al. 2018); any failure is reported, not raised:
    # a diagnostic must not take a finished run down with it
    if cfg.data_on_host:
        metrics["diagnostics_skipped"] = "--data-on-host"
    else:
        try:
            metrics.update(diagnose(spec.model, setup.guide, ds.train, cfg.diagnostic_draws, seed=cfg.seed))
        except Exception as e:  # noqa: BLE001
            metrics["diagnostics_skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    # draws of the latents from the fitted guide, for ArviZ (none: no posterior.nc), and their summary
    with model_code(setup.mf.path, "drawing from the guide for posterior.nc"):
        table = save_guide_posterior(fitted, folder.path / "posterior.nc", num_draws=cfg.diagnostic_draws,
                                     seed=cfg.seed)
    if table is not None:
        metrics["posterior_summary"] = {str(k): {c: float(v) for c, v in row.items()}
                                        for k, row in table.iterrows()}
    folder.write_json("metrics.json", metrics)
    return fitted, metrics


def renyi_bound(setup: RunSetup, repeats: int = 10) -> float:
    """The Renyi bound of the final guide on the training data (nats per point), the mean of
    ``repeats`` K-draw estimates (K = --num-particles: with --renyi-alpha 0, the IWAE bound)."""
    from ppl_gen.core.train import call_args, make_elbo

    cfg, ds = setup.cfg, setup.dataset
    elbo = make_elbo("renyi", num_particles=cfg.num_particles, alpha=cfg.renyi_alpha)
    args, kwargs = call_args(setup.spec.model, ds.train, None, ds.train.shape[0], device=ds.device)
    with torch.random.fork_rng(devices=[ds.device] if ds.device.type == "cuda" else []), torch.no_grad():
        pyro.set_rng_seed(cfg.seed)
        values = [-elbo.loss(setup.spec.model, setup.guide, *args, **kwargs) for _ in range(repeats)]
    return sum(values) / len(values) / ds.train.shape[0]


SUMMARY_SKIP = {"model", "guide", "elbo", "jit", "steps", "seconds", "seconds_per_step", "startup_seconds", "device",
                "seed", "n_parameters", "train_elbo", "test_elbo", "elbo_units", "eval_particles", "running_elbo",
                "backend", "num_particles", "renyi_alpha",
                # the runner's diagnostics have lines of their own
                "psis_khat", "iw_log_evidence", "is_ess", "is_draws", "train_bound"}


def summary(metrics: dict, out: Path) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    per_step = metrics.get("seconds_per_step")
    timing = f"{metrics['seconds']:.1f} s" + (f" ({1e3 * per_step:.2f} ms/step after a {metrics['startup_seconds']:.2f} s "
                                               "first step)" if per_step and metrics.get("startup_seconds") else "")
    lines = [f"{metrics['model']} / guide {metrics['guide']} / elbo {metrics['elbo']} / "
             f"{metrics['steps']} steps in {timing} on {metrics['device']}",
             f"  train ELBO {fmt(metrics['train_elbo'])}   held-out ELBO {fmt(metrics['test_elbo'])}"
             "   (nats per data point)"]
    if metrics.get("psis_verdict"):
        lines.append(f"  PSIS ({metrics['is_draws']} draws): {metrics['psis_verdict']}; importance-weighted "
                     f"log p(x) {fmt(metrics['iw_log_evidence'])} nats per data point, ESS {metrics['is_ess']:.0f}")
    elif metrics.get("diagnostics_skipped"):
        lines.append(f"  PSIS diagnostic skipped: {metrics['diagnostics_skipped']}")
    if metrics.get("train_bound") is not None:
        lines.append(f"  Renyi bound (alpha {metrics.get('renyi_alpha')}, K {metrics.get('num_particles')}) on the "
                     f"training set: {fmt(metrics['train_bound'])}")
    post = metrics.get("posterior_summary") or {}
    if post:
        lines.append("  posterior (guide draws)      mean       sd      q5%     q50%     q95%")
        for name, row in list(post.items())[:10]:
            lines.append(f"    {name:<24}" + "".join(f"{row.get(c, float('nan')):9.3f}"
                                                  for c in ("mean", "sd", "q5%", "q50%", "q95%")))
        if len(post) > 10:
            lines.append(f"    ... {len(post) - 10} more in posterior_summary.csv")
    # the model's own headline numbers: every scalar it reported
    extra = [(k, v) for k, v in metrics.items()
             if k not in SUMMARY_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k, v in extra[:12]:
        lines.append(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    lines.append(f"  run folder: {out}")
    return "\n".join(lines)
