"""Variational autoencoder with amortized inference (Kingma & Welling 2014, "Auto-Encoding
Variational Bayes", ICLR).

Generative model (the lecture's decoder, parameters phi), for each data point n:

    z_n ~ N(0, I)                                   prior p(z)
    x_n | z_n ~ Bernoulli(sigmoid(f_phi(z_n)))      decoder p_phi(x | z), an MLP

Variational family (the lecture's encoder, parameters theta), amortized over data points:

    q_theta(z_n | x_n) = N(mu_theta(x_n), diag sigma_theta(x_n)^2)

One network maps any x to its variational parameters lambda_n = (mu, sigma), instead
of keeping a separate lambda_n per data point. Sampling z = mu + sigma * eps with
eps ~ N(0, I) (the reparameterization trick) lets gradients of the ELBO

    ELBO(theta, phi) = E_q[log p_phi(x | z)] - KL(q_theta(z | x) || p(z))

flow into theta. ``--elbo meanfield`` takes the KL term in closed form; ``--elbo trace``
estimates every term by Monte Carlo. Note the lecture calls the encoder's parameters
theta and the decoder's phi, the reverse of Kingma & Welling's naming.

Data: scikit-learn's 8x8 digits by default (binarized); ``--data fashion-mnist``;
any MNIST-format IDX folder or an .npz with x_train / x_test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_gen import Spec, UserError, data_plate, plotting
from ppl_gen.data import load_images


@dataclass
class Options:
    latent_dim: int = field(default=20, metadata={"help": "dimension of the latent z"})
    hidden_dim: int = field(default=400, metadata={"help": "width of the encoder's and decoder's hidden layer"})
    ll_samples: int = field(default=1000, metadata={
        "help": "K, importance samples per point for the held-out log-likelihood"})
    ll_points: int = field(default=1000, metadata={
        "help": "held-out points (the first ones) scored by the log-likelihood estimate"})

    def validate(self):
        for name in ("latent_dim", "hidden_dim", "ll_samples", "ll_points"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


# Kingma & Welling's MNIST settings use batch 100 and Adagrad; Adam at 1e-3 with
# batch 128 is today's common default and converges on the digits in seconds.
DEFAULTS = {"steps": 3000, "lr": 1e-3, "batch_size": 128}


def data(spec: str | None = None, options: Options | None = None):
    """Binarized images: digits (default), fashion-mnist, an IDX folder or an .npz."""
    return load_images(spec)


class Encoder(nn.Module):
    """x -> (mu_theta(x), sigma_theta(x)): the variational parameters lambda = f(x; theta)."""

    def __init__(self, x_dim: int, hidden_dim: int, z_dim: int):
        super().__init__()
        self.hidden = nn.Linear(x_dim, hidden_dim)
        self.mu = nn.Linear(hidden_dim, z_dim)
        self.log_sigma = nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.hidden(x))
        return self.mu(h), torch.exp(self.log_sigma(h))


class Decoder(nn.Module):
    """z -> Bernoulli logits of p_phi(x | z)."""

    def __init__(self, z_dim: int, hidden_dim: int, x_dim: int):
        super().__init__()
        self.hidden = nn.Linear(z_dim, hidden_dim)
        self.logits = nn.Linear(hidden_dim, x_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits(torch.relu(self.hidden(z)))


class VAE:
    """The model p_phi(x, z) = p(z) p_phi(x | z) and its amortized guide q_theta(z | x)."""

    def __init__(self, x_dim: int, options: Options, device: torch.device | str = "cpu"):
        self.x_dim, self.z_dim = x_dim, options.latent_dim
        self.options = options
        self.encoder = Encoder(x_dim, options.hidden_dim, self.z_dim).to(device)
        self.decoder = Decoder(self.z_dim, options.hidden_dim, x_dim).to(device)

    def prior(self, like: torch.Tensor) -> dist.Distribution:
        return dist.Normal(like.new_zeros(self.z_dim), like.new_ones(self.z_dim)).to_event(1)

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=self.decoder(z)).to_event(1)

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        pyro.module("decoder", self.decoder)
        with data_plate(x, idx, size):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood(z), obs=x)

    def amortized(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, size):
            mu, sigma = self.encoder(x)
            pyro.sample("z", dist.Normal(mu, sigma).to_event(1))

    # -- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, K: int,
                       chunk: int = 64) -> torch.Tensor:
        """Importance-sampled log p(x) per data point, with proposal N(loc, scale^2):

            log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k),   z_k ~ q

        A lower bound in expectation that tightens as K grows and equals the ELBO's
        integrand at K = 1 (Burda, Grosse & Salakhutdinov 2016).
        """
        out = []
        for s in range(0, len(x), chunk):
            xs, mu, sigma = x[s:s + chunk], loc[s:s + chunk], scale[s:s + chunk]
            q = dist.Normal(mu, sigma).to_event(1)
            z = q.sample((K,))                                   # (K, n, z_dim)
            log_w = self.prior(xs).log_prob(z) + self.likelihood(z).log_prob(xs) - q.log_prob(z)
            out.append(torch.logsumexp(log_w, 0) - math.log(K))
        return torch.cat(out)

    def evaluate(self, run) -> dict:
        x = run.dataset.test
        if x is None:
            return {}
        x = x[: self.options.ll_points]
        with torch.no_grad():
            loc, scale = self.encoder(x)
        ll = self.log_likelihood(x, loc, scale, self.options.ll_samples)
        return {"test_log_likelihood": ll.mean().item(),
                "log_likelihood_samples": self.options.ll_samples,
                "log_likelihood_points": len(x),
                "log_likelihood_proposal": "amortized encoder q(z|x)"}

    # -- plots -----------------------------------------------------------------------
    @torch.no_grad()
    def plots(self, run, out: Path) -> list[Path]:
        ds = run.dataset
        shape = ds.meta.get("shape", [self.x_dim])
        if len(shape) != 2:
            return []  # images only; flat vectors have no picture
        x = ds.test if ds.test is not None else ds.train
        labels = ds.labels_test if ds.test is not None else ds.labels_train
        paths = []
        mu, _ = self.encoder(x[:10])
        recon = torch.sigmoid(self.decoder(mu))
        paths.append(plotting.image_grid(torch.cat([x[:10], recon]), shape, out / "reconstructions.png",
                                         "held-out images (top) and their reconstructions (bottom)",
                                         nrow=2, row_labels=["x", "E[x|mu(x)]"]))
        z = self.prior(x).sample((64,))
        paths.append(plotting.image_grid(torch.sigmoid(self.decoder(z)), shape, out / "samples.png",
                                         "samples from the prior: Bernoulli means of p(x|z), z ~ N(0, I)"))
        mu, _ = self.encoder(x[:2000])
        if self.z_dim == 2:
            points, xl, yl, how = mu, "z1", "z2", ""
        else:  # project the posterior means on their two principal axes
            centred = mu - mu.mean(0)
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            points, xl, yl, how = centred @ v[:2].T, "PC1", "PC2", " (first two principal components)"
        paths.append(plotting.scatter_2d(points, None if labels is None else labels[:2000],
                                         out / "latent_space.png", f"encoder means of held-out data{how}", xl, yl))
        if self.z_dim == 2:
            # the manifold: decode a grid of z placed at Normal quantiles, as in Kingma & Welling's Fig. 4
            n = 15
            p = torch.linspace(0.05, 0.95, n, device=x.device)
            grid = dist.Normal(x.new_zeros(()), x.new_ones(())).icdf(p)
            zz = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"), -1).reshape(-1, 2)
            paths.append(plotting.image_grid(torch.sigmoid(self.decoder(zz)), shape, out / "manifold.png",
                                             "decoder means over a grid of z (Normal quantiles)", nrow=n))
        return paths


def build(options: Options, dataset) -> Spec:
    vae = VAE(dataset.train.shape[-1], options, dataset.train.device)
    return Spec(model=vae.model, guides={"amortized": vae.amortized},
                evaluate=vae.evaluate, plots=vae.plots, description=__doc__.split("\n")[0])
