"""models/bayes_net.py and ppl_gen/exact/bayesnet.py against oracles: brute-force sums over the
full joint table, pgmpy's variable elimination, CAVI, the conjugate Dirichlet posterior."""

import gzip
import itertools
import json
import math
from pathlib import Path

import pyro
import pyro.infer
import pytest
import torch

from ppl_gen import UserError
from ppl_gen.exact import bayesnet as bn
from ppl_gen.core.protocol import load_model_file

ROOT = Path(__file__).resolve().parents[2]
ASIA = ROOT / "models" / "networks" / "asia.bif"


@pytest.fixture(scope="module")
def mf():
    return load_model_file(ROOT / "models" / "bayes_net.py")


def build(mf, **options):
    opts = mf.options(options)
    ds = mf.data(None, opts)
    return mf.build(opts, ds), ds


# ---------------------------------------------------------------- the brute-force oracle
def brute_force(net: bn.BayesNet, evidence: dict[str, int]):
    """log P(e) and P(v | e) by summing prod_t P(x_t | pa_t) over every joint state."""
    Z, marg = 0.0, {v: [0.0] * net.card(v) for v in net.order if v not in evidence}
    for states in itertools.product(*(range(net.card(v)) for v in net.order)):
        x = dict(zip(net.order, states))
        if any(x[v] != s for v, s in evidence.items()):
            continue
        p = 1.0
        for v in net.order:
            p *= net.cpt[v][tuple(x[u] for u in net.parents[v]) + (x[v],)].item()
        Z += p
        for v in marg:
            marg[v][x[v]] += p
    return math.log(Z), {v: [m / Z for m in ms] for v, ms in marg.items()}


CASES = [("lecture", ""), ("lecture", "D=d1"), ("lecture", "C=c0,D=d1"), ("lecture", "A=a1,D=d0"),
         ("asia", ""), ("asia", "xray=yes,dysp=yes"), ("asia", "asia=yes,smoke=no,dysp=no"),
         ("asia", "either=yes")]


@pytest.mark.parametrize("network,evidence", CASES)
def test_exact_posterior_matches_brute_force(mf, network, evidence):
    net = mf.module.load_network(network)
    ev = net.parse_assignment(evidence)
    post = bn.posterior(net, ev)
    log_z, marginals = brute_force(net, ev)
    assert post.log_evidence == pytest.approx(log_z, abs=1e-6)
    assert set(post.marginals) == set(marginals)
    for v, m in marginals.items():
        assert post.marginals[v].tolist() == pytest.approx(m, abs=1e-6)


def test_lecture_tables_are_the_slides():
    lec = load_model_file(ROOT / "models" / "bayes_net.py").module.lecture_network()
    assert lec.cpt["C"][..., 0].flatten().tolist() == [0.45, 1.0, 0.9, 0.7]  # a0b0 a0b1 a1b0 a1b1
    assert lec.cpt["D"][:, 0].tolist() == [0.3, 0.5]
    # P(d1) by hand: P(c0) = sum_ab P(a)P(b)P(c0|a,b)
    pc0 = 0.75 * 0.33 * 0.45 + 0.75 * 0.67 * 1.0 + 0.25 * 0.33 * 0.9 + 0.25 * 0.67 * 0.7
    assert math.exp(bn.posterior(lec, {"D": 1}).log_evidence) == pytest.approx(0.7 * pc0 + 0.5 * (1 - pc0), abs=1e-12)


def test_asia_against_pgmpy():
    pgmpy = pytest.importorskip("pgmpy")  # noqa: F841
    from pgmpy.inference import VariableElimination
    from pgmpy.readwrite import BIFReader

    ref = VariableElimination(BIFReader(str(ASIA)).get_model())
    net = bn.read_bif(ASIA)
    for evidence in ["xray=yes,dysp=yes", "smoke=no,xray=no"]:
        ev = net.parse_assignment(evidence)
        post = bn.posterior(net, ev)
        named = {v: net.states[v][s] for v, s in ev.items()}
        for v, p in post.marginals.items():
            theirs = ref.query([v], evidence=named, show_progress=False)
            order = [theirs.state_names[v].index(s) for s in net.states[v]]
            assert p.tolist() == pytest.approx(theirs.values[order].tolist(), abs=1e-6)


