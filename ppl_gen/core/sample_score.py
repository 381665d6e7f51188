"""One sample-quality score for every image model, explicit or implicit: it needs samples only.

* The Fréchet distance between Gaussians fitted to features of held-out images and of samples
  (Heusel, Ramsauer, Unterthiner, Nessler & Hochreiter 2017, "GANs trained by a two time-scale
  update rule converge to a local Nash equilibrium", NeurIPS: the FID),

      FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}),

  in the feature space of a small classifier that the project trains on the same training set
  (its penultimate layer), not Inception's: nothing is downloaded, and the features are those of
  the data at hand. Its weights are cached in ``runs/.cache/sample_score/`` (or ``cache_dir``)
  under a fingerprint of the training set and the recipe, and trained on first use.
* The squared maximum mean discrepancy with a Gaussian kernel on the same features (Gretton,
  Borgwardt, Rasch, Schölkopf & Smola 2012, "A kernel two-sample test", JMLR), unbiased, with a
  permutation p-value for "samples and held-out images come from one distribution".
* Against memorization: the mean pixel distance (L2) of each sample to its nearest training image,
  beside the same number for held-out images (what an unmemorized model should be near).

FD and MMD are 0 for identical sets; both grow as samples leave the data's distribution. FD from
few images is biased upwards, so scores compare only at the same numbers of images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ppl_gen.core.dataset import Dataset
from ppl_gen.core.errors import UserError

CACHE_DIR = Path("runs/.cache/sample_score")
# the classifier's recipe: a change here must change the cache key
RECIPE = {"version": 1, "features": 32, "epochs": 10, "batch": 128, "lr": 2e-3, "seed": 0, "max_train": 20000}


class FeatureNet(nn.Module):
    """Two strided convolutions and a 32-unit layer (the features), then the class logits."""

    def __init__(self, H: int, W: int, classes: int, features: int = RECIPE["features"]):
        super().__init__()
        self.H, self.W = H, W
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        h, w = (H + 3) // 4, (W + 3) // 4
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(32 * h * w, features), nn.ReLU())
        self.head = nn.Linear(features, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv(x.reshape(len(x), 1, self.H, self.W)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _shape(dataset: Dataset) -> tuple[int, int]:
    shape = list(dataset.meta.get("shape", [dataset.train.shape[-1]]))
    if len(shape) != 2:
        raise UserError(f"the sample score needs 2-D images; {dataset.name} holds flat vectors of {shape[0]} values")
    return int(shape[0]), int(shape[1])


def _key(x: torch.Tensor, y: torch.Tensor, shape) -> str:
    h = hashlib.sha1(repr((sorted(RECIPE.items()), tuple(shape))).encode())
    h.update(x.detach().cpu().float().numpy().tobytes())
    h.update(y.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()[:16]


def classifier(dataset: Dataset, cache_dir: str | Path | None = None) -> FeatureNet:
    """The feature network for ``dataset``: loaded from the cache, or trained on its training set
    (labels needed) under its own seed, leaving the caller's random state untouched, and cached."""
    if dataset.labels_train is None:
        raise UserError(f"the sample score trains a classifier on {dataset.name}'s training labels, and it has none; "
                        "give labels (y_train, y_test in the .npz) or leave the score out")
    H, W = _shape(dataset)
    x, y = dataset.train[:RECIPE["max_train"]], dataset.labels_train[:RECIPE["max_train"]].long()
    classes = int(y.max().item()) + 1
    path = Path(cache_dir or CACHE_DIR) / f"classifier-{dataset.name}-{_key(x, y, (H, W))}.pt"
    net = FeatureNet(H, W, classes)
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.to(x.device).eval()
    net = net.to(x.device)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(RECIPE["seed"])
        opt = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"])
        for _ in range(RECIPE["epochs"]):
            for idx in torch.randperm(len(x), device=x.device).split(RECIPE["batch"]):
                loss = F.cross_entropy(net(x[idx]), y[idx].to(x.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(path)  # atomic: a run reading the cache never sees half a file
    return net.eval()


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) of Gaussians fitted to two feature sets.
    Tr (S_1 S_2)^{1/2} = sum of the square roots of the eigenvalues of S_1^{1/2} S_2 S_1^{1/2}, a
    symmetric matrix with the same eigenvalues as S_1 S_2 (so no non-symmetric square root)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T).reshape(f1.shape[1], -1), torch.cov(f2.T).reshape(f2.shape[1], -1)
    e, v = torch.linalg.eigh(s1)
    root1 = (v * e.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    # round-off can leave a distance of identical sets a hair below 0
    return max(float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross), 0.0)


