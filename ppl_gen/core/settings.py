"""The runner's settings, each stated once: flag, default, help, placeholder, whether a resumed
run may change it, and how a value is checked.

``inference.svi`` and ``inference.compare`` build their flags from :data:`SETTINGS`;
:class:`RunConfig` (what ``config.json`` stores under ``settings``) has one field per setting;
a model file's ``DEFAULTS`` are checked by the same parsers; the flag table in
``docs/model-files.md`` is :func:`markdown_table` (a test keeps the two equal).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ppl_gen.core.errors import UserError

SEED_MAX = 2**32 - 1  # numpy's and torch's generators take seeds in 0..2^32-1
ELBO_NAMES = ("trace", "meanfield", "tracegraph", "enum", "renyi", "tail-adaptive")
DEVICE_NAMES = ("auto", "cpu", "cuda")
BACKEND_NAMES = ("pyro", "numpyro")


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def seed(text) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if isinstance(text, float) and text != value or isinstance(text, str) and not text.strip().lstrip("+").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in 0..{SEED_MAX}")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in 0..{SEED_MAX}, got {text}")
    return value


def choice(names: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text):
        if text not in names and not (names is DEVICE_NAMES and str(text).startswith("cuda:")):
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return text
    parse.__name__ = "choice"
    return parse


def real(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def text(value) -> str:
    return str(value)


def flag_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def setting(default, help: str, *, parse: Callable | None = None, metavar: str | None = None,
            locked: bool = False, shown: str | None = None, switch: bool = False, model_default: bool = True):
    """One runner setting. ``parse`` turns text (or a DEFAULTS value) into the value, raising
    ArgumentTypeError; ``locked``: a resumed run must keep it; ``shown``: how the default reads
    in --help when it is None; ``switch``: an on/off flag; ``model_default``: a model file's
    DEFAULTS may set it."""
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar, "locked": locked,
                                             "shown": shown, "switch": switch, "model_default": model_default})


@dataclass
class RunConfig:
    """Every setting of one run (``config.json``'s ``settings``)."""

    model_file: str = field(default="", metadata={"positional": True})
    guide: str | None = setting(None, "which guide (variational family) to fit", metavar="NAME", locked=True,
                                parse=text, shown="the file's default guide")
    elbo: str = setting("trace", "ELBO estimator: trace = Monte Carlo; meanfield = KL in closed form where "
                        "Pyro knows it; tracegraph = score-function gradient with dependency tracking, for "
                        "discrete latents; enum = discrete latents marked for enumeration summed out exactly; renyi = "
                        "the Renyi bound of order --renyi-alpha over --num-particles draws (alpha 0: IWAE); "
                        "tail-adaptive = the tail-adaptive f-divergence (needs --num-particles >= 2)",
                        parse=choice(ELBO_NAMES), metavar="{" + ",".join(ELBO_NAMES) + "}", locked=True)
    renyi_alpha: float = setting(0.0, "order of the Renyi bound for --elbo renyi (0 with --num-particles K is "
                           "the IWAE bound; 1 would be the ELBO, use --elbo trace)", parse=real, metavar="A",
                           locked=True)
    rank: int | None = setting(None, "rank of AutoLowRankMultivariateNormal's covariance factor", parse=positive(int),
                               metavar="R", locked=True, shown="Pyro's, about the square root of the latent size")
    diagnostic_draws: int = setting(1000, "draws from the fitted guide for the PSIS k-hat, the importance-"
                                    "weighted log p(x) and posterior.nc", parse=positive(int), metavar="S")
    jit: bool = setting(False, "JIT-compile the ELBO (PyTorch tracing)", switch=True, locked=True, parse=flag_bool)
    steps: int = setting(1000, "total optimization steps", parse=positive(int), metavar="N")
    batch_size: int | None = setting(None, "data points per step", parse=positive(int), metavar="N", locked=True,
                                     shown="the whole data set")
    lr: float = setting(1e-3, "Adam learning rate", parse=positive(float), metavar="RATE")
    seed: int = setting(0, f"random seed (0..{SEED_MAX}) for data, initialization, batches and sampling",
                        parse=seed, metavar="N", locked=True)
    device: str = setting("auto", "where to compute: auto picks CUDA when present", parse=choice(DEVICE_NAMES),
                          metavar="{" + ",".join(DEVICE_NAMES) + "}")
    data: str | None = setting(None, "data set name or path, as the model file understands it", parse=text,
                               metavar="SPEC", locked=True, shown="the file's own data")
    out: str | None = setting(None, "run folder (refused if it holds a run, unless --overwrite or --resume)",
                              parse=text, metavar="DIR", shown="runs/<model>-<timestamp>/", model_default=False)
    eval_every: int | None = setting(None, "held-out ELBO and checkpoint every N steps", parse=positive(int),
                                     metavar="N", shown="steps/10")
    resume: str | None = setting(None, "continue the run in DIR up to --steps (same settings); on a finished "
                                 "run, redo its final evaluation and plots", parse=text, metavar="DIR",
                                 model_default=False, shown="a new run")
    overwrite: bool = setting(False, "replace the run already in --out", switch=True, model_default=False,
                              parse=flag_bool)
    backend: str = setting("pyro", "inference engine", parse=choice(BACKEND_NAMES), metavar="{" + ",".join(BACKEND_NAMES) + "}",
                           locked=True)
    num_particles: int = setting(1, "ELBO samples per training step", parse=positive(int), metavar="K", locked=True)
    eval_particles: int = setting(10, "ELBO samples per data point for the reported ELBOs", parse=positive(int),
                                  metavar="K")
    validate: bool = setting(False, "keep Pyro's distribution checks on after the first step (slower)",
                             switch=True, parse=flag_bool)
    threads: int | None = setting(None, "CPU threads for torch; one is fastest for small models and never "
                                  "slows a run on a machine shared with other jobs", parse=positive(int),
                                  metavar="N", shown="1 on the CPU, torch's choice with a GPU")
    data_on_host: bool = setting(False, "keep the data in host memory and copy each minibatch (and evaluation "
                                 "chunk) to --device, for data larger than GPU memory; needs --batch-size and a "
                                 "model file that supports it (models/lda.py)", switch=True, parse=flag_bool)
    progress: bool = setting(True, "no progress bar", switch=True, model_default=False,
                             parse=flag_bool)
    traceback: bool = setting(False, "on an error, show the whole traceback, not one line", switch=True,
                              model_default=False, parse=flag_bool)
    options: dict[str, Any] = field(default_factory=dict, metadata={"options": True})


SETTINGS: list[dataclasses.Field] = [f for f in dataclasses.fields(RunConfig) if "help" in f.metadata]
BY_NAME = {f.name: f for f in SETTINGS}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in SETTINGS}
LOCKED_ON_RESUME = tuple(["model_file"] + [f.name for f in SETTINGS if f.metadata["locked"]])
# run-local settings: where and how this invocation runs, not what it computes
NOT_SAVED = ("resume", "overwrite", "progress", "traceback")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_text(f: dataclasses.Field, model_defaults: dict | None = None) -> str:
    model_defaults = model_defaults or {}
    if f.name in model_defaults:
        return f"{model_defaults[f.name]}, from the model file's DEFAULTS"
    if f.name == "progress":
        return "a bar is shown"
    if f.metadata["switch"]:
        return "on" if f.default else "off"
    return f.metadata["shown"] if f.default is None else str(f.default)


