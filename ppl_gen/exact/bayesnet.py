"""Discrete Bayesian networks: CPTs, the BIF reader, exact inference and the mean-field ELBO.

A Bayesian network is a DAG over discrete variables X_1..X_T whose joint factorizes as

    P(X_1, ..., X_T) = prod_t P(X_t | parents(X_t)),

each factor a conditional probability table (CPT). Here a CPT is a tensor of shape
``(*parent_cards, card)``: ``cpt[j_1, ..., j_m, :]`` is the distribution of the child for
the parents' states ``(j_1, ..., j_m)``, so every last-axis row sums to 1.

Exact inference (:func:`posterior`) multiplies the CPTs restricted to the evidence and
sums out every variable: variable elimination (Koller & Friedman 2009, "Probabilistic
Graphical Models", ch. 9), with the elimination order chosen by ``opt_einsum``. One
contraction gives Z = P(evidence); its gradient with respect to a vector of ones
attached to each variable gives every unnormalized marginal in one backward pass
(Darwiche 2003, "A differential approach to inference in Bayesian networks").

The mean-field ELBO (:func:`mean_field_elbo`) for q(z) = prod_v q_v(z_v) is exact and
cheap: E_q[log P(z, e)] splits over the CPTs, each needing only its family's q's
(Blei, Kucukelbir & McAuliffe 2017, "Variational inference: a review for statisticians").
"""

from __future__ import annotations

import gzip
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import opt_einsum
import pyro
import pyro.distributions as dist
import torch

from ppl_gen.core.errors import UserError

ROW_TOLERANCE = 1e-4  # BIF files print 4-6 digits; rows summing to 1 +- this are accepted


