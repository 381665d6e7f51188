"""Discrete Bayesian networks: CPTs, exact posteriors and mean-field VI (Koller & Friedman 2009, ch. 3, 9).

A network is a DAG whose joint factorizes into conditional probability tables,

    P(X_1, ..., X_T) = prod_t P(X_t | parents(X_t)).

The lecture's example (``--network lecture``, the default) has four binary variables,

    P(a, b, c, d) = P(a) P(b) P(c | a, b) P(d | c),

with the tables of the slides (A: a0 .75; B: b0 .33; P(c0 | a, b) = .45, 1, .9, .7 for
a0b0, a0b1, a1b0, a1b1; P(d0 | c) = .3, .5 for c0, c1). ``--network asia`` is the chest-clinic
network of Lauritzen & Spiegelhalter (1988, JRSS B 50:157-224); ``--network FILE.bif[.gz]``
reads any network in the BIF text format.

Observed (shaded) nodes are the ``--evidence``; the model samples every other variable
given its parents (ancestral sampling) and observes the evidence. The posterior over the
latents z given the evidence e is computed exactly (variable elimination), and fitted by
the mean-field family q(z) = prod_v q_v(z_v), one Categorical per latent (Blei et al. 2017).
Since log P(e) = ELBO(q) + KL(q || P(z | e)), maximizing the ELBO minimizes that KL.

Estimator: ``--elbo enum`` (the default here) enumerates the guide, so Pyro sums the ELBO
over every joint state of q exactly: no sampling noise, exact gradients; its cost grows as
the product of the latents' cardinalities (fine up to ~2^16 states, e.g. asia). For large
networks use ``--elbo tracegraph`` (score-function gradients with Rao-Blackwellization
along the graph). The reported ELBO and KL are exact either way.

``--learn-from data.csv`` instead learns the CPTs from fully observed rows, each row of
each CPT with a Dirichlet(prior_count) prior and a Dirichlet guide; the conjugate posterior
Dirichlet(prior_count + counts) is the closed form it is checked against.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from ppl_gen import Dataset, Spec, UserError
from ppl_gen.exact import bayesnet as bn

# The guide marks its sites for enumeration, which --elbo enum uses and the sampling
# estimators (trace, tracegraph) ignore, as intended; Pyro warns about the latter.
warnings.filterwarnings("ignore", message=".*Found sample sites configured for enumeration")

NETWORKS_DIR = Path(__file__).resolve().parent / "networks"
EXAMPLE_EVIDENCE = {"lecture": "C=c0,D=d1", "asia": "xray=yes,dysp=yes"}


@dataclass
class Options:
    network: str = field(default="lecture", metadata={
        "help": "lecture, asia, or the path of a BIF file (.bif or .bif.gz)"})
    evidence: str = field(default="example", metadata={
        "help": "observed variables as VAR=STATE,VAR=STATE; 'none' for no evidence; 'example' is the "
                f"network's example ({', '.join(f'{k}: {v}' for k, v in EXAMPLE_EVIDENCE.items())})"})
    query: str = field(default="", metadata={
        "help": "variables whose posterior marginals to report, e.g. A,B (default: all unobserved)"})
    learn_from: str = field(default="", metadata={
        "help": "CSV with one column per variable (header = names, cells = state names): "
                "learn the CPTs instead of inferring latents"})
    prior_count: float = field(default=1.0, metadata={
        "help": "Dirichlet prior pseudo-count per CPT entry for --learn-from (alpha in the literature)"})
    floor: float = field(default=1e-6, metadata={
        "help": "when the evidence leaves latent configurations of probability 0, mean-field VI "
                "runs on the network with CPT entries raised to this floor (see the docs)"})

    def validate(self):
        if not self.prior_count > 0:
            raise UserError(f"--prior-count must be positive, got {self.prior_count}")
        if not 0 < self.floor < 0.01:
            raise UserError(f"--floor must be in (0, 0.01), got {self.floor}")


# enum: exact ELBO and gradients for the small discrete latent spaces here (see above)
DEFAULTS = {"elbo": "enum", "steps": 300, "lr": 0.05}


# ---------------------------------------------------------------- networks
def lecture_network() -> bn.BayesNet:
    """The lecture's A, B -> C -> D example with its CPTs."""
    cpt = {
        "A": [0.75, 0.25],
        "B": [0.33, 0.67],
        # P(C | A, B): axes (A, B, C); c0 column .45, 1, .9, .7 for a0b0, a0b1, a1b0, a1b1
        "C": [[[0.45, 0.55], [1.0, 0.0]],
              [[0.9, 0.1], [0.7, 0.3]]],
        "D": [[0.3, 0.7], [0.5, 0.5]],   # P(D | C): rows c0, c1
    }
    states = {v: [f"{v.lower()}{i}" for i in range(2)] for v in "ABCD"}
    parents = {"A": [], "B": [], "C": ["A", "B"], "D": ["C"]}
    return bn.BayesNet(states, parents, {v: torch.tensor(t, dtype=torch.float64) for v, t in cpt.items()}, name="lecture")