# ---------------------------------------------------------------- mean field
def cavi(net, evidence, iters=200):
    """Coordinate ascent: q_v(s) ∝ exp E_{q_-v}[log P(z, e) | z_v = s] (Blei et al. 2017, eq. 17),
    by brute force over the latent joint; an independent route to the mean-field optimum."""
    latents = [v for v in net.order if v not in evidence]
    log_p = {}
    for states in itertools.product(*(range(net.card(v)) for v in latents)):
        x = dict(zip(latents, states), **evidence)
        log_p[states] = sum(math.log(net.cpt[v][tuple(x[u] for u in net.parents[v]) + (x[v],)].item())
                            for v in net.order)
    q = {v: [1.0 / net.card(v)] * net.card(v) for v in latents}
    for _ in range(iters):
        for i, v in enumerate(latents):
            e = [0.0] * net.card(v)
            for states, lp in log_p.items():
                w = math.prod(q[u][s] for j, (u, s) in enumerate(zip(latents, states)) if j != i)
                e[states[i]] += w * lp
            m = max(e)
            un = [math.exp(x - m) for x in e]
            q[v] = [u / sum(un) for u in un]
    return q


def fit(spec, x, elbo, steps, lr):
    guide = next(iter(spec.guides.values()))
    optim = None
    for _ in range(steps):
        loss = elbo.differentiable_loss(spec.model, guide, x)
        if optim is None:
            optim = torch.optim.Adam([p for _, p in pyro.get_param_store().named_parameters()], lr=lr)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return guide


def test_mean_field_vi_lecture(mf):
    spec, ds = build(mf, evidence="C=c0,D=d1")
    inf = spec.evaluate.__self__
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=0)
    guide = fit(spec, ds.train, elbo, steps=200, lr=0.1)
    q = inf.q()
    net, ev = inf.net, inf.evidence
    log_z = bn.posterior(net, ev).log_evidence
    exact_elbo = bn.mean_field_elbo(net, ev, q)
    kl, how = bn.kl_to_posterior(net, ev, q)
    assert how == "direct"
    # Pyro's enumerated ELBO and ours agree (two independent computations of the same sum)
    with torch.no_grad():
        assert -elbo.loss(spec.model, guide, ds.train) == pytest.approx(exact_elbo, abs=1e-5)
    assert exact_elbo <= log_z
    assert kl == pytest.approx(log_z - exact_elbo, abs=1e-5)  # log P(e) = ELBO + KL
    assert kl > 1e-3  # A and B are dependent given C: mean field cannot be exact
    # the lecture's reading, ELBO = E_q[log P(z, e)] + H[q], against a brute-force sum over the
    # latent joint table P(z, e) (A, B: four states)
    table, latents = bn.latent_joint(net, ev)
    qz = torch.einsum("a,b->ab", *(q[v] for v in latents))
    m = inf.evaluate(None)
    assert m["elbo_expected_log_joint"] == pytest.approx(float((qz * table.log()).sum()), abs=1e-6)
    assert m["elbo_entropy_q"] == pytest.approx(float(-(qz * qz.log()).sum()), abs=1e-6)
    assert m["elbo_expected_log_joint"] + m["elbo_entropy_q"] == pytest.approx(m["elbo_final"], abs=1e-9)
    # SVI reaches the CAVI fixed point (both from uniform q)
    ref = cavi(net, ev)
    for v in inf.latents:
        assert q[v].tolist() == pytest.approx(ref[v], abs=0.01)


def test_structural_zeros_use_the_floor(mf):
    spec, _ = build(mf, network="asia", evidence="xray=yes")
    inf = spec.evaluate.__self__
    assert inf.floor == 1e-6  # either = tub OR lung has zeros: KL would be infinite
    spec, _ = build(mf, evidence="C=c0,D=d1")
    assert spec.evaluate.__self__.floor == 0.0  # the zero P(c1 | a0, b1) is cut away by C = c0


