"""Data-parallel SVI on ``torch.distributed``: ``torchrun --nproc-per-node W -m inference.svi FILE``.

torchrun starts W processes (ranks) and tells each its rank through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); gloo carries the collectives on CPUs, NCCL on GPUs. Nothing here
knows which model it runs; any model file whose model and guide take ``(x, idx=None, size=None)``
is split without changes.

How a step is split (N training rows, global batch size B, W ranks):

* rank r owns a contiguous shard of n_r rows (``World.bounds``). The global batch of step t is
  the one a single process draws (``BatchSchedule(N, B, seed)``, a fixed function of (seed, t)),
  so it does not depend on W and a run resumed on another number of ranks draws the same
  batches. Rank r takes the b_r rows of it that lie in its shard and calls the model file with
  those rows, their *local* row numbers and ``size = n_r``: per-data-point parameters (an
  explicit guide's table, ``Guide.local_params``) have n_r rows on rank r; no rank holds the
  whole table.
* the one-process loss is (N/B) sum_{i in batch} l_i + G, G being the terms of global latents
  (KL of the topics, of a global mean). On rank r Pyro's subsampled plate scales the local
  terms by n_r/b_r; :class:`RankScale` rescales them by (N/B) / (n_r/b_r) and the global
  terms by 1/W, so the ranks' losses add up to the one-process loss, term by term. Which
  sites are local is found once by tracing the model with ``size`` doubled: a local term's
  scale doubles with it, a global one's does not (this catches hand-made scales such as LDA's
  word counts, not only the data plate).
* the gradients of the global parameters (every ``pyro.param`` and ``pyro.module`` parameter
  in Pyro's store that is not a local table) are summed over the ranks with one
  ``all_reduce`` per dtype; a local row gets its gradient from its owner only, which is the
  one-process gradient of that row. Adam then takes the same step on every rank.

With the same seed on every rank, global latents drawn before any local noise coincide across
ranks (a global-only model steps exactly as one process does). After a step with local noise
the ranks' random streams differ, so a global latent drawn later differs from rank to rank: the
sum is still an unbiased estimate of the same ELBO, not the one-process draw.

Rank 0 writes the run folder; checkpoints gather the local tables (and their Adam moments)
into full N-row tables, so a run resumes on any number of ranks, one process included. A step
that fails on one rank ends the step on every rank (a status ``all_reduce`` before the
gradients'); a rank that dies or hangs is noticed at the next collective, which has a timeout
(``PPL_GEN_DIST_TIMEOUT`` seconds, default 120). Either way rank 0 prints one ``error:`` line
and the last checkpoint stays on disk.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ppl_gen.core.errors import TrainingDiverged, UserError
from ppl_gen.core.guard import model_code
from ppl_gen.core.train import Trainer, call_args, make_elbo, reporting_elbo

TIMEOUT_ENV = "PPL_GEN_DIST_TIMEOUT"
# objectives that are not a sum of per-site terms: the ranks' parts would not add up to them
NOT_A_SUM = ("renyi", "tail-adaptive")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started."""

    rank: int
    size: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Rows [lo, hi) of a set of n rows that ``rank`` owns: contiguous shards whose sizes
        differ by at most one."""
        r = self.rank if rank is None else rank
        return r * n // self.size, (r + 1) * n // self.size


def world() -> World | None:
    """The ranks torchrun (or any launcher setting WORLD_SIZE and RANK) started; None for one process."""
    size = int(os.environ.get("WORLD_SIZE") or 1)
    if size <= 1:
        return None
    return World(rank=int(os.environ.get("RANK") or 0), size=size,
                 local_rank=int(os.environ.get("LOCAL_RANK") or 0))


def world_size() -> int:
    w = world()
    return 1 if w is None else w.size


def prints_errors() -> bool:
    """Only rank 0 speaks: the others' error lines would repeat it."""
    w = world()
    return w is None or w.main


def rank_device(device: torch.device) -> torch.device:
    """``--device cuda`` under torchrun: each rank its own GPU (LOCAL_RANK)."""
    w = world()
    if w is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", w.local_rank)
    return device


