"""models/pixelcnn.py: an exact likelihood (sums to one, equals the chain rule pixel by
pixel, equals Pyro's ELBO), and the model file through the runner."""

import itertools
import json
import math

import numpy as np
import pyro
import pytest
import torch

from inference.svi import main as svi_main
from models import pixelcnn as pcnn_file
from ppl_gen import Dataset, UserError


def _model(H, W, seed=0, **kw):
    torch.manual_seed(seed)
    opts = pcnn_file.Options(**{"layers": 3, "channels": 6, "kernel_size": 3, **kw})
    m = pcnn_file.PixelCNNModel(H, W, opts)
    m.net.double()
    with torch.no_grad():  # larger than the default init, so the conditionals are far from 1/2
        for p in m.net.parameters():
            p.mul_(3.0)
    return m


def test_all_512_binary_3x3_images_sum_to_probability_one():
    m = _model(3, 3)
    x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=9)), dtype=torch.float64)
    log_p = m.log_prob(x)
    assert abs(torch.logsumexp(log_p, 0).item()) < 1e-12
    assert log_p.max() - log_p.min() > 3.0  # far from uniform: the sum is not trivially one


def test_elbo_is_the_exact_log_likelihood():
    """No latent variables: Pyro's Trace_ELBO of model and empty guide is -sum log p(x)."""
    m = _model(3, 3)
    x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=9)), dtype=torch.float64)
    with torch.no_grad():
        loss = pyro.infer.Trace_ELBO().loss(m.model, m.guide, x)
    assert loss == pytest.approx(-m.log_prob(x).sum().item(), rel=1e-12)


def test_log_likelihood_is_the_chain_rule_one_pixel_at_a_time():
    """Pixel i's conditional from an input in which pixels >= i are noise equals what the
    one-pass log-likelihood uses: the sum of D such terms is log p(x)."""
    H, W = 4, 5
    m = _model(H, W, seed=1, kernel_size=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (6, H * W), generator=g).double()
    total = torch.zeros(6, dtype=torch.float64)
    for i in range(H * W):
        seen = x.clone()
        seen[:, i:] = torch.randint(0, 2, (6, H * W - i), generator=g).double()  # the future: noise
        logit = m.logits(seen)[:, i]
        total += torch.distributions.Bernoulli(logits=logit).log_prob(x[:, i])
    assert torch.allclose(total, m.log_prob(x), atol=1e-10, rtol=0)


def test_non_binary_images_are_refused():
    grey = torch.rand(20, 16)
    ds = Dataset(grey, grey[:5], meta={"shape": [4, 4]})
    with pytest.raises(UserError, match=r"binary pixels.*x = \(x > 0.5\).float\(\)"):
        pcnn_file.build(pcnn_file.Options(), ds)


def test_runs_through_the_runner(cli, tmp_path):
    """The model file as a user runs it, tiny budget: exact log-likelihood = the runner's
    held-out ELBO, bits/dim its conversion, and the three figures."""
    out = tmp_path / "run"
    r = cli("inference.svi", "models/pixelcnn.py", "--steps", "3", "--no-progress", "--out", str(out),
            "--layers", "2", "--channels", "4", "--kernel-size", "3", "--first-kernel-size", "3",
            "--samples", "2", "--completions", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_log_likelihood"] == pytest.approx(m["test_elbo"], abs=1e-4)
    assert m["test_bits_per_dim"] == pytest.approx(-m["test_log_likelihood"] / (64 * math.log(2)), rel=1e-9)
    assert 0 < m["sampling_seconds_per_image"] and m["network_passes_per_sample"] == 64
    # 2 masked 3x3 layers: pixel (4, 2) reads 5 + 4 + 2 pixels of rows 2, 3, 4, of the 34 before it
    assert m["receptive_field_probe"] == [4, 2] and m["future_pixels_read"] == 0
    assert m["receptive_field_pixels"] == 11 and m["blind_spot_pixels"] == 23
    for png in ("samples.png", "receptive_field.png", "completions.png", "elbo.png"):
        assert (out / png).is_file(), png


def _error_line(capsys, argv):
    code = svi_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("bad,expect", [
    ("flat", "needs 2-D images"),
    ("kernel", "--kernel-size must be odd"),
])
def test_bad_input_is_one_error_line(bad, expect, tmp_path, capsys):
    argv = ["models/pixelcnn.py", "--steps", "1", "--no-progress", "--out", str(tmp_path / "r")]
    if bad == "flat":
        path = tmp_path / "flat.npz"
        rng = np.random.default_rng(0)
        np.savez(path, x_train=rng.integers(0, 2, (30, 64)), x_test=rng.integers(0, 2, (10, 64)))
        argv += ["--data", str(path)]
    else:
        argv += ["--kernel-size", "4"]
    code, err = _error_line(capsys, argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and expect in err[0], err


def test_runs_on_each_device(device, tmp_path):
    """Data, parameters and samples on the device (CUDA case skips without a GPU)."""
    from inference.svi import RunConfig, run

    cfg = RunConfig(model_file=pcnn_file.__file__, steps=2, device=device.type, out=str(tmp_path / "r"),
                    progress=False, batch_size=32,
                    options={"layers": 2, "channels": 4, "samples": 2, "completions": 1})
    fitted, metrics = run(cfg)
    assert all(p.device.type == device.type for _, p in pyro.get_param_store().named_parameters())
    assert metrics["device"].startswith(device.type)
    assert math.isfinite(metrics["test_log_likelihood"])