@dataclass
class BayesNet:
    """A DAG of named discrete variables with named states and CPTs.

    ``states[v]``: the state names of v; ``parents[v]``: its parents, in the order of the
    CPT's leading axes; ``cpt[v]``: tensor ``(*parent_cards, card)`` (float64).
    ``order`` is a topological order, checked at construction (a cycle is a UserError).
    """

    states: dict[str, list[str]]
    parents: dict[str, list[str]]
    cpt: dict[str, torch.Tensor]
    name: str = "network"
    order: list[str] = field(default_factory=list)

    def __post_init__(self):
        for v in self.states:
            if v not in self.cpt:
                raise UserError(f"{self.name}: variable {v} has no probability table")
            for p in self.parents.get(v, []):
                if p not in self.states:
                    raise UserError(f"{self.name}: {v} has parent {p}, which is not a variable "
                                    f"(variables: {', '.join(self.states)})")
        self.parents = {v: list(self.parents.get(v, [])) for v in self.states}
        self.order = topological_order(self.parents, self.name)
        for v in self.states:
            self.cpt[v] = torch.as_tensor(self.cpt[v], dtype=torch.float64)
            self._check_cpt(v)

    # -- structure ------------------------------------------------------------------
    @property
    def variables(self) -> list[str]:
        return list(self.order)

    def card(self, v: str) -> int:
        return len(self.states[v])

    def _check_cpt(self, v: str) -> None:
        table = self.cpt[v]
        shape = tuple(self.card(p) for p in self.parents[v]) + (self.card(v),)
        if tuple(table.shape) != shape:
            raise UserError(f"{self.name}: the table of {v} has shape {tuple(table.shape)}, expected "
                            f"{shape} (parents {self.parents[v]} then {v}'s {self.card(v)} states)")
        if (table < 0).any():
            raise UserError(f"{self.name}: the table of {v} has a negative entry")
        sums = table.sum(-1)
        for idx in itertools.product(*(range(n) for n in shape[:-1])):
            s = sums[idx].item()
            if abs(s - 1.0) > ROW_TOLERANCE:
                given = ", ".join(f"{p}={self.states[p][j]}" for p, j in zip(self.parents[v], idx))
                where = f" given {given}" if given else ""
                raise UserError(f"{self.name}: P({v}{' | ' + given if given else ''}) sums to {s:.6g}, "
                                f"not 1; fix the row of {v}{where}")

    # -- evidence -------------------------------------------------------------------
    def parse_assignment(self, text: str, what: str = "--evidence") -> dict[str, int]:
        """``"D=d1,C=c0"`` -> ``{"D": 1, "C": 0}`` (state indices); errors list the valid names."""
        out: dict[str, int] = {}
        for part in filter(None, (s.strip() for s in (text or "").split(","))):
            if "=" not in part:
                raise UserError(f"{what} {part!r} is not VARIABLE=STATE, e.g. "
                                f"{self.order[-1]}={self.states[self.order[-1]][0]}")
            v, s = (t.strip() for t in part.split("=", 1))
            self.check_variable(v, what)
            if s not in self.states[v]:
                raise UserError(f"{what}: {v} has no state {s!r}; its states are {', '.join(self.states[v])}")
            out[v] = self.states[v].index(s)
        return out

    def check_variable(self, v: str, what: str) -> None:
        if v not in self.states:
            raise UserError(f"{what}: unknown variable {v!r}; {self.name}'s variables are "
                            f"{', '.join(self.order)}")

    # -- factors --------------------------------------------------------------------
    def factors(self, evidence: dict[str, int] | None = None, floor: float = 0.0):
        """Each CPT as (tensor, variable names), restricted to the evidence: observed axes
        are indexed away, so the factors' product over the rest is P(z, e)."""
        evidence = evidence or {}
        out = []
        for v in self.order:
            table = self.cpt[v] if floor <= 0 else floored(self.cpt[v], floor)
            names = self.parents[v] + [v]
            index = tuple(evidence.get(n, slice(None)) for n in names)
            out.append((table[index], [n for n in names if n not in evidence]))
        return out

    def with_floor(self, eps: float) -> "BayesNet":
        """The same network with every CPT entry raised to at least eps (rows renormalized)."""
        return BayesNet(dict(self.states), dict(self.parents),
                        {v: floored(t, eps) for v, t in self.cpt.items()}, f"{self.name} (floor {eps:g})")

    # -- Pyro -----------------------------------------------------------------------
    def pyro_model(self, evidence: dict[str, torch.Tensor] | None = None, num_samples: int | None = None,
                   cpts: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Ancestral sampling: each X_t ~ Categorical(P(X_t | parents)) in topological order;
        evidence sites are observed. With ``num_samples`` the draws are iid in a plate."""
        cpts = cpts or self.cpt
        evidence = evidence or {}
        values: dict[str, torch.Tensor] = {}
        with pyro.plate("samples", num_samples) if num_samples else _nullcontext():
            for v in self.order:
                probs = cpts[v][tuple(values[p] for p in self.parents[v])]
                values[v] = pyro.sample(v, dist.Categorical(probs=probs), obs=evidence.get(v))
        return values


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def floored(table: torch.Tensor, eps: float) -> torch.Tensor:
    t = table.clamp(min=eps)
    return t / t.sum(-1, keepdim=True)


def topological_order(parents: dict[str, list[str]], name: str = "network") -> list[str]:
    """Parents before children; a cycle raises a UserError that names it (A -> B -> A)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(v: str, path: list[str]):
        if state.get(v) == 2:
            return
        if state.get(v) == 1:
            # the walk goes child -> parent; reversed, the cycle reads along the arrows
            cycle = (path[path.index(v):] + [v])[::-1]
            raise UserError(f"{name}: the graph has a cycle {' -> '.join(cycle)}; "
                            "a Bayesian network must be a DAG")
        state[v] = 1
        for p in parents.get(v, []):
            visit(p, path + [v])
        state[v] = 2
        order.append(v)

    for v in parents:
        visit(v, [])
    return order


# ---------------------------------------------------------------- exact inference
@dataclass
class Posterior:
    log_evidence: float                  # log P(e)
    marginals: dict[str, torch.Tensor]   # v -> P(v | e), for every unobserved v


def posterior(net: BayesNet, evidence: dict[str, int] | None = None, floor: float = 0.0) -> Posterior:
    """Exact P(e) and P(v | e) for every unobserved v, by one factor contraction (VE)
    and its gradient. Raises UserError when P(e) = 0."""
    evidence = evidence or {}
    latents = [v for v in net.order if v not in evidence]
    ones = {v: torch.ones(net.card(v), dtype=torch.float64, requires_grad=True) for v in latents}
    operands = []
    for table, names in net.factors(evidence, floor):
        operands += [table, names]
    for v in latents:
        operands += [ones[v], [v]]
    Z = contract(operands, [])
    if not Z.item() > 0:
        shown = ", ".join(f"{v}={net.states[v][s]}" for v, s in evidence.items())
        raise UserError(f"the evidence {shown} has probability zero in {net.name}; "
                        "no posterior exists: change the evidence")
    grads = torch.autograd.grad(Z, [ones[v] for v in latents]) if latents else []
    # dZ/d(ones_v)[s] = sum over all other variables with v = s: the unnormalized marginal
    marginals = {v: (g / Z).detach() for v, g in zip(latents, grads)}
    return Posterior(math.log(Z.item()), marginals)


def contract(operands: list, output: list[str]) -> torch.Tensor:
    """einsum over named axes: ``operands = [tensor, names, tensor, names, ...]``."""
    symbols: dict[str, str] = {}
    sym = lambda names: "".join(symbols.setdefault(n, opt_einsum.get_symbol(len(symbols))) for n in names)  # noqa: E731
    terms, tensors = [], []
    for table, names in zip(operands[::2], operands[1::2]):
        tensors.append(table)
        terms.append(sym(names))
    return opt_einsum.contract(",".join(terms) + "->" + sym(output), *tensors, backend="torch")


def latent_joint(net: BayesNet, evidence: dict[str, int], floor: float = 0.0,
                 max_size: int = 2 ** 22) -> tuple[torch.Tensor, list[str]] | None:
    """P(z, e) as a full table over the latents z (None if it would exceed max_size)."""
    latents = [v for v in net.order if v not in evidence]
    if math.prod(net.card(v) for v in latents) > max_size:
        return None
    operands = []
    for table, names in net.factors(evidence, floor):
        operands += [table, names]
    return contract(operands, latents), latents


# ---------------------------------------------------------------- mean field
def _xlogy(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """w * log p with 0 * log 0 = 0 (and w * log 0 = -inf for w > 0)."""
    return torch.xlogy(w, p)


def mean_field_elbo(net: BayesNet, evidence: dict[str, int], q: dict[str, torch.Tensor],
                    floor: float = 0.0) -> float:
    """ELBO(q) = E_q[log P(z, e)] + H(q) for q(z) = prod_v q_v(z_v), computed exactly.

    E_q[log P(z, e)] = sum_t E_q[log P(x_t | parents(x_t))]: each term only needs q on
    the family of x_t, so the cost is linear in the number of CPTs.
    """
    expected_log_joint = torch.zeros((), dtype=torch.float64)
    for table, names in net.factors(evidence, floor):
        # log 0 stands in as -1e300 so that 0 * log 0 = 0 in the contraction
        log_table = torch.log(table).clamp(min=-1e300)
        operands = [log_table, names]
        for n in names:
            operands += [q[n].double(), [n]]
        expected_log_joint = expected_log_joint + (contract(operands, []) if names else log_table)
    entropy = sum(-_xlogy(qv.double(), qv.double()).sum() for qv in q.values())
    elbo = (expected_log_joint + entropy).item()
    return elbo if elbo > -1e299 else -math.inf


def kl_to_posterior(net: BayesNet, evidence: dict[str, int], q: dict[str, torch.Tensor],
                    floor: float = 0.0) -> tuple[float, str]:
    """KL(q || P(. | e)), directly from the latent joint where it fits in memory,
    else from the identity KL = log P(e) - ELBO(q). Returns (kl, method)."""
    joint = latent_joint(net, evidence, floor)
    if joint is None:
        return posterior(net, evidence, floor).log_evidence - mean_field_elbo(net, evidence, q, floor), "identity"
    table, latents = joint
    p = table / table.sum()
    operands = []
    for v in latents:
        operands += [q[v].double(), [v]]
    qz = contract(operands, latents) if latents else torch.ones((), dtype=torch.float64)
    kl = (_xlogy(qz, qz) - _xlogy(qz, p)).sum()
    return kl.item(), "direct"


def has_structural_zeros(net: BayesNet, evidence: dict[str, int]) -> bool:
    """True when some configuration of the latents has P(z, e) = 0: then every q with full
    support has KL(q || p) = infinity (a zero of a product is a zero of one factor)."""
    return any((table == 0).any().item() for table, names in net.factors(evidence) if names)


# ---------------------------------------------------------------- BIF reader
_TOKEN = re.compile(r"\s*(?:(//[^\n]*|/\*.*?\*/)|([{}()\[\];,|])|([^\s{}()\[\];,|]+))", re.S)


class _Tokens:
    def __init__(self, text: str, source: str):
        self.source = source
        self.items: list[tuple[str, int]] = []
        line, pos = 1, 0
        for m in _TOKEN.finditer(text):
            start = m.start(m.lastindex) if m.lastindex else m.start()
            line += text.count("\n", pos, start)
            pos = start
            if m.group(1) is None:
                self.items.append((m.group(2) or m.group(3), line))
        self.last_line = line + text.count("\n", pos)
        self.i = 0

    def error(self, message: str, line: int | None = None):
        if line is None:
            line = self.items[self.i][1] if self.i < len(self.items) else self.last_line
        raise UserError(f"{self.source}:{line}: BIF syntax error: {message}")

    def peek(self) -> str | None:
        return self.items[self.i][0] if self.i < len(self.items) else None

    def next(self) -> str:
        if self.i >= len(self.items):
            self.error("unexpected end of file")
        tok = self.items[self.i][0]
        self.i += 1
        return tok

    def expect(self, want: str) -> None:
        got = self.peek()
        if got != want:
            self.error(f"expected {want!r}, found {got!r}" if got else f"expected {want!r} before end of file")
        self.i += 1

    def line(self) -> int:
        return self.items[min(self.i, len(self.items) - 1)][1] if self.items else 1

    def skip_block(self) -> None:
        self.expect("{")
        depth = 1
        while depth:
            tok = self.next()
            depth += {"{": 1, "}": -1}.get(tok, 0)

    def number(self) -> float:
        line, tok = self.line(), self.next()
        try:
            return float(tok)
        except ValueError:
            self.error(f"expected a probability, found {tok!r}", line)


def read_bif(path: str | Path) -> BayesNet:
    """Read a network in the BIF text format (``.bif`` or ``.bif.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"network file {path} does not exist; give a .bif path or a shipped name")
    try:
        raw = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return parse_bif(raw, str(path), name=path.name.split(".")[0])


def parse_bif(text: str, source: str = "<bif>", name: str = "network") -> BayesNet:
    """Parse BIF text. Grammar (the part networks use):

        network NAME { property ...; }
        variable NAME { type discrete [ K ] { s1, ..., sK }; property ...; }
        probability ( CHILD | P1, P2 ) { (p1state, p2state) v1, ..., vK; ... }
        probability ( ROOT ) { table v1, ..., vK; }

    Errors name the file and line.
    """
    tok = _Tokens(text, source)
    states: dict[str, list[str]] = {}
    parents: dict[str, list[str]] = {}
    tables: dict[str, dict] = {}
    where: dict[str, int] = {}
    while tok.peek() is not None:
        line, word = tok.line(), tok.next()
        if word == "network":
            while tok.peek() not in ("{", None):
                name = tok.next()
            tok.skip_block()
        elif word == "variable":
            v = tok.next()
            tok.expect("{")
            while tok.peek() != "}":
                kw = tok.next()
                if kw == "type":
                    if tok.next() != "discrete":
                        tok.error(f"variable {v}: only discrete variables are supported")
                    tok.expect("[")
                    k_line, k = tok.line(), tok.next()
                    tok.expect("]")
                    tok.expect("{")
                    names = _comma_list(tok, "}")
                    if not k.isdigit() or int(k) != len(names):
                        tok.error(f"variable {v} declares {k} states but lists {len(names)}", k_line)
                    states[v] = names
                    tok.expect(";")
                elif kw == "property":
                    while tok.next() != ";":
                        pass
                else:
                    tok.error(f"unexpected {kw!r} in variable {v}")
            tok.expect("}")
        elif word == "probability":
            tok.expect("(")
            v = tok.next()
            ps: list[str] = []
            if tok.peek() == "|":
                tok.next()
                ps = _comma_list(tok, ")")
            else:
                tok.expect(")")
            for n in [v] + ps:
                if n not in states:
                    tok.error(f"probability ( {v} ... ) uses {n!r}, which no 'variable' block declares", line)
            parents[v], where[v] = ps, line
            rows: dict = {}
            tok.expect("{")
            while tok.peek() != "}":
                row_line = tok.line()
                if tok.peek() == "table":
                    tok.next()
                    rows["table"] = (_numbers(tok), row_line)
                elif tok.peek() == "(":
                    tok.next()
                    key = tuple(_comma_list(tok, ")"))
                    rows[key] = (_numbers(tok), row_line)
                elif tok.peek() == "default":
                    tok.error("'default' rows are not supported; list every parent configuration")
                elif tok.peek() == "property":
                    while tok.next() != ";":
                        pass
                else:
                    tok.error(f"expected 'table' or '(' in probability ( {v} ), found {tok.peek()!r}")
            tok.expect("}")
            tables[v] = rows
        else:
            tok.error(f"expected 'network', 'variable' or 'probability', found {word!r}", line)
    cpt = {}
    for v, rows in tables.items():
        cpt[v] = _table(v, parents[v], rows, states, tok, where[v])
    return BayesNet(states, {v: parents.get(v, []) for v in states}, cpt, name=name)


def _comma_list(tok: _Tokens, end: str) -> list[str]:
    items = []
    while True:
        item = tok.next()
        if item in (",", end, ";", "{", "}", "(", ")"):
            tok.error(f"expected a name, found {item!r}")
        items.append(item)
        sep = tok.next()
        if sep == end:
            return items
        if sep != ",":
            tok.i -= 1
            tok.error(f"expected ',' or {end!r}, found {sep!r}")


def _numbers(tok: _Tokens) -> list[float]:
    values = [tok.number()]
    while tok.peek() == ",":
        tok.next()
        values.append(tok.number())
    tok.expect(";")
    return values


def _table(v, ps, rows, states, tok, line) -> torch.Tensor:
    k = len(states[v])
    shape = [len(states[p]) for p in ps]
    if "table" in rows:
        values, row_line = rows["table"]
        if len(values) != math.prod(shape) * k:
            tok.error(f"table of {v} has {len(values)} numbers, expected {math.prod(shape) * k}", row_line)
        # BIF's 'table' lists the child's states slowest (child first, then parents),
        # i.e. the array P[child, p1, p2, ...] in C order: move the child last
        t = torch.tensor(values, dtype=torch.float64).reshape([k] + shape)
        return t.permute(*range(1, len(shape) + 1), 0).contiguous()
    t = torch.full(shape + [k], float("nan"), dtype=torch.float64)
    for key, (values, row_line) in rows.items():
        if len(key) != len(ps):
            tok.error(f"row {key} of {v} names {len(key)} parent states, {v} has {len(ps)} parents", row_line)
        idx = []
        for p, s in zip(ps, key):
            if s not in states[p]:
                tok.error(f"{p} has no state {s!r} (states: {', '.join(states[p])})", row_line)
            idx.append(states[p].index(s))
        if len(values) != k:
            tok.error(f"row {key} of {v} has {len(values)} numbers, {v} has {k} states", row_line)
        t[tuple(idx)] = torch.tensor(values, dtype=torch.float64)
    missing = torch.isnan(t[..., 0]).nonzero()
    if len(missing):
        first = [states[p][j] for p, j in zip(ps, missing[0].tolist())]
        tok.error(f"probability ( {v} | ... ) has no row for ({', '.join(first)})", line)
    return t


def write_bif(net: BayesNet) -> str:
    """The network as BIF text (round-trips through :func:`parse_bif`)."""
    out = [f"network {net.name.split()[0]} {{\n}}"]
    for v in net.order:
        out.append(f"variable {v} {{\n  type discrete [ {net.card(v)} ] {{ {', '.join(net.states[v])} }};\n}}")
    for v in net.order:
        ps = net.parents[v]
        head = f"probability ( {v}{' | ' + ', '.join(ps) if ps else ''} ) {{"
        lines = [head]
        if not ps:
            lines.append("  table " + ", ".join(f"{x:.10g}" for x in net.cpt[v].tolist()) + ";")
        else:
            for idx in itertools.product(*(range(net.card(p)) for p in ps)):
                key = ", ".join(net.states[p][j] for p, j in zip(ps, idx))
                lines.append(f"  ({key}) " + ", ".join(f"{x:.10g}" for x in net.cpt[v][idx].tolist()) + ";")
        out.append("\n".join(lines) + "\n}")
    return "\n".join(out) + "\n"
