"""SVI on a model file: the ELBO estimators, the training step, the ELBO evaluator.

The training step computes Pyro's ELBO as a differentiable loss and steps a plain
``torch.optim.Adam`` over the parameter store. This is the same objective and the
same gradients as ``pyro.infer.SVI`` with ``pyro.optim.Adam``; it skips Pyro's
per-parameter optimizer bookkeeping, which is where much of Pyro's per-step overhead
lives for small networks (see ``python -m ppl_gen.bench vae``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyro
import pyro.infer
import torch

from ppl_gen.core.dataset import Dataset, Rows, whole
from ppl_gen.core.errors import TrainingDiverged, UserError
from ppl_gen.core.optim import RowwiseAdam
from ppl_gen.core.protocol import Spec, takes_minibatches

# The lecture's ELBO, E_q[log p(x, z)] - E_q[log q(z)], estimated four ways:
ELBOS = {
    # Monte Carlo over every term (reparameterized where q allows it)
    "trace": (pyro.infer.Trace_ELBO, pyro.infer.JitTrace_ELBO),
    # KL(q || p) in closed form where Pyro knows it (Normal/Normal, ...): lower variance
    "meanfield": (pyro.infer.TraceMeanField_ELBO, pyro.infer.JitTraceMeanField_ELBO),
    # score-function terms with Rao-Blackwellized dependency tracking, for discrete latents
    "tracegraph": (pyro.infer.TraceGraph_ELBO, pyro.infer.JitTraceGraph_ELBO),
    # discrete latents marked for enumeration are summed out exactly
    "enum": (pyro.infer.TraceEnum_ELBO, pyro.infer.JitTraceEnum_ELBO),
}


# Objectives other than the ELBO; each run reports the standard ELBO of its final guide as well
# (evaluate_elbo), so runs with different objectives compare on one scale.
#   renyi: the Renyi bound of order alpha (Li & Turner 2016, "Renyi divergence variational
#     inference", NeurIPS), L_alpha = 1/(1-alpha) log E_q[(p(x,z)/q(z))^(1-alpha)], estimated from
#     K = --num-particles draws; alpha = 0 gives the importance-weighted bound of Burda, Grosse &
#     Salakhutdinov (2016, "Importance weighted autoencoders", ICLR), log (1/K) sum_k p(x,z_k)/q(z_k),
#     which grows with K towards log p(x).
#   tail-adaptive: the tail-adaptive f-divergence of Wang, Liu & Liu (2018, "Variational inference
#     with tail-adaptive f-divergence", NeurIPS), a mass-covering objective whose weights are ranks of
#     the importance weights, so heavy tails do not blow up its gradient's variance.
OBJECTIVES = ("renyi", "tail-adaptive")


class TailAdaptiveELBO(pyro.infer.TraceTailAdaptive_ELBO):
    """Pyro's TraceTailAdaptive_ELBO with a finite loss: Pyro's returns inf plus the surrogate
    (it never computes the divergence itself), which the training loop would read as divergence.
    This one returns the surrogate, -sum_k gamma_k log(p(x,z_k)/q(z_k)) / sum_k gamma_k with
    gamma_k = rank_k^beta (Wang et al. 2018, alg. 1): its gradient is Pyro's up to the factor 1/K,
    which Adam's step does not see. The reported ELBOs use Trace_ELBO (reporting_elbo)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        total = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            total = total + self._differentiable_loss_particle(model_trace, guide_trace)[1]
        return total


def make_elbo(name: str, jit: bool = False, num_particles: int = 1, alpha: float = 0.0,
              **kwargs) -> pyro.infer.ELBO:
    if name == "renyi":
        if jit:
            raise UserError("--elbo renyi has no JIT-compiled form in Pyro; drop --jit")
        if alpha == 1:
            raise UserError("--renyi-alpha 1 makes the Renyi bound the ELBO, which RenyiELBO cannot compute; "
                            "use --elbo trace, or another --renyi-alpha")
        return pyro.infer.RenyiELBO(alpha=alpha, num_particles=num_particles, **kwargs)
    if name == "tail-adaptive":
        if jit:
            raise UserError("--elbo tail-adaptive has no JIT-compiled form in Pyro; drop --jit")
        if num_particles < 2:
            raise UserError("--elbo tail-adaptive weighs several draws against each other: give "
                            "--num-particles 2 or more (e.g. 8)")
        return TailAdaptiveELBO(num_particles=num_particles, vectorize_particles=True, **kwargs)
    if name not in ELBOS:
        raise UserError(f"unknown --elbo {name!r}; choose one of {', '.join((*ELBOS, *OBJECTIVES))}")
    cls = ELBOS[name][1 if jit else 0]
    if jit:
        kwargs.setdefault("ignore_jit_warnings", True)
    return cls(num_particles=num_particles, **kwargs)