# ---------------------------------------------------------------- sampling and learning
def test_ancestral_samples_reproduce_the_cpts(mf):
    net = mf.module.lecture_network()
    n = 40000
    with torch.no_grad():
        x = net.pyro_model(num_samples=n)
    # P(c0 | a, b): each cell has >= 0.25 * 0.33 * n = 3300 samples, so sd <= 0.009; 0.03 is > 3 sd
    for a, b in itertools.product(range(2), range(2)):
        rows = (x["A"] == a) & (x["B"] == b)
        freq = (x["C"][rows] == 0).double().mean().item()
        assert freq == pytest.approx(net.cpt["C"][a, b, 0].item(), abs=0.03)
    assert (x["A"] == 0).double().mean().item() == pytest.approx(0.75, abs=0.01)
    for c in range(2):
        assert (x["D"][x["C"] == c] == 0).double().mean().item() == pytest.approx(net.cpt["D"][c, 0].item(), abs=0.02)


def test_cpt_learning_matches_conjugate_posterior(mf, tmp_path):
    csv_path = mf.module.write_csv(mf.module.lecture_network(), 300, tmp_path / "d.csv", seed=1)
    spec, ds = build(mf, learn_from=str(csv_path), prior_count=2.0)
    learn = spec.evaluate.__self__
    fit(spec, ds.train, pyro.infer.TraceMeanField_ELBO(num_particles=4), steps=400, lr=0.1)
    exact = learn.conjugate(ds.train)
    store = pyro.get_param_store()
    for v in learn.net.order:
        vi = store[f"kappa_{v}"].detach().double()
        # means within 0.05 of (alpha + n) / sum: a statistical tolerance for this budget
        # (400 Adam steps, 4 particles); the slowest entry is the near-deterministic
        # P(c0 | a0, b1) = 1, whose Dirichlet is far from the prior (seed 0 gives 0.033)
        assert (vi / vi.sum(-1, keepdim=True)).flatten().tolist() == pytest.approx(
            (exact[v] / exact[v].sum(-1, keepdim=True)).flatten().tolist(), abs=0.05)
    # the oracle itself: counts add up to the number of rows in every CPT
    assert all((exact[v] - 2.0).sum().item() == len(ds.train) for v in exact)


# ---------------------------------------------------------------- BIF and bad input
def test_bif_round_trip_and_gz(tmp_path):
    net = bn.read_bif(ASIA)
    gz = tmp_path / "asia.bif.gz"
    with gzip.open(gz, "wt") as f:
        f.write(bn.write_bif(net))
    again = bn.read_bif(gz)
    assert again.order == net.order
    for v in net.order:
        assert torch.equal(again.cpt[v], net.cpt[v])


def test_bif_table_keyword_orders_child_first():
    text = """variable a { type discrete [ 2 ] { y, n }; }
variable b { type discrete [ 3 ] { r, g, bl }; }
probability ( a ) { table 0.2, 0.8; }
probability ( b | a ) { table 0.1, 0.5, 0.2, 0.2, 0.7, 0.3; }
"""
    net = bn.parse_bif(text)
    # BIF lists P(b = r | a = y), P(b = r | a = n), P(b = g | a = y), ...
    assert net.cpt["b"].flatten().tolist() == pytest.approx([0.1, 0.2, 0.7, 0.5, 0.2, 0.3])


@pytest.mark.parametrize("text,message", [
    ("variable a { type discrete [ 2 ] { y, n }; }\nprobability ( a ) {\n  table 0.5 0.5;\n}\n",
     "<t>:3: BIF syntax error: expected ';'"),
    ("variable a { type discrete [ 2 ] { y, n }; }\nprobability ( a | q ) {\n table 1;\n}\n",
     "<t>:2: BIF syntax error: probability ( a ... ) uses 'q'"),
    ("variable a { type discrete [ 3 ] { y, n }; }\n", "<t>:1: BIF syntax error: variable a declares 3 states"),
    ("varible a { }", "<t>:1: BIF syntax error: expected 'network', 'variable' or 'probability'"),
])
def test_bif_syntax_errors_name_the_line(text, message):
    with pytest.raises(UserError) as e:
        bn.parse_bif(text, "<t>")
    assert str(e.value).startswith(message)


