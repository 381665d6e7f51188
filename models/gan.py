"""GAN: an implicit generative model trained by a two-player game (Goodfellow, Pouget-Abadie,
Mirza, Xu, Warde-Farley, Ozair, Courville & Bengio 2014, "Generative Adversarial Nets",
NeurIPS), with DCGAN-style convolutional networks (Radford, Metz & Chintala 2016,
"Unsupervised Representation Learning with Deep Convolutional Generative Adversarial
Networks", ICLR).

The lecture's third way to learn p_theta(x), after the exact likelihood (PixelCNN) and the
variational bound (VAE, VQ-VAE, diffusion): the generator is a sampler,

    z ~ N(0, I),    x = G(z; theta_g),

whose density p_g(x) is never written down (an implicit model: a deterministic map of noise
into the space of images has no tractable density there). Instead a discriminator D(x;
theta_d) in (0, 1), the probability that x is real, plays the minimax game

    min_G max_D V(D, G) = E_{x ~ p_data} log D(x) + E_{z ~ p(z)} log(1 - D(G(z))),

by alternating updates (Goodfellow et al.'s Algorithm 1): k gradient-ascent steps on theta_d
(``--d-steps``), then one step on theta_g. For a fixed G the best D is

    D*_G(x) = p_data(x) / (p_data(x) + p_g(x))                 (their Proposition 1),

and V(D*_G, G) = -log 4 + 2 JSD(p_data || p_g): the game minimizes a Jensen-Shannon
divergence, with the equilibrium p_g = p_data, D = 1/2 everywhere, D's loss -V = log 4.

The generator's loss. Minimizing log(1 - D(G(z))) (``--loss minimax``, the game as written)
saturates: early in training D rejects the samples, D(G(z)) ~ 0, where the gradient of
log(1 - D) with respect to D's logit, -D(G(z)), vanishes. The lecture's slide (and
Goodfellow et al., section 3) instead maximizes log D(G(z)): the same fixed point, a
gradient -(1 - D(G(z))) ~ -1 where the samples are bad (``--loss non-saturating``, the
default). ``g_logit_grad_final`` in metrics.json is that gradient's mean size over the last batches.

Instance noise (``--instance-noise``, default 0.5): the real digits are binary and G's pixels
grey, so a D that sees them as they are tells them apart by pixel values alone, its gradient
to G says little, and G collapses onto a few images. D is instead shown x + sd * eps, real and
fake alike: Proposition 1 then holds for the two noised densities, which overlap everywhere.

As a Pyro model: ``model`` samples z ~ N(0, I) in the data plate and records x = G(z) with
``pyro.deterministic`` (nothing is observed: there is no likelihood to observe it with), and
the guide is q(z) = p(z) (a GAN infers nothing about z), so the ELBO is identically 0 and the
runner reports none (``Spec(likelihood=False)``). Training is the ``Guide(update=...)`` hook:
:class:`AlternatingUpdates` takes both players' steps with its own two Adam optimizers, whose
state, the losses per step and the snapshots of samples over training it keeps in the
checkpoint. trace.csv's ``loss`` column is D's loss -V(D, G) on the batch.

Code names: ``G`` is theta_g's network, ``D`` returns D's logit (D(x) = sigmoid(D.logit)),
``z`` the latent, ``latent_dim`` its size.

Data: scikit-learn's 8x8 digits by default (binarized), ``--data fashion-mnist`` (28x28), any
MNIST-format IDX folder or .npz of (n, H, W) arrays with H and W multiples of 4 (the
generator doubles the side twice). Pixels are intensities in [0, 1]; G ends in a sigmoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ppl_gen import Dataset, Guide, Metric, Spec, UserError, data_plate, load_images

LOSSES = ("non-saturating", "minimax")


@dataclass
class Options:
    latent_dim: int = field(default=16, metadata={"help": "size of the latent z ~ N(0, I)"})
    width: int = field(default=32, metadata={
        "help": "feature maps of the networks' widest convolution (G's first, D's last)"})
    loss: str = field(default="non-saturating", metadata={
        "help": "the generator's loss: -log D(G(z)) (non-saturating) or log(1 - D(G(z))) (minimax)",
        "choices": LOSSES})
    d_steps: int = field(default=1, metadata={"help": "discriminator steps per generator step (k)"})
    # binary real pixels against G's grey ones: without noise D separates the two supports by
    # the pixel values alone and G collapses onto a few images
    instance_noise: float = field(default=0.5, metadata={
        "help": "sd of the Gaussian noise added to every image D sees in training, real and fake "
                "(instance noise: 0 for the plain game)"})
    # DCGAN's Adam: rate 2e-4 and beta_1 = 0.5, for both players; the runner's --lr is one
    # rate and the game has two
    g_lr: float = field(default=2e-4, metadata={"help": "Adam's rate for theta_g"})
    d_lr: float = field(default=2e-4, metadata={"help": "Adam's rate for theta_d"})
    beta1: float = field(default=0.5, metadata={"help": "Adam's beta_1 for both players"})
    samples: int = field(default=64, metadata={"help": "images in samples.png and in the D(G(z)) estimate"})
    score: bool = field(default=True, metadata={
        "help": "score samples against held-out images (ppl_gen.core.sample_score: Fréchet distance and MMD "
                "in a classifier's features, trained on first use and cached in runs/.cache/sample_score/)"})
    score_samples: int = field(default=500, metadata={"help": "samples and held-out images the score compares"})
    snapshot_images: int = field(default=8, metadata={
        "help": "images of a fixed z kept at steps 1, 3, 10, 30, ... for training_samples.png"})

    def validate(self):
        if self.score and self.score_samples < 2:
            raise UserError(f"--score-samples must be at least 2 (the score fits a covariance), "
                            f"got {self.score_samples}")
        for name in ("latent_dim", "samples", "d_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.width < 2 or self.width % 2:
            raise UserError(f"--width must be even and at least 2 (the first layers have width / 2 maps), "
                            f"got {self.width}")
        for name in ("g_lr", "d_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.instance_noise >= 0:
            raise UserError(f"--instance-noise must be at least 0, got {self.instance_noise}")
        if not 0 <= self.beta1 < 1:
            raise UserError(f"--beta1 must be in [0, 1), got {self.beta1}")
        if self.snapshot_images < 0:
            raise UserError(f"--snapshot-images must be at least 0, got {self.snapshot_images}")


# batch 64 and 3000 alternating steps: recognizable digits in about a minute on one CPU core
DEFAULTS = {"steps": 3000, "batch_size": 64}


def data(spec: str | None = None, options: Options | None = None) -> Dataset:
    """Images with pixels in [0, 1]: digits (default), fashion-mnist, an IDX folder or an .npz."""
    return load_images(spec)


def image_shape(dataset: Dataset) -> tuple[int, int]:
    """(H, W) of flat images whose sides are multiples of 4, pixels in [0, 1]; else a UserError."""
    shape = list(dataset.meta.get("shape", [dataset.train.shape[-1]]))
    if len(shape) != 2:
        raise UserError(f"gan.py needs 2-D images (its convolutions run over rows and columns); {dataset.name} "
                        f"holds flat vectors of {shape[0]} values: save x_train and x_test as (n, H, W) arrays")
    H, W = int(shape[0]), int(shape[1])
    if H % 4 or W % 4:
        raise UserError(f"gan.py's generator doubles the image side twice, so H and W must be multiples of 4; "
                        f"{dataset.name} has {H}x{W} images: pad or crop them (8x8 digits and 28x28 "
                        "Fashion-MNIST fit)")
    for split, x in (("training", dataset.train), ("held-out", dataset.test)):
        if x is not None and x.numel():
            lo, hi = x.min().item(), x.max().item()
            if lo < 0 or hi > 1:
                raise UserError(f"gan.py's generator ends in a sigmoid, so pixels must lie in [0, 1]; the {split} "
                                f"images range over [{lo:.3g}, {hi:.3g}]: rescale them, e.g. x / 255")
    return H, W


class Generator(nn.Module):
    """G(z; theta_g): z -> (width, H/4, W/4) -> transposed convolutions doubling the side twice ->
    sigmoid intensities (n, H*W). DCGAN's pattern without batch normalization: each sample is a
    function of its own z only, and these small networks train without it."""

    def __init__(self, latent_dim: int, width: int, H: int, W: int):
        super().__init__()
        self.width, self.h, self.w = width, H // 4, W // 4
        self.project = nn.Linear(latent_dim, width * self.h * self.w)
        self.up = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width // 2, 1, 4, stride=2, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).reshape(len(z), self.width, self.h, self.w)
        return torch.sigmoid(self.up(h)).reshape(len(z), -1)


class Discriminator(nn.Module):
    """D(x; theta_d) as a logit: strided convolutions halving the side twice, LeakyReLU (DCGAN),
    one linear output. D(x) = sigmoid(logit(x)), the probability that x is real."""

    def __init__(self, width: int, H: int, W: int):
        super().__init__()
        self.H, self.W = H, W
        self.down = nn.Sequential(
            nn.Conv2d(1, width // 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Linear(width * (H // 4) * (W // 4), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x.reshape(len(x), 1, self.H, self.W))
        return self.out(h.flatten(1)).squeeze(-1)


def discriminator_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """-V(D, G) on a batch: -[mean log D(x) + mean log(1 - D(G(z)))], from D's logits, with
    log D = -softplus(-logit) and log(1 - D) = -softplus(logit) (stable for any logit). theta_d
    descends it, i.e. ascends V."""
    return F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()


def generator_loss(fake_logit: torch.Tensor, kind: str = "non-saturating") -> torch.Tensor:
    """G's loss on a batch of D's logits at G(z): -log D(G(z)) (non-saturating, the lecture's
    choice) or log(1 - D(G(z))) (minimax, the game as written), averaged."""
    if kind == "minimax":
        return -F.softplus(fake_logit).mean()
    return F.softplus(-fake_logit).mean()


def snapshot_steps(t: int) -> bool:
    """Steps 1, 3, 10, 30, 100, ...: training's sample grid, one row per half decade, whatever
    the number of steps (the update does not know it)."""
    e = math.floor(math.log10(t))
    return t in (10 ** e, 3 * 10 ** e)


class GAN:
    """The generator as a Pyro model, the discriminator beside it, the images' shape."""

    def __init__(self, H: int, W: int, options: Options, device: torch.device | str = "cpu"):
        self.H, self.W, self.options = H, W, options
        self.G = Generator(options.latent_dim, options.width, H, W).to(device)
        self.D = Discriminator(options.width, H, W).to(device)

    def prior(self, like: torch.Tensor):
        """p(z) = N(0, I) over latent_dim numbers, on the data's device."""
        return dist.Normal(like.new_zeros(self.options.latent_dim), 1.0).to_event(1)

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """z ~ N(0, I), x = G(z): a sampler, no density. Nothing is observed."""
        pyro.module("generator", self.G)
        with data_plate(x, idx, size):
            z = pyro.sample("z", self.prior(x))
            pyro.deterministic("x", self.G(z), event_dim=1)

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(z) = p(z): a GAN has no inference network, so the ELBO is 0; the discriminator, G's
        critic, is registered here so that checkpoints hold theta_d beside theta_g."""
        pyro.module("discriminator", self.D)
        with data_plate(x, idx, size):
            pyro.sample("z", self.prior(x))

    def sample(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """n images x = G(z), z ~ N(0, I), flat (n, H*W)."""
        with torch.no_grad():
            return self.G(torch.randn(n, self.options.latent_dim, device=like.device, dtype=like.dtype))


class AlternatingUpdates:
    """Goodfellow et al.'s Algorithm 1 as the runner's ``Guide(update=...)`` hook: per step, k
    ascent steps on V for theta_d, then one step on G's loss for theta_g, each with its own Adam.
    Keeps, for checkpoints: both optimizers, the losses per step, a fixed z and the samples
    G(z) at the snapshot steps."""

    KEYS = ("d_loss", "g_loss", "d_real", "d_fake", "g_logit_grad")

    def __init__(self, gan: GAN, like: torch.Tensor):
        o = gan.options
        self.gan, self.loss_name, self.k = gan, o.loss, o.d_steps
        self.opt_g = torch.optim.Adam(gan.G.parameters(), lr=o.g_lr, betas=(o.beta1, 0.999))
        self.opt_d = torch.optim.Adam(gan.D.parameters(), lr=o.d_lr, betas=(o.beta1, 0.999))
        # one fixed z, drawn after the runner seeded: the same images tracked through training
        self.z_fixed = torch.randn(o.snapshot_images, o.latent_dim, device=like.device, dtype=like.dtype)
        self.history: dict[str, list[float]] = {k: [] for k in self.KEYS}
        self.snapshots: dict[int, torch.Tensor] = {}

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        """x + sd * eps, what D sees in training: the game is then played between p_data and p_g
        each convolved with N(0, sd^2 I), whose supports overlap (Arjovsky & Bottou 2017, "Towards
        principled methods for training GANs", ICLR; Sønderby et al. 2017's instance noise)."""
        sd = self.gan.options.instance_noise
        return x + sd * torch.randn_like(x) if sd > 0 else x

    def __call__(self, x: torch.Tensor, idx, size: int, t: int) -> float:
        G, D, o, noisy = self.gan.G, self.gan.D, self.gan.options, self.noisy
        n = len(x)
        with torch.enable_grad():
            for _ in range(self.k):
                z = torch.randn(n, o.latent_dim, device=x.device, dtype=x.dtype)
                real_logit, fake_logit = D(noisy(x)), D(noisy(G(z).detach()))
                d_loss = discriminator_loss(real_logit, fake_logit)
                self.opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                self.opt_d.step()
            z = torch.randn(n, o.latent_dim, device=x.device, dtype=x.dtype)
            fake_logit = D(noisy(G(z)))
            g_loss = generator_loss(fake_logit, self.loss_name)
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            self.opt_g.step()
            # D's parameters got gradients from G's loss too; D's own step sets them to None first
        d_fake = torch.sigmoid(fake_logit.detach())
        # d(G's loss)/d(logit) per sample: -D(G(z)) for minimax, -(1 - D(G(z))) non-saturating
        grad = d_fake if self.loss_name == "minimax" else 1 - d_fake
        for key, value in (("d_loss", d_loss), ("g_loss", g_loss), ("d_real", torch.sigmoid(real_logit).mean()),
                           ("d_fake", d_fake.mean()), ("g_logit_grad", grad.mean())):
            self.history[key].append(float(value.detach()))
        if len(self.z_fixed) and snapshot_steps(t):
            with torch.no_grad():
                self.snapshots[t] = G(self.z_fixed).detach().clone()
        # the Trainer reports value / size: trace.csv's loss is D's loss -V on this batch
        return float(d_loss.detach()) * size

    # -- checkpoint state: tensors and plain numbers only (weights_only=True) -----------------
    def state_dict(self) -> dict:
        steps = sorted(self.snapshots)
        return {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
                "z_fixed": self.z_fixed.detach().clone(),
                "snapshot_steps": torch.tensor(steps, dtype=torch.long),
                "snapshots": (torch.stack([self.snapshots[s] for s in steps]) if steps
                              else self.z_fixed.new_zeros(0, self.gan.H * self.gan.W))}

    def load_state_dict(self, state: dict) -> None:
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.history = {k: [float(v) for v in state["history"][k]] for k in self.KEYS}
        self.z_fixed = state["z_fixed"].to(self.z_fixed.device)
        self.snapshots = {int(s): img.to(self.z_fixed.device)
                          for s, img in zip(state["snapshot_steps"], state["snapshots"])}


def _tail_mean(values: list[float], window: int = 50) -> float | None:
    tail = values[-window:]
    return sum(tail) / len(tail) if tail else None


class GANFile:
    """evaluate and plots of a trained GAN."""

    def __init__(self, gan: GAN, update: AlternatingUpdates, x_train: torch.Tensor):
        self.gan, self.update = gan, update
        self.samples: torch.Tensor | None = None
        self.x_train = x_train
        # binary data were binarized at 1/2: G's grey images are compared after the same map, so
        # that a score's features see images of the kind the data are
        self.binary = bool(((x_train == 0) | (x_train == 1)).all())

    def sample(self, n: int) -> torch.Tensor:
        """n images x = G(z) in the data's form (binarized at 1/2 where the data are binary)."""
        x = self.gan.sample(n, self.x_train)
        return (x > 0.5).to(x.dtype) if self.binary else x

    def evaluate(self, run) -> dict:
        gan, h = self.gan, self.update.history
        x_train, x_test = run.dataset.train, run.dataset.test
        real = x_test if x_test is not None else x_train
        out = {"likelihood": "none (implicit model): x = G(z) has no density to evaluate, so there is no ELBO "
                             "or log-likelihood; D(x) and the losses describe the game, not the fit",
               "generator_loss": gan.options.loss,
               "d_loss_final": _tail_mean(h["d_loss"]), "g_loss_final": _tail_mean(h["g_loss"]),
               "g_logit_grad_final": _tail_mean(h["g_logit_grad"]),
               "d_loss_at_equilibrium": math.log(4.0)}
        self.samples = gan.sample(gan.options.samples, real)
        # D was trained on noised images (instance noise): it is asked about the same
        noisy, D = self.update.noisy, gan.D
        with torch.no_grad():
            out["d_real_heldout"] = torch.sigmoid(torch.cat([D(noisy(c)) for c in real.split(4096)])).mean().item()
            out["d_real_train"] = torch.sigmoid(torch.cat([D(noisy(c)) for c in x_train.split(4096)])).mean().item()
            out["d_fake"] = torch.sigmoid(D(noisy(self.samples))).mean().item()
        if gan.options.score and run.dataset.labels_train is not None:
            from ppl_gen.core.sample_score import sample_score

            if self.binary:
                out["sample_score_of"] = "G(z) binarized at 1/2, as the data were"
            out.update(sample_score(self.sample(gan.options.score_samples), run.dataset,
                                    n=gan.options.score_samples))
        else:
            from ppl_gen.core.sample_score import nearest_distance

            # against memorization: how far a sample is from the training image nearest to it
            out["nearest_train_distance"] = nearest_distance(self.samples, x_train[:20000])
        if run.trace:
            out["train_seconds"] = float(run.trace[-1]["seconds"])
        return out

    def plots(self, run, out_dir: Path) -> list[Path]:
        from ppl_gen import plotting

        gan, shape = self.gan, [self.gan.H, self.gan.W]
        like = run.dataset.train
        samples = self.samples if self.samples is not None else gan.sample(gan.options.samples, like)
        paths = [plotting.image_grid(samples, shape, out_dir / "samples.png",
                                     f"x = G(z), z ~ N(0, I): {len(samples)} samples")]
        snaps = self.update.snapshots
        if snaps:
            steps = sorted(snaps)
            with torch.no_grad():
                final = gan.G(self.update.z_fixed)
            rows = [snaps[s] for s in steps] + [final]
            labels = [f"step {s}" for s in steps] + ["final"]
            paths.append(plotting.image_grid(torch.cat(rows), shape, out_dir / "training_samples.png",
                                             "G(z) for one fixed z over training", nrow=len(rows),
                                             row_labels=labels))
        paths.append(self.plot_interpolation(like, shape, out_dir / "interpolation.png"))
        if self.update.history["d_loss"]:
            paths.append(self.plot_losses(out_dir / "losses.png"))
        return paths

    def plot_interpolation(self, like: torch.Tensor, shape, path: Path, rows: int = 6, cols: int = 9) -> Path:
        """G((1 - a) z_0 + a z_1) for a from 0 to 1, one pair of z per row (DCGAN's walk in latent
        space): smooth changes say G maps nearby z to nearby images."""
        from ppl_gen import plotting

        d = self.gan.options.latent_dim
        z0 = torch.randn(rows, 1, d, device=like.device, dtype=like.dtype)
        z1 = torch.randn(rows, 1, d, device=like.device, dtype=like.dtype)
        a = torch.linspace(0, 1, cols, device=like.device, dtype=like.dtype).reshape(1, cols, 1)
        with torch.no_grad():
            x = self.gan.G(((1 - a) * z0 + a * z1).reshape(rows * cols, d))
        return plotting.image_grid(x, shape, path, "G(z) along straight lines from z_0 to z_1", nrow=rows)

    def plot_losses(self, path: Path) -> Path:
        """Left: D's loss -V and G's loss per step, with the equilibrium values log 4 (and log 2 for
        the non-saturating loss); right: D(x) on real batches and D(G(z)) on fakes."""
        from ppl_gen import plotting
        import matplotlib.pyplot as plt
        import numpy as np

        h = self.update.history
        steps = np.arange(1, len(h["d_loss"]) + 1)
        window = max(len(steps) // 50, 1)
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
        name = "-log D(G(z))" if self.gan.options.loss == "non-saturating" else "log(1 - D(G(z)))"
        for key, label, colour in (("d_loss", "D's loss -V(D, G)", "tab:blue"),
                                   ("g_loss", f"G's loss {name}", "tab:orange")):
            y = np.array(h[key])
            axes[0].plot(steps, y, color=colour, alpha=0.2, lw=0.7)
            axes[0].plot(steps, plotting._smooth(y, window), color=colour, lw=1.6, label=label)
        axes[0].axhline(math.log(4), color="tab:blue", ls=":", lw=1, label="log 4 (D = 1/2)")
        axes[0].axhline(math.log(2) if self.gan.options.loss == "non-saturating" else -math.log(2),
                        color="tab:orange", ls=":", lw=1, label="G's loss at D = 1/2")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("loss (nats)")
        axes[0].legend(fontsize=8)
        for key, label, colour in (("d_real", "D(x), real batch", "tab:green"),
                                   ("d_fake", "D(G(z)), fakes", "tab:red")):
            y = np.array(h[key])
            axes[1].plot(steps, y, color=colour, alpha=0.2, lw=0.7)
            axes[1].plot(steps, plotting._smooth(y, window), color=colour, lw=1.6, label=label)
        axes[1].axhline(0.5, color="grey", ls=":", lw=1)
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("discriminator output")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle("the two players' losses (alternating updates)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def build(options: Options, dataset: Dataset) -> Spec:
    H, W = image_shape(dataset)
    gan = GAN(H, W, options, dataset.device)
    update = AlternatingUpdates(gan, dataset.train)
    shown = GANFile(gan, update, dataset.train)
    return Spec(model=gan.model, guides={"discriminator": Guide(fn=gan.guide, update=update)},
                evaluate=shown.evaluate, plots=shown.plots, description=__doc__.split("\n")[0],
                likelihood=False, density="implicit", sample=shown.sample,
                metrics=(Metric("d_real_heldout", "D(x), held-out real", "{:.3f}"),
                         Metric("d_fake", "D(G(z)), samples", "{:.3f}"),
                         Metric("d_loss_final", "D's loss -V", "{:.3f}"),
                         Metric("g_loss_final", "G's loss", "{:.3f}"),
                         Metric("sample_fd", "Fréchet distance, samples to held-out", "{:.2f}",
                                higher_is_better=False, bar=True),
                         Metric("sample_mmd_p_value", "MMD p-value", "{:.3f}"),
                         Metric("nearest_train_distance", "sample to nearest training image (L2)", "{:.3f}"),
                         Metric("train_seconds", "training s", "{:.1f}", higher_is_better=False)))
