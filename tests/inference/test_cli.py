"""python -m inference.svi end to end: the run folder, resume, the README's own model file,
and the error convention (one line, exit 2, no traceback, nothing lost)."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from inference.svi import main

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
VAE = str(ROOT / "models" / "vae.py")
TINY = ["--latent-dim", "2", "--hidden-dim", "16", "--ll-samples", "10", "--ll-points", "20"]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_vae_end_to_end_in_a_subprocess(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("inference.svi", VAE, "--steps", "30", "--eval-every", "10", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    assert "test_log_likelihood:" in r.stdout and str(out) in r.stdout
    for name in ["config.json", "trace.csv", "metrics.json", "checkpoint.pt", "elbo.png",
                 "reconstructions.png", "samples.png", "latent_space.png", "manifold.png"]:
        assert (out / name).is_file(), name
    m = _metrics(out)
    for key in ["model", "guide", "elbo", "steps", "seconds", "train_elbo", "test_elbo", "test_log_likelihood"]:
        assert key in m, key
    assert (m["model"], m["guide"], m["elbo"], m["steps"]) == ("vae", "amortized", "trace", 30)
    for key in ["seconds", "train_elbo", "test_elbo", "test_log_likelihood"]:
        assert math.isfinite(m[key]), key
    with open(out / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert sum(r["test_elbo"] != "" for r in rows) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["seed"] == 0 and config["device"] == "cpu"
    assert config["settings"]["options"]["latent_dim"] == 2 and "torch" in config["versions"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # no code runs on load
    assert ckpt["step"] == 30 and any(k.startswith("decoder$$$") for k in ckpt["params"])


def test_the_readme_model_file_runs(cli, tmp_path):
    """The minimal model file shown in README.md, copied out of it, runs as documented."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n# my_model\.py\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_model.py").write_text(code)
    r = cli("inference.svi", "my_model.py", "--steps", "200", "--lr", "0.05", "--out", "r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = _metrics(tmp_path / "r")
    assert m["guide"] == "guide" and math.isfinite(m["test_elbo"])


def test_help_shows_the_model_options(cli):
    r = cli("inference.svi", VAE, "--help")
    assert r.returncode == 0
    assert "--latent-dim" in r.stdout and "--hidden-dim" in r.stdout and "--eval-every" in r.stdout


def test_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    common = [VAE, "--eval-every", "10", "--batch-size", "64", "--no-progress", *TINY]
    assert main([*common, "--steps", "40", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--steps", "20", "--out", str(tmp_path / "part")]) == 0
    assert main([VAE, "--resume", str(tmp_path / "part"), "--steps", "40", "--no-progress"]) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == whole["step"] == 40
    for k, v in whole["params"].items():
        torch.testing.assert_close(part["params"][k], v, rtol=0, atol=1e-6)
    a, b = _metrics(tmp_path / "whole"), _metrics(tmp_path / "part")
    assert a["test_elbo"] == pytest.approx(b["test_elbo"], abs=1e-5)
    with open(tmp_path / "part" / "trace.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 41))


def _error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_errors(tmp_path, capsys):
    (tmp_path / "nomodel.py").write_text("def guide(x):\n    pass\n")
    (tmp_path / "noguide.py").write_text("def model(x):\n    pass\n")
    assert "does not exist" in _error([str(tmp_path / "missing.py")], capsys)
    assert "defines no model" in _error([str(tmp_path / "nomodel.py")], capsys)
    assert "defines no data()" in _error([str(tmp_path / "noguide.py")], capsys)  # a guide is optional
    assert "unknown guide 'nope'; this model file has: amortized" in _error([VAE, "--guide", "nope"], capsys)
    assert "--elbo" in _error([VAE, "--elbo", "magic"], capsys)
    assert "--steps" in _error([VAE, "--steps", "0"], capsys)
    assert "--lr" in _error([VAE, "--lr", "-1"], capsys)
    assert "--latent-dim must be at least 1" in _error([VAE, "--latent-dim", "0"], capsys)
    assert "neither a known data set" in _error([VAE, "--data", str(tmp_path / "nope")], capsys)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 broken")
    assert "cannot read" in _error([VAE, "--data", str(tmp_path / "corrupt.npz")], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _error([VAE, "--device", "cuda"], capsys)
    bayes_net = str(Path(VAE).with_name("bayes_net.py"))
    assert "--elbo meanfield needs a guide whose every sample is reparameterized" in _error(
        [bayes_net, "--elbo", "meanfield", "--steps", "2", "--no-progress", "--out", str(tmp_path / "bn")], capsys)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    import ppl_gen.datasets.images

    monkeypatch.setattr(ppl_gen.datasets.images, "FASHION_MNIST_DIR", tmp_path / "absent")
    assert "apt-get install dataset-fashion-mnist" in _error([VAE, "--data", "fashion-mnist"], capsys)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    err = _error([str(HERE / "nan_model.py"), "--steps", "50", "--eval-every", "5", "--out", str(out),
                  "--no-progress"], capsys)
    assert "step 13" in err and "step 10" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10
    with open(out / "trace.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 13))


def test_errors_in_a_subprocess_have_no_traceback(cli):
    r = cli("inference.svi", VAE, "--guide", "nope")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr
