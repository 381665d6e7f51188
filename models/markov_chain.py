"""Order-k Markov chain over discrete symbols with Dirichlet priors (the lecture's Markov model).

The k-th order Markov assumption: p(x_t | x_1..x_{t-1}) = p(x_t | x_{t-k}..x_{t-1}), so

    p(x_1..x_T) = prod_t p(x_t | c_t),   c_t = (x_{t-k}, ..., x_{t-1})   (the context)

drawn as a chain-shaped DGM in which x_t has the k previous symbols as parents. The
sequence is preceded by k start symbols <s>, so the row of the context (<s>, ..., <s>)
is the initial distribution p(x_1) and the other rows are transitions; every line
ends with the symbol "\\n", so the chain also models where a line stops.

Prior and likelihood, one Dirichlet per context c (a row theta_c of the transition table):

    theta_c ~ Dirichlet(alpha 1_V),    x_t | c_t ~ Categorical(theta_{c_t})

The Dirichlet is conjugate: the posterior is Dirichlet(alpha + N_c), with N_c[v] the
number of times v follows c in the training data (e.g. Murphy 2012, Machine Learning:
A Probabilistic Perspective, section 3.4; Bishop 2006, section 2.2.1). SVI with the
guide q(theta_c) = Dirichlet(lambda_c) has this posterior in its family, so the ELBO is
maximized exactly at lambda_c = alpha + N_c; the tests hold SVI to that closed form.

Only contexts that occur in the data get a row: a row no data point touches
integrates out of the model exactly, and an unseen context predicts with the prior
mean 1/V. So orders above 1 cost memory in the number of distinct contexts, not V^k.

Data: the Reuters headlines shipped with the PyPI package ``lda`` (default), any text
file (``--data FILE``, one sequence per line), or ``--data sample``: lines sampled from
the model itself with theta drawn from the prior (known truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from ppl_gen import Dataset, Spec, UserError, data_plate
from ppl_gen.datasets import text as texts


@dataclass
class Options:
    order: int = field(default=1, metadata={"help": "k: each symbol depends on the k previous ones"})
    alpha: float = field(default=0.1, metadata={"help": "Dirichlet concentration of each transition entry"})
    symbols: int = field(default=4, metadata={"help": "alphabet size of --data sample (plus the line end)"})
    sequences: int = field(default=300, metadata={"help": "lines drawn for --data sample"})
    samples: int = field(default=8, metadata={"help": "lines of text sampled from the fitted chain"})

    def validate(self):
        if self.order < 1:
            raise UserError(f"--order must be at least 1 (x_t depends on the k previous symbols), got {self.order}")
        if not self.alpha > 0:
            raise UserError(f"--alpha must be positive (a Dirichlet concentration), got {self.alpha}")
        if self.symbols < 1 or self.sequences < 2:
            raise UserError("--symbols must be at least 1 and --sequences at least 2")


DEFAULTS = {"elbo": "meanfield", "steps": 1000, "lr": 0.05}
# theta in float64: with alpha = 0.1 a float32 Gamma draw underflows to 0 with probability
# ~(1e-38)^0.1 = 1e-4 per entry, which gives log 0 and NaN gradients; in float64, ~1e-31.
REAL = torch.float64


# ---------------------------------------------------------------- contexts
class Contexts:
    """Maps each position t of padded sequences to the row of its context c_t.

    A context (x_{t-k}, ..., x_{t-1}) over V symbols plus <s> (id V) is the integer
    sum_j x_{t-j} (V+1)^(j-1); rows are the sorted codes that occur in the data, found
    by binary search, so the lookup is vectorized (and runs on a GPU)."""

    def __init__(self, V: int, order: int, *data: torch.Tensor):
        self.V, self.k, self.base = V, order, V + 1
        if self.base ** order > 2 ** 62:
            raise UserError(f"--order {order} over {V} symbols overflows the context codes; use a smaller --order")
        codes = [self.codes(x)[x >= 0] for x in data if x is not None]
        self.rows = torch.unique(torch.cat(codes))                        # sorted

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        n, T = x.shape
        prev = torch.cat([x.new_full((n, self.k), self.V), x.clamp(min=0)], 1)
        code = torch.zeros_like(x)
        for j in range(1, self.k + 1):                                   # x_{t-j}
            code = code + prev[:, self.k - j:self.k - j + T] * self.base ** (j - 1)
        return code

    def lookup(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index, whether the context has a row)."""
        r = torch.searchsorted(self.rows, code.contiguous()).clamp(max=len(self.rows) - 1)
        return r, self.rows[r] == code

    def row_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.lookup(self.codes(x))[0]

    def label(self, row: int, alphabet: str) -> str:
        code, chars = int(self.rows[row]), []
        for _ in range(self.k):
            code, c = divmod(code, self.base)
            chars.append("<s>" if c == self.V else repr(alphabet[c])[1:-1])
        return "".join(reversed(chars))


