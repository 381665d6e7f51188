"""model.png / guide.png from pyro.render_model: drawn when graphviz is present, one line when not,
and drawing never changes a run's parameters or random stream."""

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_gen import Dataset, Spec, data_plate
from ppl_gen.core import pictures

PNG = b"\x89PNG\r\n\x1a\n"


def _model(x, idx=None, size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with data_plate(x, idx, size):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def _guide(x, idx=None, size=None):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 1.0))


def _spec():
    return Spec(model=_model, guides={"normal": _guide}), Dataset(train=torch.randn(50) + 3.0)


def test_pictures_drawn_with_graphviz(tmp_path):
    if pictures.graphviz_missing():
        pytest.skip(f"graphviz absent, so nothing to check here: {pictures.HOW_TO_GET}")
    spec, ds = _spec()
    pyro.param("loc", torch.tensor(2.5))
    before_rng = torch.get_rng_state()
    written = pictures.model_pictures(spec, _guide, ds, tmp_path)
    assert [p.name for p in written] == ["model.png", "guide.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG
    assert sorted(q.name for q in tmp_path.iterdir()) == ["guide.png", "model.png"]  # no dot source left
    # the picture's trace neither moves the random stream nor touches the parameters
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert list(pyro.get_param_store().keys()) == ["loc"] and pyro.param("loc").item() == 2.5


def test_pictures_dot_source_shows_plate_and_observed(tmp_path):
    if pictures.graphviz_missing():
        pytest.skip(f"graphviz absent: {pictures.HOW_TO_GET}")
    spec, ds = _spec()
    g = pyro.render_model(_model, model_args=(ds.train[:4], torch.arange(4)), model_kwargs={"size": 50},
                          render_distributions=True)
    src = g.source
    assert "cluster_data" in src and "filled" in src and "Normal" in src


def test_without_graphviz_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(pictures.shutil, "which", lambda name: None)
    spec, ds = _spec()
    note = pictures.model_pictures(spec, _guide, ds, tmp_path)
    assert note == pictures.HOW_TO_GET and "\n" not in note
    assert not list(Path(tmp_path).iterdir())


def test_a_trained_per_point_table_is_drawn_and_left_as_it_was(build_run, tmp_path):
    """The explicit VAE guide's trained (mu_n, sigma_n) table in a subsampled plate: the picture is
    drawn (from fresh parameters on the first rows) and the trained table comes back unchanged."""
    if pictures.graphviz_missing():
        pytest.skip(f"graphviz absent: {pictures.HOW_TO_GET}")
    from ppl_gen.backends.pyro_backend import PyroBackend

    setup = build_run("models/vae.py", guide="explicit", options={"test_points": 30}, batch_size=64)
    trainer = PyroBackend().trainer(setup)
    for t in (1, 2):
        trainer.step(t)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    written = pictures.model_pictures(setup.spec, setup.guide, setup.dataset, tmp_path)
    assert [p.name for p in written] == ["model.png", "guide.png"]
    after = dict(pyro.get_param_store().named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
