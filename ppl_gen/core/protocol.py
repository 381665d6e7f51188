"""The model-file protocol: how ``inference/`` reads a model file.

A model file is a plain Python file. The minimal one defines

* ``model(x)``: a Pyro model, and optionally ``guide(x)``, its variational guide (without one,
  Pyro's automatic guides fit it: ``--guide AutoNormal``, the default, and the others in
  :data:`AUTOGUIDES`);
* ``data()``: the observations, as a tensor or a ``(train, test)`` pair.

A richer file may add, all optional:

* ``guides = {"name": fn, ...}``: several named guides (``--guide NAME``);
* ``Options``: a dataclass whose fields become flags (``latent_dim`` -> ``--latent-dim``),
  with the help text in ``field(metadata={"help": ...})``;
* ``data(spec=None, options=None)``: resolves ``--data SPEC``; may return a ``ppl_gen.Dataset``;
* ``build(options, dataset[, elbo]) -> ppl_gen.Spec``: for models whose networks depend
  on the options or the data; the Spec carries model, guides, evaluation and plots
  (``elbo``, the ``--elbo`` name, is passed when build accepts it);
* ``DEFAULTS = {"steps": ..., "lr": ..., "batch_size": ...}``: runner defaults for this model;
* ``exact_posterior(n[, dataset])``: n independent draws of each latent from the exact posterior,
  ``{site: tensor [n, *shape]}``, or ``REFERENCE_POSTERIOR = "references/NAME.nc"``: NUTS draws
  shipped beside the file (``python -m inference.reference FILE`` makes them); either is the
  reference ``inference.compare`` measures every scheme's error against.

``data()`` may return None: nothing is observed, and ``model()`` takes no arguments (a target
density over the latents alone, such as Neal's funnel).

Minibatching: a model and guide that take ``(x, idx=None, size=None)`` are trained on
minibatches: ``x`` holds the batch rows, ``idx`` their row numbers in the full set and
``size`` the number of rows of the full set; ``ppl_gen.data_plate(x, idx, size)`` opens
the matching ``pyro.plate`` so Pyro scales the likelihood by ``size / len(idx)``.
Functions that take only ``x`` always get the whole data set.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pyro
import torch

from ppl_gen.core.dataset import Dataset, as_dataset
from ppl_gen.core.errors import UserError


@dataclass(frozen=True)
class Metric:
    """One number a model file reports, as compare's table, JSON and plots show it.

    ``key`` is the name in ``metrics.json`` (what ``evaluate`` returns); ``header`` the column
    title; ``fmt`` a ``str.format`` pattern; ``higher_is_better`` says which way is good (None:
    neither, e.g. a count); ``bar``: whether compare draws it in its held-out bar chart."""

    key: str
    header: str
    fmt: str = "{:.3f}"
    higher_is_better: bool | None = None
    bar: bool = False


@dataclass
class Guide:
    """A guide and what the runner must know to fit and score it, carried by the guide itself
    (the way Pyro's autoguides own their parameters), so nothing keys on its name.

    ``local_params``: its per-data-point parameters (one row per training example): a minibatch
    step updates only its own rows, at rate ``local_lr`` (default ``--lr``). ``update(x, idx,
    size, t) -> -ELBO``: the guide is fitted by closed-form updates of its parameters in Pyro's
    store (coordinate ascent, CAVI) instead of gradient steps. ``heldout(x) -> guide``: the guide
    to score new data ``x`` with, for a guide that cannot be applied to data it was not fitted on
    (an explicit guide fits fresh local parameters there). ``loss(x, idx, size) -> -ELBO``: the
    one-particle ELBO ``loss_elbo`` (an ``--elbo`` name) of (model, fn) written out instead of
    traced, the same value and gradients for the same draws; the training step uses it after its
    first, traced step (which checks the model and guide) whenever the run's estimator is that one.
    ``terms() -> {name: value}``: the last step's ELBO terms per data point (a VAE's reconstruction
    and KL), columns ``trace_terms`` of trace.csv; empty where the last step did not compute them."""

    fn: Callable
    local_params: tuple[str, ...] = ()
    local_lr: float | None = None
    update: Callable | None = None
    heldout: Callable[[torch.Tensor], Callable] | None = None
    # after training, the guide to evaluate: (x) -> guide (the Laplace approximation at the MAP)
    fitted: Callable[[torch.Tensor], Callable] | None = None
    loss: Callable | None = None
    loss_elbo: str = "enum"
    terms: Callable[[], dict[str, float]] | None = None
    trace_terms: tuple[str, ...] = ()

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


DENSITIES = ("exact", "bound", "implicit")


@dataclass
class Spec:
    """Everything the runner needs from a model file, once built.

    ``evaluate(run) -> dict`` adds model-specific metrics; ``plots(run, out_dir)``
    writes model-specific PNGs. ``run`` is the :class:`~ppl_gen.core.train.FittedRun`.

    ``guides`` maps names to guide functions or :class:`Guide` objects; a guide with
    per-data-point parameters, a held-out form or closed-form updates says so itself (Guide).
    ``param_lr[name] = rate`` gives a global parameter its own Adam rate (e.g. topics that
    must travel far in log space next to a network that needs a small rate).
    ``posterior_dims[site] = ("dim", ...)`` (or ``{"dim": labels, ...}``) names the dimensions
    of a global latent in ``posterior.nc``; by default they come from the model's plates.
    """

    model: Callable
    guides: dict[str, Callable | Guide]
    default_guide: str | None = None
    evaluate: Callable[[Any], dict] | None = None
    plots: Callable[[Any, Path], list] | None = None
    description: str = ""
    # global parameters that take their own Adam rate instead of --lr, by name
    param_lr: dict[str, float] = field(default_factory=dict)
    # torch modules whose buffers (BatchNorm running statistics) checkpoints must keep
    buffers: dict[str, torch.nn.Module] = field(default_factory=dict)
    # the model's own evaluate/plots/heldout_guide accept data in host memory and copy chunks
    # to dataset.device themselves (--data-on-host)
    streams: bool = False
    # names (or {name: labels}) for the dimensions of global latents in posterior.nc,
    # where the plates' names are not the ones wanted (see ppl_gen.core.posterior)
    posterior_dims: dict[str, Any] = field(default_factory=dict)
    # the model's own numbers (keys of what evaluate returns), for compare's table and plots
    metrics: tuple[Metric, ...] = ()
    # extra paragraphs for compare's report: report(rows) -> list of markdown lines
    report: Callable[[list[dict]], list[str]] | None = None
    # False for an implicit model (a GAN's x = G(z)): no density is written down, so the runner
    # reports no ELBO and no log-likelihood for it
    likelihood: bool = True
    # the lecture's taxonomy of generative models: "exact" (a tractable density: PixelCNN), "bound"
    # (a variational bound on it: VAE, VQ-VAE, diffusion) or "implicit" (samples only: a GAN);
    # by default "bound" for a model with a likelihood, else "implicit"
    density: str = ""
    # keys of evaluate()'s metrics holding the held-out log density (or its bound) in nats per data
    # point, the first present wins; the runner's held-out ELBO ("test_elbo") by default
    heldout_log_density: tuple[str, ...] = ("test_elbo",)
    # sample(n) -> n draws x ~ p_theta(x) from the fitted model, flat (n, D), in the data's own form
    # (binary pixels for binarized images): what inference.compare's families table scores and shows
    sample: Callable[[int], torch.Tensor] | None = None
    # the posterior every scheme is measured against (inference.compare, ppl_gen.bench zoo), when the
    # model file knows it: exact_posterior(n) -> {latent site: n independent exact draws, [n, *shape]}
    # (a conjugate model's closed form); or reference_posterior, the path of an ArviZ netcdf of
    # NUTS draws on the file's default data, made by ``python -m inference.reference FILE``
    exact_posterior: Callable[[int], dict] | None = None
    reference_posterior: str | Path | None = None

    # Pyro's automatic guides set up for this run (by ppl_gen.core.pipeline), by class name
    auto: dict[str, "Guide"] = field(default_factory=dict)

    def __post_init__(self):
        if not self.density:
            self.density = "bound" if self.likelihood else "implicit"
        if self.density not in DENSITIES:
            raise UserError(f"Spec(density={self.density!r}): choose one of {', '.join(DENSITIES)}")
        if self.default_guide is None:
            # a file with no guide of its own is fitted by the mean-field Gaussian (ADVI)
            self.default_guide = next(iter(self.guides)) if self.guides else "AutoNormal"

    def guide(self, name: str | None) -> Callable:
        name = name or self.default_guide
        if name in self.guides:
            return self.guides[name]
        if name in self.auto:
            return self.auto[name]
        own = f"this model file has: {', '.join(self.guides)}; " if self.guides else ""
        raise UserError(f"unknown guide {name!r}; {own}Pyro's automatic guides: {', '.join(AUTOGUIDES)}")

    def resolve(self, name: str | None) -> Guide:
        """Guide ``name`` as a :class:`Guide` (a plain function is a Guide with no extras)."""
        g = self.guide(name)
        return g if isinstance(g, Guide) else Guide(fn=g)


# Pyro's automatic guides (Pyro's pyro.infer.autoguide), available to every model file whose latent
# variables are continuous, by class name:
#   AutoNormal                     mean-field Gaussian in the unconstrained space: ADVI (Kucukelbir,
#                                  Tran, Ranganath, Gelman & Blei 2017, "Automatic differentiation
#                                  variational inference", JMLR 18)
#   AutoMultivariateNormal         full-covariance Gaussian (ADVI's full-rank form)
#   AutoLowRankMultivariateNormal  diagonal plus rank-R covariance (--rank R)
#   AutoIAFNormal                  a normalizing flow: inverse autoregressive (Kingma et al. 2016)
#   AutoDelta                      a point mass: MAP estimation
#   AutoLaplaceApproximation       MAP, then a Gaussian with the inverse Hessian of -log p at the MAP
AUTOGUIDES = ("AutoNormal", "AutoMultivariateNormal", "AutoLowRankMultivariateNormal", "AutoIAFNormal",
              "AutoDelta", "AutoLaplaceApproximation")


def autoguide(name: str, model: Callable, x: torch.Tensor, file_name: str, rank: int | None = None,
              batched: bool = False) -> Guide:
    """Pyro's automatic guide ``name`` for ``model`` on data ``x``, after refusing, in one line,
    what it cannot fit: discrete latents (an autoguide is a density over continuous values),
    a model with no latents, and minibatches of a model with per-data-point latents."""
    import pyro.infer.autoguide as ag
    import pyro.poutine as poutine
    from pyro.poutine.util import site_is_subsample

    from ppl_gen.core.dataset import whole

    args, kwargs = whole(x)
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    latent = {k: s for k, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
              and not site_is_subsample(s)}
    discrete = [k for k, s in latent.items() if s["fn"].support.is_discrete or s["infer"].get("enumerate")]
    if discrete:
        raise UserError(f"{file_name}: the latent site(s) {', '.join(discrete[:4])} are discrete, and Pyro's automatic "
                        f"guide {name} is a density over continuous values; sum them out (mark them "
                        "infer={'enumerate': 'parallel'} and use --elbo enum with a guide of the rest), or write a "
                        "guide(x) of your own")
    if not latent:
        raise UserError(f"{file_name}: the model has no latent variables, so there is nothing for {name} to fit; "
                        "its likelihood needs no guide (write guide(x) as an empty function)")
    observed_plates = {f.name for s in tr.nodes.values() if s["type"] == "sample" and s["is_observed"]
                       for f in s["cond_indep_stack"]}
    local = [k for k, s in latent.items() if any(f.name in observed_plates for f in s["cond_indep_stack"])]
    if batched and local:
        raise UserError(f"{file_name}: {name} fits one value per data point of {', '.join(local[:3])} and cannot "
                        "follow a minibatch; drop --batch-size, or write a guide that takes (x, idx, size)")
    cls = getattr(ag, name)
    if name == "AutoLowRankMultivariateNormal" and rank is not None:
        fn = cls(model, rank=rank)
    elif name == "AutoIAFNormal":
        size = sum(s["value"].numel() for s in latent.values())
        if size < 2:  # Pyro's autoregressive network needs at least two inputs to be autoregressive over
            raise UserError(f"{file_name}: AutoIAFNormal needs at least two latent numbers, the model has {size}; "
                            "use AutoNormal (exact for one Gaussian number) or AutoLaplaceApproximation")
        fn = cls(model)
    else:
        fn = cls(model)
    # its call passes every argument on to the model: minibatches where the model takes them and
    # every latent is global (a per-point latent's value table would not follow the batch)
    fn.minibatches = takes_minibatches(model) and not local
    if name == "AutoLaplaceApproximation":
        from ppl_gen.core.dataset import whole

        return Guide(fn=fn, fitted=lambda data: fn.laplace_approximation(*whole(data)[0], **whole(data)[1]))
    return Guide(fn=fn)


@dataclass
class ModelFile:
    """A loaded model file: its module, name and option dataclass."""

    path: Path
    module: ModuleType
    name: str
    options_cls: type | None = None
    defaults: dict = field(default_factory=dict)

    # -- options -------------------------------------------------------------
    def option_fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.options_cls)) if self.options_cls else []

    def add_option_flags(self, parser: argparse.ArgumentParser) -> None:
        """Each field of ``Options`` becomes a real flag, shown in ``--help``."""
        if not self.options_cls:
            return
        group = parser.add_argument_group(f"options of {self.path.name}")
        for f in self.option_fields():
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            helptext = f.metadata.get("help", "") + f" (default: {default})"
            kind = f.type if isinstance(f.type, type) else type(default)
            choices = f.metadata.get("choices")
            metavar = ("{" + ",".join(map(str, choices)) + "}" if choices else
                       {int: "N", float: "X"}.get(kind, "TEXT"))
            if kind is bool:
                group.add_argument(flag, dest=f"opt_{f.name}", action=argparse.BooleanOptionalAction,
                                   default=None, help=helptext)
            else:
                group.add_argument(flag, dest=f"opt_{f.name}", type=kind, default=None, metavar=metavar,
                                   choices=choices, help=helptext)

    def options(self, values: dict[str, Any] | None = None):
        """Build the ``Options`` instance from flag values (None = default)."""
        if not self.options_cls:
            return None
        given = {k: v for k, v in (values or {}).items() if v is not None}
        unknown = set(given) - {f.name for f in self.option_fields()}
        if unknown:
            raise UserError(f"{self.path.name} has no option {', '.join(sorted(unknown))}")
        opts = self.options_cls(**given)
        check = getattr(opts, "validate", None)
        if check:
            check()
        return opts

    # -- data and spec ---------------------------------------------------------
    def data(self, spec: str | None, options) -> Dataset:
        fn = getattr(self.module, "data", None)
        if fn is None:
            raise UserError(f"{self.path} defines no data(); add a function that returns (train, test)")
        kwargs = _accepted(fn, spec=spec, options=options)
        if spec is not None and "spec" not in kwargs:
            raise UserError(f"{self.path.name}'s data() takes no spec, so --data cannot be used with it")
        return as_dataset(fn(**kwargs))

    def build(self, options, dataset: Dataset, elbo: str | None = None) -> Spec:
        mod = self.module
        if hasattr(mod, "build"):
            spec = mod.build(**_accepted(mod.build, options=options, dataset=dataset, elbo=elbo))
            if not isinstance(spec, Spec):
                raise UserError(f"{self.path.name}: build() must return a ppl_gen.Spec")
            return spec
        guides = dict(getattr(mod, "guides", None) or {})
        if not guides and callable(getattr(mod, "guide", None)):
            guides = {"guide": mod.guide}
        exact = getattr(mod, "exact_posterior", None)
        if exact is not None:
            extra = _accepted(exact, dataset=dataset, options=options)
            exact = functools.partial(exact, **extra)
        shipped = getattr(mod, "REFERENCE_POSTERIOR", None)
        return Spec(model=mod.model, guides=guides,
                    evaluate=getattr(mod, "evaluate", None), plots=getattr(mod, "plots", None),
                    description=(mod.__doc__ or "").strip().split("\n")[0], exact_posterior=exact,
                    reference_posterior=None if shipped is None else self.path.parent / shipped)


def _accepted(fn: Callable, **kwargs) -> dict:
    """The subset of kwargs that fn's signature accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def takes_minibatches(fn: Callable) -> bool:
    """A model or guide that accepts ``idx`` can be trained on minibatches (an automatic guide
    says so itself: it takes what its model takes)."""
    fn = fn.fn if isinstance(fn, Guide) else fn
    declared = getattr(fn, "minibatches", None)
    if isinstance(declared, bool):
        return declared
    try:
        return "idx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_model_file(path: str | Path) -> ModelFile:
    """Import a model file by path; errors name the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; give the path of a .py file "
                        "such as models/vae.py")
    if path.suffix != ".py":
        raise UserError(f"model file {path} is not a .py file")
    name = path.stem
    mod_name = f"ppl_gen_modelfile_{name}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses look their module up here
    from ppl_gen.core.guard import model_code
    from ppl_gen.core.settings import check_model_defaults

    try:
        with model_code(path, "while importing it"):
            spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except ImportError as e:
        raise UserError(f"{path} failed to import {e.name or e}: install it or fix the import") from None
    if not callable(getattr(module, "model", None)) and not hasattr(module, "build"):
        raise UserError(f"{path} defines no model(); a model file needs model and data() (a guide is optional)")
    options_cls = getattr(module, "Options", None)
    if options_cls is not None and not dataclasses.is_dataclass(options_cls):
        raise UserError(f"{path}: Options must be a dataclass")
    return ModelFile(path=path.resolve(), module=module, name=name, options_cls=options_cls,
                     defaults=check_model_defaults(getattr(module, "DEFAULTS", None) or {}, path.name))


def data_plate(x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None,
               name: str = "data", dim: int | None = None) -> pyro.plate:
    """The plate over data points, minibatch-aware.

    With ``idx`` (the batch's row numbers) and ``size`` (rows in the full set), Pyro
    scales each log-density in the plate by ``size / len(idx)``: an unbiased estimate
    of the full-data ELBO from a minibatch (Hoffman et al. 2013, stochastic VI).
    """
    if idx is None:
        return pyro.plate(name, x.shape[0], dim=dim)
    return pyro.plate(name, size if size is not None else x.shape[0], subsample=idx, dim=dim)
