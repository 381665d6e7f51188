"""``--backend numpyro``: fit a model file's NumPyro twin with NumPyro's SVI (JIT-compiled).

NumPyro (Phan, Pradhan & Jankowiak 2019, arXiv:1912.11554) traces model and guide with
JAX, so one SVI step (ELBO estimate, its gradient and the Adam update) is a single
XLA-compiled function: ``jax.jit(svi.update)``
(https://num.pyro.ai/en/stable/svi.html).

What is shared with the Pyro path, so that differences are the inference engine's alone:

* data: the model file's ``data()`` runs once (torch tensors), converted to JAX arrays;
* the batch schedule: ``ppl_gen.core.train.BatchSchedule`` draws the same rows at step t;
* the starting point: the Pyro spec is built under the same seed and its parameters are
  created as the Pyro runner would create them; NumPyro starts from those values;
* the optimizer: Adam with torch's defaults (betas 0.9/0.999, eps 1e-8) in the same
  unconstrained space (exp for positive parameters), row-wise for per-data-point parameters
  like ``ppl_gen.core.optim.RowwiseAdam``;
* evaluation: at every evaluation the fitted values are copied back into Pyro's parameter
  store (and so into the model file's torch networks), and the held-out ELBO, the
  train ELBO, the model's own ``evaluate`` and ``plots`` run on the Pyro side: one code path
  for the numbers of both backends;
* the run folder: the same files, the same ``metrics.json`` keys; ``checkpoint.pt`` holds
  torch tensors converted from the JAX arrays (loads with ``weights_only=True``);
* Pyro's automatic guides: NumPyro's class of the same name on the twin's model, its values
  carried exactly into Pyro's guide of that class (``NUMPYRO_AUTOGUIDES``), which evaluates.

numpyro and jax are imported here only, inside functions: without them ``--backend numpyro``
is one ``error:`` line naming the extra to install.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ppl_gen.core.errors import TrainingDiverged, UserError
from ppl_gen.core.train import call_args  # the same batch-argument convention as the Pyro path

MISSING = '--backend numpyro needs the numpyro extra: pip install -e ".[numpyro]"'


def require_numpyro():
    """Import jax and numpyro, or stop with the one-line message naming the extra."""
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except ImportError:
        raise UserError(MISSING) from None
    return numpyro


def elbo_class(name: str):
    """The NumPyro estimator behind each ``--elbo`` name (the same estimators as Pyro's)."""
    import numpyro.infer as ni

    table = {"trace": ni.Trace_ELBO, "meanfield": ni.TraceMeanField_ELBO, "tracegraph": ni.TraceGraph_ELBO}
    if name not in table:
        raise UserError(f"--elbo {name} has no NumPyro counterpart here (TraceEnum_ELBO needs funsor); "
                        f"with --backend numpyro choose one of {', '.join(table)}")
    return table[name]


def twin_elbo(twin, name: str) -> str:
    """The NumPyro estimator for ``--elbo name`` with this twin: ``enum`` is the twin's
    ``enum_as`` where it has nothing to enumerate (``NumpyroTwin.enum_as``); a name without
    a NumPyro counterpart is one error line."""
    if name == "enum" and twin.enum_as:
        name = twin.enum_as
    elbo_class(name)
    return name


# ---------------------------------------------------------------- the twin
def load_twin(mf, options, dataset):
    """Call the model file's ``numpyro_twin(options, dataset)``; clear errors when it has none."""
    from ppl_gen.backends.numpyro_twin import NumpyroTwin
    from ppl_gen.core.protocol import _accepted

    fn = getattr(mf.module, "numpyro_twin", None)
    if fn is None:
        raise UserError(f"{mf.path.name} declares no NumPyro twin (def numpyro_twin(options, dataset)); "
                        "use --backend pyro")
    twin = fn(**_accepted(fn, options=options, dataset=dataset))
    if not isinstance(twin, NumpyroTwin):
        raise UserError(f"{mf.path.name}: numpyro_twin() must return a ppl_gen.backends.numpyro_twin.NumpyroTwin")
    import jax

    # float64 exactly when the twin asks for it: x64 is process-wide in JAX, and a float32 twin
    # run after a float64 one would otherwise mix dtypes (NumPyro's lower-Cholesky transform
    # then fails on float32 parameters)
    jax.config.update("jax_enable_x64", bool(twin.x64))
    return twin


CLOSED_FORM = "fitted by closed-form updates, which run on Pyro only"


# ---------------------------------------------------------------- Pyro's automatic guides on NumPyro
def _same(params: dict) -> dict:
    return params


def _mvn_to_pyro(params: dict) -> dict:
    """NumPyro's ``auto_scale_tril`` L (the covariance's lower Cholesky factor) -> Pyro 1.9's
    factors of the same L: ``L = scale[:, None] * scale_tril``, ``scale`` positive and
    ``scale_tril`` unit lower triangular, so ``scale = diag L`` and ``scale_tril`` is L with
    row i divided by L_ii."""
    import numpy as np

    out = dict(params)
    L = np.asarray(out.pop("auto_scale_tril"))
    scale = np.diagonal(L, axis1=-2, axis2=-1)
    out["AutoMultivariateNormal.scale"] = scale
    out["AutoMultivariateNormal.scale_tril"] = L / scale[..., None]
    return out


def _mvn_from_pyro(params: dict) -> dict:
    """The inverse of :func:`_mvn_to_pyro`: ``L = scale[:, None] * scale_tril``."""
    import numpy as np

    out = dict(params)
    scale = np.asarray(out.pop("AutoMultivariateNormal.scale"))
    out["auto_scale_tril"] = scale[..., None] * np.asarray(out.pop("AutoMultivariateNormal.scale_tril"))
    return out


@dataclass(frozen=True)
class Carried:
    """How NumPyro's automatic guide of one class stands for Pyro's class of the same name.

    ``names``: NumPyro's parameter name -> the Pyro store's, as templates over a latent site's
    name (``"{site}_auto_loc" -> "AutoNormal.locs.{site}"``); such a pair holds the same numbers
    in the same spaces in both libraries. A NumPyro parameter no template names keeps its own
    name: it holds Pyro's numbers in another parameterization, and ``to_pyro`` / ``from_pyro``
    convert the constrained values (Pyro's names <-> NumPyro's) exactly.
    ``flat``: the guide is a density over one vector of all latents' unconstrained values
    (Pyro's and NumPyro's ``AutoContinuous``), which both libraries must lay out alike
    (:meth:`NumpyroAutoguide.check_layout`)."""

    names: dict[str, str]
    to_pyro: Callable[[dict], dict] = _same
    from_pyro: Callable[[dict], dict] = _same
    flat: bool = False


# Pyro's automatic guides that NumPyro has a class of the same name for (Pyro 1.9's
# pyro.infer.autoguide, NumPyro's numpyro.infer.autoguide). Per class, what each parameter is:
#   AutoNormal, AutoDelta: one loc (and scale) per site, the same in both (a point mass's loc in the
#     site's support, AutoNormal's loc unconstrained and its scale softplus-positive).
#   AutoLowRankMultivariateNormal: z ~ N(loc, (scale * W)(scale * W)^T + diag(scale^2)) in both, with
#     W = cov_factor (D x rank) and scale softplus-positive: the same three parameters.
#   AutoLaplaceApproximation: the MAP's loc in both; the Gaussian at it is formed afterwards, on the
#     Pyro side (Pyro's laplace_approximation, the inverse Hessian of -log p(x, z) at loc).
#   AutoMultivariateNormal: z ~ N(loc, L L^T). NumPyro keeps L (scaled unit lower Cholesky), Pyro 1.9
#     keeps scale and scale_tril with L = scale[:, None] * scale_tril: converted by _mvn_to_pyro. Both
#     optimize the same unconstrained numbers (the strictly lower entries of scale_tril and
#     softplus^-1(scale): NumPyro's ScaledUnitLowerCholeskyTransform), so Adam walks the same path.
NUMPYRO_AUTOGUIDES = {
    "AutoNormal": Carried({"{site}_auto_loc": "AutoNormal.locs.{site}",
                           "{site}_auto_scale": "AutoNormal.scales.{site}"}),
    "AutoDelta": Carried({"{site}_auto_loc": "AutoDelta.{site}"}),
    "AutoMultivariateNormal": Carried({"auto_loc": "AutoMultivariateNormal.loc"},
                                      to_pyro=_mvn_to_pyro, from_pyro=_mvn_from_pyro, flat=True),
    "AutoLowRankMultivariateNormal": Carried({"auto_loc": "AutoLowRankMultivariateNormal.loc",
                                              "auto_cov_factor": "AutoLowRankMultivariateNormal.cov_factor",
                                              "auto_scale": "AutoLowRankMultivariateNormal.scale"}, flat=True),
    "AutoLaplaceApproximation": Carried({"auto_loc": "AutoLaplaceApproximation.loc"}, flat=True),
}

# Pyro's automatic guides that stay on Pyro, and why (one line each)
NOT_CARRIED = {
    "AutoIAFNormal": "Pyro's AutoIAFNormal orders its autoregressive network's inputs by a random permutation "
                     "(torch.randperm) where NumPyro's fixes the identity order, and their default flows differ "
                     "(Pyro: one flow, one ReLU layer of 3D+1 units; NumPyro: three flows, two ELU layers of D "
                     "units), so Pyro's flow has no exact NumPyro counterpart",
}


def autoguide_refusal(name: str) -> str | None:
    """Why Pyro's automatic guide ``name`` cannot run as NumPyro's, or None when it can."""
    if name in NUMPYRO_AUTOGUIDES:
        return None
    reason = NOT_CARRIED.get(name, f"NumPyro has no {name} that reads Pyro's parameters")
    return f"{reason}; {', '.join(NUMPYRO_AUTOGUIDES)} are carried over"


class NumpyroAutoguide:
    """NumPyro's automatic guide ``name`` (``rank``: AutoLowRankMultivariateNormal's, as Pyro's
    ``--rank``; None is round(sqrt(D)) in both) on the twin's model, its parameters named as
    Pyro's class of the same name names them in Pyro's store (:class:`Carried`).

    ``to_pyro`` / ``from_pyro`` carry constrained values between NumPyro's parameters and Pyro's
    store; parameters of the model itself pass unchanged."""

    def __init__(self, name: str, twin_model: Callable, rank: int | None = None):
        import re

        import numpyro.infer.autoguide as autoguides
        from numpyro.primitives import Messenger

        self.name, self.carried = name, NUMPYRO_AUTOGUIDES[name]
        kwargs = {"rank": rank} if name == "AutoLowRankMultivariateNormal" else {}
        self.auto = getattr(autoguides, name)(twin_model, **kwargs)
        patterns = [(re.compile(re.escape(a).replace(re.escape("{site}"), "(?P<site>.+)") + "$"), b)
                    for a, b in self.carried.names.items()]

        class PyroNames(Messenger):
            def process_message(self, msg):
                if msg["type"] == "param":
                    for pattern, target in patterns:
                        found = pattern.match(msg["name"])
                        if found:
                            msg["name"] = target.format(**found.groupdict())
                            break

        self._names = PyroNames

    def __call__(self, *args, **kwargs):
        with self._names():
            return self.auto(*args, **kwargs)

    def to_pyro(self, params: dict) -> dict:
        return self.carried.to_pyro(params)

    def from_pyro(self, params: dict) -> dict:
        return self.carried.from_pyro(params)

    def check_layout(self, pyro_guide, *args, **kwargs) -> None:
        """Both libraries' ``AutoContinuous`` read one vector u of the latents' unconstrained
        values, site by site in the model's order, each through biject_to(its support) (Pyro:
        ``AutoContinuous._unpack_latent``; NumPyro: ``_unpack_latent`` over ``_init_locs``). A
        loc or covariance carries over exactly only where both read the same u as the same
        latent values: checked here on a probe u (distinct entries, so a swapped order shows),
        against Pyro's guide once its parameters exist. A site whose support maps differently
        in the two (Pyro's lower-Cholesky latent is a D x D matrix, NumPyro's a D(D+1)/2
        vector) is one error line."""
        if not self.carried.flat:
            return
        import jax
        import numpy as np
        import torch
        from numpyro import handlers
        from numpyro.distributions.transforms import biject_to as jax_biject_to
        from torch.distributions import biject_to

        if self.auto.prototype_trace is None:  # NumPyro sets its layout up on the first call
            handlers.trace(handlers.seed(self, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
        refuse = f"--backend numpyro cannot carry Pyro's {self.name} over to NumPyro's: {{}}; use --backend pyro"
        if self.auto.latent_dim != pyro_guide.latent_dim:
            raise UserError(refuse.format(f"Pyro's latent vector has {pyro_guide.latent_dim} numbers, NumPyro's "
                                          f"{self.auto.latent_dim} (a support with different unconstrained spaces)"))
        u = np.sin(1.0 + np.arange(self.auto.latent_dim))
        with torch.no_grad():
            ours = {s["name"]: biject_to(s["fn"].support)(v).cpu().numpy()
                    for s, v in pyro_guide._unpack_latent(pyro_guide.loc.new_tensor(u))}
        theirs = {k: np.asarray(jax_biject_to(self.auto.prototype_trace[k]["fn"].support)(v))
                  for k, v in self.auto._unpack_latent(u.astype(np.asarray(self.auto._init_latent).dtype)).items()}
        if list(ours) != list(theirs):
            raise UserError(refuse.format(f"the model's latents come in the order {', '.join(ours)}, the twin's in "
                                          f"{', '.join(theirs)} (numpyro_twin must sample them in the model's order)"))
        for k in ours:
            if ours[k].shape != theirs[k].shape or not np.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6):
                raise UserError(refuse.format(f"the two read latent site {k!r} from the latent vector differently "
                                              "(its support's unconstrained space differs)"))


def numpyro_autoguide(name: str, twin_model: Callable, rank: int | None = None) -> NumpyroAutoguide:
    """NumPyro's automatic guide ``name`` on the twin's model, its parameters named as Pyro's
    guide of the same class names them in Pyro's store."""
    return NumpyroAutoguide(name, twin_model, rank)


def unsupported(spec, twin, name: str) -> str | None:
    """Why guide ``name`` cannot run on NumPyro, or None when it can: the one rule that
    ``run`` (one guide) and ``inference.compare`` (all of them, before training) apply."""
    from ppl_gen.core.protocol import AUTOGUIDES

    if name in AUTOGUIDES and name not in spec.guides:
        return autoguide_refusal(name)
    if spec.resolve(name).update is not None:
        return CLOSED_FORM
    if name in twin.refused:
        return twin.refused[name]
    return None if name in twin.guides else "no NumPyro twin"


def twin_guide(twin, name: str, model_name: str) -> Callable:
    if name in twin.refused:
        raise UserError(f"guide {name!r} has no NumPyro twin in {model_name}: {twin.refused[name]}; "
                        "use --backend pyro")
    if name not in twin.guides:
        raise UserError(f"guide {name!r} has no NumPyro twin in {model_name}; with --backend numpyro "
                        f"choose --guide {' or '.join(twin.guides)}")
    return twin.guides[name]


def to_jax(value):
    """torch tensor -> JAX array (numbers go in, numbers come out)."""
    import jax.numpy as jnp

    from ppl_gen.backends.numpyro_twin import to_numpy

    return None if value is None else jnp.asarray(to_numpy(value))


# ---------------------------------------------------------------- parameters both ways
def pyro_params() -> dict:
    """Constrained values of every parameter in Pyro's store, as numpy arrays."""
    import pyro

    store = pyro.get_param_store()
    return {k: store[k].detach().cpu().numpy() for k in store.keys()}


def copy_to_pyro(constrained: dict) -> None:
    """Write constrained values into Pyro's store in place (module parameters stay the
    module's own tensors), inverting each parameter's constraint on the torch side."""
    import numpy as np
    import pyro
    import torch
    from torch.distributions import transform_to

    store = pyro.get_param_store()
    unconstrained = dict(store.named_parameters())
    constraints = store.get_state()["constraints"]
    with torch.no_grad():
        for k, v in constrained.items():
            u = unconstrained[k]
            value = torch.as_tensor(np.array(v), dtype=u.dtype, device=u.device)
            u.copy_(transform_to(constraints[k]).inv(value))


def adam(lr: float, local_names=(), local_lr: float | None = None, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, param_lr: dict[str, float] | None = None):
    """Adam (Kingma & Ba 2015) as a ``jax.example_libraries.optimizers.Optimizer`` over a dict of
    unconstrained parameters: torch's update and defaults. Parameters in ``local_names`` are
    updated row-wise (moments and bias correction counted per row; rows without gradient stay
    exactly as they were), as ``ppl_gen.core.optim.RowwiseAdam`` does on the Pyro side. Global
    parameters named in ``param_lr`` take their own rate (``Spec.param_lr``).

    The state of each parameter is (x, m, v, t); t is a scalar, or one count per row."""
    import jax.numpy as jnp
    from jax.example_libraries.optimizers import Optimizer

    local = set(local_names)
    local_lr = lr if local_lr is None else local_lr

    def init(params):
        return {k: (x, jnp.zeros_like(x), jnp.zeros_like(x),
                    jnp.zeros(x.shape[:1] if k in local else (), x.dtype)) for k, x in params.items()}

    def one(k, g, state):
        x, m, v, t = state
        if k not in local:
            t = t + 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            rate = param_lr.get(k, lr) if param_lr else lr
            return x - rate * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps), m, v, t
        touched = jnp.any(g.reshape(g.shape[0], -1) != 0, axis=1)
        rows = touched.reshape((-1,) + (1,) * (g.ndim - 1))
        t = t + touched.astype(t.dtype)
        m = jnp.where(rows, b1 * m + (1 - b1) * g, m)
        v = jnp.where(rows, b2 * v + (1 - b2) * g * g, v)
        tt = jnp.maximum(t, 1).reshape(rows.shape)
        step = local_lr * (m / (1 - b1 ** tt)) / (jnp.sqrt(v / (1 - b2 ** tt)) + eps)
        return jnp.where(rows, x - step, x), m, v, t

    def update(i, grads, state):
        return {k: one(k, grads[k], state[k]) for k in state}

    def params(state):
        return {k: s[0] for k, s in state.items()}

    return Optimizer(init, update, params)


# ---------------------------------------------------------------- the trainer
class NumpyroTrainer:
    """The NumPyro counterpart of ``ppl_gen.core.train.Trainer``: one jitted ``svi.update`` per step."""

    def __init__(self, twin_model: Callable, twin_guide: Callable, x, schedule, elbo_name: str, lr: float,
                 seed: int, init_params: dict, num_particles: int = 1, local_params=(),
                 local_lr: float | None = None, param_lr: dict[str, float] | None = None):
        import jax
        import jax.numpy as jnp
        from numpyro.infer import SVI

        self.model, self.guide, self.schedule = twin_model, twin_guide, schedule
        self.x = x                                   # the whole training set, a JAX array
        self.n = int(x.shape[0])
        # Pyro's automatic guide run as NumPyro's: its parameters are NumPyro's, the start and
        # the fitted values Pyro's store's (NumpyroAutoguide.from_pyro / to_pyro)
        self.auto = twin_guide if isinstance(twin_guide, NumpyroAutoguide) else None
        if self.auto is not None:
            init_params = self.auto.from_pyro(init_params)
        self.optim = adam(lr, local_params, local_lr, param_lr=param_lr)
        self.svi = SVI(twin_model, twin_guide, self.optim,
                       elbo_class(elbo_name)(num_particles=num_particles))
        args, kwargs = self._args(1)
        names = self._param_names(args, kwargs)
        self._refuse_discrete_without_score(elbo_name, args, kwargs)
        unknown = sorted(set(names) - set(init_params))
        if unknown:
            raise UserError(f"the NumPyro twin has parameters the Pyro model does not create ({', '.join(unknown[:3])}); "
                            "a twin's numpyro.param names must be the Pyro parameter-store names")
        self.state = self.svi.init(jax.random.PRNGKey(seed), *args, **kwargs,
                                   init_params={k: jnp.asarray(init_params[k]) for k in names})
        n = self.n

        def full_step(state, x):
            return self.svi.update(state, x)

        def batch_step(state, x, idx):
            a, kw = call_args(twin_model, x, idx, n)
            return self.svi.update(state, *a, **kw)

        self._full, self._batch = jax.jit(full_step), jax.jit(batch_step)

    def _args(self, t: int):
        idx = self.schedule(t)
        return call_args(self.model, self.x, None if idx is None else to_jax(idx), self.n)

    def _param_names(self, args, kwargs) -> list[str]:
        import jax
        from numpyro import handlers

        names = []
        for fn in (self.guide, self.model):
            tr = handlers.trace(handlers.seed(fn, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
            names += [k for k, s in tr.items() if s["type"] == "param" and k not in names]
        return names

    def _refuse_discrete_without_score(self, elbo_name: str, args, kwargs) -> None:
        """NumPyro's Trace_ELBO and TraceMeanField_ELBO add no score-function term (Pyro's
        Trace_ELBO does): a discrete draw carries no gradient, so their gradient for its guide
        parameters is -grad log q(z), zero in expectation. NumPyro only warns; this refuses."""
        import jax
        from numpyro import handlers

        cls = elbo_class(elbo_name)
        if getattr(cls, "can_infer_discrete", False):
            return
        tr = handlers.trace(handlers.seed(self.guide, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
        discrete = [k for k, s in tr.items() if s["type"] == "sample" and not s["is_observed"]
                    and s["fn"].support.is_discrete]
        if discrete:
            raise UserError(f"NumPyro's {cls.__name__} has no score-function term, so it cannot fit the guide of the "
                            f"discrete latent {', '.join(discrete[:3])}; with --backend numpyro use --elbo tracegraph, "
                            "or --backend pyro (its --elbo enum sums discrete latents exactly)")

    def step(self, t: int) -> float:
        """One jitted SVI step; returns -ELBO per data point (the batch's estimate)."""
        idx = self.schedule(t)
        if idx is None:
            self.state, loss = self._full(self.state, self.x)
        else:
            self.state, loss = self._batch(self.state, self.x, to_jax(idx))
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at step {t}")
        return value / self.n

    def params(self) -> dict:
        """Constrained parameter values (numpy), as Pyro's store holds them."""
        import numpy as np

        values = {k: np.asarray(v) for k, v in self.svi.get_params(self.state).items()}
        return values if self.auto is None else self.auto.to_pyro(values)

    # -- checkpoint state: torch tensors only, so weights_only loading works -----------
    def state_dict(self, step: int) -> dict:
        import jax
        import numpy as np
        import torch

        import pyro

        _, opt = self.state.optim_state
        T = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
        copy_to_pyro(self.params())
        return {
            "step": step,
            # the layout of a Pyro checkpoint: Pyro's unconstrained store values
            "params": {k: v.detach().cpu().clone() for k, v in pyro.get_param_store().named_parameters()},
            "optimizer": {"numpyro_adam": {k: {"x": T(x), "m": T(m), "v": T(v), "t": T(t)}
                                           for k, (x, m, v, t) in opt.items()}},
            "rng_jax": T(np.asarray(jax.random.key_data(self.state.rng_key)).astype(np.int64)),
            "rng_torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> int:
        import jax.numpy as jnp
        import numpy as np
        import torch
        from numpyro.infer.svi import SVIState

        i, opt = self.state.optim_state
        saved = state.get("optimizer", {}).get("numpyro_adam")
        if saved is None or set(saved) != set(opt):
            raise UserError("the checkpoint was not written by --backend numpyro with this model; "
                            "resume with the same model options")
        new = {}
        for k, (x, m, v, t) in opt.items():
            s = saved[k]
            if tuple(s["x"].shape) != tuple(x.shape):
                raise UserError(f"checkpoint parameter {k} has shape {tuple(s['x'].shape)}, the model makes "
                                f"{tuple(x.shape)}; resume with the same model options")
            new[k] = tuple(jnp.asarray(s[f].numpy(), dtype=ref.dtype) for f, ref in zip("xmvt", (x, m, v, t)))
        key = jnp.asarray(np.asarray(state["rng_jax"].numpy(), dtype=np.uint32))
        self.state = SVIState((jnp.asarray(int(state["step"]), dtype=jnp.asarray(i).dtype), new),
                              self.state.mutable_state, key)
        torch.set_rng_state(state["rng_torch"].cpu())
        return int(state["step"])


def numpyro_elbo(model: Callable, guide: Callable, params: dict, x, idx=None, size: int | None = None,
                 elbo_name: str = "trace", num_particles: int = 1000, seed: int = 0) -> float:
    """The NumPyro ELBO estimate (total, nats) at given constrained parameter values; the
    equivalence tests set it against Pyro's at the same values."""
    import jax
    import jax.numpy as jnp

    x = to_jax(x)
    n = int(x.shape[0]) if size is None else size
    args, kwargs = call_args(model, x, None if idx is None else to_jax(idx), n)
    elbo = elbo_class(elbo_name)(num_particles=num_particles)
    loss = elbo.loss(jax.random.PRNGKey(seed), {k: jnp.asarray(v) for k, v in params.items()},
                     model, guide, *args, **kwargs)
    return -float(loss)


# ---------------------------------------------------------------- the backend
class NumpyroBackend:
    """``--backend numpyro`` for the pipeline: NumPyro does the optimization; the run folder,
    the evaluation and the plots are the Pyro path's, on the NumPyro values."""

    name, suffix = "numpyro", " (numpyro)"

    def check(self, setup) -> None:
        require_numpyro()
        if setup.cfg.data_on_host:
            raise UserError("--data-on-host runs on the Pyro backend only (NumPyro holds the data as one JAX "
                            "array on its device); drop it or use --backend pyro")
        if setup.guide.update is not None:
            raise UserError(f"guide {setup.guide_name!r} is {CLOSED_FORM}; use --backend pyro for it")
        from ppl_gen.core.protocol import AUTOGUIDES

        auto = setup.guide_name in AUTOGUIDES and setup.guide_name not in setup.spec.guides
        if auto and autoguide_refusal(setup.guide_name):
            raise UserError(f"--backend numpyro: Pyro's automatic guide {setup.guide_name} is not carried over to "
                            f"NumPyro's: {autoguide_refusal(setup.guide_name)}; use --backend pyro for it")
        if auto and setup.cfg.batch_size is not None and setup.cfg.batch_size < len(setup.dataset.train):
            raise UserError(f"--backend numpyro runs {setup.guide_name} on the whole data set only (the twin's plates "
                            "scale a minibatch, they do not subsample); drop --batch-size or use --backend pyro")
        self.twin = load_twin(setup.mf, setup.options, setup.dataset)
        self.elbo_name = twin_elbo(self.twin, setup.cfg.elbo)  # an unsupported --elbo fails before any work
        self.guide = (numpyro_autoguide(setup.guide_name, self.twin.model, rank=setup.cfg.rank) if auto
                      else twin_guide(self.twin, setup.guide_name, setup.mf.path.name))

    def trainer(self, setup):
        from ppl_gen.core.pipeline import site_check
        from ppl_gen.core.train import Trainer, make_elbo

        cfg, spec, g = setup.cfg, setup.spec, setup.guide
        # The Pyro side creates the parameters exactly as a Pyro run would (same seed, same
        # initializers): that is NumPyro's starting point, and where evaluation reads them back.
        pyro_side = Trainer(spec.model, g.fn, setup.dataset.train, make_elbo(cfg.elbo), lr=cfg.lr,
                            batch_size=cfg.batch_size, seed=cfg.seed, local_params=g.local_params,
                            local_lr=g.local_lr)
        with site_check(setup.mf.path.name, setup.guide_name):
            pyro_side.init_params()
        x = to_jax(setup.dataset.train)
        if isinstance(self.guide, NumpyroAutoguide):  # before NumPyro starts from Pyro's values
            args, kwargs = call_args(self.twin.model, x, None, int(x.shape[0]))
            self.guide.check_layout(g.fn, *args, **kwargs)
        trainer = NumpyroTrainer(self.twin.model, self.guide, x, pyro_side.schedule,
                                 self.elbo_name, cfg.lr, cfg.seed, pyro_params(), cfg.num_particles,
                                 local_params=tuple(set(self.twin.local_params) | set(g.local_params)),
                                 local_lr=g.local_lr, param_lr=spec.param_lr)
        return trainer

    def extra_config(self, setup) -> dict:
        import jax

        return {"jax_device": str(jax.devices()[0]), "jax_x64": bool(self.twin.x64)}

    def sync(self, trainer) -> None:
        """Copy the fitted values into Pyro's store before anything evaluates them."""
        copy_to_pyro(trainer.params())
