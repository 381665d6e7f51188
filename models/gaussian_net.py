"""A linear-Gaussian network: the lecture's continuous A, B -> C -> D example (Koller & Friedman 2009, sec. 7.2).

    A ~ N(mu_a, Sigma_a)      B ~ N(mu_b, Sigma_b)
    C ~ N(A + B, Sigma_c)     D ~ N(mu_d + C, Sigma_d)

(Sigma_* are variances, as in the lecture's N(mu, Sigma).) Evidence on any subset of
{A, B, C, D} (``--evidence D=2``) leaves a Gaussian posterior over the rest, computed in
closed form by conditioning the joint Gaussian. Two guides fit it:

* ``mean_field``: q(z) = prod_v N(z_v | m_v, s_v^2), a diagonal Normal (Blei et al. 2017);
* ``full_rank``: q(z) = N(z | m, L L^T), a MultivariateNormal over all latents.

The full-rank family contains the posterior, so its optimum is exact. The mean-field
optimum of KL(q || p) for a Gaussian p = N(mu, Lambda^{-1}) matches the means and sets
s_v^2 = 1 / Lambda_vv <= Sigma_vv, with equality only where v is uncorrelated with the
other latents a posteriori (Bishop 2006, sec. 10.1.2): mean-field under-estimates the
marginal variances. Observing D makes A and B anti-correlated (explaining away).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch

from ppl_gen import Dataset, Spec, UserError
from ppl_gen.core.protocol import Guide
from ppl_gen.exact.gaussian import condition, kl_gaussian, linear_gaussian_joint

NODES = ["A", "B", "C", "D"]


@dataclass
class Options:
    mu_a: float = field(default=0.0, metadata={"help": "mean of A"})
    mu_b: float = field(default=0.0, metadata={"help": "mean of B"})
    mu_d: float = field(default=0.0, metadata={"help": "offset of D given C"})
    var_a: float = field(default=1.0, metadata={"help": "Sigma_a, the variance of A"})
    var_b: float = field(default=1.0, metadata={"help": "Sigma_b, the variance of B"})
    var_c: float = field(default=0.5, metadata={"help": "Sigma_c, the variance of C given A, B"})
    var_d: float = field(default=0.5, metadata={"help": "Sigma_d, the variance of D given C"})
    evidence: str = field(default="D=2.0", metadata={
        "help": "observed nodes as VAR=VALUE,... over A, B, C, D; 'none' for no evidence"})

    def validate(self):
        for v in "abcd":
            if not getattr(self, f"var_{v}") > 0:
                raise UserError(f"--var-{v} must be positive, got {getattr(self, f'var_{v}')}")
        parse_evidence(self.evidence)


# Reparameterized Monte Carlo ELBO; lr 0.02 and 2000 steps bring both guides within
# ~0.05 of their optima on the default evidence.
DEFAULTS = {"elbo": "trace", "steps": 2000, "lr": 0.02}


def parse_evidence(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if text.strip().lower() == "none":
        return out
    for part in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in NODES:
            raise UserError(f"--evidence: unknown variable {name!r}; the variables are {', '.join(NODES)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UserError(f"--evidence {part!r}: the value of {name} must be a number, e.g. {name}=1.5") from None
    if len(out) == len(NODES):
        raise UserError("the evidence observes every variable: nothing to infer; drop some of --evidence")
    return out


def data(options: Options) -> Dataset:
    """The evidence as one row over (A, B, C, D); NaN marks an unobserved node."""
    ev = parse_evidence(options.evidence)
    row = torch.tensor([[ev.get(v, float("nan")) for v in NODES]])
    return Dataset(train=row, name="evidence", meta={"evidence": ev}, nan_is_missing=True)


class GaussianNet:
    def __init__(self, options: Options, device: torch.device):
        o = options
        self.options = o
        self.evidence = parse_evidence(o.evidence)
        self.observed = [NODES.index(v) for v in self.evidence]
        self.latents = [v for v in NODES if v not in self.evidence]
        f64 = dict(dtype=torch.float64)
        # x = b + W x + eps in the order A, B, C, D
        self.b = torch.tensor([o.mu_a, o.mu_b, 0.0, o.mu_d], **f64)
        self.W = torch.zeros(4, 4, **f64)
        self.W[2, 0] = self.W[2, 1] = self.W[3, 2] = 1.0
        self.v = torch.tensor([o.var_a, o.var_b, o.var_c, o.var_d], **f64)
        self.device = device

    def model(self, x: torch.Tensor):
        o = self.options
        obs = {v: x[0, NODES.index(v)] for v in self.evidence}
        sd = lambda var: x.new_tensor(var).sqrt()  # noqa: E731
        a = pyro.sample("A", dist.Normal(x.new_tensor(o.mu_a), sd(o.var_a)), obs=obs.get("A"))
        b = pyro.sample("B", dist.Normal(x.new_tensor(o.mu_b), sd(o.var_b)), obs=obs.get("B"))
        c = pyro.sample("C", dist.Normal(a + b, sd(o.var_c)), obs=obs.get("C"))
        pyro.sample("D", dist.Normal(o.mu_d + c, sd(o.var_d)), obs=obs.get("D"))

    def mean_field(self, x: torch.Tensor):
        for v in self.latents:
            loc = pyro.param(f"loc_{v}", lambda: x.new_zeros(()))
            scale = pyro.param(f"scale_{v}", lambda: x.new_ones(()), constraint=dist.constraints.positive)
            pyro.sample(v, dist.Normal(loc, scale))

    def full_rank(self, x: torch.Tensor):
        k = len(self.latents)
        loc = pyro.param("loc", lambda: x.new_zeros(k))
        scale_tril = pyro.param("scale_tril", lambda: torch.eye(k, dtype=x.dtype, device=x.device),
                                constraint=dist.constraints.lower_cholesky)
        z = pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril),
                        infer={"is_auxiliary": True})
        for i, v in enumerate(self.latents):  # each model site takes its coordinate of z
            pyro.sample(v, dist.Delta(z[..., i]))

    # -- the closed form -------------------------------------------------------------
    def exact(self):
        mean, cov = linear_gaussian_joint(self.b, self.W, self.v)
        values = torch.tensor([self.evidence[NODES[i]] for i in self.observed], dtype=torch.float64)
        return condition(mean, cov, self.observed, values)

    def draw_posterior(self, n: int) -> dict:
        """n exact draws of the latents, jointly Gaussian, one site each."""
        mu, Sigma = self.exact()
        z = dist.MultivariateNormal(mu, Sigma).sample((n,))
        return {v: z[:, i] for i, v in enumerate(self.latents)}

    # -- each fitted guide's q(z) = N(m, S), read from Pyro's store ---------------------
    def q_mean_field(self) -> tuple[torch.Tensor, torch.Tensor]:
        """m = (m_v), S = diag(s_v^2)."""
        store = pyro.get_param_store()
        loc = torch.stack([store[f"loc_{v}"].detach().double().cpu() for v in self.latents])
        scale = torch.stack([store[f"scale_{v}"].detach().double().cpu() for v in self.latents])
        return loc, torch.diag(scale ** 2)

    def q_full_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """m and S = L L^T."""
        store = pyro.get_param_store()
        L = store["scale_tril"].detach().double().cpu()
        return store["loc"].detach().double().cpu(), L @ L.T

    def guides(self) -> dict[str, GaussianGuide]:
        return {"mean_field": GaussianGuide(self.mean_field, q=self.q_mean_field),
                "full_rank": GaussianGuide(self.full_rank, q=self.q_full_rank)}

    def evaluate(self, run) -> dict:
        mu, Sigma = self.exact()
        precision = torch.linalg.inv(Sigma)
        out = {"latents": self.latents, "evidence": self.evidence,
               "posterior": {"exact": {"mean": mu.tolist(), "cov": Sigma.tolist()}},
               # the mean-field optimum in closed form: exact means, variances 1 / Lambda_vv
               "mean_field_optimum_var": (1 / torch.diagonal(precision)).tolist()}
        if getattr(run.guide, "q", None) is None:  # an automatic guide: its summary and the reference report it
            return out
        m, S = run.guide.q()
        out["posterior"]["vi"] = {"mean": m.tolist(), "cov": S.tolist()}
        return {
            **out,
            "kl_vi_to_exact": kl_gaussian(m, S, mu, Sigma).item(),
            "max_abs_mean_error": (m - mu).abs().max().item(),
            "var_ratio_vi_to_exact": (torch.diagonal(S) / torch.diagonal(Sigma)).tolist(),
        }

    def plots(self, run, out: Path) -> list[Path]:
        if getattr(run.guide, "q", None) is None:
            return []
        return [plot_pairs(self, run.guide.q(), run.guide_name, out / "posterior_pairs.png")]


@dataclass
class GaussianGuide(Guide):
    """A guide of this file and the Gaussian it has fitted, ``q() -> (m, S)``: the mean and
    covariance of q(z) over the latents, in their order, for comparison with the exact posterior."""

    q: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None


def plot_pairs(net: GaussianNet, q: tuple[torch.Tensor, torch.Tensor], guide_name: str, path: Path) -> Path:
    """2-sigma ellipses of the exact posterior and of q = (m, S) for each pair of latents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mu, Sigma = net.exact()
    m, S = q
    pairs = [(i, j) for i in range(len(net.latents)) for j in range(i + 1, len(net.latents))]
    if not pairs:
        pairs = [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.4), dpi=90, squeeze=False)
    t = torch.linspace(0, 2 * torch.pi, 100, dtype=torch.float64)
    circle = torch.stack([t.cos(), t.sin()])
    for ax, (i, j) in zip(axes[0], pairs):
        for (mean, cov), color, label in (((mu, Sigma), "tab:blue", "exact posterior"),
                                          ((m, S), "tab:orange", f"q ({guide_name})")):
            idx = [i, j] if i != j else [i]
            sub = cov[idx][:, idx]
            if len(idx) == 1:
                xs = torch.linspace(-4, 4, 200, dtype=torch.float64) * Sigma[i, i].sqrt() + mu[i]
                ax.plot(xs, dist.Normal(mean[i], sub[0, 0].sqrt()).log_prob(xs).exp(), color=color, label=label)
                continue
            ellipse = mean[idx, None] + 2 * torch.linalg.cholesky(sub) @ circle
            ax.plot(ellipse[0], ellipse[1], color=color, label=label)
            ax.plot(mean[i], mean[j], "+", color=color)
        ax.set_xlabel(net.latents[i])
        ax.set_ylabel(net.latents[j] if i != j else "density")
    axes[0][0].legend(fontsize=8)
    ev = ", ".join(f"{k}={v:g}" for k, v in net.evidence.items()) or "no evidence"
    fig.suptitle(f"2-sigma ellipses given {ev}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build(options: Options, dataset: Dataset) -> Spec:
    net = GaussianNet(options, dataset.train.device)
    return Spec(model=net.model, guides=net.guides(), evaluate=net.evaluate, plots=net.plots,
                exact_posterior=net.draw_posterior, description=__doc__.split("\n")[0])


def numpyro_twin(options: Options, dataset: Dataset):
    """The NumPyro twin (``--backend numpyro``, Phan et al. 2019): the same A, B -> C -> D
    network and both guides, with the Pyro store's parameter names and constraints."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin

    o, ev = options, parse_evidence(options.evidence)
    latents = [v for v in NODES if v not in ev]

    def model(x):
        obs = {v: x[0, NODES.index(v)] for v in ev}
        sd = lambda var: jnp.sqrt(jnp.asarray(var, x.dtype))  # noqa: E731
        a = numpyro.sample("A", nd.Normal(jnp.asarray(o.mu_a, x.dtype), sd(o.var_a)), obs=obs.get("A"))
        b = numpyro.sample("B", nd.Normal(jnp.asarray(o.mu_b, x.dtype), sd(o.var_b)), obs=obs.get("B"))
        c = numpyro.sample("C", nd.Normal(a + b, sd(o.var_c)), obs=obs.get("C"))
        numpyro.sample("D", nd.Normal(o.mu_d + c, sd(o.var_d)), obs=obs.get("D"))

    def mean_field(x):
        for v in latents:
            loc = numpyro.param(f"loc_{v}", jnp.zeros((), x.dtype))
            scale = numpyro.param(f"scale_{v}", jnp.ones((), x.dtype), constraint=nd.constraints.positive)
            numpyro.sample(v, nd.Normal(loc, scale))

    def full_rank(x):
        k = len(latents)
        loc = numpyro.param("loc", jnp.zeros(k, x.dtype))
        scale_tril = numpyro.param("scale_tril", jnp.eye(k, dtype=x.dtype), constraint=nd.constraints.lower_cholesky)
        z = numpyro.sample("z", nd.MultivariateNormal(loc, scale_tril=scale_tril), infer={"is_auxiliary": True})
        for i, v in enumerate(latents):
            numpyro.sample(v, nd.Delta(z[..., i]))

    return NumpyroTwin(model=model, guides={"mean_field": mean_field, "full_rank": full_rank})