# ---------------------------------------------------------------- data
def sample_chain(theta_of, V: int, order: int, n: int, max_len: int, generator=None) -> torch.Tensor:
    """n lines by ancestral sampling: x_t ~ theta(c_t) until the line end (id V-1) or max_len."""
    ctx = Contexts(V, order, torch.zeros(1, 1, dtype=torch.long))
    x = torch.full((n, max_len), -1, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for t in range(max_len):
        code = ctx.codes(x[:, :t + 1])[:, t]
        nxt = torch.multinomial(theta_of(code), 1, generator=generator).squeeze(-1)
        x[:, t] = torch.where(done, -1, nxt)
        done |= nxt == V - 1
    return x


def data(spec: str | None = None, options: Options | None = None) -> Dataset:
    options = options or Options()
    if spec != "sample":
        return texts.load_text(spec)
    V, k = options.symbols + 1, options.order                            # the last symbol ends a line
    if (V + 1) ** k > 2_000_000:
        raise UserError(f"--data sample draws a dense table of (symbols+2)^order = {(V + 1) ** k} rows; "
                        "use fewer --symbols or a smaller --order")
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the same table in every process and run
        torch.manual_seed(0)
        theta = torch.distributions.Dirichlet(torch.full(((V + 1) ** k, V), 1.0)).sample()
    theta[:, -1] = theta[:, -1].clamp(min=0.05)                          # lines of finite length
    theta = theta / theta.sum(-1, keepdim=True)
    x = sample_chain(lambda code: theta[code], V, k, options.sequences, 60, generator=g)
    n_test = len(x) // 5
    alphabet = "abcdefghijklmnopqrstuvwxyz"[:V - 1] + texts.EOS if V <= 27 else None
    if alphabet is None:
        raise UserError("--data sample supports at most 26 --symbols")
    return Dataset(x[n_test:], x[:n_test], name="sample",
                   meta={"alphabet": alphabet, "source": "sampled from an order-k chain with Dirichlet(1) rows"})


# ---------------------------------------------------------------- the model
class MarkovChain:
    def __init__(self, options: Options, dataset: Dataset):
        self.options, self.alphabet = options, dataset.meta["alphabet"]
        self.V, self.alpha = len(self.alphabet), options.alpha
        x = dataset.train
        if int((x >= 0).sum()) < 2:
            raise UserError("the training data hold fewer than 2 symbols; a Markov chain needs sequences "
                            "with at least one transition")
        self.ctx = Contexts(self.V, options.order, x, dataset.test)
        self.R = len(self.ctx.rows)

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """N[c, v]: how often symbol v follows context c in x (the sufficient statistics)."""
        m = x >= 0
        N = torch.zeros(self.R, self.V, device=x.device, dtype=REAL)
        return N.index_put_((self.ctx.row_of(x)[m], x[m]), torch.ones_like(x[m], dtype=N.dtype), accumulate=True)

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        with pyro.plate("contexts", self.R):
            theta = pyro.sample("theta", dist.Dirichlet(x.new_full((self.R, self.V), self.alpha, dtype=REAL)))
        m = x >= 0
        # a draw can underflow to exactly 0 (P ~ tiny^alpha per entry); floor it
        log_theta = theta.clamp(min=torch.finfo(theta.dtype).tiny).log()
        log_p = log_theta[..., self.ctx.row_of(x), x.clamp(min=0)]            # log theta_{c_t}[x_t]
        with data_plate(x, idx, size):
            pyro.factor("x", torch.where(m, log_p, torch.zeros_like(log_p)).sum(-1))

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(theta_c) = Dirichlet(lambda_c), one free concentration vector per context."""
        lam = pyro.param("lambda", lambda: x.new_full((self.R, self.V), self.alpha, dtype=REAL),
                         constraint=constraints.positive)
        with pyro.plate("contexts", self.R):
            pyro.sample("theta", dist.Dirichlet(lam))

    def exact_posterior(self, train: torch.Tensor) -> torch.Tensor:
        """The conjugate posterior's concentration, alpha + N_c, per row."""
        return self.alpha + self.counts(train)

    def log_likelihood_per_symbol(self, x: torch.Tensor, mean: torch.Tensor) -> float:
        """Mean over the symbols of x of log E[theta_{c_t}][x_t]: the posterior predictive
        probability of each next symbol given its context."""
        m = x >= 0
        return mean.log()[self.ctx.row_of(x), x.clamp(min=0)][m].mean().item()

    @torch.no_grad()
    def evaluate(self, run) -> dict:
        ds = run.dataset
        lam = pyro.param("lambda").detach()
        mean = lam / lam.sum(-1, keepdim=True)                                # E_q[theta_c]
        exact = self.exact_posterior(ds.train)
        exact_mean = exact / exact.sum(-1, keepdim=True)
        seen = self.counts(ds.train).sum(-1) > 0
        out = {"order": self.options.order, "alphabet_size": self.V, "contexts": self.R,
               "max_abs_error_posterior_mean": (mean - exact_mean)[seen].abs().max().item()}
        for split, x in (("train", ds.train), ("test", ds.test)):
            if x is None:
                continue
            ll = self.log_likelihood_per_symbol(x, mean)
            out[f"{split}_log_likelihood_per_symbol"] = ll
            out[f"{split}_perplexity"] = float(torch.tensor(-ll).exp())
            out[f"{split}_log_likelihood_per_symbol_exact_posterior"] = self.log_likelihood_per_symbol(x, exact_mean)
        out["sampled_text"] = self.sample_text(mean, self.options.samples)
        return out

    def sample_text(self, mean: torch.Tensor, n: int, max_len: int = 120) -> list[str]:
        uniform = mean.new_full((self.V,), 1.0 / self.V)

        def theta_of(code):
            r, found = self.ctx.lookup(code.to(mean.device))
            return torch.where(found.unsqueeze(-1), mean[r], uniform).cpu()

        return texts.decode(sample_chain(theta_of, self.V, self.options.order, n, max_len), self.alphabet)

    @torch.no_grad()
    def plots(self, run, out: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from ppl_gen.core import plotting  # noqa: F401  (sets the Agg backend)

        lam = pyro.param("lambda").detach()
        mean = (lam / lam.sum(-1, keepdim=True)).cpu()
        N = self.counts(run.dataset.train).cpu()
        rows = torch.argsort(N.sum(-1), descending=True)[:40].sort().values  # the most used contexts
        cols = torch.argsort(N.sum(0), descending=True)[:40].sort().values   # and the most used symbols
        sym = lambda c: "\\n" if c == texts.EOS else ("' '" if c == " " else c)  # noqa: E731
        fig, ax = plt.subplots(figsize=(8.5, 7))
        im = ax.imshow(mean[rows][:, cols].numpy(), cmap="magma_r", aspect="auto")
        ax.set_xticks(range(len(cols)), [sym(self.alphabet[c]) for c in cols.tolist()], fontsize=7)
        ax.set_yticks(range(len(rows)), [self.ctx.label(r, self.alphabet) for r in rows.tolist()], fontsize=7)
        ax.set_xlabel("next symbol x_t")
        ax.set_ylabel(f"context x_(t-{self.options.order})..x_(t-1)")
        ax.set_title(f"posterior mean p(x_t | context), order {self.options.order}: "
                     f"{len(rows)} most frequent contexts x {len(cols)} symbols", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        fig.savefig(out / "transitions.png", dpi=90)
        plt.close(fig)
        return [out / "transitions.png"]


def build(options: Options, dataset: Dataset) -> Spec:
    chain = MarkovChain(options, dataset)
    # the conjugate posterior, drawn: theta_c ~ Dirichlet(alpha + N_c), each row independently
    exact = lambda n: {"theta": dist.Dirichlet(chain.exact_posterior(dataset.train)).sample((n,))}  # noqa: E731
    return Spec(model=chain.model, guides={"dirichlet": chain.guide}, evaluate=chain.evaluate,
                plots=chain.plots, exact_posterior=exact, description=__doc__.split("\n")[0])


def numpyro_twin(options: Options, dataset: Dataset):
    """The NumPyro twin (``--backend numpyro``, Phan et al. 2019): Dirichlet rows over the
    same contexts (``Contexts`` above, ported to jax.numpy for the lookup), float64 as on the
    Pyro side, and the Dirichlet guide with the same parameter ``lambda``."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate

    chain = MarkovChain(options, dataset)
    V, R, k, base, alpha = chain.V, chain.R, chain.ctx.k, chain.ctx.base, chain.alpha
    rows = chain.ctx.rows.cpu().numpy()

    def row_of(x):
        """Contexts.row_of in jax.numpy: the code of (x_{t-k}..x_{t-1}), then its row."""
        n, T = x.shape
        prev = jnp.concatenate([jnp.full((n, k), V, x.dtype), jnp.clip(x, 0)], 1)
        code = jnp.zeros_like(x)
        for j in range(1, k + 1):
            code = code + prev[:, k - j:k - j + T] * base ** (j - 1)
        table = jnp.asarray(rows)
        return jnp.clip(jnp.searchsorted(table, code), None, R - 1)

    def model(x, idx=None, size=None):
        with numpyro.plate("contexts", R):
            theta = numpyro.sample("theta", nd.Dirichlet(jnp.full((R, V), alpha, jnp.float64)))
        m = x >= 0
        log_theta = jnp.log(jnp.clip(theta, jnp.finfo(theta.dtype).tiny))
        log_p = log_theta[..., row_of(x), jnp.clip(x, 0)]
        with data_plate(x, idx, size):
            numpyro.factor("x", jnp.where(m, log_p, 0.0).sum(-1))

    def guide(x, idx=None, size=None):
        lam = numpyro.param("lambda", jnp.full((R, V), alpha, jnp.float64), constraint=nd.constraints.positive)
        with numpyro.plate("contexts", R):
            numpyro.sample("theta", nd.Dirichlet(lam))

    return NumpyroTwin(model=model, guides={"dirichlet": guide}, x64=True)
