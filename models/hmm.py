"""Hidden Markov model with categorical or Gaussian emissions (Rabiner 1989, "A tutorial on
hidden Markov models and selected applications in speech recognition", Proc. IEEE 77(2)).

Generative model with K hidden states, for each sequence n = 1..N of length T_n:

    pi ~ Dirichlet(1_K)                        initial distribution       p(z_1)
    A_i ~ Dirichlet(1_K),  i = 1..K            transition rows            p(z_t | z_{t-1} = i)
    categorical:  B_i ~ Dirichlet(1_V)         emission rows              p(x_t | z_t = i) = B_i[x_t]
    Gaussian:     mu_i ~ N(m, (2 s)^2), sigma_i ~ LogNormal(log s, 1)     x_t | z_t = i ~ N(mu_i, sigma_i^2)
    z_1 ~ pi,  z_t | z_{t-1} ~ A_{z_{t-1}},  x_t | z_t ~ emission_{z_t}

(m, s: mean and standard deviation of the training data, which only sets the scale.)

It is the lecture's Markov chain with the chain made latent. The hidden states are
summed out exactly: p(x | pi, A, B) = sum over all K^T paths, which the forward
algorithm computes in O(T K^2) (``ppl_gen.exact.hmm.forward``; the same recursion that
``pyro.markov`` with enumeration and ``TraceEnum_ELBO`` would run). What is left to
infer are the global parameters, with the guide ``meanfield`` (Dirichlet rows,
Normal means, LogNormal scales) or ``map`` (point masses: MAP estimation).

Sequences of different lengths are padded into one tensor ([N, T_max]; -1 pads a
categorical sequence, NaN a Gaussian one) and batched with masks.

Data: ``casino`` (the occasionally dishonest casino of Durbin et al. 1998, sampled;
default for categorical), ``gaussian`` (sampled from a known 3-state Gaussian HMM;
default for Gaussian), ``nile`` (annual Nile flow 1871-1970 shipped with statsmodels),
or a CSV file with one sequence per row.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from ppl_gen import Dataset, Spec, UserError, data_plate
from ppl_gen.core.protocol import Guide
from ppl_gen.exact import hmm as exact

EMISSIONS = ("categorical", "gaussian")


@dataclass
class Options:
    states: int = field(default=2, metadata={"help": "K, the number of hidden states"})
    emission: str = field(default="categorical", metadata={
        "help": "p(x_t | z_t): categorical over symbols 0..V-1 or gaussian", "choices": list(EMISSIONS)})
    sequences: int = field(default=200, metadata={"help": "sequences drawn for the sampled data sets"})
    length: int = field(default=100, metadata={
        "help": "longest sampled sequence; lengths are uniform in [length/2, length]"})

    def validate(self):
        if self.states < 1:
            raise UserError(f"--states must be at least 1 (K hidden states), got {self.states}")
        if self.sequences < 2:
            raise UserError(f"--sequences must be at least 2 (train and held-out), got {self.sequences}")
        if self.length < 2:
            raise UserError(f"--length must be at least 2, got {self.length}")


DEFAULTS = {"elbo": "meanfield", "steps": 600, "lr": 0.05}


# ---------------------------------------------------------------- data
# The occasionally dishonest casino (Durbin, Eddy, Krogh & Mitchison 1998, Biological
# Sequence Analysis, section 3.2): state 0 a fair die, state 1 a loaded one that shows
# a six half of the time. Symbols 0..5 stand for faces 1..6.
CASINO = {"pi": [0.5, 0.5], "A": [[0.95, 0.05], [0.10, 0.90]],
          "B": [[1 / 6] * 6, [0.1] * 5 + [0.5]]}
GAUSSIAN = {"pi": [1 / 3] * 3, "A": [[0.90, 0.05, 0.05], [0.05, 0.90, 0.05], [0.05, 0.05, 0.90]],
            "mu": [-2.0, 0.0, 3.0], "sigma": [0.5, 1.0, 0.7]}


def _pad(seqs: list[torch.Tensor], value) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def mask_of(x: torch.Tensor) -> torch.Tensor:
    """True at real steps: padding is -1 (categorical) or NaN (Gaussian)."""
    return ~torch.isnan(x) if x.is_floating_point() else x >= 0


def sample_hmm(truth: dict, n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences (lengths uniform in [length/2, length]) and their hidden paths, padded."""
    g = torch.Generator().manual_seed(seed)  # the data set is fixed; the run's --seed is for inference
    pi, A = torch.tensor(truth["pi"]), torch.tensor(truth["A"])
    z = exact.sample_states(pi, A, n, length, generator=g)
    if "B" in truth:
        B = torch.tensor(truth["B"])
        x = torch.multinomial(B[z.reshape(-1)], 1, generator=g).reshape(n, length)
    else:
        mu, sigma = torch.tensor(truth["mu"]), torch.tensor(truth["sigma"])
        x = mu[z] + sigma[z] * torch.randn(n, length, generator=g)
    lengths = torch.randint(max(length // 2, 1), length + 1, (n,), generator=g)
    pad = torch.arange(length) >= lengths[:, None]
    x = x.masked_fill(pad, float("nan") if x.is_floating_point() else -1)
    return x, z.masked_fill(pad, -1)


def read_csv_sequences(path: Path, emission: str) -> torch.Tensor:
    """One sequence per row; rows may differ in length (trailing empty cells are ignored)."""
    seqs = []
    with open(path, newline="") as f:
        for r, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            while cells and cells[-1] == "":
                cells.pop()
            if not cells:
                raise UserError(f"{path}: row {r} is an empty sequence; an HMM needs at least one "
                                "observation per row (delete the row)")
            values = []
            for c, cell in enumerate(cells, start=1):
                try:
                    v = float(cell)
                except ValueError:
                    raise UserError(f"{path}: row {r}, column {c} is {cell!r}, not a number; "
                                    "every cell must be numeric") from None
                if not math.isfinite(v):
                    raise UserError(f"{path}: row {r}, column {c} is {cell!r}; give finite numbers")
                if emission == "categorical" and (v != int(v) or v < 0):
                    raise UserError(f"{path}: row {r}, column {c} is {cell!r}; categorical emissions "
                                    "need symbols 0, 1, 2, ... (or use --emission gaussian)")
                values.append(v)
            seqs.append(torch.tensor(values, dtype=torch.float32 if emission == "gaussian" else torch.float64))
    if len(seqs) < 2:
        raise UserError(f"{path} holds {len(seqs)} sequence(s); give at least 2 rows "
                        "(the last fifth of the rows is held out)")
    if emission == "categorical":
        seqs = [s.long() for s in seqs]
    return _pad(seqs, float("nan") if emission == "gaussian" else -1)


def data(spec: str | None = None, options: Options | None = None) -> Dataset:
    """Sequences padded into [N, T_max]; the truth of a sampled set in meta and labels."""
    options = options or Options()
    emission = options.emission
    spec = spec or ("casino" if emission == "categorical" else "gaussian")
    if spec in ("casino", "gaussian"):
        truth = CASINO if spec == "casino" else GAUSSIAN
        kind = "categorical" if spec == "casino" else "gaussian"
        if kind != emission:
            raise UserError(f"--data {spec} has {kind} emissions; add --emission {kind}")
        x, z = sample_hmm(truth, options.sequences, options.length)
        n_test = max(len(x) // 5, 1)
        # NaN pads a Gaussian sequence to T_max (mask_of): missing steps, on purpose
        return Dataset(x[n_test:], x[:n_test], z[n_test:], z[:n_test], name=spec,
                       meta={"truth": truth, "emission": kind,
                             "source": "sampled from the known HMM in models/hmm.py (seed 0)"}, nan_is_missing=True)
    if spec == "nile":
        if emission != "gaussian":
            raise UserError("--data nile is real-valued river flow; add --emission gaussian")
        try:
            from statsmodels.datasets import nile
        except ImportError:
            raise UserError("--data nile needs the statsmodels package (it ships the series): "
                            "pip install statsmodels") from None
        flow = torch.tensor(nile.load_pandas().data["volume"].to_numpy(), dtype=torch.float32)
        # one series: the first 80 years to fit, the last 20 held out
        return Dataset(flow[None, :80], flow[None, 80:], name="nile",
                       meta={"emission": "gaussian", "first_year": 1871,
                             "source": "statsmodels.datasets.nile (annual flow at Aswan, 1871-1970)"})
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--data {spec!r} is neither a known data set (casino, gaussian, nile) "
                        "nor an existing CSV file of sequences (one per row)")
    x = read_csv_sequences(path, emission)
    n_test = max(len(x) // 5, 1)
    return Dataset(x[:-n_test], x[-n_test:], name=path.stem, meta={"emission": emission, "source": str(path)},
                   nan_is_missing=True)


# ---------------------------------------------------------------- the model
class HMM:
    """p(pi, A, theta) p(x | pi, A, theta), with z summed out by the forward algorithm."""

    def __init__(self, options: Options, dataset: Dataset):
        self.K, self.emission = options.states, options.emission
        x = dataset.train
        if x.is_floating_point() != (self.emission == "gaussian"):
            raise UserError(f"the data are {'real' if x.is_floating_point() else 'integer'}-valued; "
                            f"use --emission {'gaussian' if x.is_floating_point() else 'categorical'}")
        if (mask_of(x).sum(-1) < 1).any():
            raise UserError("a training sequence is empty; every sequence needs at least one observation")
        self.device = x.device
        if self.emission == "categorical":
            seen = [t for t in (x, dataset.test) if t is not None]
            self.V = int(max(t.max() for t in seen)) + 1        # alphabet 0..V-1
        else:
            obs = x[mask_of(x)]
            self.m, self.s = obs.mean(), obs.std().clamp(min=1e-3) if len(obs) > 1 else obs.new_tensor(1.0)
            self.quantiles = torch.quantile(obs, (torch.arange(self.K, device=x.device) + 0.5) / self.K)

    # p(x_t | z_t = k) for every t and k: [n, T, K]
    def emission_log_prob(self, x: torch.Tensor, theta: dict) -> torch.Tensor:
        if self.emission == "categorical":
            log_B = theta["B"].log()                              # [K, V]
            return log_B.T[x.clamp(min=0)]                        # pads read symbol 0; masked later
        mu, sigma = theta["mu"], theta["sigma"]
        return dist.Normal(mu, sigma).log_prob(torch.nan_to_num(x).unsqueeze(-1))

    def prior_sites(self, like: torch.Tensor) -> dict:
        ones = lambda *s: like.new_ones(s)  # noqa: E731
        sites = {"pi": dist.Dirichlet(ones(self.K)), "A": dist.Dirichlet(ones(self.K, self.K))}
        if self.emission == "categorical":
            sites["B"] = dist.Dirichlet(ones(self.K, self.V))
        else:
            sites["mu"] = dist.Normal(self.m * ones(self.K), 2 * self.s * ones(self.K))
            sites["sigma"] = dist.LogNormal(self.s.log() * ones(self.K), ones(self.K))
        return sites

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        x = x.to(self.device)
        sites = self.prior_sites(x.float() if not x.is_floating_point() else x)
        pi = pyro.sample("pi", sites.pop("pi"))
        theta = {}
        with pyro.plate("states", self.K):                       # one row per state i
            A = pyro.sample("A", sites.pop("A"))
            for name, prior in sites.items():
                theta[name] = pyro.sample(name, prior)
        log_b = self.emission_log_prob(x, theta)
        with data_plate(x, idx, size):
            pyro.factor("x", exact.forward(pi.log(), A.log(), log_b, mask_of(x)))

    # -- guides ------------------------------------------------------------------
    def _init(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A starting point that breaks the symmetry between states (seeded by the runner)."""
        K = self.K
        if name == "pi":
            return like.new_ones(K) / K
        if name == "A":  # "sticky" start: states persist, as in most segmentations
            return (like.new_ones(K, K) + 8 * torch.eye(K, device=like.device)) / (K + 8)
        if name == "B":
            return torch.distributions.Dirichlet(like.new_ones(K, self.V) * 5).sample()
        if name == "mu":
            return self.quantiles.to(like)
        return self.s.to(like) * like.new_ones(K) / K

    def meanfield(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(pi) q(A) q(theta) = Dir(pi) prod_i Dir(A_i) prod_i q(theta_i): the conjugate family per row."""
        like = x.float() if not x.is_floating_point() else x
        pos = constraints.positive
        pyro.sample("pi", dist.Dirichlet(pyro.param("q_pi", 20 * self._init("pi", like), constraint=pos)))
        with pyro.plate("states", self.K):
            pyro.sample("A", dist.Dirichlet(pyro.param("q_A", 20 * self._init("A", like), constraint=pos)))
            if self.emission == "categorical":
                pyro.sample("B", dist.Dirichlet(pyro.param("q_B", 20 * self._init("B", like), constraint=pos)))
            else:
                loc = pyro.param("q_mu_loc", self._init("mu", like))
                scale = pyro.param("q_mu_scale", 0.1 * self.s.to(like) * like.new_ones(self.K), constraint=pos)
                pyro.sample("mu", dist.Normal(loc, scale))
                sloc = pyro.param("q_sigma_loc", self._init("sigma", like).log())
                sscale = pyro.param("q_sigma_scale", 0.1 * like.new_ones(self.K), constraint=pos)
                pyro.sample("sigma", dist.LogNormal(sloc, sscale))

    def map(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """Point masses: maximizing the ELBO maximizes log p(x, pi, A, theta) (MAP)."""
        like = x.float() if not x.is_floating_point() else x
        simplex, pos = constraints.simplex, constraints.positive
        pyro.sample("pi", dist.Delta(pyro.param("map_pi", self._init("pi", like), constraint=simplex), event_dim=1))
        with pyro.plate("states", self.K):
            pyro.sample("A", dist.Delta(pyro.param("map_A", self._init("A", like), constraint=simplex),
                                        event_dim=1))
            if self.emission == "categorical":
                pyro.sample("B", dist.Delta(pyro.param("map_B", self._init("B", like), constraint=simplex),
                                            event_dim=1))
            else:
                pyro.sample("mu", dist.Delta(pyro.param("map_mu", self._init("mu", like))))
                pyro.sample("sigma", dist.Delta(pyro.param("map_sigma", self._init("sigma", like),
                                                           constraint=pos)))

    # -- each fitted guide's point estimate of (pi, A, theta) ------------------------------
    def map_point(self) -> dict:
        """Under MAP: the point itself."""
        p = lambda name: pyro.param(name).detach()  # noqa: E731
        est = {"pi": p("map_pi"), "A": p("map_A")}
        est.update({"B": p("map_B")} if self.emission == "categorical"
                   else {"mu": p("map_mu"), "sigma": p("map_sigma")})
        return est

    def posterior_mean(self) -> dict:
        """Under the mean-field guide: the means of q(pi), q(A), q(theta)."""
        p = lambda name: pyro.param(name).detach()  # noqa: E731
        norm = lambda c: c / c.sum(-1, keepdim=True)  # noqa: E731  E[Dir(c)] = c / sum(c)
        est = {"pi": norm(p("q_pi")), "A": norm(p("q_A"))}
        if self.emission == "categorical":
            est["B"] = norm(p("q_B"))
        else:  # E[LogNormal(l, s)] = exp(l + s^2 / 2)
            est["mu"] = p("q_mu_loc")
            est["sigma"] = torch.exp(p("q_sigma_loc") + p("q_sigma_scale") ** 2 / 2)
        return est

    def guides(self) -> dict[str, PointGuide]:
        return {"meanfield": PointGuide(self.meanfield, point_estimate=self.posterior_mean),
                "map": PointGuide(self.map, point_estimate=self.map_point)}

    # -- exact inference given parameters -------------------------------------------
    def _args(self, x: torch.Tensor, theta: dict):
        theta = {k: torch.as_tensor(v, device=x.device, dtype=torch.float32) for k, v in theta.items()}
        return theta["pi"].log(), theta["A"].log(), self.emission_log_prob(x, theta), mask_of(x)

    def log_likelihood(self, x: torch.Tensor, theta: dict) -> torch.Tensor:
        return exact.forward(*self._args(x, theta))

    def decode(self, x: torch.Tensor, theta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(Viterbi paths, forward-backward marginals) of every sequence in x."""
        args = self._args(x, theta)
        return exact.viterbi(*args)[0], exact.forward_backward(*args)[0]

    # -- metrics and plots -----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, run) -> dict:
        ds, est = run.dataset, run.guide.point_estimate()
        out = {"states": self.K, "emission": self.emission}
        for split, x in (("train", ds.train), ("test", ds.test)):
            if x is not None:
                steps = mask_of(x).sum()
                out[f"{split}_log_likelihood_per_step"] = (self.log_likelihood(x, est).sum() / steps).item()
        truth = ds.meta.get("truth")
        if truth is not None and len(truth["A"]) == self.K and ds.test is not None:
            key = "B" if self.emission == "categorical" else "mu"
            t = {k: torch.tensor(v, device=ds.train.device) for k, v in truth.items()}
            perm = exact.match_states(est[key], t[key])
            matched = {k: v[perm] for k, v in est.items()}
            matched["A"] = est["A"][perm][:, perm]
            out["truth_test_log_likelihood_per_step"] = (
                self.log_likelihood(ds.test, t).sum() / mask_of(ds.test).sum()).item()
            for k in t:
                if k != "pi":  # pi is seen once per sequence: too few draws to recover it well
                    out[f"recovery_max_abs_error_{k}"] = (matched[k] - t[k]).abs().max().item()
            if ds.labels_test is not None:
                path, _ = self.decode(ds.test, est)
                m = mask_of(ds.test)
                inverse = torch.argsort(perm)                   # estimated state -> true label
                out["viterbi_accuracy"] = (inverse[path[m]] == ds.labels_test[m]).float().mean().item()
        return out

    @torch.no_grad()
    def plots(self, run, out: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from ppl_gen.core import plotting  # noqa: F401  (sets the Agg backend)

        ds, est = run.dataset, run.guide.point_estimate()
        x = (ds.test if ds.test is not None and ds.name != "nile" else ds.train)[:1]
        path, gamma = self.decode(x, est)
        m = mask_of(x)[0]
        xs, zs, gs = x[0][m].cpu(), path[0][m].cpu(), gamma[0][m].cpu()
        t0 = ds.meta.get("first_year", 1)
        t = torch.arange(len(xs)) + t0
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.6), sharex=True,
                                       gridspec_kw={"height_ratios": [1.3, 1]})
        colors = plt.cm.tab10(zs.numpy() % 10)
        if self.emission == "gaussian":
            ax1.plot(t, xs, color="0.6", lw=0.8)
            ax1.scatter(t, xs, c=colors, s=14, zorder=3)
            ax1.step(t, est["mu"].cpu()[zs], where="mid", color="k", lw=1.2, label="mu of the Viterbi state")
            ax1.legend(loc="best", fontsize=8)
        else:
            ax1.scatter(t, xs, c=colors, s=14)
            ax1.set_yticks(range(self.V))
        ax1.set_ylabel("x_t (colour: Viterbi state)")
        ax1.set_title(f"{ds.name}: a sequence with its decoded states (K={self.K}, guide {run.guide_name})")
        for k in range(self.K):
            ax2.plot(t, gs[:, k], color=plt.cm.tab10(k % 10), lw=1.2, label=f"p(z_t={k} | x)")
        if ds.labels_test is not None and ds.test is not None and ds.name != "nile":
            truth = ds.labels_test[0][m].cpu()
            perm = exact.match_states(est["B" if self.emission == "categorical" else "mu"],
                                      torch.tensor(ds.meta["truth"]["B" if self.emission == "categorical"
                                                                    else "mu"]))
            if len(ds.meta["truth"]["A"]) == self.K:
                ax2.fill_between(t, 0, (perm[truth] == 1).float() if self.K == 2 else truth * 0, step="mid",
                                 color="0.85", label="true state 1" if self.K == 2 else None)
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("forward-backward")
        ax2.set_xlabel("year" if ds.name == "nile" else "t")
        ax2.legend(loc="upper right", fontsize=7, ncol=min(self.K + 1, 4))
        fig.tight_layout()
        fig.savefig(out / "decoded.png", dpi=100)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2 if ds.meta.get("truth") and len(ds.meta["truth"]["A"]) == self.K else 1,
                                 figsize=(8, 3.6), squeeze=False, constrained_layout=True)
        mats = [("estimated A", est["A"].cpu())]
        if axes.shape[1] == 2:
            key = "B" if self.emission == "categorical" else "mu"
            perm = exact.match_states(est[key], torch.tensor(ds.meta["truth"][key], device=est[key].device))
            mats = [("estimated A (states matched)", est["A"][perm][:, perm].cpu()),
                    ("true A", torch.tensor(ds.meta["truth"]["A"]))]
        for ax, (title, mat) in zip(axes[0], mats):
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            for (i, j), v in zip(((i, j) for i in range(self.K) for j in range(self.K)), mat.flatten()):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
            # one tick per state (imshow's default ticks fall at -0.5, 0, 0.5, ...)
            ax.set_xticks(range(self.K), [str(k) for k in range(self.K)])
            ax.set_yticks(range(self.K), [str(k) for k in range(self.K)])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("next state j")
            ax.set_ylabel("previous state i")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="A[i, j] = p(next = j | previous = i)")
        fig.savefig(out / "transitions.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return [out / "decoded.png", out / "transitions.png"]


@dataclass
class PointGuide(Guide):
    """A guide of this file and the one (pi, A, theta) it stands for, ``point_estimate() -> dict``
    (keys pi, A and B or mu, sigma): what the forward algorithm, Viterbi and the plots run with."""

    point_estimate: Callable[[], dict] | None = None


def build(options: Options, dataset: Dataset) -> Spec:
    hmm = HMM(options, dataset)
    return Spec(model=hmm.model, guides=hmm.guides(),
                evaluate=hmm.evaluate, plots=hmm.plots, description=__doc__.split("\n")[0],
                # posterior.nc: A[states, next_state], B[states, symbol]; pi is over the states too
                posterior_dims={"pi": ("states",), "A": ("states", "next_state"), "B": ("states", "symbol")})


def numpyro_twin(options: Options, dataset: Dataset):
    """The NumPyro twin (``--backend numpyro``, Phan et al. 2019): the same priors, the same
    likelihood with the hidden states summed out by the scaled forward recursion (Rabiner
    1989, eqs. 19-21 and section V-A; ``ppl_gen.exact.hmm.forward`` ported to ``jax.lax.scan``),
    and both guides with the Pyro store's parameter names and constraints. float32, as on
    the Pyro side. ``extras["forward"]`` is the JAX forward algorithm itself (for tests)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate, softmax_simplex

    hmm = HMM(options, dataset)            # K, V and the Gaussian scale (m, s) from the same data
    K, gaussian = hmm.K, hmm.emission == "gaussian"
    f32 = jnp.float32
    if gaussian:
        m, s = float(hmm.m), float(hmm.s)
        quantiles = jnp.asarray(hmm.quantiles.cpu().numpy(), f32)
    else:
        V = hmm.V

    def forward(log_pi, log_A, log_b, mask):
        """log p(x_1..x_T) per sequence: alpha_t = [alpha_{t-1} A] * b(x_t), rescaled to sum 1
        each step, log p(x) = sum_t log c_t. Emissions are shifted by their max over states
        first (no underflow in the tails); padded steps (mask False) leave alpha unchanged."""
        shift = log_b.max(-1)                                            # [n, T]
        b = jnp.exp(log_b - shift[..., None])                            # in (0, 1]
        A = jnp.exp(log_A)
        alpha = jnp.exp(log_pi) * b[:, 0]                                # [n, K]
        c = alpha.sum(-1)
        alpha = alpha / c[:, None]
        log_px = jnp.where(mask[:, 0], jnp.log(c) + shift[:, 0], 0.0)

        def step(carry, inputs):
            alpha, log_px = carry
            b_t, shift_t, m_t = inputs
            a = (alpha @ A) * b_t
            c = a.sum(-1)
            alpha = jnp.where(m_t[:, None], a / c[:, None], alpha)
            return (alpha, log_px + jnp.where(m_t, jnp.log(c) + shift_t, 0.0)), None

        time_major = lambda v: jnp.moveaxis(v[:, 1:], 1, 0)  # noqa: E731  scan runs over t = 2..T
        (_, log_px), _ = jax.lax.scan(step, (alpha, log_px), (time_major(b), time_major(shift), time_major(mask)))
        return log_px

    def mask_of(x):
        return ~jnp.isnan(x) if gaussian else x >= 0

    def emission_log_prob(x, theta):
        """log p(x_t | z_t = k): [n, T, K]; pads read symbol 0 (or x = 0) and are masked later."""
        if not gaussian:
            return jnp.log(theta["B"]).T[jnp.clip(x, 0)]
        return nd.Normal(theta["mu"], theta["sigma"]).log_prob(jnp.nan_to_num(x)[..., None])

    def model(x, idx=None, size=None):
        ones = lambda *shape: jnp.ones(shape, f32)  # noqa: E731
        pi = numpyro.sample("pi", nd.Dirichlet(ones(K)))
        theta = {}
        with numpyro.plate("states", K):                                  # one row per state i
            A = numpyro.sample("A", nd.Dirichlet(ones(K, K)))
            if gaussian:
                theta["mu"] = numpyro.sample("mu", nd.Normal(m * ones(K), 2 * s * ones(K)))
                theta["sigma"] = numpyro.sample("sigma", nd.LogNormal(math.log(s) * ones(K), ones(K)))
            else:
                theta["B"] = numpyro.sample("B", nd.Dirichlet(ones(K, V)))
        log_b = emission_log_prob(x, theta)
        with data_plate(x, idx, size):
            numpyro.factor("x", forward(jnp.log(pi), jnp.log(A), log_b, mask_of(x)))

    # HMM._init's starting points; the runner overwrites them with the Pyro side's values
    # (B's there is a random draw; here a fixed one, only for standalone use)
    init = {"pi": jnp.full(K, 1.0 / K, f32), "A": (jnp.ones((K, K), f32) + 8 * jnp.eye(K, dtype=f32)) / (K + 8)}
    if gaussian:
        init.update(mu=quantiles, sigma=jnp.full(K, s / K, f32))
    else:
        init["B"] = jnp.asarray(np.random.default_rng(0).dirichlet(np.full(V, 5.0), K), f32)
    pos, simplex = nd.constraints.positive, softmax_simplex()

    def meanfield(x, idx=None, size=None):
        """q(pi) q(A) q(theta) = Dir(pi) prod_i Dir(A_i) prod_i q(theta_i), as HMM.meanfield."""
        numpyro.sample("pi", nd.Dirichlet(numpyro.param("q_pi", 20 * init["pi"], constraint=pos)))
        with numpyro.plate("states", K):
            numpyro.sample("A", nd.Dirichlet(numpyro.param("q_A", 20 * init["A"], constraint=pos)))
            if gaussian:
                loc = numpyro.param("q_mu_loc", init["mu"])
                scale = numpyro.param("q_mu_scale", jnp.full(K, 0.1 * s, f32), constraint=pos)
                numpyro.sample("mu", nd.Normal(loc, scale))
                sloc = numpyro.param("q_sigma_loc", jnp.log(init["sigma"]))
                sscale = numpyro.param("q_sigma_scale", jnp.full(K, 0.1, f32), constraint=pos)
                numpyro.sample("sigma", nd.LogNormal(sloc, sscale))
            else:
                numpyro.sample("B", nd.Dirichlet(numpyro.param("q_B", 20 * init["B"], constraint=pos)))

    def map_guide(x, idx=None, size=None):
        """Point masses (MAP), as HMM.map; simplex rows unconstrained by softmax, as in Pyro's store."""
        numpyro.sample("pi", nd.Delta(numpyro.param("map_pi", init["pi"], constraint=simplex), event_dim=1))
        with numpyro.plate("states", K):
            numpyro.sample("A", nd.Delta(numpyro.param("map_A", init["A"], constraint=simplex), event_dim=1))
            if gaussian:
                numpyro.sample("mu", nd.Delta(numpyro.param("map_mu", init["mu"])))
                numpyro.sample("sigma", nd.Delta(numpyro.param("map_sigma", init["sigma"], constraint=pos)))
            else:
                numpyro.sample("B", nd.Delta(numpyro.param("map_B", init["B"], constraint=simplex), event_dim=1))

    return NumpyroTwin(model=model, guides={"meanfield": meanfield, "map": map_guide},
                       description="HMM, hidden states summed out by the forward algorithm (lax.scan)",
                       extras={"forward": forward, "emission_log_prob": emission_log_prob, "mask_of": mask_of})
