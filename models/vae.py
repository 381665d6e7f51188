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

Three guides (variational families) for the same model, ``--guide NAME``:

* ``amortized``: the encoder above (Kingma & Welling 2014);
* ``explicit``: one free (mu_n, sigma_n) per training example, the lecture's "a separate
  q for every x"; minibatch steps touch only the batch's rows. New data get fresh local
  parameters fitted with the decoder frozen (``--local-steps``);
* ``semi-amortized``: the encoder's output refined by K gradient steps on each point's
  ELBO, unrolled so the encoder learns a good starting point (Kim, Wiseman, Miller,
  Sontag & Rush 2018, "Semi-Amortized Variational Autoencoders"; ``--refine-steps``).

Evaluation splits the gap between log p(x) and the ELBO the way Cremer, Li & Duvenaud
(2018, "Inference Suboptimality in Variational Autoencoders") do: approximation gap
log p(x) - ELBO(q*) with q* the best Gaussian for each x, and amortization gap
ELBO(q*) - ELBO(q).

``--decoder gaussian`` replaces the Bernoulli decoder by x | z ~ N(mean_phi(z), s^2 I) with a fixed
s (``--decoder-sd``): its log-likelihood is -||x - mean_phi(z)||^2 / (2 s^2) + const, the L2
reconstruction loss of an ordinary autoencoder, weighed against the KL term by 1 / (2 s^2).

Data: scikit-learn's 8x8 digits by default (binarized); ``--data fashion-mnist``;
any MNIST-format IDX folder or an .npz with x_train / x_test.
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import kl_divergence

from ppl_gen import Metric, Spec, UserError, data_plate
from ppl_gen.core import plotting
from ppl_gen.core.protocol import Guide
from ppl_gen.datasets.images import load_images


