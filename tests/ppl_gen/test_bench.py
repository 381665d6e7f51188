"""ALARM (37 nodes): every exact posterior marginal agrees with pgmpy's variable elimination."""

import pytest

from ppl_gen.bench import bayesnet as bench_bayesnet


def test_alarm_marginals_agree_with_pgmpy():
    pytest.importorskip("pgmpy")
    r = bench_bayesnet.bench(repeats=1)
    assert r["nodes"] == 37 and r["queried"] == 32
    assert r["max_abs_marginal_difference"] < 1e-8
    assert r["ppl_gen_seconds"] > 0 and r["pgmpy_seconds"] > 0


def test_threads_bench_runs_tiny():
    """The threads benchmark end to end with a tiny budget: every figure finite (no timing asserted)."""
    import math

    from ppl_gen.bench import threads

    r = threads.bench(str(threads.ROOT / "tests" / "inference" / "conjugate_model.py"), steps=3, rounds=1, counts=[1])
    figures = [*r["quiet_ms_per_step"].values(), *r["contended_ms_per_step"].values(),
               r["quiet_default_vs_best"], r["contended_default_vs_threads1"]]
    assert all(math.isfinite(v) and v > 0 for v in figures)
