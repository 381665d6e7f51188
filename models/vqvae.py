"""VQ-VAE: a VAE with a discrete latent code per grid cell (van den Oord, Vinyals &
Kavukcuoglu 2017, "Neural Discrete Representation Learning", NeurIPS).

Generative model, for each image x_n (D pixels) and each of the h x w cells j of its
latent grid:

    z_nj ~ Categorical(1/K, ..., 1/K)                  prior p(z): uniform over K codes
    x_n | z_n ~ Bernoulli(sigmoid(f_phi(e_{z_n})))     decoder p_phi(x | z)

where e_1..e_K in R^d is the codebook and e_{z_n} the h x w grid of the chosen vectors.
The guide is a point mass on the nearest code of the encoder's output z_e(x) (the
lecture's "the encoder outputs discrete codes"):

    q_theta(z_nj = k | x_n) = 1  if k = argmin_k' ||z_e(x_n)_j - e_k'||,  else 0.

Its entropy is 0 and KL(q || p) = sum_j log K, so the ELBO is, exactly,

    ELBO = E_q[log p_phi(x | z)] - KL(q || p) = log p_phi(x | e_{z*}) - (h w) log K,

which is what the runner's ``test_elbo`` reports (``--guide nearest``, the only one).

Training follows the paper's loss, which is the negative ELBO (up to the constant
h w log K) plus two terms that are not part of any likelihood:

    L = -log p(x | z_q(x)) + ||sg[z_e(x)] - e||^2 + beta ||z_e(x) - sg[e]||^2

* The argmin has no gradient, so the decoder's input is z_q = z_e + sg[e - z_e]: its
  value is e_{z*}, its gradient is copied to z_e (the straight-through estimator;
  Bengio, Leonard & Courville 2013). That is why ``model`` also runs the encoder: the
  value it scores is p(x | e_{z*}) only, but the gradient reaches theta through it.
* The codebook term pulls each used e_k to the encoder outputs assigned to it; the
  commitment term (weight ``--beta``, the paper's 0.25) keeps z_e near its code.
  They enter the model as ``pyro.factor("vq_terms", -(v - sg[v]))``: a factor whose value
  is exactly 0 and whose gradient is that of the two terms. So every ELBO the runner or
  Pyro computes is the bound itself, while Adam follows the paper's L.

A learned prior (the paper's second stage): a PixelCNN over the code grid (K-way
categorical per cell, raster order, the masked layers of ``ppl_gen.nets.masked``),
p_psi(z) = prod_j p_psi(z_j | z_<j), fitted after the VQ-VAE by maximum likelihood on the
training images' codes z*(x) (``--prior-steps``, in ``evaluate``). With the encoder and
decoder fixed, maximizing the ELBO over psi *is* that fit, and the bound becomes

    ELBO_psi = log p_phi(x | e_{z*}) + log p_psi(z*),

tighter than the uniform one where p_psi puts more than K^-hw on the codes the data use
(it starts uniform: its output layer is zero at initialization). Ancestral samples of
p_psi, decoded, are the VQ-VAE's samples.

Code names: ``K`` is ``--codes``, d is ``--code-dim``, beta is ``--beta``, theta is
``encoder``, phi is ``decoder``, the codebook e is ``quantizer.codebook`` [K, d], psi is
``prior_net``; ``cells`` = h w.

Data: scikit-learn's 8x8 digits by default (binarized), ``--data fashion-mnist``, any
MNIST-format IDX folder or an .npz with x_train / x_test as (n, H, W) arrays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F

from ppl_gen import Dataset, Metric, Spec, UserError, data_plate, load_images
from ppl_gen.nets.masked import PixelCNN, sample_raster


@dataclass
class Options:
    codes: int = field(default=8, metadata={"help": "K, the number of codebook vectors"})
    code_dim: int = field(default=16, metadata={"help": "d, the length of each codebook vector"})
    hidden: int = field(default=16, metadata={"help": "feature maps in the encoder and decoder"})
    downsample: int = field(default=1, metadata={
        "help": "stride-2 halvings from the image to the code grid (8x8 digits -> 4x4 codes)"})
    beta: float = field(default=0.25, metadata={"help": "weight of the commitment term"})
    # the prior is fitted on the training grids only, and memorizes them if fitted for long
    prior_steps: int = field(default=1000, metadata={
        "help": "Adam steps fitting the PixelCNN prior to the training codes (0: no learned prior)"})
    prior_lr: float = field(default=2e-3, metadata={"help": "learning rate of the prior's fit"})
    prior_batch: int = field(default=128, metadata={"help": "code grids per step of the prior's fit"})
    prior_layers: int = field(default=3, metadata={"help": "masked layers of the prior's PixelCNN"})
    prior_channels: int = field(default=32, metadata={"help": "feature maps of the prior's PixelCNN"})
    prior_kernel: int = field(default=3, metadata={"help": "odd kernel size of the prior's masked layers"})
    samples: int = field(default=64, metadata={"help": "images sampled for samples.png and the sampling time"})

    def validate(self):
        if self.codes < 2:
            raise UserError(f"--codes must be at least 2 (one code carries no information: the "
                            f"decoder would see the same input for every image), got {self.codes}")
        for name in ("code_dim", "hidden", "prior_batch", "prior_layers", "prior_channels", "samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.downsample < 0 or self.prior_steps < 0 or self.beta < 0:
            raise UserError("--downsample, --prior-steps and --beta cannot be negative")
        if self.prior_kernel < 3 or self.prior_kernel % 2 == 0:
            raise UserError(f"--prior-kernel must be odd and at least 3, got {self.prior_kernel}")


# 8 codes on a 4x4 grid carry 48 bits, about what a 64-pixel binary digit needs, and keep the
# prior's table small. The guide is a point mass, so one particle gives the ELBO exactly.
DEFAULTS = {"steps": 1500, "lr": 2e-3, "batch_size": 128, "eval_particles": 1}


def data(spec: str | None = None, options: Options | None = None) -> Dataset:
    """Binarized images: digits (default), fashion-mnist, an IDX folder or an .npz."""
    return load_images(spec)


def image_shape(dataset: Dataset, downsample: int) -> tuple[int, int]:
    """(H, W) of flat binary images whose sides halve ``downsample`` times evenly."""
    shape = list(dataset.meta.get("shape", [dataset.train.shape[-1]]))
    if len(shape) != 2:
        raise UserError(f"vqvae.py needs 2-D images (its encoder is convolutional); {dataset.name} "
                        f"holds flat vectors of {shape[0]} values: save x_train and x_test as (n, H, W)")
    H, W = int(shape[0]), int(shape[1])
    f = 2 ** downsample
    if H % f or W % f:
        raise UserError(f"--downsample {downsample} halves the image {downsample} time(s), so height and "
                        f"width must be multiples of {f}; the images are {H}x{W}: choose a --downsample "
                        "that divides them, or crop/pad the images")
    for split, x in (("training", dataset.train), ("held-out", dataset.test)):
        bad = None if x is None else x[(x != 0) & (x != 1)]
        if bad is not None and bad.numel():
            raise UserError(f"vqvae.py's decoder models binary pixels (Bernoulli), but the {split} images "
                            f"hold values such as {bad[0].item():.3g}; binarize them first, e.g. "
                            "x = (x > 0.5).float(), or load uint8 images through --data, which binarizes")
    return H, W


class Encoder(nn.Module):
    """x (n, 1, H, W) -> z_e (n, d, H/2^s, W/2^s)."""

    def __init__(self, hidden: int, code_dim: int, downsample: int):
        super().__init__()
        layers, c = [], 1
        for _ in range(downsample):
            layers += [nn.Conv2d(c, hidden, 4, stride=2, padding=1), nn.ReLU()]
            c = hidden
        layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """z_q (n, d, h, w) -> Bernoulli logits (n, 1, H, W) of p_phi(x | z)."""

    def __init__(self, hidden: int, code_dim: int, downsample: int):
        super().__init__()
        layers = [nn.Conv2d(code_dim, hidden, 3, padding=1), nn.ReLU()]
        for _ in range(downsample):
            layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(hidden, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class Quantizer(nn.Module):
    """The codebook e [K, d] and the nearest-code map z_e -> z* = argmin_k ||z_e - e_k||."""

    def __init__(self, K: int, code_dim: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(K, code_dim).uniform_(-1.0 / K, 1.0 / K))

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (...) indices of the nearest codebook rows (squared Euclidean)."""
        e = self.codebook
        d2 = (z_e * z_e).sum(-1, keepdim=True) - 2 * z_e @ e.T + (e * e).sum(-1)
        return d2.argmin(-1)