def nearest_multiple(b: int, w: int) -> int:
    below = b // w * w
    return w if below == 0 else (below if b - below < below + w - b else below + w)  # a tie: the larger


def check_config(cfg, w: World):
    """What cannot be split over ranks, refused before any work (on every rank alike; rank 0 says it).
    Returns the rank's settings: no progress bar but on rank 0."""
    if cfg.backend != "pyro":
        raise UserError(f"--backend {cfg.backend} does not run under torchrun: data-parallel SVI is the Pyro "
                        "backend's (torch.distributed); drop --backend, or run one process without torchrun")
    if cfg.batch_size is not None and cfg.batch_size % w.size:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {w.size} ranks; give a multiple of "
                        f"{w.size}: the nearest is --batch-size {nearest_multiple(cfg.batch_size, w.size)}")
    if cfg.jit:
        raise UserError("--jit is not supported under torchrun (each step's per-rank scale would be traced in as "
                        "a constant); drop --jit")
    if cfg.elbo in NOT_A_SUM:
        raise UserError(f"--elbo {cfg.elbo} is not a sum over data points, so the ranks' parts do not add up to "
                        "it; use --elbo trace, meanfield, tracegraph or enum, or run one process")
    return cfg if w.main else replace(cfg, progress=False)


def check_setup(setup, w: World) -> None:
    from ppl_gen.core.protocol import takes_minibatches

    name, g, n = setup.mf.path.name, setup.guide, setup.dataset.train.shape[0]
    if g.update is not None:
        raise UserError(f"guide {setup.guide_name!r} is fitted by closed-form updates (coordinate ascent), which "
                        "this data-parallel SVI does not split; choose a gradient-fitted guide or run one process")
    for what, fn in (("model", setup.spec.model), (f"guide {setup.guide_name!r}", g.fn)):
        if not takes_minibatches(fn):
            raise UserError(f"{name}: the {what} takes only x, so its rows cannot be split over {w.size} ranks; "
                            "give model and guide the signature (x, idx=None, size=None) and open the data "
                            "plate with ppl_gen.data_plate(x, idx, size), or run one process")
    if n < w.size:
        raise UserError(f"{name}: {n} training rows cannot be split over {w.size} ranks; use at most {n} ranks")


def start(setup, trainer: Trainer, w: World) -> "DistributedTrainer":
    """Join the process group (after the checks every rank makes alike) and split the trainer."""
    import torch.distributed as dist

    check_setup(setup, w)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or 120))
        backend = "nccl" if setup.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(leave)
    if not w.main:  # Pyro's and torch's warnings once, from rank 0
        import warnings

        warnings.simplefilter("ignore")
    return DistributedTrainer.split(trainer, w, setup.mf.path)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (a peer already gone: nothing left to close cleanly)
            pass


