"""Markov chain: SVI against the conjugate Dirichlet posterior; counts against a plain
Python count; the command line and its errors."""

import collections
import json
import math

import pyro
import pytest

from ppl_gen.datasets import text as texts
from ppl_gen.core.protocol import load_model_file
from ppl_gen.core.train import Trainer, make_elbo


def build(options, spec="sample"):
    mf = load_model_file("models/markov_chain.py")
    opts = mf.options(options)
    ds = mf.data(spec, opts)
    return mf.build(opts, ds), ds


def test_counts_equal_a_plain_count_of_contexts():
    """N[c, v] from the vectorized context codes equals counting (x_{t-2}, x_{t-1}) -> x_t
    in Python strings, with <s> before each line and the line end as a symbol."""
    spec, ds = build({"order": 2, "symbols": 3, "sequences": 30})
    chain = spec.model.__self__
    N = chain.counts(ds.train)
    expected = collections.Counter()
    for line in texts.decode(ds.train, ds.meta["alphabet"]):
        seq = ["<s>", "<s>"] + list(line) + ["\n"]
        for t in range(2, len(seq)):
            expected[(seq[t - 2], seq[t - 1], seq[t])] += 1
    got = {}
    for r in range(chain.R):
        a, b = chain.ctx.label(r, ds.meta["alphabet"]).replace("\\n", "\n").replace("<s>", "\0")
        for v, c in enumerate(ds.meta["alphabet"]):
            if N[r, v] > 0:
                got[(a.replace("\0", "<s>"), b.replace("\0", "<s>"), c)] = int(N[r, v])
    assert got == dict(expected)


def test_svi_matches_the_conjugate_dirichlet_posterior():
    """Order 2 on 60 sampled lines (7 contexts): the guide's lambda_c reaches alpha + N_c.
    Budget: 2,000 steps of 32 vectorized particles, lr 0.1 then decayed 50x (Robbins-Monro).
    Tolerances: means within 0.01, variances within 10% (SVI's noise floor at this budget)."""
    spec, ds = build({"order": 2, "symbols": 2, "sequences": 50})
    chain = spec.model.__self__
    elbo = make_elbo("meanfield", num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    trainer = Trainer(spec.model, spec.guides["dirichlet"], ds.train, elbo, lr=0.1)
    for t in range(1, 2001):
        trainer.step(t)
        for group in trainer.optim.param_groups:
            group["lr"] = 0.1 * 0.02 ** max(0.0, (t - 1000) / 1000)
    lam = pyro.param("lambda").detach()
    exact = chain.exact_posterior(ds.train)
    moments = lambda c: (c / c.sum(-1, keepdim=True),  # noqa: E731  Dirichlet mean and variance
                         c * (c.sum(-1, keepdim=True) - c) / (c.sum(-1, keepdim=True) ** 2 * (c.sum(-1, keepdim=True) + 1)))
    (m, v), (m0, v0) = moments(lam), moments(exact)
    assert (m - m0).abs().max() < 0.01
    assert ((v - v0) / v0).abs().max() < 0.10


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_cli_reuters_order_2(cli, tmp_path):
    r = cli("inference.svi", "models/markov_chain.py", "--order", "2", "--steps", "30", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    m = _metrics(tmp_path / "r")
    for k in ("test_log_likelihood_per_symbol", "test_perplexity", "test_log_likelihood_per_symbol_exact_posterior",
              "train_elbo", "test_elbo", "max_abs_error_posterior_mean"):
        assert math.isfinite(m[k]), k
    # the exact posterior predictive is a proper distribution over ~78 symbols: perplexity in (1, 78)
    assert 1 < math.exp(-m["test_log_likelihood_per_symbol_exact_posterior"]) < m["alphabet_size"]
    assert len(m["sampled_text"]) == 8
    assert (tmp_path / "r" / "transitions.png").is_file()


@pytest.mark.parametrize("content, args, message", [
    ("abc\nabd\nabc\nabc\nabz\n", [], "held-out lines use 'z', which no training line contains"),
    ("", [], "has 0 non-empty line(s)"),
    ("a\n\n", [], "has 1 non-empty line(s)"),
    ("ab\nba\n", ["--order", "0"], "--order must be at least 1"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, content, args, message):
    from inference.svi import main

    path = tmp_path / "text.txt"
    path.write_text(content)
    code = main(["models/markov_chain.py", "--data", str(path), "--steps", "2", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_unseen_symbol_from_the_command_line(cli, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abc\nabd\nabc\nabc\nab?\n")
    r = cli("inference.svi", "models/markov_chain.py", "--data", str(path), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error:") and "'?'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