@dataclass
class Options:
    latent_dim: int = field(default=20, metadata={"help": "dimension of the latent z"})
    hidden_dim: int = field(default=400, metadata={"help": "width of the encoder's and decoder's hidden layer"})
    ll_samples: int = field(default=1000, metadata={
        "help": "K, importance samples per point for the held-out log-likelihood"})
    ll_points: int = field(default=1000, metadata={
        "help": "held-out points (the first ones) scored by the log-likelihood estimate"})
    test_points: int = field(default=0, metadata={
        "help": "use only the first N held-out points for every held-out number (0: all)"})
    local_steps: int = field(default=300, metadata={
        "help": "Adam steps that fit an explicit guide's fresh (mu, sigma) to each held-out point"})
    local_lr: float = field(default=0.05, metadata={
        "help": "learning rate of the explicit guide's per-point parameters, in training and held-out fits"})
    refine_steps: int = field(default=5, metadata={
        "help": "K, gradient steps the semi-amortized guide takes from the encoder's output"})
    refine_lr: float = field(default=0.02, metadata={"help": "step size of the semi-amortized refinement"})
    refine_samples: int = field(default=4, metadata={"help": "z samples per refinement gradient"})
    decoder: str = field(default="bernoulli", metadata={
        "help": "p_phi(x | z): bernoulli (pixels in {0, 1}) or gaussian, N(mean_phi(z), decoder_sd^2 I), whose "
                "log-likelihood is -||x - mean||^2 / (2 sd^2) + const: the L2 reconstruction loss"})
    decoder_sd: float = field(default=0.1, metadata={"help": "the Gaussian decoder's fixed standard deviation"})
    gap_points: int = field(default=200, metadata={
        "help": "held-out points for the gap decomposition (log p(x), ELBO(q*), ELBO(q)); 0: skip it"})
    qstar_steps: int = field(default=1000, metadata={
        "help": "Adam steps that fit q*, the best Gaussian for each point, for the gap decomposition"})

    def validate(self):
        for name in ("latent_dim", "hidden_dim", "ll_samples", "ll_points", "local_steps", "qstar_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.decoder not in ("bernoulli", "gaussian"):
            raise UserError(f"--decoder must be bernoulli or gaussian, got {self.decoder!r}")
        if not self.decoder_sd > 0:
            raise UserError(f"--decoder-sd must be positive, got {self.decoder_sd}")


# Kingma & Welling's MNIST settings use batch 100 and Adagrad; Adam at 1e-3 with
# batch 128 is today's common default and converges on the digits in seconds.
DEFAULTS = {"steps": 3000, "lr": 1e-3, "batch_size": 128}


def data(spec: str | None = None, options: Options | None = None):
    """Binarized images: digits (default), fashion-mnist, an IDX folder or an .npz."""
    return load_images(spec, test_points=options.test_points if options is not None else 0)


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
        self._terms = None  # the last fused step's (reconstruction, KL) per data point
        self.encoder = Encoder(x_dim, options.hidden_dim, self.z_dim).to(device)
        self.decoder = Decoder(self.z_dim, options.hidden_dim, x_dim).to(device)

    def prior(self, like: torch.Tensor) -> dist.Distribution:
        return dist.Normal(like.new_zeros(self.z_dim), like.new_ones(self.z_dim)).to_event(1)

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        logits = self.decoder(z)
        if self.options.decoder == "gaussian":
            # the slides' "Gaussian decoder means L2 loss": log N(x | m, s^2 I) = -||x - m||^2 / 2s^2 + const;
            # the mean is squashed to [0, 1] like the Bernoulli's, so the plots read both alike
            return dist.Normal(torch.sigmoid(logits), self.options.decoder_sd).to_event(1)
        return dist.Bernoulli(logits=logits).to_event(1)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n draws x ~ p_phi(x | z), z ~ N(0, I): ancestral sampling through the decoder. The
        Gaussian decoder's draws are clamped to the pixels' range [0, 1]."""
        like = next(self.decoder.parameters())
        x = self.likelihood(self.prior(like).sample((n,))).sample()
        return x.clamp(0, 1) if self.options.decoder == "gaussian" else x

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

    def fused_loss(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
        """-ELBO of ``model`` with the ``amortized`` guide, the number Trace_ELBO's
        ``differentiable_loss`` returns, draw for draw (the guide's one reparameterized draw
        z = mu + sigma * eps, then the model scored at it) and with the same gradients, written out
        instead of traced (Kingma & Welling 2014, eq. 10):

            -(N / B) sum_n [log p_phi(x_n | z_n) + log p(z_n) - log q_theta(z_n | x_n)]

        The traced form stays the definition; tests/models/test_vae.py checks value and gradients
        against it."""
        mu, sigma = self.encoder(x)
        q = dist.Normal(mu, sigma).to_event(1)
        z = q.rsample()
        reconstruction = self.likelihood(z).log_prob(x)          # log p_phi(x_n | z_n)
        kl = q.log_prob(z) - self.prior(x).log_prob(z)            # one-draw estimate of KL(q || p(z))
        self._terms = (reconstruction.detach(), kl.detach())
        return -(1.0 if idx is None else size / x.shape[0]) * (reconstruction - kl).sum()

    def elbo_terms(self) -> dict[str, float]:
        """The last training step's two terms of the ELBO, per data point of its batch (the slides'
        "the terms fight": the reconstruction wants informative z, the KL pulls q back to p(z))."""
        if self._terms is None:
            return {}
        reconstruction, kl = self._terms
        self._terms = None
        return {"reconstruction": reconstruction.mean().item(), "kl": kl.mean().item()}

    def explicit(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(z_n) = N(mu_n, diag sigma_n^2) with free parameters per training example.
        Inside the subsampled plate Pyro hands each step only the batch's rows."""
        n = x.shape[0] if size is None else size
        with data_plate(x, idx, size):
            mu = pyro.param("q_mu", lambda: x.new_zeros(n, self.z_dim), event_dim=1)
            sigma = pyro.param("q_sigma", lambda: x.new_ones(n, self.z_dim),
                               constraint=dist.constraints.positive, event_dim=1)
            pyro.sample("z", dist.Normal(mu, sigma).to_event(1))

    def semi_amortized(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """Encoder output, then K steps of gradient ascent on each point's ELBO (Kim et al. 2018)."""
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, size):
            mu, sigma = self.encoder(x)
            mu, log_sigma = self.refine(x, mu, sigma.log())
            pyro.sample("z", dist.Normal(mu, log_sigma.exp()).to_event(1))

    # -- per-point ELBOs and local fits -------------------------------------------------
    def local_elbo(self, x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor,
                   samples: int = 1) -> torch.Tensor:
        """ELBO of each x under q = N(mu, sigma^2): E_q[log p(x|z)] (reparameterized Monte
        Carlo) - KL(q || p(z)) (closed form). Shape: x.shape[:-1]."""
        q = dist.Normal(mu, log_sigma.exp())
        z = q.rsample((samples,))
        reconstruction = self.likelihood(z).log_prob(x).mean(0)
        kl = kl_divergence(q, dist.Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
        return reconstruction - kl

    def refine(self, x, mu, log_sigma, steps: int | None = None, lr: float | None = None):
        """K gradient-ascent steps on each point's one-sample ELBO. While training, the steps
        stay in the autograd graph, so the encoder learns where to start (Kim et al. 2018);
        each point's step is clipped to length 0.1 so that a noisy gradient cannot throw it far."""
        steps = self.options.refine_steps if steps is None else steps
        lr = self.options.refine_lr if lr is None else lr
        unrolled = torch.is_grad_enabled() and mu.requires_grad
        with torch.enable_grad():
            if not unrolled:
                mu, log_sigma = mu.detach().requires_grad_(), log_sigma.detach().requires_grad_()
            for _ in range(steps):
                elbo = self.local_elbo(x, mu, log_sigma, self.options.refine_samples).sum()
                g_mu, g_ls = torch.autograd.grad(elbo, (mu, log_sigma), create_graph=unrolled)
                norm = torch.cat([g_mu, g_ls], -1).norm(dim=-1, keepdim=True)
                clip = 1.0 / (10 * lr * norm).clamp(min=1.0)
                mu, log_sigma = mu + lr * clip * g_mu, log_sigma + lr * clip * g_ls
        if not unrolled:
            mu, log_sigma = mu.detach(), log_sigma.detach()
        return mu, log_sigma

    def fit_gaussians(self, x: torch.Tensor, steps: int, lr: float | None = None,
                      init: tuple[torch.Tensor, torch.Tensor] | None = None, samples: int = 4):
        """The best Gaussian q for each x with the decoder frozen: maximize each point's ELBO
        over its own (mu, log sigma) with Adam. Starts from ``init`` (mu, sigma) or the prior."""
        lr = self.options.local_lr if lr is None else lr
        if init is None:
            mu0, log_sigma0 = x.new_zeros(x.shape[0], self.z_dim), x.new_zeros(x.shape[0], self.z_dim)
        else:
            mu0, log_sigma0 = init[0], init[1].log()
        mu = mu0.detach().clone().requires_grad_()
        log_sigma = log_sigma0.detach().clone().requires_grad_()
        optim = torch.optim.Adam([mu, log_sigma], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optim.zero_grad()
                loss = -self.local_elbo(x, mu, log_sigma, samples).sum()
                mu.grad, log_sigma.grad = torch.autograd.grad(loss, (mu, log_sigma))
                optim.step()
        return mu.detach(), log_sigma.detach().exp()

    # -- each guide's q(z | x) = N(mu, diag sigma^2) for new data x ------------------------
    @torch.no_grad()
    def q_amortized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_theta(x), sigma_theta(x)): the encoder's output."""
        return self.encoder(x)

    @torch.no_grad()
    def q_semi_amortized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output refined by K gradient steps on each point's ELBO."""
        mu, sigma = self.encoder(x)
        mu, log_sigma = self.refine(x, mu, sigma.log())
        return mu, log_sigma.exp()

    @torch.no_grad()
    def q_explicit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh (mu_n, sigma_n) for each new x (``local_steps`` Adam steps from the prior, decoder
        frozen): the training rows belong to the training points and say nothing about new ones."""
        return self.fit_gaussians(x, self.options.local_steps)

    def guides(self) -> dict[str, GaussianGuide]:
        """The three guides, each with its q(z | x) for new data."""
        return {"amortized": GaussianGuide(self.amortized, q=self.q_amortized, loss=self.fused_loss,
                                           loss_elbo="trace", terms=self.elbo_terms,
                                           trace_terms=("reconstruction", "kl")),
                # (mu_n, sigma_n) rows, one per training example, each moved only when its point is
                # in the batch; the held-out ELBO scores a fresh fit of them to the new points
                "explicit": GaussianGuide(self.explicit, local_params=("q_mu", "q_sigma"),
                                          local_lr=self.options.local_lr, q=self.q_explicit,
                                          heldout=lambda x: partial(fixed_gaussian_guide, *self.q_explicit(x))),
                "semi-amortized": GaussianGuide(self.semi_amortized, q=self.q_semi_amortized)}

    # -- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, K: int,
                       chunk: int = 64, weights: bool = False):
        """Importance-sampled log p(x) per data point, with proposal N(loc, scale^2):

            log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k),   z_k ~ q

        A lower bound in expectation that tightens as K grows and equals the ELBO's
        integrand at K = 1 (Burda, Grosse & Salakhutdinov 2016). ``weights``: also return the
        log importance weights, (K, n), for PSIS per point.
        """
        out, log_ws = [], []
        for s in range(0, len(x), chunk):
            xs, mu, sigma = x[s:s + chunk], loc[s:s + chunk], scale[s:s + chunk]
            q = dist.Normal(mu, sigma).to_event(1)
            z = q.sample((K,))                                   # (K, n, z_dim)
            log_w = self.prior(xs).log_prob(z) + self.likelihood(z).log_prob(xs) - q.log_prob(z)
            out.append(torch.logsumexp(log_w, 0) - math.log(K))
            log_ws.append(log_w)
        return (torch.cat(out), torch.cat(log_ws, 1)) if weights else torch.cat(out)

    def evaluate(self, run) -> dict:
        x = run.dataset.test
        if x is None:
            return {}
        metrics = {}
        xl = x[: self.options.ll_points]
        loc, scale = run.guide.q(xl)
        ll, log_w = self.log_likelihood(xl, loc, scale, self.options.ll_samples, weights=True)
        from ppl_gen.core.posterior import pointwise_khat

        # does q(z | x) work point by point? PSIS k-hat of each held-out point's K weights
        metrics.update({f"heldout_{k}": v for k, v in (pointwise_khat(log_w) or {}).items()})
        metrics.update({"test_log_likelihood": ll.mean().item(),
                        "log_likelihood_samples": self.options.ll_samples,
                        "log_likelihood_points": len(xl),
                        "log_likelihood_proposal": f"the {run.guide_name} guide's q(z|x)"})
        if self.options.gap_points:
            xg = x[: self.options.gap_points]
            metrics.update(self.gaps(xg, run.guide.q(xg)))
        return metrics

    @torch.no_grad()
    def gaps(self, x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor], elbo_samples: int = 100) -> dict:
        """Cremer, Li & Duvenaud (2018): log p(x) - ELBO(q) = approximation gap + amortization gap,

            approximation gap = log p(x) - ELBO(q*)     (the Gaussian family's limit)
            amortization gap  = ELBO(q*) - ELBO(q)      (the guide's shortfall against q*)

        on the same points and decoder, for the guide's q = (mu, sigma) of each x. q* starts
        from q and is refined for ``qstar_steps`` Adam steps, so it is at least as good; log p(x)
        is importance-sampled with q* as proposal (K = ``ll_samples``). Per data point, nats."""
        q_star = self.fit_gaussians(x, self.options.qstar_steps, init=q)
        elbo_q = self.local_elbo(x, q[0], q[1].log(), elbo_samples).mean().item()
        elbo_q_star = self.local_elbo(x, q_star[0], q_star[1].log(), elbo_samples).mean().item()
        log_px = self.log_likelihood(x, *q_star, self.options.ll_samples).mean().item()
        return {"gap_points": len(x), "gap_log_px": log_px, "gap_elbo_q_star": elbo_q_star, "gap_elbo_q": elbo_q,
                "approximation_gap": log_px - elbo_q_star, "amortization_gap": elbo_q_star - elbo_q,
                "qstar_steps": self.options.qstar_steps}

    @torch.no_grad()
    def grid_posterior(self, x: torch.Tensor, center: torch.Tensor, half_width: float, n: int = 151):
        """The exact posterior p(z | x) of one x on an n x n grid (2-D latent only).

        log p(x, z) is evaluated at every grid point and normalized on the grid, so the
        returned density sums to 1 times the cell area, and the log normalizer is a
        quadrature estimate of log p(x) = log integral p(x, z) dz.
        Returns (z1 axis, z2 axis, density [n, n] indexed [z2, z1], log normalizer)."""
        if self.z_dim != 2:
            raise UserError("the grid posterior needs --latent-dim 2")
        z1 = torch.linspace(center[0] - half_width, center[0] + half_width, n, device=x.device)
        z2 = torch.linspace(center[1] - half_width, center[1] + half_width, n, device=x.device)
        zz = torch.stack(torch.meshgrid(z1, z2, indexing="xy"), -1).reshape(-1, 2)
        log_joint = self.prior(x).log_prob(zz) + self.likelihood(zz).log_prob(x)
        log_cell = math.log((z1[1] - z1[0]).item() * (z2[1] - z2[0]).item())
        log_normalizer = torch.logsumexp(log_joint, 0) + log_cell
        density = torch.exp(log_joint - log_normalizer).reshape(n, n)
        return z1, z2, density, log_normalizer.item()

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
        mu, _ = run.guide.q(x[:10])
        recon = torch.sigmoid(self.decoder(mu))
        paths.append(plotting.image_grid(torch.cat([x[:10], recon]), shape, out / "reconstructions.png",
                                         "held-out images (top) and their reconstructions (bottom)",
                                         nrow=2, row_labels=["x", "E[x|mu(x)]"]))
        z = self.prior(x).sample((64,))
        paths.append(plotting.image_grid(torch.sigmoid(self.decoder(z)), shape, out / "samples.png",
                                         "samples from the prior: Bernoulli means of p(x|z), z ~ N(0, I)"))
        mu, _ = run.guide.q(x[:500])
        labels = None if labels is None else labels[:500]
        if self.z_dim == 2:
            points, xl, yl, how = mu, "z1", "z2", ""
        else:  # project the posterior means on their two principal axes
            centred = mu - mu.mean(0)
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            points, xl, yl, how = centred @ v[:2].T, "PC1", "PC2", " (first two principal components)"
        paths.append(plotting.scatter_2d(points, None if labels is None else labels,
                                         out / "latent_space.png", f"encoder means of held-out data{how}", xl, yl))
        paths.append(self.plot_interpolation(x, labels, run.guide.q, shape, out / "interpolation.png"))
        terms = plotting.trace_terms(run.trace, {"reconstruction": "reconstruction E_q[log p(x | z)]",
                                                 "kl": "KL(q(z | x) || p(z))"}, out / "elbo_terms.png",
                                     "the ELBO's two terms per data point (one draw per step): ELBO = "
                                     "reconstruction - KL")
        if terms:
            paths.append(terms)
        if self.z_dim == 2:
            # the manifold: decode a grid of z placed at Normal quantiles, as in Kingma & Welling's Fig. 4
            n = 15
            p = torch.linspace(0.05, 0.95, n, device=x.device)
            grid = dist.Normal(x.new_zeros(()), x.new_ones(())).icdf(p)
            zz = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"), -1).reshape(-1, 2)
            paths.append(plotting.image_grid(torch.sigmoid(self.decoder(zz)), shape, out / "manifold.png",
                                             "decoder means over a grid of z (Normal quantiles)", nrow=n))
            # four held-out points of different classes where labels are known
            pick = list(range(4)) if labels is None else [
                int((labels == c).nonzero()[0]) for c in labels.unique()[:4]]
            noun = "digit" if ds.name == "digits" else "class"
            names = None if labels is None else [f"held-out {noun} {int(labels[i])}" for i in pick]
            paths.append(self.plot_posteriors(x[pick], run.guide.q(x[pick]), run.guide_name,
                                              out / "posterior_grid.png", names, shape))
        return paths

    @torch.no_grad()
    def plot_interpolation(self, x, labels, q, shape, path: Path, rows: int = 4, n: int = 10) -> Path:
        """Walk in latent space: encode two held-out images (different classes where labels are
        known), decode the encoder means on the straight line between them, z = (1 - t) mu_a + t mu_b.
        Smooth changes along the line are what a dense latent space looks like (the lecture's
        interpolation slide, after Radford et al. 2016)."""
        if labels is not None and len(labels.unique()) >= 2:
            firsts = [int((labels == c).nonzero()[0]) for c in labels.unique()]
            pairs = [(firsts[i % len(firsts)], firsts[(i + 1) % len(firsts)]) for i in range(rows)]
        else:
            pairs = [(2 * i, 2 * i + 1) for i in range(min(rows, len(x) // 2))]
        a, b = zip(*pairs)
        mu_a, mu_b = q(x[list(a)])[0], q(x[list(b)])[0]
        t = torch.linspace(0, 1, n, device=x.device)[None, :, None]
        z = ((1 - t) * mu_a[:, None] + t * mu_b[:, None]).reshape(-1, mu_a.shape[-1])
        names = None if labels is None else [f"{int(labels[i])} to {int(labels[j])}" for i, j in pairs]
        return plotting.image_grid(torch.sigmoid(self.decoder(z)), shape, path,
                                   "decoder means along z = (1-t) mu(x_a) + t mu(x_b), t = 0..1", nrow=len(pairs),
                                   row_labels=names)

    @torch.no_grad()
    def plot_posteriors(self, x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor], guide_name: str,
                        path: Path, names: list[str] | None = None, shape=None) -> Path:
        """For a few held-out x: the true p(z|x) on a grid, the guide's q = (mu, sigma) and q* (the
        best Gaussian for that x) drawn over it. The distance from p to q* is the approximation
        gap; from q* to the guide's q, the amortization gap."""
        q_star = self.fit_gaussians(x, self.options.qstar_steps, init=q)
        panels = []
        for i in range(len(x)):
            spread = torch.cat([q[1][i], q_star[1][i], (q[0][i] - q_star[0][i]).abs() / 3])
            half_width = 4.0 * spread.max().item()
            z1, z2, density, log_norm = self.grid_posterior(x[i], q_star[0][i], half_width)
            panels.append({"z1": z1, "z2": z2, "density": density, "log_px": log_norm,
                           "gaussians": {f"{guide_name} q": (q[0][i], q[1][i]),
                                         "q* (best Gaussian)": (q_star[0][i], q_star[1][i])},
                           "label": names[i] if names else None,
                           "image": x[i] if shape else None, "shape": shape})
        return plotting.posterior_panels(panels, path, "true posterior p(z|x) (filled) against Gaussian q's")


@dataclass
class GaussianGuide(Guide):
    """A guide of this file and the Gaussian q(z | x) = N(mu, diag sigma^2) it gives new data,
    ``q(x) -> (mu, sigma)``: the proposal of the log-likelihood, the q of the gap decomposition,
    the means the plots show."""

    q: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def fixed_gaussian_guide(mu: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor,
                         idx: torch.Tensor | None = None, size: int | None = None):
    """A guide with given (mu_n, sigma_n) per data point: explicit q on held-out data."""
    with data_plate(x, idx, size):
        mu, sigma = (mu, sigma) if idx is None else (mu[idx], sigma[idx])
        pyro.sample("z", dist.Normal(mu, sigma).to_event(1))


def build(options: Options, dataset) -> Spec:
    vae = VAE(dataset.train.shape[-1], options, dataset.train.device)
    return Spec(model=vae.model, guides=vae.guides(), evaluate=vae.evaluate, plots=vae.plots,
                description=__doc__.split("\n")[0], metrics=METRICS, report=gap_report, sample=vae.sample,
                # the importance-weighted bound of Burda et al. (2016), tighter than the ELBO
                heldout_log_density=("test_log_likelihood", "test_elbo"))


# the numbers inference.compare shows for this file, beside the runner's own
METRICS = (
    Metric("test_log_likelihood", "held-out log p(x)", "{:.3f}", higher_is_better=True, bar=True),
    Metric("heldout_khat_median", "k-hat per point, median", "{:.2f}", higher_is_better=False),
    Metric("heldout_khat_above_0.7", "k-hat > 0.7, fraction", "{:.2f}", higher_is_better=False),
    Metric("gap_log_px", "log p(x)", "{:.3f}", higher_is_better=True),
    Metric("gap_elbo_q_star", "ELBO(q*)", "{:.3f}", higher_is_better=True),
    Metric("gap_elbo_q", "ELBO(q)", "{:.3f}", higher_is_better=True),
    Metric("approximation_gap", "approximation gap", "{:.3f}", higher_is_better=False, bar=True),
    Metric("amortization_gap", "amortization gap", "{:.3f}", higher_is_better=False, bar=True),
)


def gap_report(rows: list[dict]) -> list[str]:
    """compare's paragraph on the gap decomposition (Cremer, Li & Duvenaud 2018)."""
    r0 = next((r for r in rows if "approximation_gap" in r), None)
    if r0 is None:
        return []
    return [f"Gap decomposition (Cremer, Li & Duvenaud 2018) on the first {r0['gap_points']} held-out "
            f"points with each guide's own decoder: log p(x) is importance-sampled with K = "
            f"{r0.get('log_likelihood_samples')} samples from q*, the best Gaussian for each point "
            f"(the guide's q refined for {r0.get('qstar_steps')} Adam steps); approximation gap = "
            "log p(x) - ELBO(q*), amortization gap = ELBO(q*) - ELBO(q)."]


def numpyro_twin(options: Options, dataset):
    """The NumPyro twin (``--backend numpyro``): the same model and the three guides in
    NumPyro/JAX (Phan et al. 2019). Parameters carry the Pyro store's names and torch's
    layouts (``decoder$$$hidden.weight`` is [out, in]), so the runner starts both backends
    from the same weights and evaluates the NumPyro fit with the torch networks above."""
    if options.decoder != "bernoulli":
        raise UserError("the NumPyro twin has the Bernoulli decoder only; drop --decoder or --backend numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate, linear

    x_dim, h, zd = dataset.train.shape[-1], options.hidden_dim, options.latent_dim
    o = options

    def decoder(z):
        return linear("decoder$$$logits", jax.nn.relu(linear("decoder$$$hidden", z, zd, h)), h, x_dim)

    def encoder(x):
        hid = jax.nn.relu(linear("encoder$$$hidden", x, x_dim, h))
        return linear("encoder$$$mu", hid, h, zd), jnp.exp(linear("encoder$$$log_sigma", hid, h, zd))

    def model(x, idx=None, size=None):
        with data_plate(x, idx, size):
            z = numpyro.sample("z", nd.Normal(jnp.zeros(zd, x.dtype), jnp.ones(zd, x.dtype)).to_event(1))
            numpyro.sample("x", nd.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def amortized(x, idx=None, size=None):
        mu, sigma = encoder(x)
        with data_plate(x, idx, size):
            numpyro.sample("z", nd.Normal(mu, sigma).to_event(1))

    def explicit(x, idx=None, size=None):
        n = x.shape[0] if size is None else size
        mu = numpyro.param("q_mu", jnp.zeros((n, zd), x.dtype))
        sigma = numpyro.param("q_sigma", jnp.ones((n, zd), x.dtype), constraint=nd.constraints.positive)
        if idx is not None:  # the batch's rows: only they get a gradient (row-wise Adam)
            mu, sigma = mu[idx], sigma[idx]
        with data_plate(x, idx, size):
            numpyro.sample("z", nd.Normal(mu, sigma).to_event(1))

    def local_elbo(x, mu, log_sigma, key):
        """VAE.local_elbo: Monte Carlo reconstruction, closed-form KL to N(0, I)."""
        sigma = jnp.exp(log_sigma)
        z = mu + sigma * jax.random.normal(key, (o.refine_samples,) + mu.shape, mu.dtype)
        rec = nd.Bernoulli(logits=decoder(z)).to_event(1).log_prob(x).mean(0)
        kl = 0.5 * (sigma ** 2 + mu ** 2 - 1.0 - 2.0 * log_sigma).sum(-1)
        return rec - kl

    def semi_amortized(x, idx=None, size=None):
        """VAE.refine, unrolled: K clipped gradient-ascent steps from the encoder's output."""
        mu, sigma = encoder(x)
        log_sigma, lr = jnp.log(sigma), o.refine_lr
        key = numpyro.prng_key()
        for _ in range(o.refine_steps):
            key, sub = jax.random.split(key)
            g_mu, g_ls = jax.grad(lambda m, s: local_elbo(x, m, s, sub).sum(), argnums=(0, 1))(mu, log_sigma)
            norm = jnp.linalg.norm(jnp.concatenate([g_mu, g_ls], -1), axis=-1, keepdims=True)
            clip = 1.0 / jnp.maximum(10 * lr * norm, 1.0)
            mu, log_sigma = mu + lr * clip * g_mu, log_sigma + lr * clip * g_ls
        with data_plate(x, idx, size):
            numpyro.sample("z", nd.Normal(mu, jnp.exp(log_sigma)).to_event(1))

    return NumpyroTwin(model=model, guides={"amortized": amortized, "explicit": explicit,
                                            "semi-amortized": semi_amortized},
                       local_params=("q_mu", "q_sigma"))