def load_network(name: str) -> bn.BayesNet:
    if name == "lecture":
        return lecture_network()
    shipped = NETWORKS_DIR / f"{name}.bif"
    if shipped.is_file():
        return bn.read_bif(shipped)
    path = Path(name)
    if path.suffix in (".bif", ".gz") or path.exists():
        return bn.read_bif(path)
    choices = ["lecture"] + sorted(p.name[:-4] for p in NETWORKS_DIR.glob("*.bif"))
    raise UserError(f"--network {name!r} is neither a shipped network ({', '.join(choices)}) "
                    "nor a .bif/.bif.gz file")


def resolve_evidence(net: bn.BayesNet, options: Options) -> dict[str, int]:
    text = options.evidence
    if text == "example":
        text = EXAMPLE_EVIDENCE.get(net.name, "")
    if text.strip().lower() == "none":
        text = ""
    return net.parse_assignment(text, "--evidence")


def resolve_query(net: bn.BayesNet, evidence: dict[str, int], options: Options) -> list[str]:
    names = [s.strip() for s in options.query.split(",") if s.strip()]
    for v in names:
        net.check_variable(v, "--query")
        if v in evidence:
            raise UserError(f"--query {v}: {v} is observed ({v}={net.states[v][evidence[v]]}); "
                            "query unobserved variables or drop it from --evidence")
    return names or [v for v in net.order if v not in evidence]


# ---------------------------------------------------------------- data
def read_csv(path: str | Path, net: bn.BayesNet) -> torch.Tensor:
    """Rows of state names -> (N, T) state indices, columns in ``net.order``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--learn-from {path}: no such file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise UserError(f"{path} is empty; it needs a header of variable names and data rows")
    header = [h.strip() for h in rows[0]]
    unknown = [h for h in header if h not in net.states]
    if unknown:
        raise UserError(f"{path}: unknown column(s) {', '.join(unknown)}; {net.name}'s variables are "
                        f"{', '.join(net.order)}")
    missing = [v for v in net.order if v not in header]
    if missing:
        raise UserError(f"{path}: no column for {', '.join(missing)}; learning needs every variable observed")
    col = {v: header.index(v) for v in net.order}
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise UserError(f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
        codes = []
        for v in net.order:
            s = row[col[v]].strip()
            if s not in net.states[v]:
                raise UserError(f"{path}:{line}: {v} has no state {s!r}; its states are {', '.join(net.states[v])}")
            codes.append(net.states[v].index(s))
        out.append(codes)
    if not out:
        raise UserError(f"{path} has a header but no data rows")
    return torch.tensor(out, dtype=torch.long)


def write_csv(net: bn.BayesNet, n: int, path: str | Path, seed: int = 0) -> Path:
    """n ancestral samples of the network, as a CSV of state names (for --learn-from)."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        values = net.pyro_model(num_samples=n)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(net.order)
        for i in range(n):
            w.writerow([net.states[v][values[v][i].item()] for v in net.order])
    return Path(path)


def data(options: Options) -> Dataset:
    """The evidence as one row of state indices (-1 = unobserved), or the --learn-from rows."""
    net = load_network(options.network)
    if options.learn_from:
        return Dataset(train=read_csv(options.learn_from, net), name=Path(options.learn_from).name,
                       meta={"network": net.name, "columns": net.order})
    evidence = resolve_evidence(net, options)
    row = torch.tensor([[evidence.get(v, -1) for v in net.order]], dtype=torch.long)
    return Dataset(train=row, name=net.name,
                   meta={"evidence": {v: net.states[v][s] for v, s in evidence.items()}})


