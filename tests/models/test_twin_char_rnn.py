"""models/char_rnn.py's NumPyro twin against the torch network it mirrors.

The model has no latent variables, so the ELBO of either backend is log p(x) itself and
every comparison is exact: the same torch weights (Pyro's store, copied into NumPyro) give
the same log-likelihood of each line on both backends, GRU and LSTM, full data and
minibatch-scaled; and the same budget through the runner gives the same fit.
"""

import math
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

pytest.importorskip("numpyro")

from ppl_gen.backends import numpyro_backend as nb  # noqa: E402
from inference.svi import main  # noqa: E402
from ppl_gen.core.protocol import load_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "char_rnn.py"
import test_numpyro_backend as backend_tests  # noqa: E402  (pyro_elbo, _metrics)


def setup(cell: str, double: bool = False):
    """A small network with torch's random initial weights, registered in Pyro's store
    by one trace of the model (as the runner does), and its twin."""
    mf = load_model_file(MODEL)
    options = mf.options({"hidden": 16, "embed": 8, "cell": cell})
    ds = mf.data(None, options)
    spec = mf.build(options, ds)
    lm = spec.model.__self__
    if double:
        lm.net.double()
    x = ds.test[:8]  # eight headlines of different lengths: padding (-1) included
    pyro.poutine.trace(lm.model).get_trace(x)
    return lm, mf.module.numpyro_twin(options, ds), x, nb.pyro_params()


def torch_log_p(lm, x) -> np.ndarray:
    """log p(line) = sum_t log softmax(logits_t)[x_t] over the line's symbols, by torch."""
    with torch.no_grad():
        logits, _ = lm.net(lm.shifted(x))
        lp = torch.log_softmax(logits, -1).gather(-1, x.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(x >= 0, lp, 0.0).sum(1).numpy()


def twin_log_p(twin, params, x) -> np.ndarray:
    """The same per line, from the log-density of the twin's observed site "x"."""
    import jax
    import jax.numpy as jnp
    from numpyro import handlers

    model = handlers.substitute(handlers.seed(twin.model, jax.random.PRNGKey(0)),
                                data={k: jnp.asarray(v) for k, v in params.items()})
    site = handlers.trace(model).get_trace(nb.to_jax(x))["x"]
    return np.asarray(site["fn"].log_prob(site["value"]))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_line_log_likelihoods_are_the_same_on_both_backends_in_float64(cell):
    """torch's gate order (r, z, n / i, f, g, o), [out, in] layouts and two bias vectors,
    reproduced: in float64 every line's log-likelihood agrees to 1e-8 nats (a wrong gate
    order or bias placement moves it by nats)."""
    import jax

    lm, twin, x, params = setup(cell, double=True)
    jax.config.update("jax_enable_x64", True)
    try:
        got = twin_log_p(twin, params, x)
    finally:
        jax.config.update("jax_enable_x64", False)
    expected = torch_log_p(lm, x)
    assert got.dtype == np.float64 and got.shape == (len(x),)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_elbo_is_the_log_likelihood_on_both_backends_in_float32(cell):
    """As the runner computes (float32): the ELBO of both backends (no latents: the ELBO
    is log p(x)) and the per-line log-likelihoods agree to 1e-5 nats per symbol; per line
    they differ by a few float32 ulps of ~300 nats."""
    lm, twin, x, params = setup(cell)
    symbols = int((x >= 0).sum())
    expected = torch_log_p(lm, x)
    np.testing.assert_allclose(twin_log_p(twin, params, x) / symbols, expected / symbols, rtol=0, atol=1e-5)
    total = expected.sum() / symbols
    got = nb.numpyro_elbo(twin.model, twin.guides["none"], params, x, num_particles=1)
    assert got / symbols == pytest.approx(total, abs=1e-5)
    assert backend_tests.pyro_elbo(lm.model, lm.guide, x) / symbols == pytest.approx(total, abs=1e-5)


def test_minibatch_scaling_is_the_same_on_both_backends():
    """A batch of 3 rows out of 8 stands for the whole set: both backends scale its
    log-likelihood by 8 / 3 (Pyro's subsampled plate, the twin's data_plate), 1e-5 per symbol."""
    lm, twin, x, params = setup("gru")
    idx = torch.tensor([1, 4, 6])
    batch = x[idx]
    symbols = int((batch >= 0).sum())
    expected = len(x) / len(idx) * torch_log_p(lm, batch).sum()
    # numpyro_elbo takes the whole set and picks the rows (the runner's call_args); Pyro's model the rows
    got = nb.numpyro_elbo(twin.model, twin.guides["none"], params, x, idx=idx, size=len(x))
    assert got / symbols == pytest.approx(expected / symbols, abs=1e-5)
    pyro_got = backend_tests.pyro_elbo(lm.model, lm.guide, batch, idx=idx, size=len(x))
    assert pyro_got / symbols == pytest.approx(expected / symbols, abs=1e-5)


def test_fits_agree_after_the_same_budget(tmp_path):
    """60 Adam steps (batch 32, lr 3e-3) from the same torch weights and batches: no sampling
    anywhere, so the two trajectories differ only by float32 rounding; held-out and train
    log-likelihoods per symbol within 1e-3 nats (measured: 5e-6), and both moved from the
    start (a uniform guess over the 78 symbols scores log 1/78 = -4.36)."""
    common = [str(MODEL), "--hidden", "32", "--embed", "16", "--steps", "60", "--eval-every", "60",
              "--samples", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "pyro")]) == 0
    assert main([*common, "--backend", "numpyro", "--out", str(tmp_path / "numpyro")]) == 0
    a, b = backend_tests._metrics(tmp_path / "pyro"), backend_tests._metrics(tmp_path / "numpyro")
    for key in ("test_log_likelihood_per_symbol", "train_log_likelihood_per_symbol"):
        assert abs(a[key] - b[key]) < 1e-3, (key, a[key], b[key])
        assert a[key] > -math.log(78) + 0.5
    assert abs(a["test_elbo"] - b["test_elbo"]) < 0.1  # nats per line of ~80 symbols (measured: 4e-4)