def collective(fn, *args, **kwargs):
    """A collective call; a peer that died or hung (the timeout) is one user-facing error."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"another rank stopped answering (killed, crashed outside a step, or slower than the "
                        f"{TIMEOUT_ENV} timeout): {first}") from None


def attempt(path: Path, doing: str, fn) -> tuple[float, str | None]:
    """(fn(), None), or (0, the message) when it fails on this rank: the ranks then agree to stop
    (:meth:`DistributedTrainer.agree`) instead of leaving the others waiting in a collective."""
    try:
        with model_code(path, doing):
            return fn(), None
    except UserError as e:
        return 0.0, str(e)
    except Exception as e:  # noqa: BLE001  an internal failure keeps its traceback, on its own rank
        traceback.print_exc()
        return 0.0, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- scaling each rank's terms
class RankScale(Messenger):
    """Multiplies the scale of local sites by ``local`` and of every other site by ``global_``
    (see the module's docstring). ``local_sites``: the model's local site names; a guide site
    of another name is local when it sits in a plate of ``local_plates``."""

    def __init__(self, local_sites: set[str], local_plates: set[str], local: float, global_: float):
        super().__init__()
        self.local_sites, self.local_plates, self.local, self.global_ = local_sites, local_plates, local, global_
        self.known: set[str] = set()

    def _process_message(self, msg):
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        name = msg["name"]
        local = name in self.local_sites or (name not in self.known
                                             and any(f.name in self.local_plates for f in msg["cond_indep_stack"]))
        msg["scale"] = (self.local if local else self.global_) * msg["scale"]


def classify_sites(model, x: torch.Tensor, size: int, path: Path) -> tuple[set[str], set[str], set[str]]:
    """(local sites, their plates, every site) of ``model`` on one row: a site whose scale doubles
    when ``size`` doubles is a per-data-point term. Leaves the random state and the parameter
    store as they were."""
    idx = torch.zeros(1, dtype=torch.long, device=x.device)
    scales = []
    devices = [x.device] if x.device.type == "cuda" else []
    with model_code(path, "tracing the model to split it over ranks"), torch.no_grad():
        for s in (size, 2 * size):
            with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope(), poutine.block():
                tr = poutine.trace(model).get_trace(x[:1], idx, size=s)
            scales.append({k: site for k, site in tr.nodes.items()
                           if site["type"] == "sample" and not site_is_subsample(site)})
    local, plates_local, plates_global = set(), set(), set()
    for name, site in scales[0].items():
        a = torch.as_tensor(site["scale"], dtype=torch.float64)
        b = torch.as_tensor(scales[1][name]["scale"], dtype=torch.float64)
        frames = {f.name for f in site["cond_indep_stack"]}
        if torch.allclose(b, 2 * a):
            local.add(name)
            plates_local |= frames
        elif torch.allclose(b, a):
            plates_global |= frames
        else:
            raise UserError(f"{path.name}: the scale of site {name!r} is neither proportional to size / len(idx) "
                            "nor free of it, so it cannot be split over ranks; scale per-point terms by size / "
                            "len(idx) (ppl_gen.data_plate does) and nothing else by size")
    return local, plates_local - plates_global, set(scales[0])


# ---------------------------------------------------------------- the trainer
class DistributedTrainer(Trainer):
    """The backend's :class:`~ppl_gen.core.train.Trainer` on one rank's shard: same ELBO,
    optimizers and (global) batch schedule; each step's gradients summed over the ranks."""

    @classmethod
    def split(cls, base: Trainer, w: World, path: Path) -> "DistributedTrainer":
        self = cls.__new__(cls)
        self.__dict__.update(base.__dict__)
        self.world, self.path = w, Path(path)
        self.N = base.n
        self.lo, self.hi = w.bounds(self.N)
        self.rows = [w.bounds(self.N, r) for r in range(w.size)]
        self.x, self.n = base.x[self.lo:self.hi], self.hi - self.lo
        self.user_model, self.user_guide = base.model, base.guide
        self.model, self.guide = self._scaled(base.model), self._scaled(base.guide)
        # a guide's own written-out loss (Guide.loss) would bypass RankScale: Pyro's ELBO, rescaled
        self.fused_loss = None
        self.sites = None  # (local sites, local plates, all sites), found at the first step
        self.factors = (1.0, 1.0 / w.size)
        return self

    def _scaled(self, fn):
        def scaled(*args, **kwargs):
            local, plates, known = self.sites
            scale = RankScale(local, plates, *self.factors)
            scale.known = known
            with scale:
                return fn(*args, **kwargs)
        return scaled

    def _args(self, t: int):
        if self.sites is None:
            self.sites = classify_sites(self.user_model, self.x[:1].to(self.device), self.n, self.path)
        idx = self.schedule(t)
        device = self.x.device
        if idx is None:  # the whole data set each step: every rank its whole shard
            local, batch = torch.arange(self.n, device=device), self.N
        else:
            mine = (idx >= self.lo) & (idx < self.hi)
            local, batch = idx[mine] - self.lo, idx.shape[0]
        if local.numel() == 0:  # none of this step's rows are here: one row with weight 0 keeps
            # the global terms (each rank's 1/W of them) and the shape of the computation
            local, weight = torch.zeros(1, dtype=torch.long, device=device), 0.0
        else:
            weight = self.N * local.numel() / (batch * self.n)  # (N / B) / (n_r / b_r)
        self.factors = (weight, 1.0 / self.world.size)
        return call_args(self.model, self.x, local, self.n, self.batched, self.device if self.copies else None)

    # -- one step ------------------------------------------------------------------
    def step(self, t: int) -> float:
        value, failure = attempt(self.path, f"at step {t}", lambda: self._backward(t))
        total = self.agree(value, failure)
        if not math.isfinite(total):
            raise TrainingDiverged(f"the loss became {total} at step {t}")
        self._sync_optimizer()
        self._sum_gradients()
        self.optim.step()
        return total / self.N

    def agree(self, value: float, failure: str | None) -> float:
        """The sum of the ranks' values; if any rank failed, every rank raises its message."""
        import torch.distributed as dist

        status = torch.tensor([value, float(failure is not None)], dtype=torch.float64)
        collective(dist.all_reduce, status)
        if status[1] > 0:
            messages = [None] * self.world.size
            collective(dist.all_gather_object, messages, failure)
            r, text = next((r, m) for r, m in enumerate(messages) if m is not None)
            raise UserError(f"rank {r} of {self.world.size} failed: {text}")
        return float(status[0])

    def _global_params(self) -> list[torch.Tensor]:
        named = dict(pyro.get_param_store().named_parameters())
        return [named[k] for k in sorted(named) if k not in self.local_params]

    def _sync_optimizer(self) -> None:
        import torch.distributed as dist

        known = self.optim.known() if self.optim is not None else set()
        super()._sync_optimizer()
        # parameters created this step start from rank 0's values (they are equal when created
        # from the seed; this keeps them equal when a file draws them from a random state)
        named = dict(pyro.get_param_store().named_parameters())
        with torch.no_grad():
            for k in sorted(set(named) - known - set(self.local_params)):
                collective(dist.broadcast, named[k].data, src=0)

    def _sum_gradients(self) -> None:
        """Sum the global parameters' gradients over the ranks: one all_reduce per dtype, with
        a flag per parameter so that one no rank differentiated stays without a gradient."""
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self._global_params():
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                             + [torch.tensor([float(p.grad is not None) for p in params], dtype=dtype,
                                             device=params[0].device)])
            collective(dist.all_reduce, flat)
            flags, start = flat[-len(params):], 0
            for p, flag in zip(params, flags.tolist()):
                p.grad = flat[start:start + p.numel()].view_as(p).clone() if flag > 0 else None
                start += p.numel()

    # -- checkpoints: full tables on rank 0 ------------------------------------------------
    def gather_rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """This rank's rows of a local table, gathered in rank order into the N-row table on
        rank 0 (None on the others)."""
        import torch.distributed as dist

        sizes = [hi - lo for lo, hi in self.rows]
        padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes] if self.world.main else None
        collective(dist.gather, padded, parts, dst=0)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]) if self.world.main else None

    def _local_optimizer(self):
        return self.optim.parts.get("local") if self.optim is not None else None

    def state_dict(self, step: int) -> dict:
        import torch.distributed as dist

        state = super().state_dict(step)
        for k in sorted(set(state["params"]) & set(self.local_params)):
            state["params"][k] = self.gather_rows(state["params"][k])
        opt = self._local_optimizer()
        if opt is not None:
            saved = state["optimizer"]["states"]["local"]["state"]
            params = [p for g in opt.param_groups for p in g["params"]]
            for i, p in enumerate(params):  # a table no row of which was visited here has no state yet
                own = saved.get(i) or {"step": p.new_zeros(p.shape[0]), "exp_avg": torch.zeros_like(p),
                                       "exp_avg_sq": torch.zeros_like(p)}
                saved[i] = {k: self.gather_rows(v) for k, v in sorted(own.items())}
        ranks = [None] * self.world.size
        collective(dist.all_gather_object, ranks, torch.get_rng_state())
        state["rng_torch_ranks"], state["world_size"] = ranks, self.world.size
        return state

    def load_state_dict(self, state: dict) -> int:
        """A checkpoint of any number of ranks (full tables): this rank's slice of each."""
        state = dict(state, params=dict(state["params"]))
        for k in set(state["params"]) & set(self.local_params):
            table = state["params"][k]
            if table.shape[0] != self.N:
                raise UserError(f"checkpoint table {k} has {table.shape[0]} rows, the training data {self.N}; "
                                "resume with the same data")
            state["params"][k] = table[self.lo:self.hi]
        opt = state.get("optimizer") or {}
        if "local" in opt.get("states", {}):
            local = opt["states"]["local"]
            sliced = {i: {k: v[self.lo:self.hi] for k, v in s.items()} for i, s in local["state"].items()}
            state["optimizer"] = dict(opt, states=dict(opt["states"], local=dict(local, state=sliced)))
        step = super().load_state_dict(state)
        ranks = state.get("rng_torch_ranks")
        if ranks and len(ranks) == self.world.size:  # the same ranks: each its own random stream
            torch.set_rng_state(ranks[self.world.rank].cpu())
        return step

    def unshard(self) -> None:
        """After training: rank 0's parameter store gets the full tables (for the final
        evaluation, plots and posterior), the other ranks are done."""
        store = pyro.get_param_store()
        named = dict(store.named_parameters())
        for k in sorted(set(named) & set(self.local_params)):
            full = self.gather_rows(named[k].detach())
            if self.world.main:
                constraint = store.get_state()["constraints"][k]
                store.set_state({"params": {k: full.requires_grad_()}, "constraints": {k: constraint}})