# ---------------------------------------------------------------- inference
class Inference:
    """The network with evidence: Pyro model, mean-field guide, exact answers, plots."""

    def __init__(self, net: bn.BayesNet, evidence: dict[str, int], query: list[str], options: Options,
                 device: torch.device):
        self.net, self.evidence, self.query, self.options = net, evidence, query, options
        self.latents = [v for v in net.order if v not in evidence]
        if not self.latents:
            raise UserError("the evidence observes every variable: nothing to infer; drop some of --evidence")
        self.exact = bn.posterior(net, evidence)  # raises UserError when P(e) = 0
        # A zero of P(z, e) at some latent z makes KL(q || p) infinite for every q of full
        # support; VI then targets the network with CPT entries floored at eps.
        self.floor = options.floor if bn.has_structural_zeros(net, evidence) else 0.0
        target = net.with_floor(self.floor) if self.floor else net
        self.cpts = {v: t.to(device=device, dtype=torch.float32) for v, t in target.cpt.items()}
        self.index = {v: i for i, v in enumerate(net.order)}

    def model(self, x: torch.Tensor):
        """Ancestral sampling of every variable given its parents; x[0] holds the evidence."""
        observed = {v: x[0, self.index[v]] for v in self.evidence}
        self.net.pyro_model(observed, cpts=self.cpts)

    def mean_field(self, x: torch.Tensor):
        """q(z) = prod_v Categorical(z_v | softmax(lambda_v)), enumerated under --elbo enum."""
        for v in self.latents:
            logits = pyro.param(f"q_{v}", lambda: x.new_zeros(self.net.card(v), dtype=torch.float32))
            pyro.sample(v, dist.Categorical(logits=logits), infer={"enumerate": "parallel"})

    def q(self) -> dict[str, torch.Tensor]:
        store = pyro.get_param_store()
        return {v: torch.softmax(store[f"q_{v}"].detach().double().cpu(), -1) for v in self.latents}

    def evaluate(self, run) -> dict:
        net, ev, q = self.net, self.evidence, self.q()
        named = lambda p, v: {s: float(p[i]) for i, s in enumerate(net.states[v])}  # noqa: E731
        elbo = bn.mean_field_elbo(net, ev, q, self.floor)
        kl, how = bn.kl_to_posterior(net, ev, q, self.floor)
        entropy = float(sum(-(qv * qv.clamp_min(1e-300).log()).sum() for qv in q.values()))
        out = {
            "network": net.name,
            "evidence": {v: net.states[v][s] for v, s in ev.items()},
            "marginals": {"exact": {v: named(self.exact.marginals[v], v) for v in self.query},
                          "vi": {v: named(q[v], v) for v in self.query}},
            "log_evidence": self.exact.log_evidence,
            "elbo_final": elbo,
            # the ELBO read as the lecture reads it: E_q[log P(z, e)] + H[q] (mean field: H sums over v)
            "elbo_expected_log_joint": elbo - entropy,
            "elbo_entropy_q": entropy,
            "kl_vi_to_exact": kl,
            "kl_method": how,
            "max_abs_marginal_error": max(float((q[v] - self.exact.marginals[v]).abs().max())
                                          for v in self.latents),
        }
        if self.floor:
            floored = bn.posterior(net, ev, self.floor)
            out.update({"vi_floor": self.floor, "log_evidence_floored": floored.log_evidence,
                        "vi_note": "the evidence leaves latent states of probability 0, where every "
                                   "full-support q has KL = inf; ELBO and KL are for the network with "
                                   f"CPT entries floored at {self.floor:g}"})
        return out

    def plots(self, run, out: Path) -> list[Path]:
        return [plot_dag(self.net, self.evidence, self.exact.marginals, self.q(),
                         out / "posterior_dag.png",
                         f"{self.net.name}: exact posterior vs mean-field q ({run.config['settings']['elbo']})")]