def add_flags(parser: argparse.ArgumentParser, model_defaults: dict | None = None, title: str = "inference (how)"):
    """Every setting as a flag; ``model_defaults`` (a model file's DEFAULTS) shows in the help."""
    g = parser.add_argument_group(title)
    for f in SETTINGS:
        helptext = f"{f.metadata['help']} (default: {default_text(f, model_defaults)})".replace("%", "%%")
        if f.name == "progress":
            g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help=helptext)
        elif f.metadata["switch"]:
            g.add_argument(flag(f.name), dest=f.name, action="store_true", default=None, help=helptext)
        else:
            g.add_argument(flag(f.name), dest=f.name, type=f.metadata["parse"], default=None,
                           metavar=f.metadata["metavar"], help=helptext)


def check_model_defaults(defaults: Any, file_name: str) -> dict:
    """A model file's DEFAULTS, checked by the flags' own parsers: one error line naming the key."""
    if not isinstance(defaults, dict):
        raise UserError(f"{file_name}: DEFAULTS must be a dict such as {{'steps': 2000, 'lr': 0.01}}, "
                        f"got {type(defaults).__name__}")
    known = [f.name for f in SETTINGS if f.metadata["model_default"]]
    out = {}
    for key, value in defaults.items():
        if key not in known:
            raise UserError(f"{file_name}: DEFAULTS has {key!r}, which is not a runner setting; "
                            f"use one of {', '.join(known)}")
        f = BY_NAME[key]
        if value is None:
            out[key] = None
            continue
        try:
            out[key] = f.metadata["parse"](value)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{file_name}: DEFAULTS[{key!r}] = {value!r}: {e}; fix the value") from None
    return out


def markdown_table() -> str:
    """The flag table of docs/model-files.md."""
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for f in SETTINGS:
        name = "--no-progress" if f.name == "progress" else flag(f.name)
        arg = "" if f.metadata["switch"] else f" {f.metadata['metavar']}"
        rows.append(f"| `{name}{arg}` | {default_text(f)} | {f.metadata['help']} |")
    return "\n".join(rows)