# ---------------------------------------------------------------- the run folder and evaluation
class NullFolder:
    """The run folder as the ranks other than 0 see it: they write nothing."""

    writes = False

    def __init__(self, folder):
        self.path, self.checkpoint_path = folder.path, folder.checkpoint_path

    def read_trace(self) -> list[dict]:
        return []

    def __getattr__(self, name):  # create, write_json, start_trace, append_trace, save_checkpoint, ...
        return lambda *args, **kwargs: None


def heldout_evaluator(setup, trainer: DistributedTrainer, before=None):
    """The held-out ELBO per point, each rank scoring its shard of the held-out rows (a guide with
    a held-out form fits its shard only), the parts summed: evaluate_elbo's chunk estimate."""
    cfg, spec, ds, w = setup.cfg, setup.spec, setup.dataset, trainer.world
    if ds.test is None or not spec.likelihood:
        return lambda: None
    n = ds.test.shape[0]
    lo, hi = w.bounds(n)
    x = ds.test[lo:hi]

    def evaluate():
        if before:
            before()
        part, failure = attempt(setup.mf.path, "in the held-out evaluation",
                                lambda: shard_elbo(setup, x, n) if hi > lo else 0.0)
        return trainer.agree(part, failure) / n
    return evaluate


def shard_elbo(setup, x: torch.Tensor, n: int, chunk_size: int = 2048) -> float:
    """sum over this shard's chunks c of ELBO_c * len(c) / n, ELBO_c the chunk's estimate of the
    whole set's ELBO (the plate scaled by n / len(c)); summed over the ranks and divided by n it
    is the held-out ELBO per point (as in ppl_gen.core.train.evaluate_elbo)."""
    cfg, ds = setup.cfg, setup.dataset
    guide = setup.guide.heldout(x) if setup.guide.heldout else setup.guide
    elbo = make_elbo(reporting_elbo(cfg.elbo), num_particles=cfg.eval_particles)
    copy = ds.device if ds.device != x.device else None
    total = 0.0
    with torch.random.fork_rng(devices=[ds.device] if ds.device.type == "cuda" else []), torch.no_grad():
        pyro.set_rng_seed(cfg.seed)
        for start in range(0, x.shape[0], chunk_size):
            idx = torch.arange(start, min(start + chunk_size, x.shape[0]), device=x.device)
            args, kwargs = call_args(setup.spec.model, x, idx, n, device=copy)
            total += -elbo.loss(setup.spec.model, guide, *args, **kwargs) * len(idx) / n
    return total