class CodePrior(dist.TorchDistribution):
    """p_psi(z) = prod_j Categorical(z_j | softmax(g_psi(z_<j)_j)): a PixelCNN over an h x w
    grid of codes in raster order, one-hot codes in, K logits per cell out. Values are
    flat (..., h w) code grids (the shape of the model's ``z`` site)."""

    arg_constraints = {}

    def __init__(self, net: nn.Module, K: int, h: int, w: int, validate_args=None):
        self.net, self.K, self.h, self.w = net, K, h, w
        super().__init__(torch.Size(), torch.Size([h * w]), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.K - 1), 1)

    def _param(self) -> torch.Tensor:
        return next(self.net.parameters())

    def one_hot(self, z: torch.Tensor) -> torch.Tensor:
        """(m, h w) codes -> (m, K, h, w) network input."""
        return F.one_hot(z.reshape(-1, self.h, self.w), self.K).permute(0, 3, 1, 2).to(self._param().dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, self.h * self.w).long()
        logits = self.net(self.one_hot(flat)).flatten(2)                      # (m, K, h w)
        lp = torch.log_softmax(logits, 1).gather(1, flat.unsqueeze(1)).squeeze(1).sum(-1)
        return lp.reshape(z.shape[:-1])

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        m = max(shape.numel(), 1)
        p = self._param()
        grid = p.new_zeros(m, self.K, self.h, self.w)
        draw = lambda logits: F.one_hot(dist.Categorical(logits=logits).sample(), self.K)  # noqa: E731
        sample_raster(self.net, grid, draw)
        return grid.argmax(1).reshape(*shape, self.h * self.w)


