"""ALARM (37 nodes): every exact posterior marginal agrees with pgmpy's variable elimination."""

import pytest

from ppl_gen.bench import bayesnet as bench_bayesnet


def test_alarm_marginals_agree_with_pgmpy():
    pytest.importorskip("pgmpy")
    r = bench_bayesnet.bench(repeats=1)
    assert r["nodes"] == 37 and r["queried"] == 32
    assert r["max_abs_marginal_difference"] < 1e-8
    assert r["ppl_gen_seconds"] > 0 and r["pgmpy_seconds"] > 0

