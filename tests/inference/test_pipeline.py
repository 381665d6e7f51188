"""What the run pipeline guarantees (issue 11): run folders are never lost or replaced by
accident, every number reproduces, a user's model file fails with one line, nothing computed is
lost, timings and the console are honest."""

import csv
import json
import math
import os
import re
import textwrap

import numpy as np
import pytest
import torch

from inference import compare
from inference.svi import main

from conftest import ROOT, readme_model


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    return err[-1]


def _one_error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _trace(folder):
    with open(folder / "trace.csv") as f:
        return list(csv.DictReader(f))


FAST = ["--no-progress", "--eval-particles", "2"]


# 1. an existing run folder is not replaced --------------------------------------------------
def test_existing_out_is_refused_and_kept(tmp_path, capsys):
    f = readme_model(tmp_path)
    out = tmp_path / "keep"
    assert main([f, "--steps", "40", "--out", str(out), *FAST]) == 0
    before = (out / "metrics.json").read_bytes(), (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([f, "--steps", "5", "--out", str(out), *FAST]) == 2
    line = _one_error_line(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert ((out / "metrics.json").read_bytes(), (out / "checkpoint.pt").read_bytes()) == before
    assert main([f, "--steps", "5", "--out", str(out), "--overwrite", *FAST]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5


def test_folder_that_is_not_a_run_is_never_replaced(tmp_path, capsys):
    f = readme_model(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main([f, "--steps", "2", "--out", str(mine), "--overwrite", *FAST]) == 2
    assert "not a run" in _one_error_line(capsys)
    assert (mine / "notes.txt").read_text() == "my notes"


def test_failure_before_first_step_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "bad.py").write_text(textwrap.dedent("""\
        import torch, pyro, pyro.distributions as dist
        def data():
            return torch.randn(20), torch.randn(5)
        def model(x):
            raise RuntimeError("broken model")
        def guide(x):
            pass
        """))
    out = tmp_path / "never"
    assert main([str(tmp_path / "bad.py"), "--steps", "3", "--out", str(out), *FAST]) == 2
    assert "broken model" in _one_error_line(capsys)
    assert not out.exists()


# 2. reproducible: seed before data, fingerprints, resume --------------------------------------
def test_readme_model_reproduces_and_resume_equals_uninterrupted(tmp_path):
    f = readme_model(tmp_path)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([f, "--steps", "30", "--lr", "0.05", "--eval-every", "10", "--out", str(a), *FAST]) == 0
    assert main([f, "--steps", "30", "--lr", "0.05", "--eval-every", "10", "--out", str(b), *FAST]) == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["train_elbo"] == mb["train_elbo"] and ma["test_elbo"] == mb["test_elbo"]
    config = json.loads((a / "config.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{16}", config["data"]["fingerprint"])
    # 10 steps, then resumed to 30 (flags in another order, --flag=value form)
    assert main([f, "--steps", "10", "--lr", "0.05", "--eval-every", "10", "--out", str(c), *FAST]) == 0
    assert main(["--steps=30", *FAST, f"--resume={c}"]) == 0
    ta, tc = _trace(a), _trace(c)
    assert [r["loss"] for r in ta] == [r["loss"] for r in tc]
    assert [r["test_elbo"] for r in ta] == [r["test_elbo"] for r in tc]
    ck_a = torch.load(a / "checkpoint.pt", weights_only=True)["params"]
    ck_c = torch.load(c / "checkpoint.pt", weights_only=True)["params"]
    assert all(torch.equal(ck_a[k], ck_c[k]) for k in ck_a)


def test_resume_refuses_changed_data(tmp_path, capsys):
    f = readme_model(tmp_path)
    out = tmp_path / "r"
    assert main([f, "--steps", "4", "--out", str(out), *FAST]) == 0
    text = (tmp_path / "my_model.py").read_text().replace("+ 3.0", "+ 4.0")
    (tmp_path / "my_model.py").write_text(text)
    capsys.readouterr()
    assert main(["--resume", str(out), "--steps", "8", *FAST]) == 2
    assert "the data differ" in _one_error_line(capsys)


@pytest.mark.parametrize("order", ["resume-first", "steps-first"])
def test_resume_flag_order(tmp_path, order):
    f = readme_model(tmp_path)
    out = tmp_path / "r20"
    assert main([f, "--steps", "20", "--out", str(out), *FAST]) == 0
    argv = ["--resume", str(out), "--steps", "40"] if order == "resume-first" else ["--steps", "40", "--resume", str(out)]
    assert main([*argv, *FAST]) == 0
    assert int(_trace(out)[-1]["step"]) == 40


def test_compare_resumes(tmp_path, capsys):
    gn = str(ROOT / "models" / "gaussian_net.py")
    out = tmp_path / "cmp"
    assert compare.main([gn, "--steps", "6", "--out", str(out), *FAST]) == 0
    assert compare.main(["--resume", str(out), "--steps", "12", *FAST]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert [r["steps"] for r in data["rows"]] == [12, 12]
    capsys.readouterr()
    assert compare.main(["--resume", str(out / "mean_field"), "--steps", "20"]) == 2
    line = _one_error_line(capsys)
    assert "not a comparison folder" in line and "python -m inference.svi --resume" in line


# 4. a failure inside the user's model file: one line naming file, line and exception ----------
FAILURES = {
    "import": ("import torch\nraise ValueError('bad constant')\n", "bad.py:2", "ValueError: bad constant"),
    "data": ("import torch\ndef data():\n    return torch.ones(3) / undefined_name\n"
             "def model(x): pass\ndef guide(x): pass\n", "bad.py:3", "NameError"),
    "shape": ("import torch, pyro, pyro.distributions as dist\n"
              "def data():\n    return torch.randn(30), torch.randn(10)\n"
              "def model(x):\n    mu = pyro.sample('mu', dist.Normal(0., 1.))\n"
              "    with pyro.plate('obs', 7):\n        pyro.sample('x', dist.Normal(mu, 1.), obs=x)\n"
              "def guide(x):\n    pyro.sample('mu', dist.Normal(pyro.param('m', torch.tensor(0.)), 1.))\n",
              "bad.py:7", "not broadcastable"),
}


@pytest.mark.parametrize("where", list(FAILURES))
def test_model_file_failure_is_one_line(where, tmp_path, capsys):
    code, place, exc = FAILURES[where]
    (tmp_path / "bad.py").write_text(code)
    assert main([str(tmp_path / "bad.py"), "--steps", "2", "--out", str(tmp_path / "o"), *FAST]) == 2
    line = _one_error_line(capsys)
    assert place in line and exc in line, line
    # --traceback shows the whole, then the same line
    assert main([str(tmp_path / "bad.py"), "--steps", "2", "--out", str(tmp_path / "o"), "--traceback", *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1] == line


def _normal_file(tmp_path, data_line: str, guide_site: str = "mu") -> str:
    (tmp_path / "m.py").write_text(textwrap.dedent(f"""\
        import torch, pyro, pyro.distributions as dist
        def data():
            x = torch.randn(40) + 1.0
            {data_line}
        def model(x):
            mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
            with pyro.plate("obs", len(x)):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        def guide(x):
            pyro.sample("{guide_site}", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
        """))
    return str(tmp_path / "m.py")


@pytest.mark.parametrize("data_line, expected", [
    ("return x[:0], x[30:]", "empty training set"),
    ("x[35] = float('nan'); return x[:30], x[30:]", "held-out data"),
    ("x[3] = float('inf'); return x[:30], x[30:]", "training data"),
])
def test_bad_data_is_caught_up_front(data_line, expected, tmp_path, capsys):
    f = _normal_file(tmp_path, data_line)
    assert main([f, "--steps", "2", "--out", str(tmp_path / "o"), *FAST]) == 2
    line = _one_error_line(capsys)
    assert expected in line and "m.py" in line
    assert not (tmp_path / "o").exists()


def test_guide_sites_that_do_not_match_stop_at_step_one(tmp_path, capsys):
    f = _normal_file(tmp_path, "return x[:30], x[30:]", guide_site="nu")
    assert main([f, "--steps", "500", "--out", str(tmp_path / "o"), *FAST]) == 2
    line = _one_error_line(capsys)
    assert "nu" in line and "mu" in line and "guide" in line
    assert not (tmp_path / "o").exists()  # stopped at step 1, before anything was written


# 5. nothing computed is lost ---------------------------------------------------------------
EVAL_FAILS = textwrap.dedent("""\
    import os, torch, pyro, pyro.distributions as dist
    def data():
        x = torch.randn(40) + 1.0
        return x[:30], x[30:]
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("obs", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
    def evaluate(run):
        if os.environ.get("PPL_GEN_TEST_EVAL") == "raise":
            raise RuntimeError("evaluation broke")
        if os.environ.get("PPL_GEN_TEST_EVAL") == "interrupt":
            raise KeyboardInterrupt
        return {"mine": 1.5}
    """)


def test_failed_or_interrupted_final_evaluation_keeps_the_run(tmp_path, capsys, monkeypatch):
    (tmp_path / "ev.py").write_text(EVAL_FAILS)
    out = tmp_path / "o"
    monkeypatch.setenv("PPL_GEN_TEST_EVAL", "raise")
    assert main([str(tmp_path / "ev.py"), "--steps", "10", "--out", str(out), *FAST]) == 2
    assert "ev.py:13" in _one_error_line(capsys)
    assert (out / "checkpoint.pt").is_file() and len(_trace(out)) == 10 and _trace(out)[-1]["test_elbo"]
    assert not (out / "metrics.json").exists()
    monkeypatch.setenv("PPL_GEN_TEST_EVAL", "interrupt")
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(out), *FAST])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err
    assert (out / "checkpoint.pt").is_file() and len(_trace(out)) == 10
    monkeypatch.delenv("PPL_GEN_TEST_EVAL")
    assert main(["--resume", str(out), *FAST]) == 0  # a finished run: the final evaluation again
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mine"] == 1.5 and metrics["steps"] == 10 and (out / "elbo.png").is_file()


# 6. honest timings and the progress bar's ELBO --------------------------------------------
def test_running_elbo_agrees_with_summary(tmp_path):
    f = readme_model(tmp_path)
    assert main([f, "--steps", "600", "--lr", "0.05", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    # the window mean of the last steps' one-sample estimates against the 10-sample final ELBO
    assert abs(m["running_elbo"] - m["train_elbo"]) < 0.05
    assert m["startup_seconds"] > 0 and m["seconds_per_step"] > 0


@pytest.mark.skipif(bool(os.environ.get("PYTEST_XDIST_WORKER")),
                    reason="a timing comparison: run alone (-n 0), not beside another test worker")
def test_compare_timings_do_not_depend_on_guide_order(tmp_path):
    gn = str(ROOT / "models" / "gaussian_net.py")
    ms = {}
    # each order three times, interleaved, the fastest figure kept: the minimum over repeats is the
    # benchmarker's guard against other jobs on a shared machine (the suite runs beside itself
    # under pytest-xdist)
    for repeat in range(3):
        for order in ("mean_field,full_rank", "full_rank,mean_field"):
            out = tmp_path / f"{order.replace(',', '-')}-{repeat}"
            assert compare.main([gn, "--guides", order, "--steps", "150", "--out", str(out), "--no-progress"]) == 0
            rows = json.loads((out / "compare.json").read_text())["rows"]
            seen = ms.setdefault(order, {})
            for r in rows:
                seen[r["guide"]] = min(seen.get(r["guide"], math.inf), r["ms_per_step"])
    a, b = ms.values()
    for guide in a:  # a guide's time per step is the same whether it runs first or second
        assert 0.75 < a[guide] / b[guide] < 1.25, ms


# 8. a quiet console ------------------------------------------------------------------------
def test_console_is_quiet(cli, tmp_path):
    p = cli("inference.svi", str(ROOT / "models" / "lda.py"), "--data", "synthetic", "--docs", "40", "--vocab", "30",
            "--topics", "3", "--steps", "2", "--no-progress", "--infer-docs", "5", "--local-steps", "2",
            "--out", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr
    assert "INFO" not in p.stderr and "Warning" not in p.stderr, p.stderr


def test_no_empty_heldout_plot(tmp_path):
    gn = str(ROOT / "models" / "gaussian_net.py")  # no held-out split, no declared metrics
    out = tmp_path / "cmp"
    assert compare.main([gn, "--steps", "3", "--out", str(out), *FAST]) == 0
    assert not (out / "compare_heldout.png").exists()
    assert "compare_heldout.png" not in (out / "compare.md").read_text()


# 9. --help ---------------------------------------------------------------------------------
def test_help_lists_guides_defaults_and_placeholders(capsys):
    with pytest.raises(SystemExit) as e:
        main([str(ROOT / "models" / "vae.py"), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "OPT_" not in out
    assert "amortized (default), explicit, semi-amortized" in out
    assert re.search(r"--steps N\s+total optimization steps \(default: 3000, from the", out)
    assert re.search(r"--latent-dim N\s+dimension of the latent z \(default: 20\)", out)


# 10. bad input, one line each --------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--seed", "-1"], "in 0..4294967295"),
    (["--seed", "1e20"], "--seed"),
    (["--out", "/proc/x/y"], "cannot be written"),
])
def test_bad_flags(flags, expected, tmp_path, capsys):
    f = readme_model(tmp_path)
    assert main([f, "--steps", "2", *flags, *FAST]) == 2
    assert expected in _one_error_line(capsys)


def test_invalid_defaults(tmp_path, capsys):
    f = _normal_file(tmp_path, "return x[:30], x[30:]")
    (tmp_path / "m.py").write_text((tmp_path / "m.py").read_text() + "DEFAULTS = {'lr': -1}\n")
    assert main([f, "--steps", "2", *FAST]) == 2
    assert "DEFAULTS['lr'] = -1: must be positive" in _one_error_line(capsys)
    (tmp_path / "m.py").write_text((tmp_path / "m.py").read_text() + "DEFAULTS = {'step': 5}\n")
    assert main([f, "--steps", "2", *FAST]) == 2
    assert "'step', which is not a runner setting" in _one_error_line(capsys)


@pytest.mark.parametrize("arrays, expected", [
    ({"x_train": np.zeros((0, 8, 8)), "x_test": np.zeros((3, 8, 8))}, "x_train holds no images"),
    ({"x_train": np.full((4, 8, 8), np.nan), "x_test": np.zeros((3, 8, 8))}, "NaN or inf"),
])
def test_bad_npz_images(arrays, expected, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", **arrays)
    assert main([str(ROOT / "models" / "vae.py"), "--data", str(tmp_path / "d.npz"), "--steps", "2", *FAST]) == 2
    assert expected in _one_error_line(capsys)


def test_damaged_checkpoint(tmp_path, capsys):
    f = readme_model(tmp_path)
    out = tmp_path / "r"
    assert main([f, "--steps", "4", "--out", str(out), *FAST]) == 0
    torch.save({"step": 4}, out / "checkpoint.pt")  # no parameters
    capsys.readouterr()
    assert main(["--resume", str(out), "--steps", "8", *FAST]) == 2
    assert "lacks params" in _one_error_line(capsys)


def test_binary_file_in_text_folder_is_skipped(tmp_path, capsys):
    from ppl_gen.datasets.corpus import read_texts

    (tmp_path / "a.txt").write_text("stocks rose on monday")
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)
    texts, _ = read_texts(str(tmp_path))
    assert texts == ["stocks rose on monday"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.txt" in err[0] and err[0].startswith("warning:")