class VQVAE:
    """The model p(z) p_phi(x | z), the nearest-code guide, and the learned prior p_psi."""

    def __init__(self, H: int, W: int, options: Options, device: torch.device | str = "cpu"):
        o = options
        self.options, self.H, self.W, self.K = o, H, W, o.codes
        self.h, self.w = H // 2 ** o.downsample, W // 2 ** o.downsample
        self.cells = self.h * self.w
        self.encoder = Encoder(o.hidden, o.code_dim, o.downsample).to(device)
        self.decoder = Decoder(o.hidden, o.code_dim, o.downsample).to(device)
        self.quantizer = Quantizer(o.codes, o.code_dim).to(device)
        self.prior_net = PixelCNN(o.codes, o.codes, o.prior_channels, o.prior_layers, o.prior_kernel).to(device)
        # the prior starts uniform, so its bound starts at the uniform prior's
        nn.init.zeros_(self.prior_net.head[-1].weight)
        nn.init.zeros_(self.prior_net.head[-1].bias)
        self.prior_fitted = False
        self.samples: dict[str, torch.Tensor] = {}

    # -- the pieces ------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Flat images (n, H W) -> z_e as (n, cells, d), cells in raster order."""
        z_e = self.encoder(x.reshape(-1, 1, self.H, self.W))
        return z_e.flatten(2).transpose(1, 2)

    def decode_logits(self, z_q: torch.Tensor) -> torch.Tensor:
        """(n, cells, d) -> (n, H W) Bernoulli logits."""
        grid = z_q.transpose(1, 2).reshape(-1, z_q.shape[-1], self.h, self.w)
        return self.decoder(grid).reshape(z_q.shape[0], self.H * self.W)

    def codes(self, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """z*(x): (n, cells) nearest codes."""
        with torch.no_grad():
            return torch.cat([self.quantizer.nearest(self.encode(xs)) for xs in x.split(chunk)])

    def uniform_prior(self, like: torch.Tensor) -> dist.Distribution:
        return dist.Categorical(logits=like.new_zeros(self.cells, self.K)).to_event(1)

    def learned_prior(self, like: torch.Tensor) -> dist.Distribution:
        return CodePrior(self.prior_net, self.K, self.h, self.w)

    # -- model and guide -------------------------------------------------------
    def _joint(self, x, idx, size, prior):
        pyro.module("encoder", self.encoder)
        pyro.module("decoder", self.decoder)
        pyro.module("quantizer", self.quantizer)
        with data_plate(x, idx, size):
            z = pyro.sample("z", prior(x))                                   # (n, cells) codes
            e = self.quantizer.codebook[z]                                   # e_z: (n, cells, d)
            z_e = self.encode(x)
            z_q = z_e + (e - z_e).detach()                                   # value e_z, gradient to z_e
            vq = ((z_e.detach() - e) ** 2).sum((-1, -2)) + self.options.beta * ((z_e - e.detach()) ** 2).sum((-1, -2))
            pyro.factor("vq_terms", -(vq - vq.detach()))                     # value 0, gradient of L's terms
            pyro.sample("x", dist.Bernoulli(logits=self.decode_logits(z_q)).to_event(1), obs=x)

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """p(z) p_phi(x | z) with the uniform prior: what the runner trains."""
        self._joint(x, idx, size, self.uniform_prior)

    def model_learned_prior(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """p_psi(z) p_phi(x | z): the same decoder under the fitted PixelCNN prior."""
        self._joint(x, idx, size, self.learned_prior)

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(z | x): a point mass on the nearest code of every cell."""
        pyro.module("encoder", self.encoder)
        pyro.module("quantizer", self.quantizer)
        with data_plate(x, idx, size):
            z_star = self.quantizer.nearest(self.encode(x))
            pyro.sample("z", dist.Categorical(probs=F.one_hot(z_star, self.K).to(x.dtype)).to_event(1))

    # -- numbers ---------------------------------------------------------------
    @torch.no_grad()
    def reconstruction(self, x: torch.Tensor, z: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """log p_phi(x | e_z) per image (nats)."""
        out = [dist.Bernoulli(logits=self.decode_logits(self.quantizer.codebook[zs])).log_prob(xs).sum(-1)
               for xs, zs in zip(x.split(chunk), z.split(chunk))]
        return torch.cat(out)

    @torch.no_grad()
    def prior_log_prob(self, z: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        prior = CodePrior(self.prior_net, self.K, self.h, self.w)
        return torch.cat([prior.log_prob(zs) for zs in z.split(chunk)])

    def fit_prior(self, z_train: torch.Tensor, steps: int | None = None) -> list[float]:
        """Maximum likelihood of the PixelCNN prior on training codes (Adam, minibatches of
        ``--prior-batch`` grids); returns the mean log p_psi(z) per grid at each step."""
        steps = self.options.prior_steps if steps is None else steps
        prior = CodePrior(self.prior_net, self.K, self.h, self.w)
        optim = torch.optim.Adam(self.prior_net.parameters(), lr=self.options.prior_lr)
        n, b = len(z_train), min(self.options.prior_batch, len(z_train))
        curve = []
        self.prior_net.train()
        with torch.enable_grad():
            for _ in range(steps):
                batch = z_train[torch.randint(n, (b,), device=z_train.device)]
                optim.zero_grad(set_to_none=True)
                loss = -prior.log_prob(batch).mean()
                loss.backward()
                optim.step()
                curve.append(-loss.item())
        self.prior_net.eval()
        self.prior_fitted = steps > 0
        return curve

    @torch.no_grad()
    def sample_images(self, n: int, prior: str) -> torch.Tensor:
        """Bernoulli means of p(x | e_z) for n code grids z drawn from a prior."""
        like = self.quantizer.codebook
        z = (self.uniform_prior(like) if prior == "uniform" else self.learned_prior(like)).sample((n,))
        return torch.sigmoid(self.decode_logits(self.quantizer.codebook[z]))

    def evaluate(self, run) -> dict:
        x_train, x_test = run.dataset.train, run.dataset.test
        bits = lambda nats: -nats / (self.H * self.W * math.log(2))  # noqa: E731
        log_K = self.cells * math.log(self.K)
        z_train = self.codes(x_train)
        counts = torch.bincount(z_train.reshape(-1), minlength=self.K).double()
        p = counts[counts > 0] / counts.sum()
        t0 = time.perf_counter()
        self.fit_prior(z_train)
        prior_seconds = time.perf_counter() - t0
        bounds = {}
        for split, x, z in (("test", x_test, None), ("train", x_train, z_train)):
            if x is None:
                continue
            z = self.codes(x) if z is None else z
            rec = self.reconstruction(x, z).mean().item()
            bounds[split] = {"reconstruction": rec, "elbo_uniform_prior": rec - log_K}
            if self.prior_fitted:
                lp = self.prior_log_prob(z).mean().item()
                bounds[split].update({"elbo_learned_prior": rec + lp, "code_log_prob_learned_prior": lp})
        prior = "learned" if self.prior_fitted else "uniform"
        t0 = time.perf_counter()
        self.samples[prior] = self.sample_images(self.options.samples, prior)
        if x_train.device.type == "cuda":
            torch.cuda.synchronize(x_train.device)
        sampling = (time.perf_counter() - t0) / self.options.samples
        # headline numbers first: the runner's summary prints the first few
        out = {}
        for split, b in bounds.items():
            for key, value in b.items():
                out[f"{split}_{key}"] = value
                if key.startswith("elbo"):
                    out[f"{split}_bits_per_dim{key[4:]}"] = bits(value)
        out.update({"codebook_perplexity": math.exp(-(p * p.log()).sum().item()),
                    "dead_codes": int((counts == 0).sum().item()),
                    "sampling_seconds_per_image": sampling, "sampling_prior": prior,
                    "prior_seconds": prior_seconds, "prior_steps": self.options.prior_steps,
                    "prior_parameters": sum(q.numel() for q in self.prior_net.parameters()),
                    "cells": self.cells, "codes": self.K, "kl_uniform_prior": log_K})
        if run.trace:
            out["train_seconds"] = float(run.trace[-1]["seconds"])
        return out

    # -- plots -----------------------------------------------------------------
    @torch.no_grad()
    def plots(self, run, out_dir: Path) -> list[Path]:
        from ppl_gen import plotting

        shape = [self.H, self.W]
        x = (run.dataset.test if run.dataset.test is not None else run.dataset.train)[:10]
        z = self.codes(x)
        recon = torch.sigmoid(self.decode_logits(self.quantizer.codebook[z]))
        paths = [plotting.image_grid(torch.cat([x, recon]), shape, out_dir / "reconstructions.png",
                                     "held-out images (top) and decoder means at their nearest codes",
                                     nrow=2, row_labels=["x", "E[x | e_z*]"])]
        paths.append(self.plot_codes(x[:8], z[:8], out_dir / "codes.png"))
        for prior in ("learned", "uniform") if self.prior_fitted else ("uniform",):
            images = self.samples.get(prior)
            images = self.sample_images(self.options.samples, prior) if images is None else images
            what = "the PixelCNN prior p_psi(z)" if prior == "learned" else f"the uniform prior over {self.K} codes"
            paths.append(plotting.image_grid(images, shape, out_dir / f"samples_{prior}_prior.png",
                                             f"decoder means for code grids drawn from {what}"))
        return paths

    def plot_codes(self, x: torch.Tensor, z: torch.Tensor, path: Path) -> Path:
        """Each image above its h x w grid of code indices (colour = code)."""
        from ppl_gen import plotting  # noqa: F401  (sets matplotlib's file-only backend)
        import matplotlib.pyplot as plt
        import numpy as np

        n = len(x)
        fig, axes = plt.subplots(2, n, figsize=(1.4 * n + 0.4, 3.2), squeeze=False)
        cmap = plt.get_cmap("tab20" if self.K <= 20 else "gist_ncar", self.K)
        for k in range(n):
            axes[0, k].imshow(x[k].reshape(self.H, self.W).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1,
                              interpolation="nearest")
            grid = z[k].reshape(self.h, self.w).cpu().numpy()
            axes[1, k].imshow(grid, cmap=cmap, vmin=-0.5, vmax=self.K - 0.5, interpolation="nearest")
            if self.cells <= 64:
                for (r, c), v in np.ndenumerate(grid):
                    axes[1, k].text(c, r, str(v), ha="center", va="center", fontsize=7)
            for ax in axes[:, k]:
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, 0].set_ylabel("x")
        axes[1, 0].set_ylabel("z*")
        fig.suptitle(f"held-out images and their {self.h}x{self.w} grids of codes (K = {self.K})")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def build(options: Options, dataset: Dataset) -> Spec:
    H, W = image_shape(dataset, options.downsample)
    vq = VQVAE(H, W, options, dataset.device)
    nats = "nats/image"
    return Spec(model=vq.model, guides={"nearest": vq.guide}, evaluate=vq.evaluate, plots=vq.plots,
                description=__doc__.split("\n")[0], density="bound",
                heldout_log_density=("test_elbo_learned_prior", "test_elbo_uniform_prior"),
                sample=lambda n: torch.bernoulli(vq.sample_images(n, "learned" if vq.prior_fitted else "uniform")),
                metrics=(Metric("test_reconstruction", f"held-out log p(x|z*) ({nats})", "{:.2f}", True),
                         Metric("test_elbo_uniform_prior", f"ELBO, uniform prior ({nats})", "{:.2f}", True),
                         Metric("test_bits_per_dim_uniform_prior", "bits/dim, uniform prior", "{:.4f}", False),
                         Metric("test_elbo_learned_prior", f"ELBO, PixelCNN prior ({nats})", "{:.2f}", True,
                                bar=True),
                         Metric("test_bits_per_dim_learned_prior", "bits/dim, PixelCNN prior", "{:.4f}", False),
                         Metric("codebook_perplexity", "codebook perplexity", "{:.1f}", None),
                         Metric("dead_codes", "dead codes", "{:d}", None),
                         Metric("sampling_seconds_per_image", "sampling s/image", "{:.2e}", False)))
