"""`python -m inference.compare A.py B.py ...`: the generative families side by side."""

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_families_in_a_subprocess(cli, tmp_path):
    """An exact density and an implicit one on the digits, tiny budgets: the table's numbers are
    the run folders' own (nats = -log p(x) of the file's declared key, bits/dim = nats / (D ln 2)),
    the GAN has no density number, and samples from every family are scored and drawn."""
    out = tmp_path / "fam"
    r = cli("inference.compare", "models/pixelcnn.py", "models/gan.py", "--steps", "3", "--score-images", "40",
            "--sample-images", "16", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = {row["model"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"pixelcnn", "gan", "held-out images (reference)"}
    pixel = json.loads((out / "pixelcnn" / "metrics.json").read_text())
    D = 64  # the 8x8 digits
    assert rows["pixelcnn"]["density"] == "exact"
    assert rows["pixelcnn"]["heldout_nats_per_image"] == -pixel["test_log_likelihood"]
    assert math.isclose(rows["pixelcnn"]["bits_per_dim"], -pixel["test_log_likelihood"] / (D * math.log(2)))
    assert rows["gan"]["density"] == "implicit" and rows["gan"]["heldout_nats_per_image"] is None
    for name in ("pixelcnn", "gan", "held-out images (reference)"):
        assert math.isfinite(rows[name]["sample_fd"]) and 0 <= rows[name]["sample_mmd_p_value"] <= 1
    assert rows["pixelcnn"]["score_images"] == "40/40"
    # three training steps are far from the data: held-out images score better against held-out images
    assert rows["held-out images (reference)"]["sample_fd"] < min(rows["pixelcnn"]["sample_fd"], rows["gan"]["sample_fd"])
    assert (out / "families_samples.png").is_file() and "| gan | implicit | n/a |" in (out / "compare.md").read_text()


def test_bad_input_is_one_error_line(tmp_path, capsys):
    from inference.compare import main

    smaller = tmp_path / "small_gan.py"  # the GAN on fewer training images than the PixelCNN's
    smaller.write_text("from models.gan import *  # noqa: F403\nfrom models.gan import data as _data\n\n\n"
                       "def data(spec=None, options=None):\n    d = _data(spec, options)\n"
                       "    d.train = d.train[:500]\n    return d\n")
    cases = [
        (["models/pixelcnn.py", str(smaller)], "small_gan.py's training data (digits, 500 x 64) differ from "
                                               "pixelcnn.py's"),
        (["models/pixelcnn.py", "models/markov_chain.py"], "markov_chain.py cannot draw samples"),
        (["models/gan.py", "models/gan.py"], "a model file is named twice"),
        (["models/gan.py", "models/vae.py", "--score-images", "1"], "--score-images takes a whole number of at least 2"),
    ]
    for argv, message in cases:
        files = [str(ROOT / a) if a.startswith("models/") else a for a in argv]
        code = main([*files, "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "never").exists()


def test_compare_under_torchrun_is_refused(monkeypatch, capsys):
    from inference.compare import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([str(ROOT / "models" / "gaussian_net.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: inference.compare runs its schemes one after another") and len(err.splitlines()) == 1