def mmd2(f1: torch.Tensor, f2: torch.Tensor, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with a Gaussian kernel (bandwidth: the median pairwise distance of the pooled
    features) and its permutation p-value, (1 + #{permuted >= observed}) / (1 + permutations)."""
    f = torch.cat([f1, f2]).double()
    d2 = torch.cdist(f, f).pow(2)
    bandwidth2 = d2[d2 > 0].median() if (d2 > 0).any() else d2.new_tensor(1.0)
    k = torch.exp(-d2 / (2 * bandwidth2))
    n1 = len(f1)

    def stat(first: torch.Tensor) -> torch.Tensor:
        a, b = first, ~first
        kaa, kbb, kab = k[a][:, a], k[b][:, b], k[a][:, b]
        na, nb = int(a.sum()), int(b.sum())
        return ((kaa.sum() - kaa.diagonal().sum()) / (na * (na - 1))
                + (kbb.sum() - kbb.diagonal().sum()) / (nb * (nb - 1)) - 2 * kab.mean())

    first = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    first[:n1] = True
    observed = stat(first)
    g = torch.Generator().manual_seed(seed)
    exceed = sum(int(stat(first[torch.randperm(len(f), generator=g).to(f.device)]) >= observed)
                 for _ in range(permutations))
    return float(observed), (1 + exceed) / (1 + permutations)


def nearest_distance(x: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> float:
    """Mean over rows of x of the L2 pixel distance to the nearest row of ``reference``."""
    ref = reference.to(x.dtype)
    return float(torch.cat([torch.cdist(c, ref).min(1).values for c in x.split(chunk)]).mean())


def sample_score(samples: torch.Tensor, dataset: Dataset, n: int = 1000, permutations: int = 200, seed: int = 0,
                 cache_dir: str | Path | None = None) -> dict:
    """Score flat samples (m, H*W), pixels in [0, 1], against ``dataset``'s held-out images (its
    first ``n``, and the first ``n`` samples): ``sample_fd``, ``sample_mmd2``, ``sample_mmd_p_value``,
    ``nearest_train_distance`` and, for reference, ``heldout_nearest_train_distance``."""
    real = dataset.test if dataset.test is not None else dataset.train
    if samples.ndim != 2 or samples.shape[1] != real.shape[1]:
        raise UserError(f"the sample score needs samples of shape (m, {real.shape[1]}), got {tuple(samples.shape)}")
    if len(samples) < 2:
        raise UserError(f"the sample score needs at least 2 samples (a covariance), got {len(samples)}")
    net = classifier(dataset, cache_dir)
    real, fake = real[:n], samples[:n].to(real.device, real.dtype)
    with torch.no_grad():
        f_real, f_fake = net.embed(real), net.embed(fake)
    stat, p = mmd2(f_real, f_fake, permutations, seed)
    train = dataset.train[:20000]
    return {"sample_fd": frechet_distance(f_real, f_fake), "sample_mmd2": stat, "sample_mmd_p_value": p,
            "nearest_train_distance": nearest_distance(fake, train),
            "heldout_nearest_train_distance": nearest_distance(real, train),
            "sample_score_images": [len(f_real), len(f_fake)]}


def references(dataset: Dataset, seed: int = 0, cache_dir: str | Path | None = None) -> dict[str, dict]:
    """What the score says about known answers on ``dataset``: the second half of the held-out
    images scored against the first (real images, unseen by the classifier), training images
    (real, seen), and Bernoulli noise with the held-out images' mean ink, as many as the half."""
    real = dataset.test
    half = len(real) // 2
    first = Dataset(dataset.train, real[:half], dataset.labels_train, None, name=dataset.name, meta=dataset.meta)
    g = torch.Generator().manual_seed(seed)
    ink = real.mean().item()
    noise = torch.bernoulli(torch.full((len(real) - half, real.shape[1]), ink), generator=g).to(real)
    return {name: sample_score(x, first, seed=seed, cache_dir=cache_dir)
            for name, x in (("held-out half", real[half:]), ("training images", dataset.train[:len(real) - half]),
                            (f"Bernoulli({ink:.2f}) noise", noise))}


def main(argv: list[str] | None = None) -> int:
    """``python -m ppl_gen.core.sample_score [--data SPEC]``: the score's reference values."""
    import argparse
    import sys

    from ppl_gen.datasets.images import load_images

    p = argparse.ArgumentParser(prog="python -m ppl_gen.core.sample_score", description=main.__doc__)
    p.add_argument("--data", default=None, help="an image data set with labels (default: the digits)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        ds = load_images(args.data)
        rows = references(ds)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'against the first held-out half':<32}{'FD':>9}{'MMD^2':>9}{'p':>8}{'nearest train':>15}")
    for name, r in rows.items():
        print(f"{name:<32}{r['sample_fd']:>9.2f}{r['sample_mmd2']:>9.4f}{r['sample_mmd_p_value']:>8.3f}"
              f"{r['nearest_train_distance']:>15.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