def reporting_elbo(name: str) -> str:
    """The estimator the reported ELBOs use: the objective's own where it estimates the ELBO
    (trace, meanfield, tracegraph, enum), else Trace_ELBO: the standard ELBO of the final guide."""
    return "trace" if name in OBJECTIVES else name


def call_args(fn: Callable, x: torch.Tensor, idx: torch.Tensor | None, size: int, batched: bool | None = None,
              device: torch.device | None = None):
    """Positional tensors (so a JIT trace sees them) and the constant ``size`` as keyword.
    ``batched``: whether fn takes minibatches, when the caller already knows (hot loops).
    ``device``: where fn computes, when ``x`` stays in host memory (the batch is copied there)."""
    if batched is None:
        batched = takes_minibatches(fn)
    if idx is None or not batched:
        return whole(x if device is None else x.to(device))
    batch = x[idx]
    if device is not None and batch.device != device:
        batch, idx = batch.to(device, non_blocking=True), idx.to(device)
    if isinstance(batch, Rows):  # (X, y): model(X_b, y_b, idx, size=N)
        args, kwargs = batch.call(idx) if not batch.names else batch.call()
        return args, {**kwargs, **({"idx": idx} if batch.names else {}), "size": size}
    return (batch, idx), {"size": size}


class BatchSchedule:
    """Which rows step t uses: a fixed function of (seed, t), so a resumed run draws
    exactly the batches the uninterrupted run would have drawn."""

    def __init__(self, n: int, batch_size: int | None, seed: int, device: torch.device):
        self.n, self.seed, self.device = n, seed, device
        self.full = batch_size is None or batch_size >= n
        self.batch_size = n if self.full else batch_size
        self.per_epoch = max(n // self.batch_size, 1)  # the ragged tail is dropped: equal batch shapes
        self._epoch, self._perm = None, None

    def __call__(self, t: int) -> torch.Tensor | None:
        if self.full:
            return None
        epoch, pos = divmod(t - 1, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).to(self.device), epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class Optimizers:
    """Adam for global parameters; RowwiseAdam for per-data-point (local) parameters, so a
    minibatch step changes only its own rows of them. Parameters join in groups as Pyro
    creates them; the group structure (by parameter name) is saved with the state."""

    def __init__(self, lr: float, local_names=(), local_lr: float | None = None,
                 param_lr: dict[str, float] | None = None):
        self.lr, self.local_names = lr, set(local_names)
        self.local_lr = lr if local_lr is None else local_lr
        # global parameters with a rate of their own (Spec.param_lr), each in its own group
        self.param_lr = dict(param_lr or {})
        self.parts: dict[str, torch.optim.Optimizer] = {}
        self.groups: dict[str, list[list[str]]] = {}

    def __len__(self) -> int:
        return sum(len(g) for groups in self.groups.values() for g in groups)

    def known(self) -> set[str]:
        return {k for groups in self.groups.values() for g in groups for k in g}

    def _lr(self, kind: str, group: list[str]) -> float:
        if kind == "local":
            return self.local_lr
        return self.param_lr.get(group[0], self.lr)

    def add(self, names: list[str], named: dict[str, torch.Tensor]) -> None:
        for kind in ("global", "local"):
            group = [k for k in names if (k in self.local_names) == (kind == "local")]
            own = [[k] for k in group if kind == "global" and k in self.param_lr]
            group = [k for k in group if not (kind == "global" and k in self.param_lr)]
            for g in ([group] if group else []) + own:
                # one tensor may sit in the store under two names (a module registered twice, as
                # AutoIAFNormal's flow is): the optimizer takes it once
                params = list({id(named[k]): named[k] for k in g}.values())
                lr = self._lr(kind, g)
                if kind not in self.parts:
                    self.parts[kind] = (RowwiseAdam if kind == "local" else torch.optim.Adam)(params, lr=lr)
                else:
                    self.parts[kind].add_param_group({"params": params, "lr": lr})
                self.groups.setdefault(kind, []).append(g)

    @property
    def param_groups(self) -> list[dict]:
        """All groups, global and local, e.g. for a learning-rate schedule."""
        return [g for opt in self.parts.values() for g in opt.param_groups]

    def zero_grad(self) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.parts.values():
            opt.step()

    def state_dict(self) -> dict:
        return {"groups": self.groups, "states": {k: opt.state_dict() for k, opt in self.parts.items()}}

    def load_state_dict(self, state: dict, named: dict[str, torch.Tensor]) -> None:
        self.parts, self.groups = {}, {}
        for kind, groups in state["groups"].items():
            for group in groups:
                self.add(group, named)
        for kind, opt in self.parts.items():
            opt.load_state_dict(state["states"][kind])
            for group, names in zip(opt.param_groups, self.groups[kind]):  # a resumed run may change --lr
                group["lr"] = self._lr(kind, names)


class Trainer:
    """One SVI optimization: model, guide, ELBO, Adam, and the batch schedule."""

    def __init__(self, model: Callable, guide: Callable, x: torch.Tensor, elbo: pyro.infer.ELBO,
                 lr: float, batch_size: int | None = None, seed: int = 0, validate: bool = False,
                 local_params=(), local_lr: float | None = None, update: Callable | None = None,
                 param_lr: dict[str, float] | None = None, buffers: dict[str, torch.nn.Module] | None = None,
                 device: torch.device | None = None, fused_loss: Callable | None = None):
        self.model, self.guide, self.x, self.elbo, self.lr = model, guide, x, elbo, lr
        # where the model computes; x may stay in host memory (--data-on-host), batches are copied
        self.device = x.device if device is None else torch.device(device)
        self.copies = self.device != x.device
        # a guide fitted by closed-form updates (e.g. CAVI) instead of gradient steps
        self.update = update
        # the guide's own -ELBO, written out (Guide.loss): the traced ELBO's value and gradients
        self.fused_loss = fused_loss
        self.n = x.shape[0]
        # read the signatures once, not on every step
        self.batched = takes_minibatches(model) and takes_minibatches(guide)
        if batch_size is not None and batch_size < self.n and not self.batched:
            raise UserError(f"--batch-size {batch_size} needs a model and guide that take "
                            "(x, idx=None, size=None); this file's take only x: drop --batch-size")
        self.schedule = BatchSchedule(self.n, batch_size, seed, x.device)
        self.validate = validate
        self.local_params, self.local_lr, self.param_lr = tuple(local_params), local_lr, dict(param_lr or {})
        # modules whose buffers (BatchNorm running statistics) belong in checkpoints: Pyro's
        # parameter store holds parameters only
        self.buffers = dict(buffers or {})
        self.optim: Optimizers | None = None

    # Parameters live in Pyro's store (pyro.param, pyro.module); Adam sees their
    # unconstrained leaves, in a fixed (sorted) order so optimizer state round-trips.
    def _sync_optimizer(self) -> None:
        store = pyro.get_param_store()
        if self.optim is not None and len(store) == len(self.optim):
            return
        named = dict(store.named_parameters())
        if self.optim is None:
            self.optim = Optimizers(self.lr, self.local_params, self.local_lr, self.param_lr)
        new = sorted(set(named) - self.optim.known())
        if new:
            self.optim.add(new, named)

    def _args(self, t: int):
        return call_args(self.model, self.x, self.schedule(t), self.n, self.batched,
                         self.device if self.copies else None)

    def loss(self, t: int) -> torch.Tensor:
        args, kwargs = self._args(t)
        if self.fused_loss is not None and self.optim is not None:  # step 1 is traced: Pyro's checks
            return self.fused_loss(*args, **kwargs)
        return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

    def init_params(self) -> None:
        """Create every parameter (as the first step would) without taking a step."""
        args, kwargs = self._args(1)
        with torch.no_grad(), pyro.validation_enabled(True):
            self.elbo.loss(self.model, self.guide, *args, **kwargs)
        self._sync_optimizer()

    def step(self, t: int) -> float:
        """One gradient step; returns -ELBO per data point (the batch's estimate)."""
        if self.update is not None:
            return self._closed_form_step(t)
        value = self._backward(t)
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at step {t}")
        self._sync_optimizer()
        self.optim.step()
        return value / self.n

    def _backward(self, t: int) -> float:
        """The batch's -ELBO at step t, its gradients in the parameters' ``.grad`` (none when the
        loss is not finite); the step itself is the caller's (ppl_gen.core.distributed sums the
        ranks' gradients first)."""
        # Pyro's argument and support checks catch most mistakes in a model file on the
        # first step; afterwards they cost ~30% of a small VAE's step, so they go off.
        # NaN is reported by TrainingDiverged below, naming the step; Pyro's own warning
        # would add a second, less useful line
        with pyro.validation_enabled(self.validate or self.optim is None), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            if self.optim is not None:
                self.optim.zero_grad()
            try:
                if hasattr(self.elbo, "differentiable_loss"):
                    loss = self.loss(t)
                    value = loss.item()
                    if math.isfinite(value):
                        loss.backward()
                else:  # TraceGraph_ELBO builds a surrogate loss and differentiates it itself
                    args, kwargs = self._args(t)
                    value = self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)
            except NotImplementedError as e:
                # TraceMeanField_ELBO refuses a guide with discrete (non-reparameterized) sites
                if "reparameterized" not in str(e):
                    raise
                if isinstance(self.elbo, pyro.infer.TraceTailAdaptive_ELBO):
                    raise UserError("--elbo tail-adaptive needs a guide whose every sample is reparameterized; "
                                    "use --elbo renyi or --elbo trace for this guide") from None
                raise UserError("--elbo meanfield needs a guide whose every sample is reparameterized; this "
                                "guide samples discrete variables: use --elbo enum (exact sum) or --elbo "
                                "tracegraph (score function)") from None
        return value

    def _closed_form_step(self, t: int) -> float:
        """``update(x, idx, size, t) -> -ELBO`` changes the guide's parameters in place (in
        Pyro's parameter store, so checkpoints hold them); no optimizer is involved."""
        if self.optim is None:
            self.init_params()
        (batch, *rest), _ = call_args(self.model, self.x, self.schedule(t), self.n, True,
                                      self.device if self.copies else None)
        with torch.no_grad():
            value = float(self.update(batch, rest[0] if rest else None, self.n, t))
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at step {t}")
        return value / self.n

    # -- checkpoint state --------------------------------------------------------
    def state_dict(self, step: int) -> dict:
        store = pyro.get_param_store()
        state = {
            "step": step,
            "params": {k: v.detach().clone() for k, v in store.named_parameters()},
            "optimizer": self.optim.state_dict() if self.optim else {},
            "rng_torch": torch.get_rng_state(),
        }
        if self.buffers:
            state["buffers"] = {name: {k: b.detach().clone() for k, b in m.named_buffers()}
                                for name, m in self.buffers.items()}
        if hasattr(self.update, "state_dict"):  # a closed-form or loss-hook update with state of its own
            state["update"] = self.update.state_dict()
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> int:
        self.init_params()
        named = dict(pyro.get_param_store().named_parameters())
        missing = set(state["params"]) - set(named)
        if missing:
            raise UserError(f"the checkpoint has parameters this model does not create "
                            f"({', '.join(sorted(missing)[:3])}...); resume with the same model options")
        with torch.no_grad():
            for k, v in state["params"].items():
                if named[k].shape != v.shape:
                    raise UserError(f"checkpoint parameter {k} has shape {tuple(v.shape)}, the model "
                                    f"makes {tuple(named[k].shape)}; resume with the same model options")
                named[k].copy_(v.to(named[k].device))
        if state.get("optimizer"):
            self.optim = Optimizers(self.lr, self.local_params, self.local_lr, self.param_lr)
            self.optim.load_state_dict(state["optimizer"], dict(pyro.get_param_store().named_parameters()))
        for name, saved in state.get("buffers", {}).items():
            if name in self.buffers:
                own = dict(self.buffers[name].named_buffers())
                with torch.no_grad():
                    for k, b in saved.items():
                        own[k].copy_(b.to(own[k].device))
        if "update" in state and hasattr(self.update, "load_state_dict"):
            self.update.load_state_dict(state["update"])
        torch.set_rng_state(state["rng_torch"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        return int(state["step"])


def evaluate_elbo(model: Callable, guide: Callable, x: torch.Tensor | None, elbo_name: str = "trace",
                  num_particles: int = 10, chunk_size: int = 2048, seed: int = 0,
                  device: torch.device | None = None) -> float | None:
    """ELBO per data point (nats) of the whole set ``x``, in chunks.

    Each chunk's estimate, with the plate scaled by N / n_c, is unbiased for the full
    ELBO; averaging them with weights n_c / N counts global terms (KL of global
    latents) once and every local term once. Runs under its own seed and leaves the
    caller's random state untouched, so evaluating never changes training. ``device``: where
    the model computes, when ``x`` stays in host memory (each chunk is copied there).
    """
    if x is None or x.shape[0] == 0:
        return None
    n = x.shape[0]
    device = x.device if device is None else torch.device(device)
    copy = device if device != x.device else None
    elbo = make_elbo(reporting_elbo(elbo_name), num_particles=num_particles)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        pyro.set_rng_seed(seed)
        if not (takes_minibatches(model) and takes_minibatches(guide)) or n <= chunk_size:
            args, kwargs = call_args(model, x, None, n, device=copy)
            return -elbo.loss(model, guide, *args, **kwargs) / n
        total = 0.0
        for start in range(0, n, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, n), device=x.device)
            args, kwargs = call_args(model, x, idx, n, device=copy)
            total += -elbo.loss(model, guide, *args, **kwargs) * len(idx) / n
        return total / n


@dataclass
class FittedRun:
    """What a model file's ``evaluate`` and ``plots`` hooks receive after training."""

    spec: Spec
    guide_name: str
    dataset: Dataset
    options: Any
    device: torch.device
    config: dict
    out: Path
    trace: list[dict] = field(default_factory=list)
    guide_obj: Any = None  # the resolved ppl_gen.Guide, when the pipeline made this run

    @property
    def model(self) -> Callable:
        return self.spec.model

    @property
    def guide(self) -> Callable:
        return self.guide_obj if self.guide_obj is not None else self.spec.resolve(self.guide_name)
