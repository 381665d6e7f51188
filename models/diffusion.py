"""Denoising diffusion (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models",
NeurIPS) as a variational model, read as Kingma, Salimans, Poole & Ho (2021, "Variational
Diffusion Models", NeurIPS) read it: a hierarchical VAE whose encoder has no parameters.

Latents z = x_{1:T}, data x_0 (the images, scaled to [-1, 1]). For each image:

    guide (the encoder, fixed):  q(x_{1:T} | x_0) = prod_t q(x_t | x_{t-1}),
                                 q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)
    model (the decoder, theta):  p(x_T) = N(0, I),
                                 p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I),  t = T..2
                                 p_theta(x_0 | x_1)     the observation model (below)

with mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t)
(Ho et al. eq. 11), alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s, and sigma_t^2 the
posterior's beta~_t (``--variance posterior``, the default) or beta_t (``--variance beta``).
In code: ``beta``, ``alpha``, ``alpha_bar`` (index t, with alpha_bar[0] = 1), ``beta_tilde``.
The lecture's VAE calls the decoder's parameters phi; its diffusion slide and Ho et al. call
them theta, as here.

eps_theta comes from a U-Net (``ppl_gen.nets.unet``). With ``--predict eps`` the U-Net's output
is eps_theta, as in Ho et al. With ``--predict x0`` (the default) the U-Net predicts the image
and eps_theta = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t), the same model written
another way; for binary pixels x0_hat = tanh(sqrt(alpha_bar_t) x_t / (1 - alpha_bar_t) + U-Net),
whose first term is E[x_0 | x_t] for independent fair bits. Why it matters for the bound: with
sigma_t^2 = beta~_t each KL term is (SNR(t-1) - SNR(t)) / 2 * ||x_0 - x0_hat||^2, with
SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021). The first steps have the largest
SNR jumps; there the pixels are known from x_t and the x0 form gets them exactly, while an
eps-predicting network has to learn the noise of every pixel almost exactly. At the last steps
(alpha_T near 0) the eps form divides the network's error by sqrt(alpha_T); the x0 form does not.

The bound (Ho et al. eq. 5), in nats per image:

    ELBO(x_0) = E_q[log p_theta(x_0 | x_1)]                                   (-L_0, step t = 1)
                - sum_{t=2..T} E_q[KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))]   (-L_{t-1})
                - KL(q(x_T | x_0) || p(x_T))                                  (-L_T, no parameters)

Every q it needs is closed-form Gaussian: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
and the posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I).

How this is a Pyro model/guide pair whose ELBO is that bound. Training needs a cost that does
not grow with T, so the sum over t is replaced by T times one uniformly drawn step per image:
an unbiased estimate. The guide draws, per image, u ~ U(0, 1) (so t = 1 + floor(T u) is uniform
on 1..T), x_t ~ q(x_t | x_0), x_{t-1} ~ q(x_{t-1} | x_t, x_0) and x_T ~ q(x_T | x_0). The model
has the same sites:

* ``u`` and ``x_t`` with the *same* densities as in the guide: their log p - log q is exactly 0
  (Pyro's mean-field ELBO takes KL = 0). They are the estimator's auxiliary draws, so the
  model's trace is not a normalized joint density of x_0; it is the Monte Carlo integrand of
  the bound, which is what the runner optimizes and reports;
* ``x_prev``: p_theta(x_{t-1} | x_t) against the guide's q(x_{t-1} | x_t, x_0), under
  ``poutine.scale(T)`` and masked to the images with t >= 2: T times one KL term;
* ``x`` (observed): p_theta(x_0 | x_1), scale T, masked to the images with t = 1;
* ``x_T``: p(x_T) = N(0, I) against q(x_T | x_0): the prior term.

So Pyro's ELBO of this pair, per image, equals ELBO(x_0) in expectation over the draws. With
``--elbo meanfield`` (this file's default) Pyro takes each Gaussian KL in closed form, which
is the estimator of Ho et al. eq. 5; ``--elbo trace`` estimates the KLs by Monte Carlo too
(unbiased, noisier). The runner's ``train_elbo``/``test_elbo`` are this one-t estimate averaged
over ``--eval-particles`` draws; ``evaluate`` adds the exact sum over all T steps.

``--loss simple``: Ho et al.'s L_simple, a *reweighted* bound. In the eps-parameterization
each KL term is w_t ||eps - eps_theta(x_t, t)||^2 plus a constant, with
w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)); the simple loss scales step t's
term by 1 / w_t (same sites, per-image Pyro scale T / w_t), so every step counts as the plain
squared error of the noise. The t = 1 and prior terms keep weight 1. Its runner "ELBO" is that
weighted objective, not a bound on log p(x); ``evaluate`` still reports the true bound.

Observation model p_theta(x_0 | x_1): Ho et al.'s discretized Gaussian, the mass of
N(mu_theta(x_1, 1), beta_1) on the bin of each pixel's level. The images of ``load_images``
are binarized, two levels {-1, +1} with the bin edge at 0: p(x_0 = 1 | x_1) = Phi(mu / sigma_1),
a Bernoulli with a probit link. ``Diffusion(levels=256)`` is the 8-bit grey-level decoder
(tested), but no data path here gives grey levels; ``levels=None`` is a Gaussian density, for
continuous data (the tests' 1-D oracle).

Noise schedules (``--schedule``): ``cosine``, the default (Nichol & Dhariwal 2021, "Improved
Denoising Diffusion Probabilistic Models", ICML: alpha_bar_t = f(t)/f(0),
f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008), and ``linear`` (Ho et al.: beta from 1e-4 to
0.02 at T = 1000, scaled by 1000/T as Nichol & Dhariwal do for other T). Both clip beta_t at 0.999.

Evaluation: the held-out ELBO summed over all t (one x_t draw per image and step, or
``--eval-draws``) in nats per image and bits per dimension, its split over t, and ancestral
sampling x_T -> x_0 in seconds per image. Figures: the forward chain, the reverse chain, a
grid of samples, the bound's terms against t.

Data: the binarized 8x8 digits by default, ``--data fashion-mnist`` (28x28) and the other
``load_images`` specs; the U-Net takes heights and widths that are multiples of 2**levels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from torch import nn

from ppl_gen import Metric, Spec, UserError, data_plate, load_images
from ppl_gen.nets.unet import UNet, check_size

LOSSES = ("elbo", "simple")
VARIANCES = ("beta", "posterior")
PREDICTS = ("eps", "x0")


# ------------------------------------------------------------------ noise schedules
def linear_betas(T: int) -> torch.Tensor:
    """Ho et al.'s linear beta_1..beta_T, 1e-4 to 0.02 at T = 1000, scaled by 1000/T."""
    scale = 1000.0 / T
    return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar_t = f(t) / f(0)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