# ---------------------------------------------------------------- CPT learning
class Learning:
    """theta_{v,j} ~ Dirichlet(alpha) for each CPT row j; rows x_n ~ prod_t P(x_t | pa; theta)."""

    def __init__(self, net: bn.BayesNet, options: Options, device: torch.device):
        self.net, self.alpha, self.device = net, options.prior_count, device
        self.shape = {v: tuple(net.card(p) for p in net.parents[v]) + (net.card(v),) for v in net.order}
        self.col = {v: i for i, v in enumerate(net.order)}

    def model(self, x: torch.Tensor):
        theta = {}
        for v in self.net.order:
            prior = dist.Dirichlet(x.new_full(self.shape[v], self.alpha, dtype=torch.float32))
            theta[v] = pyro.sample(f"theta_{v}", prior.to_event(len(self.shape[v]) - 1))
        with pyro.plate("rows", x.shape[0]):
            for v in self.net.order:
                probs = theta[v][tuple(x[:, self.col[p]] for p in self.net.parents[v])]
                pyro.sample(v, dist.Categorical(probs=probs), obs=x[:, self.col[v]])

    def dirichlet_guide(self, x: torch.Tensor):
        """q(theta_{v,j}) = Dirichlet(kappa_{v,j}), started at the prior."""
        for v in self.net.order:
            kappa = pyro.param(f"kappa_{v}", lambda: x.new_full(self.shape[v], self.alpha, dtype=torch.float32),
                               constraint=dist.constraints.positive)
            pyro.sample(f"theta_{v}", dist.Dirichlet(kappa).to_event(len(self.shape[v]) - 1))

    def conjugate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The closed form: theta_{v,j} | data ~ Dirichlet(alpha + n_{v,j,.}) (counts of each row)."""
        out = {}
        for v in self.net.order:
            counts = torch.zeros(self.shape[v], dtype=torch.float64)
            idx = tuple(x[:, self.col[p]].cpu() for p in self.net.parents[v] + [v])
            counts.index_put_(idx, torch.ones(len(x), dtype=torch.float64), accumulate=True)
            out[v] = counts + self.alpha
        return out

    def evaluate(self, run) -> dict:
        store = pyro.get_param_store()
        exact = self.conjugate(run.dataset.train)
        mean = lambda k: k / k.sum(-1, keepdim=True)  # noqa: E731
        vi = {v: mean(store[f"kappa_{v}"].detach().double().cpu()) for v in self.net.order}
        ex = {v: mean(exact[v]) for v in self.net.order}
        return {
            "network": self.net.name, "rows": len(run.dataset.train), "prior_count": self.alpha,
            "cpt_posterior_mean": {"vi": {v: vi[v].tolist() for v in vi},
                                   "conjugate": {v: ex[v].tolist() for v in ex}},
            "max_abs_error_vs_conjugate": max(float((vi[v] - ex[v]).abs().max()) for v in vi),
        }


def build(options: Options, dataset: Dataset) -> Spec:
    net = load_network(options.network)
    device = dataset.train.device
    if options.learn_from:
        learn = Learning(net, options, device)
        # posterior.nc: theta_v has one dimension per parent and one for v, labelled by state names
        dims = {f"theta_{v}": {u: net.states[u] for u in net.parents[v] + [v]} for v in net.order}
        conjugate = learn.conjugate(dataset.train)
        exact = lambda n: {f"theta_{v}": dist.Dirichlet(k.float()).sample((n,))  # noqa: E731
                           for v, k in conjugate.items()}
        return Spec(model=learn.model, guides={"dirichlet": learn.dirichlet_guide},
                    evaluate=learn.evaluate, description="CPT learning with Dirichlet priors",
                    posterior_dims=dims, exact_posterior=exact)
    evidence = resolve_evidence(net, options)
    inf = Inference(net, evidence, resolve_query(net, evidence, options), options, device)
    # the exact marginals P(z_v | e) by variable elimination, drawn one latent at a time (each scheme's
    # error is measured marginal by marginal)
    exact = lambda n: {v: dist.Categorical(probs=inf.exact.marginals[v].float()).sample((n,))  # noqa: E731
                       for v in inf.latents}
    return Spec(model=inf.model, guides={"mean_field": inf.mean_field}, evaluate=inf.evaluate,
                plots=inf.plots, exact_posterior=exact, description=__doc__.split("\n")[0])


# ---------------------------------------------------------------- the picture
def plot_dag(net: bn.BayesNet, evidence: dict[str, int], exact: dict[str, torch.Tensor],
             q: dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """The DAG, one box per node; latent nodes show P(v | e) and q_v as bars side by side,
    observed (shaded) nodes their state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth: dict[str, int] = {}
    for v in net.order:  # longest path from a root: parents sit above children
        depth[v] = 1 + max((depth[p] for p in net.parents[v]), default=-1)
    rows: dict[int, list[str]] = {}
    for v in net.order:
        rows.setdefault(depth[v], []).append(v)
    n_rows, width = len(rows), max(len(r) for r in rows.values())
    fig = plt.figure(figsize=(max(2.3 * width, 5.0), 1.9 * n_rows + 0.6), dpi=90)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    box_w, box_h = 0.8 / width, 0.62 / (n_rows + 0.4)
    pos = {}
    for d, vs in rows.items():
        for i, v in enumerate(vs):
            pos[v] = ((i + 0.5) / len(vs), 1 - (d + 0.75) / (n_rows + 0.4))
    for v in net.order:
        for p in net.parents[v]:
            (x0, y0), (x1, y1) = pos[p], pos[v]
            ax.annotate("", xy=(x1, y1 + box_h / 2), xytext=(x0, y0 - box_h / 2),
                        arrowprops=dict(arrowstyle="-|>", color="0.4", lw=1.0))
    for v, (x, y) in pos.items():
        ax.add_patch(plt.Rectangle((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                   facecolor="0.8" if v in evidence else "white", edgecolor="0.3"))
        if v in evidence:
            ax.text(x, y, f"{v}\n= {net.states[v][evidence[v]]}", ha="center", va="center", fontsize=9)
            continue
        inset = fig.add_axes([x - box_w / 2 + 0.1 * box_w, y - box_h / 2 + 0.12 * box_h,
                              0.8 * box_w, 0.62 * box_h])
        k = net.card(v)
        xs = torch.arange(k).double()
        inset.bar(xs - 0.2, exact[v].tolist(), width=0.4, color="tab:blue", label="exact P(v | e)")
        inset.bar(xs + 0.2, q[v].tolist(), width=0.4, color="tab:orange", label="mean-field q")
        inset.set_ylim(0, 1)
        inset.set_xticks(xs.tolist(), net.states[v], fontsize=7)
        inset.tick_params(axis="y", labelsize=6)
        inset.set_title(v, fontsize=9, pad=2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange", "0.8")]
    fig.legend(handles, ["exact P(v | evidence)", "mean-field q(v)", "observed (evidence)"],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10, y=0.995, va="top")
    fig.savefig(path)
    plt.close(fig)
    return path



# ---------------------------------------------------------------- the NumPyro twin
def numpyro_twin(options: Options, dataset: Dataset):
    """The NumPyro twin (``--backend numpyro``; Phan et al. 2019) of both modes: the same
    sites, priors and CPTs, and the Pyro guides' parameters (``q_v``, ``kappa_v``).

    CPT learning (``--learn-from``): Dirichlet priors, Dirichlet guides ``kappa_v`` (positive).
    That guide has no discrete site, so this file's default ``--elbo enum`` enumerates
    nothing and computes Trace_ELBO's estimate: ``enum_as="trace"`` tells the backend so.

    Inference: the mean-field Categorical guide ``q_v`` (logits). Pyro sums its ELBO over q
    by enumeration; NumPyro's TraceEnum_ELBO needs funsor, and NumPyro's Trace_ELBO and
    TraceMeanField_ELBO add no score-function term: a Categorical draw carries no gradient,
    so their gradient for the logits is -grad log q(z), zero in expectation (NumPyro only
    warns; the backend refuses them for discrete latents). TraceGraph_ELBO does add it, the
    score-function (REINFORCE) estimator of Williams (1992) and Ranganath et al. (2014),
    each q_v weighted by the costs downstream of it (Schulman et al. 2015): unbiased, so
    this mode runs on NumPyro with ``--elbo tracegraph``, noisier than Pyro's exact sum.
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin

    net = load_network(options.network)
    device = dataset.train.device
    if options.learn_from:
        learn = Learning(net, options, device)
        shape, col, alpha = learn.shape, learn.col, learn.alpha

        def model(x):
            theta = {}
            for v in net.order:
                prior = nd.Dirichlet(jnp.full(shape[v], alpha, jnp.float32))
                theta[v] = numpyro.sample(f"theta_{v}", prior.to_event(len(shape[v]) - 1))
            with numpyro.plate("rows", x.shape[0]):
                for v in net.order:
                    probs = theta[v][tuple(x[:, col[p]] for p in net.parents[v])]
                    numpyro.sample(v, nd.Categorical(probs=probs), obs=x[:, col[v]])

        def dirichlet_guide(x):
            for v in net.order:
                kappa = numpyro.param(f"kappa_{v}", jnp.full(shape[v], alpha, jnp.float32),
                                      constraint=nd.constraints.positive)
                numpyro.sample(f"theta_{v}", nd.Dirichlet(kappa).to_event(len(shape[v]) - 1))

        return NumpyroTwin(model=model, guides={"dirichlet": dirichlet_guide}, enum_as="trace",
                           description="CPT learning with Dirichlet priors")

    evidence = resolve_evidence(net, options)
    inf = Inference(net, evidence, resolve_query(net, evidence, options), options, device)
    cpts = {v: jnp.asarray(t.cpu().numpy()) for v, t in inf.cpts.items()}  # floored where Pyro's are

    def model(x):
        values = {}
        for v in net.order:
            probs = cpts[v][tuple(values[p] for p in net.parents[v])]
            values[v] = numpyro.sample(v, nd.Categorical(probs=probs),
                                       obs=x[0, inf.index[v]] if v in evidence else None)

    def mean_field(x):
        for v in inf.latents:
            logits = numpyro.param(f"q_{v}", jnp.zeros(net.card(v), jnp.float32))
            numpyro.sample(v, nd.Categorical(logits=logits))

    return NumpyroTwin(model=model, guides={"mean_field": mean_field}, description=__doc__.split("\n")[0])
