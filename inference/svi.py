"""Fit a model file with stochastic variational inference.

    python -m inference.svi models/vae.py
    python -m inference.svi models/vae.py --data fashion-mnist --device cuda --steps 20000
    python -m inference.svi my_model.py --steps 2000 --lr 0.01
    python -m inference.svi --resume runs/vae-20261121-120000 --steps 4000

The model file says *what* (model, guides, data, options); this runner decides *how*
(ELBO estimator, optimizer, device, steps) and writes the run folder: config.json,
trace.csv, metrics.json, checkpoint.pt and PNG plots. An existing run folder is never
replaced (--overwrite does it on purpose); a run stopped at any point continues with --resume.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from ppl_gen.core.errors import UserError
from ppl_gen.core.pipeline import run, summary  # noqa: F401  (the runner's API, re-exported)
from ppl_gen.core.settings import BY_NAME, DEFAULTS, LOCKED_ON_RESUME, SETTINGS, RunConfig, add_flags, flag

RUNNER_DEFAULTS = DEFAULTS


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, ``error: ...``, exit 2 (the project's convention)."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def _guide_lines(model_file) -> str:
    """The file's guides for --help, the default marked (from a build on the default data)."""
    from ppl_gen.core.pipeline import RunSetup

    try:
        setup = RunSetup.build(RunConfig(model_file=str(model_file.path), threads=1), model_file)
    except Exception:  # help must not fail on a file whose data are not there; the run will say why
        return ""
    from ppl_gen.core.protocol import AUTOGUIDES

    mark = lambda g: f"{g} (default)" if g == setup.spec.default_guide else g  # noqa: E731
    own = ("guides of " + model_file.path.name + ": " + ", ".join(map(mark, setup.spec.guides)) + "\n"
           if setup.spec.guides else f"{model_file.path.name} defines no guide of its own\n")
    return (own + "Pyro's automatic guides, for models with continuous latents (--guide NAME): "
            + ", ".join(map(mark, AUTOGUIDES)))


def parse_args(argv: list[str] | None = None, prog: str = "python -m inference.svi",
               description: str | None = None, extra_flags=None):
    """Parse in two passes: the model file first, so its options and guides show in --help.
    Returns (args, model file, the resumed run's config or {})."""
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.core.rundir import RunFolder

    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = "-h" in argv or "--help" in argv
    pre = _Parser(add_help=False)
    add_flags(pre)
    if extra_flags:
        extra_flags(pre)
    pre.add_argument("words", nargs="*")
    known, _ = pre.parse_known_args(argv)
    # a resumed run names its model file itself: other words are the values of the file's own flags
    words = [w for w in known.words if w.endswith(".py")] or ([] if known.resume else known.words)
    resumed: dict = {}
    if known.resume:
        folder = RunFolder(known.resume)
        # a comparison folder keeps its settings in compare.json, one run's in config.json
        resumed = folder.read_json("compare.json" if (folder.path / "compare.json").is_file() else "config.json")
    path = words[0] if words else resumed.get("settings", {}).get("model_file")
    model_file = None
    if path and not (wants_help and not Path(path).is_file()):
        model_file = load_model_file(path)

    epilog = _guide_lines(model_file) if (model_file and wants_help) else None
    parser = _Parser(prog=prog, description=description or __doc__, epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_file", nargs="?", metavar="MODEL_FILE", help="a model file, e.g. models/vae.py")
    add_flags(parser, model_file.defaults if model_file else None)
    if extra_flags:
        extra_flags(parser)
    if model_file:
        model_file.add_option_flags(parser)
    args = parser.parse_args(argv)
    if model_file is None:
        raise UserError(f"give a model file, e.g. {prog} models/vae.py (or --resume DIR)")
    if args.model_file and resumed and Path(args.model_file).resolve() != Path(resumed["settings"]["model_file"]):
        raise UserError(f"--resume {known.resume} is a run of {resumed['settings']['model_file']}, not of "
                        f"{args.model_file}; drop the model file or resume another run")
    return args, model_file, resumed


def resolve_config(args: argparse.Namespace, model_file, resumed: dict) -> RunConfig:
    """Each setting from: the command line, else the resumed run, else the model file's
    DEFAULTS, else the runner's defaults (``ppl_gen.core.settings``)."""
    cli = {f.name: getattr(args, f.name) for f in SETTINGS if getattr(args, f.name, None) is not None}
    cli_options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    old = resumed.get("settings", {})
    if resumed:
        for key in LOCKED_ON_RESUME:
            if key in cli and cli[key] != old.get(key):
                raise UserError(f"{flag(key)} cannot change on --resume (the run used {old.get(key)!r}); drop the flag")
        changed = {k for k, v in cli_options.items() if v != old.get("options", {}).get(k)}
        if changed:
            raise UserError(f"model options cannot change on --resume ({', '.join(sorted(changed))}); drop them")
    values = dict(DEFAULTS)
    values.update(model_file.defaults)
    values.update({k: v for k, v in old.items() if k in BY_NAME and k not in ("resume", "out", "overwrite")})
    values.update(cli)
    options = dict(old.get("options", {}))
    options.update(cli_options)
    values["out"] = args.resume or values.get("out")
    return RunConfig(model_file=str(model_file.path), options=options, **values)


def report_error(e: UserError, show_traceback: bool) -> None:
    from ppl_gen.core.distributed import prints_errors

    if not prints_errors():  # under torchrun, rank 0 says it once
        return
    if show_traceback:
        traceback.print_exception(e.__cause__ or e)
    print(f"error: {e}", file=sys.stderr)


def wants_traceback(argv) -> bool:
    return "--traceback" in (sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args, model_file, resumed = parse_args(argv)
        cfg = resolve_config(args, model_file, resumed)
        fitted, metrics = run(cfg, model_file)
    except UserError as e:
        report_error(e, wants_traceback(argv))
        return 2
    if fitted is not None:  # None: a rank other than 0 under torchrun
        print(summary(metrics, fitted.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