class Schedule:
    """beta_t, alpha_t, alpha_bar_t, beta~_t as tensors indexed by t = 0..T (entry 0 is
    t = 0: beta_0 = 0, alpha_bar_0 = 1). Computed in float64, stored in ``dtype``."""

    def __init__(self, betas: torch.Tensor, device=None, dtype=torch.float32):
        betas = betas.to(torch.float64)
        self.T = len(betas)
        beta = torch.cat([betas.new_zeros(1), betas])
        alpha = 1 - beta
        alpha_bar = torch.cumprod(alpha, 0)
        # the posterior variance of x_{t-1} given x_t and x_0; 0 at t = 1 (x_0 is known)
        beta_tilde = torch.cat([beta.new_zeros(1), (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * beta[1:]])
        self.float64 = {"beta": beta, "alpha": alpha, "alpha_bar": alpha_bar, "beta_tilde": beta_tilde}
        for k, v in self.float64.items():
            setattr(self, k, v.to(device=device, dtype=dtype))

    @classmethod
    def named(cls, name: str, T: int, device=None, dtype=torch.float32) -> "Schedule":
        if name not in SCHEDULES:
            raise UserError(f"unknown --schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
        if T < 1:
            raise UserError(f"--T (the number of diffusion steps) must be at least 1, got {T}")
        return cls(SCHEDULES[name](T), device, dtype)


# ------------------------------------------------------------------ observation model
def _log_diff_ndtr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, without cancellation: bins above the mean are
    mirrored below it, where log Phi is accurate."""
    flip = (a + b) > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    la, lb = torch.special.log_ndtr(lo), torch.special.log_ndtr(hi)
    d = la - lb  # <= 0
    # log(1 - e^d): expm1 near d = 0, log1p far from it
    return lb + torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


class DiscretizedGaussian(dist.TorchDistribution):
    """Ho et al.'s decoder for data on ``levels`` evenly spaced values k / (levels - 1) in
    [0, 1], mapped to y = 2 k / (levels - 1) - 1 in [-1, 1]: the mass of N(loc, scale^2) on
    [y - 1/(levels-1), y + 1/(levels-1)], the outer bins reaching to -inf and +inf."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval

    def __init__(self, loc: torch.Tensor, scale, levels: int, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, torch.as_tensor(scale, dtype=loc.dtype,
                                                                          device=loc.device))
        self.levels = levels
        super().__init__(self.loc.shape, validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        k = torch.round(value * (self.levels - 1))
        y = 2 * k / (self.levels - 1) - 1
        half = 1.0 / (self.levels - 1)
        a = (y - half - self.loc) / self.scale
        b = (y + half - self.loc) / self.scale
        bottom, top = k == 0, k == self.levels - 1
        # the outer bins are one-sided; placeholders keep the unused branch finite
        inner = _log_diff_ndtr(torch.where(bottom, b - 1, a), torch.where(top, a + 1, b))
        return torch.where(bottom, torch.special.log_ndtr(b), torch.where(top, torch.special.log_ndtr(-a), inner))

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = sample_shape + self.loc.shape
            y = self.loc + self.scale * torch.randn(shape, device=self.loc.device, dtype=self.loc.dtype)
            k = torch.round((y + 1) / 2 * (self.levels - 1)).clamp(0, self.levels - 1)
            return k / (self.levels - 1)


# ------------------------------------------------------------------ the model
class Diffusion:
    """The DDPM as a model/guide pair, around any eps_theta(x_t, t) on flat (B, D) tensors.

    ``levels``: pixel levels of the data (2: binarized images in {0, 1}; K: values k/(K-1));
    None: continuous data, used as they are, with a Gaussian density at t = 1."""

    def __init__(self, net: nn.Module, schedule: Schedule, levels: int | None = 2, loss: str = "elbo",
                 variance: str = "posterior", predict: str = "x0"):
        if loss not in LOSSES:
            raise UserError(f"unknown --loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        if variance not in VARIANCES:
            raise UserError(f"unknown --variance {variance!r}; choose one of: {', '.join(VARIANCES)}")
        if predict not in PREDICTS:
            raise UserError(f"unknown --predict {predict!r}; choose one of: {', '.join(PREDICTS)}")
        if levels is not None and levels < 2:
            raise UserError(f"a discretized decoder needs at least 2 levels, got {levels}")
        self.net, self.s, self.T = net, schedule, schedule.T
        self.levels, self.loss, self.variance, self.predict = levels, loss, variance, predict

    # -- the Gaussians, in the papers' symbols; t is a (B,) long tensor ------------------
    def to_y(self, x: torch.Tensor) -> torch.Tensor:
        """Data -> x_0 in the diffusion's space: [0, 1] levels become [-1, 1]."""
        return x if self.levels is None else 2 * x - 1

    def q_xt(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): mean and sd."""
        ab = self.s.alpha_bar[t][:, None]
        return ab.sqrt() * y0, (1 - ab).sqrt().expand_as(y0)

    def q_posterior(self, y0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I): mean and variance (Ho et al. eq. 7)."""
        s = self.s
        beta, alpha = s.beta[t][:, None], s.alpha[t][:, None]
        ab, ab_prev = s.alpha_bar[t][:, None], s.alpha_bar[t - 1][:, None]
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * y0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * xt
        return mean, s.beta_tilde[t][:, None].expand_as(y0)

    def eps(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t): the network's output, or (``predict="x0"``) the noise implied by its
        prediction of x_0: eps = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t). For
        binary data x0_hat = tanh(sqrt(alpha_bar_t) x_t / (1 - alpha_bar_t) + net(x_t, t)): the
        first term is E[x_0 | x_t] for independent fair bits, which is exact where the noise is
        small; the network adds what the neighbouring pixels tell."""
        out = self.net(xt, t)
        if self.predict == "eps":
            return out
        ab = self.s.alpha_bar[t][:, None]
        x0_hat = torch.tanh(ab.sqrt() * xt / (1 - ab) + out) if self.levels == 2 else out
        return (xt - ab.sqrt() * x0_hat) / (1 - ab).sqrt()

    def p_mean(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) from the predicted noise (Ho et al. eq. 11)."""
        s = self.s
        beta, alpha, ab = s.beta[t][:, None], s.alpha[t][:, None], s.alpha_bar[t][:, None]
        return (xt - beta / (1 - ab).sqrt() * eps) / alpha.sqrt()

    def p_var(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t^2 of p_theta(x_{t-1} | x_t), (B, 1)."""
        return (self.s.beta if self.variance == "beta" else self.s.beta_tilde)[t][:, None]

    def eps_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w_t: KL_t = w_t ||eps - eps_theta||^2 + const (t >= 2)."""
        s = self.s
        beta, alpha, ab = s.beta[t], s.alpha[t], s.alpha_bar[t]
        return beta ** 2 / (2 * self.p_var(t)[:, 0] * alpha * (1 - ab))

    def kl_step(self, y0, xt, t, eps) -> torch.Tensor:
        """KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) per image, closed form (t >= 2)."""
        mean_q, var_q = self.q_posterior(y0, xt, t)
        mean_p, var_p = self.p_mean(xt, t, eps), self.p_var(t)
        return 0.5 * (torch.log(var_p / var_q) + var_q / var_p + (mean_q - mean_p) ** 2 / var_p - 1).sum(-1)

    def decoder(self, mean: torch.Tensor) -> dist.Distribution:
        """p_theta(x_0 | x_1) given mu_theta(x_1, 1), with sigma_1^2 = beta_1."""
        sd = self.s.beta[1].sqrt()
        if self.levels is None:
            return dist.Normal(mean, sd).to_event(1)
        if self.levels == 2:
            z = mean / sd  # P(N(mean, sd^2) > 0): the upper bin's mass
            return dist.Bernoulli(logits=torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)).to_event(1)
        return DiscretizedGaussian(mean, sd, self.levels).to_event(1)

    def decoder_display(self, mean: torch.Tensor) -> torch.Tensor:
        """What a sample grid shows for x_0 given mu_theta(x_1, 1): P(x_0 = 1) for binary data,
        the level the mean falls on otherwise, in [0, 1]."""
        if self.levels == 2:
            return torch.special.ndtr(mean / self.s.beta[1].sqrt())
        return ((mean + 1) / 2).clamp(0, 1)

    def prior_kl(self, y0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per image, closed form."""
        ab = self.s.alpha_bar[self.T]
        return 0.5 * (ab * y0 ** 2 - ab - torch.log1p(-ab)).sum(-1)

    # -- the Pyro pair ------------------------------------------------------------------
    def _step(self, x: torch.Tensor) -> torch.Tensor:
        """The site u ~ U(0, 1), identical in model and guide, and t = 1 + floor(T u)."""
        u = pyro.sample("u", dist.Uniform(x.new_zeros(x.shape[0]), x.new_ones(x.shape[0])))
        return (u * self.T).long().clamp(max=self.T - 1) + 1

    def _weight(self, t: torch.Tensor):
        """T for the bound's one-t estimate; T / w_t for Ho et al.'s simplified loss."""
        if self.loss == "simple":
            # images with t = 1 are masked out of the reweighted site; w_1 is not defined
            return torch.where(t > 1, self.T / self.eps_weight(t), torch.full_like(self.s.beta[t], self.T))
        return float(self.T)

    @staticmethod
    def _sd(var: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        # images with t = 1 are masked out of x_prev; a placeholder sd keeps their values finite
        return torch.where(later[:, None], var, torch.ones_like(var)).sqrt()

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        pyro.module("eps_theta", self.net)
        y0 = self.to_y(x)
        with data_plate(x, idx, size):
            t = self._step(x)
            mean, sd = self.q_xt(y0, t)
            xt = pyro.sample("x_t", dist.Normal(mean, sd).to_event(1))  # auxiliary: same as the guide's
            mean_p = self.p_mean(xt, t, self.eps(xt, t))
            later = t > 1
            with poutine.mask(mask=later), poutine.scale(scale=self._weight(t)):
                pyro.sample("x_prev", dist.Normal(mean_p, self._sd(self.p_var(t).expand_as(y0), later)).to_event(1))
            with poutine.mask(mask=~later), poutine.scale(scale=float(self.T)):
                pyro.sample("x", self.decoder(mean_p), obs=x)
            pyro.sample("x_T", dist.Normal(y0.new_zeros(()), y0.new_ones(())).expand(y0.shape).to_event(1))

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """The forward process q: no parameters."""
        y0 = self.to_y(x)
        with data_plate(x, idx, size):
            t = self._step(x)
            mean, sd = self.q_xt(y0, t)
            xt = pyro.sample("x_t", dist.Normal(mean, sd).to_event(1))
            mean_q, var_q = self.q_posterior(y0, xt, t)
            later = t > 1
            with poutine.mask(mask=later), poutine.scale(scale=self._weight(t)):
                pyro.sample("x_prev", dist.Normal(mean_q, self._sd(var_q, later)).to_event(1))
            t_last = torch.full_like(t, self.T)
            pyro.sample("x_T", dist.Normal(*self.q_xt(y0, t_last)).to_event(1))

    # -- the bound, every step ------------------------------------------------------------
    @torch.no_grad()
    def terms(self, x: torch.Tensor, draws: int = 1, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative bound's terms per image: (L [N, T], L_T [N]), nats. Column t-1 is step t:
        -log p_theta(x_0 | x_1) at t = 1, the KL L_{t-1} for t >= 2, each averaged over
        ``draws`` draws of x_t ~ q(x_t | x_0). -ELBO = L.sum(1) + L_T."""
        y0 = self.to_y(x)
        n = x.shape[0]
        out = x.new_zeros(n, self.T)
        for step in range(1, self.T + 1):
            for s in range(0, n, chunk):
                xs, ys = x[s:s + chunk].repeat(draws, 1), y0[s:s + chunk].repeat(draws, 1)
                t = torch.full((xs.shape[0],), step, dtype=torch.long, device=x.device)
                mean, sd = self.q_xt(ys, t)
                xt = mean + sd * torch.randn_like(mean)
                eps = self.eps(xt, t)
                if step == 1:
                    term = -self.decoder(self.p_mean(xt, t, eps)).log_prob(xs)
                else:
                    term = self.kl_step(ys, xt, t, eps)
                out[s:s + chunk, step - 1] = term.reshape(draws, -1).mean(0)
        return out, self.prior_kl(y0)

    # -- ancestral sampling -----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor, keep=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """x_T ~ N(0, I), then x_{t-1} ~ p_theta(x_{t-1} | x_t) down to x_1, and x_0 from the
        decoder. Returns (the decoder's display values [n, D], {t: x_t for t in keep})."""
        x = torch.randn(n, like.shape[-1], device=like.device, dtype=like.dtype)
        chain = {self.T: x} if self.T in keep else {}
        for step in range(self.T, 0, -1):
            t = torch.full((n,), step, dtype=torch.long, device=like.device)
            mean = self.p_mean(x, t, self.eps(x, t))
            if step == 1:
                out = self.decoder_display(mean)
            else:
                x = mean + self.p_var(t).sqrt() * torch.randn_like(x)
                if step - 1 in keep:
                    chain[step - 1] = x
        return out, chain


class ImageEps(nn.Module):
    """eps_theta on flat (B, H*W) images: a U-Net on (B, 1, H, W)."""

    def __init__(self, shape: tuple[int, int], channels: int, levels: int):
        super().__init__()
        self.shape = tuple(shape)
        self.unet = UNet(1, channels, levels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x.reshape(x.shape[0], 1, *self.shape), t).reshape(x.shape[0], -1)


# ------------------------------------------------------------------ the model file
@dataclass
class Options:
    T: int = field(default=100, metadata={
        "help": "number of diffusion steps; training costs the same for any T, evaluation and sampling grow with it"})
    schedule: str = field(default="cosine", metadata={"help": "noise schedule: " + " or ".join(SCHEDULES)})
    loss: str = field(default="elbo", metadata={
        "help": "elbo: the bound (one t per image, unbiased); simple: Ho et al.'s reweighted bound"})
    variance: str = field(default="posterior", metadata={
        "help": "sigma_t^2 of the reverse steps: beta (beta_t) or posterior (beta~_t)"})
    predict: str = field(default="x0", metadata={
        "help": "what the U-Net predicts: eps (the noise, Ho et al.) or x0 (the image; eps_theta follows)"})
    channels: int = field(default=16, metadata={"help": "U-Net width at full resolution (doubles per level)"})
    levels: int = field(default=2, metadata={
        "help": "times the U-Net halves the image; height and width must be multiples of 2**levels"})
    test_points: int = field(default=0, metadata={"help": "use only the first N held-out images (0: all)"})
    eval_draws: int = field(default=1, metadata={
        "help": "draws of x_t per held-out image and step in the sum over all t"})
    samples: int = field(default=64, metadata={"help": "images drawn for the sample grid and the sampling time"})

    def validate(self):
        Schedule.named(self.schedule, self.T)  # raises on a bad name or T < 1
        if self.loss not in LOSSES:
            raise UserError(f"unknown --loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.variance not in VARIANCES:
            raise UserError(f"unknown --variance {self.variance!r}; choose one of: {', '.join(VARIANCES)}")
        if self.predict not in PREDICTS:
            raise UserError(f"unknown --predict {self.predict!r}; choose one of: {', '.join(PREDICTS)}")
        for name in ("channels", "levels", "eval_draws", "samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.test_points < 0:
            raise UserError(f"--test-points must be 0 (all) or more, got {self.test_points}")


# Ho et al. train with Adam at 2e-4 for 800k steps; the 8x8 digits and this small U-Net
# take a larger rate. The mean-field ELBO is the estimator with closed-form KLs.
DEFAULTS = {"steps": 3000, "lr": 2e-3, "batch_size": 128, "elbo": "meanfield"}


def data(spec: str | None = None, options: Options | None = None):
    """Binarized images: digits (default), fashion-mnist, an IDX folder or an .npz."""
    return load_images(spec, test_points=options.test_points if options is not None else 0)


class DiffusionFile:
    """What build() returns hooks from: the model, the exact held-out bound, the figures."""

    def __init__(self, options: Options, dataset):
        shape = dataset.meta.get("shape", [dataset.train.shape[-1]])
        if len(shape) != 2:
            raise UserError(f"the U-Net needs images of height x width; these data are flat vectors of "
                            f"{shape[0]} values: give image data (an IDX folder, or an .npz with "
                            "x_train shaped (n, height, width))")
        check_size(shape[0], shape[1], options.levels)
        self.shape, self.options = list(shape), options
        device = dataset.device
        self.net = ImageEps(shape, options.channels, options.levels).to(device)
        schedule = Schedule.named(options.schedule, options.T, device, dataset.train.dtype)
        self.diffusion = Diffusion(self.net, schedule, levels=2, loss=options.loss, variance=options.variance,
                                   predict=options.predict)
        self._terms = None
        self.like = dataset.train

    def sample(self, n: int) -> torch.Tensor:
        """n draws x_0 ~ p_theta(x_0 | x_1) at the end of the reverse chain: binary pixels, drawn
        from the decoder's P(x_0 = 1) (the sample grids show that probability itself)."""
        with torch.no_grad():
            p, _ = self.diffusion.sample(n, self.like)
            return torch.bernoulli(p)

    def evaluate(self, run) -> dict:
        x = run.dataset.test
        if x is None:
            return {}
        d, dim = self.diffusion, x.shape[-1]
        L, prior = d.terms(x, self.options.eval_draws)
        neg = L.sum(1) + prior
        self._terms = (L.mean(0), prior.mean())
        quarters = torch.tensor_split(L.mean(0), 4) if d.T >= 4 else [L.mean(0)]
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        d.sample(self.options.samples, x)
        sync()
        seconds = time.perf_counter() - start
        return {
            "test_elbo_full": -neg.mean().item(),
            "test_elbo_full_se": (neg.std() / math.sqrt(len(neg))).item() if len(neg) > 1 else float("nan"),
            "test_bits_per_dim": neg.mean().item() / (dim * math.log(2)),
            "test_nats_decoder": L[:, 0].mean().item(),
            "test_nats_prior": prior.mean().item(),
            "test_nats_by_t": L.mean(0).tolist(),
            "test_bits_per_dim_by_quarter_of_t": [q.sum().item() / (dim * math.log(2)) for q in quarters],
            "elbo_full_units": "nats per image, every step t = 1..T summed (bits_per_dim: per pixel)",
            "T": d.T,
            "sample_seconds_per_image": seconds / self.options.samples,
            "sampled_images": self.options.samples,
        }

    @torch.no_grad()
    def plots(self, run, out: Path) -> list[Path]:
        from ppl_gen import plotting

        d, shape = self.diffusion, self.shape
        x = run.dataset.test if run.dataset.test is not None else run.dataset.train
        cols = sorted({round(k * d.T / 7) for k in range(8)})
        paths = []
        # the forward chain, one trajectory per image: x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z
        y = d.to_y(x[:6])
        frames = {0: y}
        for step in range(1, d.T + 1):
            y = d.s.alpha[step].sqrt() * y + d.s.beta[step].sqrt() * torch.randn_like(y)
            frames[step] = y
        show = lambda v: ((v + 1) / 2).clamp(0, 1)  # noqa: E731  [-1, 1] -> grey levels
        grid = torch.stack([show(frames[c]) for c in cols], 1).reshape(-1, x.shape[-1])
        paths.append(plotting.image_grid(grid, shape, out / "forward_chain.png",
                                         f"forward process q: x_t at t = {', '.join(map(str, cols))}",
                                         nrow=len(frames[0])))
        final, chain = d.sample(6, x, keep=set(cols))
        rows = [show(chain[c]) for c in reversed(cols) if c > 0] + [final]
        grid = torch.stack(rows, 1).reshape(-1, x.shape[-1])
        paths.append(plotting.image_grid(grid, shape, out / "reverse_chain.png",
                                         f"reverse process p_theta: x_t at t = {', '.join(map(str, reversed(cols)))}"
                                         " (last: P(x_0 = 1 | x_1))", nrow=6))
        samples, _ = d.sample(self.options.samples, x)
        paths.append(plotting.image_grid(samples, shape, out / "samples.png",
                                         f"ancestral samples, T = {d.T}: P(x_0 = 1 | x_1)"))
        if self._terms is None and run.dataset.test is not None:
            L, prior = d.terms(run.dataset.test)
            self._terms = (L.mean(0), prior.mean())
        if self._terms is not None:
            paths.append(self.plot_terms(*self._terms, x.shape[-1], out / "elbo_terms.png"))
        return paths

    def plot_terms(self, per_t: torch.Tensor, prior: torch.Tensor, dim: int, path: Path) -> Path:
        from ppl_gen import plotting  # noqa: F401  (selects the file-only backend)
        import matplotlib.pyplot as plt

        per_t, T = per_t.cpu().numpy(), len(per_t)
        total = per_t.sum() + float(prior)
        t = range(1, T + 1)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        ax.plot(t[1:], per_t[1:], ".-", ms=3, label="L_{t-1}: KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))")
        ax.plot([1], per_t[:1], "o", color="C3", label="L_0: -log p_theta(x_0|x_1)")
        ax.axhline(float(prior), color="C2", ls=":", label=f"L_T: KL(q(x_T|x_0) || p(x_T)) = {float(prior):.2g}")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("step t")
        ax.set_ylabel("nats per image")
        ax.set_title("held-out terms of -ELBO against t")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax2.plot(t, per_t.cumsum() / (dim * math.log(2)), color="C0")
        ax2.axhline(total / (dim * math.log(2)), color="k", ls="--", lw=0.8,
                    label=f"-ELBO = {total:.2f} nats = {total / (dim * math.log(2)):.3f} bits/dim")
        ax2.set_xlabel("step t")
        ax2.set_ylabel("bits/dim in steps 1..t")
        ax2.set_title("where the bits are")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def build(options: Options, dataset) -> Spec:
    f = DiffusionFile(options, dataset)
    d = f.diffusion
    return Spec(model=d.model, guides={"forward": d.guide}, evaluate=f.evaluate, plots=f.plots,
                description=__doc__.split("\n")[0], density="bound", heldout_log_density=("test_elbo_full", "test_elbo"),
                sample=f.sample,
                metrics=(Metric("test_elbo_full", "held-out ELBO, all t (nats/image)", "{:.2f}", higher_is_better=True),
                         Metric("test_bits_per_dim", "held-out bits/dim", "{:.3f}", higher_is_better=False, bar=True),
                         Metric("sample_seconds_per_image", "sampling s/image", "{:.4f}", higher_is_better=False)))