def test_cycle_is_named():
    states = {v: ["0", "1"] for v in "ABC"}
    parents = {"A": ["C"], "B": ["A"], "C": ["B"]}
    cpt = {"A": torch.full((2, 2), 0.5), "B": torch.full((2, 2), 0.5), "C": torch.full((2, 2), 0.5)}
    with pytest.raises(UserError, match="cycle A -> B -> C -> A"):
        bn.BayesNet(states, parents, cpt)


def test_row_not_summing_to_one_is_named():
    lec = load_model_file(ROOT / "models" / "bayes_net.py").module.lecture_network()
    cpt = dict(lec.cpt)
    cpt["C"] = cpt["C"].clone()
    cpt["C"][1, 0] = torch.tensor([0.9, 0.2])
    with pytest.raises(UserError, match=r"P\(C \| A=a1, B=b0\) sums to 1.1, not 1"):
        bn.BayesNet(lec.states, lec.parents, cpt)


@pytest.mark.parametrize("options,message", [
    ({"evidence": "E=e1"}, "unknown variable 'E'; lecture's variables are A, B, C, D"),
    ({"evidence": "D=d2"}, "D has no state 'd2'; its states are d0, d1"),
    ({"evidence": "A=a0,B=b1,C=c1"}, "has probability zero"),
    ({"query": "C", "evidence": "C=c0"}, "C is observed"),
    ({"network": "nope"}, "neither a shipped network (lecture, asia)"),
])
def test_bad_evidence_and_query(mf, options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(mf, **options)


def test_bad_csv(mf, tmp_path):
    bad_col = tmp_path / "c.csv"
    bad_col.write_text("A,B,C,D,E\na0,b0,c0,d0,e0\n")
    with pytest.raises(UserError, match="unknown column.*E; lecture's variables are A, B, C, D"):
        build(mf, learn_from=str(bad_col))
    bad_state = tmp_path / "s.csv"
    bad_state.write_text("A,B,C,D\na0,b0,c0,d0\na0,b7,c0,d0\n")
    with pytest.raises(UserError, match=r"s.csv:3: B has no state 'b7'; its states are b0, b1"):
        build(mf, learn_from=str(bad_state))


# ---------------------------------------------------------------- the command line
def test_cli_end_to_end(cli, tmp_path):
    out = tmp_path / "r"
    r = cli("inference.svi", "models/bayes_net.py", "--steps", "50", "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    for key in ("log_evidence", "elbo_final", "kl_vi_to_exact", "train_elbo"):
        assert math.isfinite(m[key]), key
    assert set(m["marginals"]) == {"exact", "vi"} and set(m["marginals"]["exact"]) == {"A", "B"}
    assert m["elbo_final"] <= m["log_evidence"]
    assert m["kl_vi_to_exact"] == pytest.approx(m["log_evidence"] - m["elbo_final"], abs=1e-5)
    assert m["train_elbo"] == pytest.approx(m["elbo_final"], abs=1e-4)  # enum ELBO is exact
    assert (out / "posterior_dag.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--evidence", "D=d9"], "error: --evidence: D has no state 'd9'"),
    (["--network", "BAD"], "error: --network 'BAD' is neither"),
])
def test_cli_bad_input(cli, tmp_path, args, message):
    r = cli("inference.svi", "models/bayes_net.py", "--steps", "1", "--out", str(tmp_path / "r"), *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr


def test_cli_bif_syntax_error(cli, tmp_path):
    bad = tmp_path / "bad.bif"
    bad.write_text("variable a {\n  type discrete [ 2 ] { y, n };\n}\nprobability ( a ) {\n  table 0.5, x;\n}\n")
    r = cli("inference.svi", "models/bayes_net.py", "--network", str(bad), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {bad}:5: BIF syntax error: expected a probability, found 'x'"
