"""PixelCNN: an autoregressive image model with an exact likelihood (van den Oord,
Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent Neural Networks", ICML; van den Oord,
Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu 2016, "Conditional Image Generation
with PixelCNN Decoders", NeurIPS).

The lecture's fully visible belief network: the chain rule over the D = H * W pixels of a
binarized image in raster order (row by row, left to right), each conditional a Bernoulli
whose logit a network computes from all previous pixels,

    p_W(x) = prod_{i=1}^{D} p_W(x_i | x_1, ..., x_{i-1}),
    p_W(x_i | x_<i) = Bernoulli(sigmoid(f_W(x_<i)_i)).

f_W is a stack of masked convolutions (``ppl_gen.nets.masked``: mask A in the first layer,
so pixel i never sees itself, mask B after), so one pass gives all D conditionals of a
training image at once: training is as parallel as a classifier's. Sampling is not: pixel
i needs pixels < i, so a sample costs D network passes (the lecture's "generation is
slow"; ``sampling_seconds_per_image``).

As a Pyro model it has no latent variables (the network's features are deterministic
functions of x_<i, not latents), so the guide is empty and the runner's ELBO *is* log
p_W(x): SVI is maximum likelihood on W, and ``test_elbo`` is the exact held-out
log-likelihood in nats per image (as in models/char_rnn.py). Bits per dimension:
-log p(x) / (D log 2).

Code names: ``W`` is the network ``PixelCNNModel.net``; ``x_i`` is pixel ``i = r * W + c``;
``logits(x)[:, i]`` is f_W(x_<i)_i.

Data: scikit-learn's 8x8 digits by default (binarized at half intensity), ``--data
fashion-mnist``, any MNIST-format IDX folder or an .npz with x_train / x_test as
(n, H, W) arrays; the loader binarizes them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from ppl_gen import Dataset, Metric, Spec, UserError, data_plate, load_images
from ppl_gen.nets.masked import PixelCNN, dependency_map, sample_raster


@dataclass
class Options:
    layers: int = field(default=5, metadata={
        "help": "masked convolution layers: one with mask A, then mask-B residual blocks"})
    channels: int = field(default=16, metadata={"help": "feature maps per masked layer"})
    kernel_size: int = field(default=5, metadata={"help": "odd side of the mask-B kernels"})
    first_kernel_size: int = field(default=5, metadata={"help": "odd side of the first (mask A) kernel"})
    samples: int = field(default=64, metadata={
        "help": "images sampled together, for samples.png and the sampling time"})
    completions: int = field(default=6, metadata={
        "help": "held-out images whose bottom half is sampled given their top half"})

    def validate(self):
        for name in ("layers", "channels", "samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("kernel_size", "first_kernel_size"):
            k = getattr(self, name)
            if k < 3 or k % 2 == 0:
                raise UserError(f"--{name.replace('_', '-')} must be odd and at least 3 (a masked kernel has "
                                f"a centre and a past around it), got {k}")
        if self.completions < 0:
            raise UserError(f"--completions must be at least 0, got {self.completions}")


# Few steps on purpose: 1,438 training digits are soon memorized, and past that point the
# held-out log-likelihood falls while the training one still rises. No latent variables, so
# one particle gives the ELBO (= log p(x)) exactly.
DEFAULTS = {"steps": 1200, "lr": 2e-3, "batch_size": 128, "eval_particles": 1}


def data(spec: str | None = None, options: Options | None = None) -> Dataset:
    """Binarized images: digits (default), fashion-mnist, an IDX folder or an .npz."""
    return load_images(spec)


def image_shape(dataset: Dataset, who: str = "pixelcnn.py") -> tuple[int, int]:
    """(H, W) of a data set of flat binary images; a UserError says what to fix."""
    shape = list(dataset.meta.get("shape", [dataset.train.shape[-1]]))
    if len(shape) != 2:
        raise UserError(f"{who} needs 2-D images (its convolutions run over rows and columns); "
                        f"{dataset.name} holds flat vectors of {shape[0]} values: save x_train "
                        "and x_test as (n, H, W) arrays")
    for split, x in (("training", dataset.train), ("held-out", dataset.test)):
        if x is None:
            continue
        bad = x[(x != 0) & (x != 1)]
        if bad.numel():
            raise UserError(f"{who} models binary pixels (Bernoulli), but the {split} images hold "
                            f"values such as {bad[0].item():.3g}; binarize them first, e.g. "
                            "x = (x > 0.5).float(), or load uint8 images through --data, which "
                            "binarizes at half intensity")
    return int(shape[0]), int(shape[1])


class PixelCNNModel:
    """p_W(x) = prod_i p_W(x_i | x_<i) over flat (n, H*W) binary images."""

    def __init__(self, H: int, W: int, options: Options, device: torch.device | str = "cpu"):
        self.H, self.W, self.D = H, W, H * W
        self.options = options
        self.net = PixelCNN(1, 1, options.channels, options.layers, options.kernel_size,
                            options.first_kernel_size).to(device)
        self.samples: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) logits of every p(x_i | x_<i), from one pass of the masked network."""
        return self.net(x.reshape(-1, 1, self.H, self.W)).reshape(x.shape[0], self.D)

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        pyro.module("pixelcnn", self.net)
        logits = self.logits(x)
        with data_plate(x, idx, size):
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """No latent variables: nothing to approximate, and the ELBO is log p(x)."""

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Exact log p_W(x) per image (nats): the sum of the D log-conditionals."""
        out = [dist.Bernoulli(logits=self.logits(xs)).log_prob(xs).sum(-1) for xs in x.split(chunk)]
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
        """n images by ancestral sampling, one network pass per pixel; with ``top`` (n, D)
        the first half of the rows is kept from it (completion)."""
        x = like.new_zeros(n, 1, self.H, self.W)
        start = 0
        if top is not None:
            start = (self.H // 2) * self.W
            x.view(n, self.D)[:, :start] = top[:, :start]
        sample_raster(self.net, x, lambda logit: torch.bernoulli(torch.sigmoid(logit)), start)
        return x.reshape(n, self.D)

    # -- evaluation ------------------------------------------------------------
    def probe_pixel(self) -> tuple[int, int]:
        """The pixel whose receptive field is shown: the middle row, a quarter across, so
        that the blind spot to its upper right has room to show."""
        return self.H // 2, self.W // 4

    def receptive_field(self, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        """|d logit_i / d x| (H, W) of the probe pixel i over 16 random binary inputs, and i."""
        r, c = self.probe_pixel()
        probe = torch.bernoulli(like.new_full((16, 1, self.H, self.W), 0.5))
        return dependency_map(self.net, probe, r, c), r * self.W + c

    def evaluate(self, run) -> dict:
        self.net.eval()
        x_train, x_test = run.dataset.train, run.dataset.test
        out = {}
        for split, x in (("test", x_test), ("train", x_train)):
            if x is not None:
                ll = self.log_prob(x).mean().item()
                out[f"{split}_log_likelihood"] = ll
                out[f"{split}_bits_per_dim"] = -ll / (self.D * math.log(2))
        t0 = time.perf_counter()
        self.samples = self.sample(self.options.samples, x_train)
        if x_train.device.type == "cuda":
            torch.cuda.synchronize(x_train.device)
        out["sampling_seconds_per_image"] = (time.perf_counter() - t0) / self.options.samples
        if run.trace:
            out["train_seconds"] = float(run.trace[-1]["seconds"])
        out["sampling_batch"] = self.options.samples
        out["network_passes_per_sample"] = self.D
        grad, i = self.receptive_field(x_train)
        seen = (grad > 0).reshape(-1)
        out["receptive_field_probe"] = list(self.probe_pixel())
        out["receptive_field_pixels"] = int(seen[:i].sum())
        out["blind_spot_pixels"] = i - int(seen[:i].sum())
        out["future_pixels_read"] = int(seen[i:].sum())  # 0 unless a mask is broken
        return out

    # -- plots -----------------------------------------------------------------
    @torch.no_grad()
    def plots(self, run, out_dir: Path) -> list[Path]:
        from ppl_gen import plotting

        shape = [self.H, self.W]
        x = run.dataset.test if run.dataset.test is not None else run.dataset.train
        samples = self.samples if self.samples is not None else self.sample(self.options.samples, x)
        paths = [plotting.image_grid(samples, shape, out_dir / "samples.png",
                                     f"samples: {self.D} network passes each, pixel by pixel")]
        paths.append(self.plot_receptive_field(x, out_dir / "receptive_field.png"))
        k = min(self.options.completions, len(x))
        if k:
            top = x[:k]
            occluded = top.clone()
            occluded[:, (self.H // 2) * self.W:] = 0.5
            rows = [top, occluded] + [self.sample(k, x, top=top) for _ in range(3)]
            paths.append(plotting.image_grid(torch.cat(rows), shape, out_dir / "completions.png",
                                             "held-out images completed from their top half", nrow=5,
                                             row_labels=["x", "top half", "sample 1", "sample 2", "sample 3"]))
        return paths

    def plot_receptive_field(self, x: torch.Tensor, path: Path) -> Path:
        """Left: |d logit_i / d x| of the trained network at the centre pixel i; right: which
        previous pixels it reads, and the blind spot (previous pixels it never reads)."""
        from ppl_gen import plotting  # noqa: F401  (sets matplotlib's file-only backend)
        import matplotlib.pyplot as plt
        import numpy as np

        r, c = self.probe_pixel()
        grad, i = self.receptive_field(x)
        grad = grad.cpu().numpy()
        kind = np.zeros(self.D)                    # 0: future pixel (not allowed)
        previous = np.arange(self.D) < i
        seen = grad.reshape(-1) > 0
        kind[previous & ~seen] = 1                 # blind spot
        kind[previous & seen] = 2                  # read by the conditional
        kind[i] = 3                                # the pixel itself
        kind[~previous & seen] = 4                 # a leak: would break the chain rule
        colours = np.array([[0.93, 0.93, 0.93], [0.85, 0.2, 0.2], [0.2, 0.45, 0.8],
                            [0.1, 0.1, 0.1], [1.0, 0.8, 0.0]])
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.2))
        shown = np.where(grad > 0, np.log10(grad + 1e-30), np.nan)
        im = axes[0].imshow(shown, cmap="viridis", interpolation="nearest")
        axes[0].plot(c, r, "s", mfc="none", mec="red", ms=12)
        fig.colorbar(im, ax=axes[0], fraction=0.046, label="log10 |d logit / d x|")
        axes[0].set_title(f"gradient of pixel ({r},{c})'s logit")
        axes[1].imshow(colours[kind.astype(int)].reshape(self.H, self.W, 3), interpolation="nearest")
        n_seen, n_blind = int((previous & seen).sum()), int((previous & ~seen).sum())
        axes[1].set_title(f"reads {n_seen} of {i} previous pixels (blue)\nblind spot: {n_blind} (red); "
                          "later pixels: grey")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        o = self.options
        fig.suptitle(f"what p(x_i | x_<i) sees: a {o.first_kernel_size}x{o.first_kernel_size} mask-A layer, "
                     f"{o.layers - 1} {o.kernel_size}x{o.kernel_size} mask-B layers")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def build(options: Options, dataset: Dataset) -> Spec:
    H, W = image_shape(dataset)
    pcnn = PixelCNNModel(H, W, options, dataset.device)
    return Spec(model=pcnn.model, guides={"none": pcnn.guide}, evaluate=pcnn.evaluate, plots=pcnn.plots,
                description=__doc__.split("\n")[0], density="exact", heldout_log_density=("test_log_likelihood",),
                sample=lambda n: pcnn.sample(n, dataset.train),
                metrics=(Metric("test_log_likelihood", "held-out log p(x) (nats/image, exact)", "{:.2f}",
                                higher_is_better=True, bar=True),
                         Metric("test_bits_per_dim", "held-out bits/dim", "{:.4f}", higher_is_better=False),
                         Metric("sampling_seconds_per_image", "sampling s/image", "{:.2e}",
                                higher_is_better=False),
                         Metric("train_seconds", "training s", "{:.1f}", higher_is_better=False)))
