"""ppl_gen.core.sample_score: the Fréchet distance against its closed form for Gaussians, held-out
images against themselves near 0, noise far worse than real images, and the classifier cache."""

import pytest
import torch

from ppl_gen import load_images
from ppl_gen.core import sample_score as ss


@pytest.fixture(scope="module")
def digits_and_cache(tmp_path_factory):
    """The digits and a cache folder holding their classifier, trained once for this module."""
    torch.set_num_threads(1)
    ds = load_images(None)
    cache = tmp_path_factory.mktemp("score-cache")
    ss.classifier(ds, cache)
    return ds, cache


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    """Features with exactly known moments (whitened draws, rescaled): FD equals
    ||mu_1 - mu_2||^2 + sum (sd_1 - sd_2)^2 for diagonal covariances, to round-off."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(500, 3, generator=g, dtype=torch.float64)
    mu1, sd1 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    mu2, sd2 = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64)
    e2 = torch.randn(400, 3, generator=g, dtype=torch.float64)
    whiten = lambda a: (a - a.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(a.T))).T  # noqa: E731
    e1, e2 = whiten(e), whiten(e2)  # sample mean 0, sample covariance I exactly
    fd = ss.frechet_distance(mu1 + sd1 * e1, mu2 + sd2 * e2)
    expect = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    assert fd == pytest.approx(expect.item(), abs=1e-8)


def test_heldout_images_against_themselves_score_near_zero(digits_and_cache):
    ds, cache = digits_and_cache
    s = ss.sample_score(ds.test, ds, cache_dir=cache)
    assert abs(s["sample_fd"]) < 1e-6 and abs(s["sample_mmd2"]) < 0.01 and s["sample_mmd_p_value"] > 0.5
    assert s["nearest_train_distance"] == pytest.approx(s["heldout_nearest_train_distance"], abs=1e-12)


def test_noise_scores_far_worse_than_real_images(digits_and_cache):
    """The first half of the held-out digits against the second: what real images score; noise with
    the digits' mean ink (Bernoulli(0.3) pixels) is rejected by the MMD test and has a far larger FD."""
    ds, cache = digits_and_cache
    half = len(ds.test) // 2
    from ppl_gen import Dataset

    first = Dataset(ds.train, ds.test[:half], ds.labels_train, None, name=ds.name, meta=ds.meta)
    real = ss.sample_score(ds.test[half:], first, cache_dir=cache)
    g = torch.Generator().manual_seed(0)
    noise = torch.bernoulli(torch.full((len(ds.test) - half, ds.test.shape[1]), 0.3), generator=g)
    fake = ss.sample_score(noise, first, cache_dir=cache)
    assert fake["sample_fd"] > 5 * real["sample_fd"]
    assert fake["sample_mmd_p_value"] < 0.01 < real["sample_mmd_p_value"]
    assert fake["nearest_train_distance"] > 1.5 * real["nearest_train_distance"]


def test_classifier_is_cached_and_reloaded_identically(digits_and_cache):
    ds, cache = digits_and_cache
    files = list(cache.glob("classifier-digits-*.pt"))
    assert len(files) == 1
    a, b = ss.classifier(ds, cache), ss.classifier(ds, cache)
    with torch.no_grad():
        assert torch.equal(a.embed(ds.test[:5]), b.embed(ds.test[:5]))
        accuracy = (a(ds.test).argmax(1) == ds.labels_test).float().mean().item()
    assert accuracy > 0.8  # features that tell digits apart


def test_data_without_labels_is_refused():
    from ppl_gen import Dataset, UserError

    x = torch.zeros(10, 16)
    with pytest.raises(UserError, match="has none"):
        ss.classifier(Dataset(x, x, meta={"shape": [4, 4]}), "/nonexistent")
