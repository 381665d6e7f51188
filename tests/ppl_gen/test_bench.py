"""ALARM (37 nodes): every exact posterior marginal agrees with pgmpy's variable elimination."""

import pytest

from ppl_gen.bench import bayesnet as bench_bayesnet


def test_alarm_marginals_agree_with_pgmpy():
    pytest.importorskip("pgmpy")
    r = bench_bayesnet.bench(repeats=1)
    assert r["nodes"] == 37 and r["queried"] == 32
    assert r["max_abs_marginal_difference"] < 1e-8
    assert r["ppl_gen_seconds"] > 0 and r["pgmpy_seconds"] > 0



def test_gpu_check_refuses_without_a_gpu(capsys):
    """python -m ppl_gen.bench gpu on a machine without CUDA: one error line, exit code 2."""
    import torch

    from ppl_gen.bench import gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check would run")
    assert gpu.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA GPU" in err[0]


def test_autoguide_bench_runs_at_a_tiny_size():
    """Every automatic guide steps through the runner beside its hand-written baseline (no timing asserted)."""
    import math

    from ppl_gen.bench import autoguides

    r = autoguides.bench(steps=2, rounds=1)
    assert set(r["seconds_per_step"]) == set(autoguides.PAIRS)
    assert all(math.isfinite(v) and v > 0 for v in r["ratio_to_hand_written"].values())
    assert r["ratio_to_hand_written"]["mean_field"] == 1.0 == r["ratio_to_hand_written"]["full_rank"]


def test_zoo_bench_runs_at_a_tiny_size(tmp_path):
    """python -m ppl_gen.bench zoo on two files, a few steps: one row per (model, guide), each with
    finite k-hat, error against the reference and time per step, and the table written."""
    import math

    from ppl_gen.bench import zoo

    r = zoo.bench(["AutoNormal"], ["funnel", "eight_schools_noncentered"], steps=20, out=tmp_path / "z", threads=1)
    assert [(row["model"], row["guide"]) for row in r["rows"]] == [("funnel", "AutoNormal"),
                                                                   ("eight_schools_noncentered", "AutoNormal")]
    for row in r["rows"]:
        assert all(math.isfinite(row[k]) for k in ("psis_khat", "max_w1_sds", "max_mean_error_sds", "ms_per_step"))
    assert [row["reference"] for row in r["rows"]] == ["exact", "NUTS"]
    assert "| funnel | AutoNormal |" in (tmp_path / "z" / "zoo.md").read_text()
