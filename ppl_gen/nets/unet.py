"""A small U-Net for noise prediction, eps_theta(x_t, t).

Ronneberger, Fischer & Brox (2015), "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI. The network was made for segmentation: one label per pixel, so its
output has the input's height and width. A diffusion model needs the same shape contract,
one noise value per pixel (Ho, Jain & Abbeel 2020 use a U-Net as eps_theta), which is why
the segmentation network is the standard noise predictor.

The parts, as the lecture's U-Net slide lists them:

* contracting path: at each of ``levels`` resolutions a block of two 3x3 convolutions, then
  2x2 max-pooling (stride 2); the channel count doubles from one level to the next;
* expanding path: a 2x2 transposed ("up-") convolution that doubles the resolution and
  halves the channels, *concatenation with the contracting path's features* of the same
  resolution (the skip connection), then a block of two 3x3 convolutions;
* a 1x1 convolution to the output channels.

The skip connections carry the fine detail that the bottleneck has pooled away; without
them the expanding path would have to rebuild every pixel from a 2x2 summary of an 8x8
image. ``UNet.skip_off`` (a set of level numbers) replaces chosen skips by zeros, with the
same weights, so a test can show that each one reaches the output.

Differences from the 2015 network, all the usual ones for diffusion models: 'same' padding
(no cropping, so output size = input size), GroupNorm and SiLU in each block, and the step t
enters every block as a per-channel shift computed from a sinusoidal embedding of t
(Vaswani et al. 2017's positional code, as Ho et al. embed t).

Sizes: the image is halved ``levels`` times, so height and width must be multiples of
2**levels. With the default ``levels=2``: multiples of 4 (8x8 digits, 28x28 Fashion-MNIST,
32x32); with ``levels=3``: multiples of 8 (8x8, 16x16, 32x32, not 28x28). Other sizes raise
a :class:`~ppl_gen.UserError` that says which work.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ppl_gen import UserError


def check_size(height: int, width: int, levels: int) -> None:
    """UserError unless the U-Net with ``levels`` halvings can take a height x width image."""
    if levels < 1:
        raise UserError(f"the U-Net needs at least one level (one halving of the image); got --levels {levels}")
    m = 2 ** levels
    if height % m or width % m or height < m or width < m:
        examples = ", ".join(f"{s}x{s}" for s in (8, 16, 28, 32) if s % m == 0)
        raise UserError(f"the U-Net halves the image {levels} times (--levels {levels}), so height and width "
                        f"must be multiples of {m} (e.g. {examples}); got {height}x{width}: crop or pad the "
                        "images, or change --levels")


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(t w_k), cos(t w_k)] with frequencies w_k = 10000^(-k / (dim/2)), k < dim/2."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class Block(nn.Module):
    """Two 3x3 convolutions (the lecture's U-Net block); t shifts the features in between."""

    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.time = nn.Linear(time_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(h)))
        h = h + self.time(emb)[:, :, None, None]
        return F.silu(self.norm2(self.conv2(h)))


class UNet(nn.Module):
    """eps_theta(x, t): (B, C, H, W) images and (B,) integer steps -> (B, C, H, W).

    ``channels``: width of the top level (doubled at each level down); ``levels``: how many
    times the contracting path halves the image (height and width must be multiples of
    2**levels); ``out_channels``: default ``in_channels``.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, levels: int = 2,
                 out_channels: int | None = None, time_dim: int | None = None):
        super().__init__()
        if channels < 1 or in_channels < 1:
            raise UserError(f"the U-Net needs at least one channel; got channels={channels}, "
                            f"in_channels={in_channels}")
        check_size(2 ** max(levels, 1), 2 ** max(levels, 1), levels)  # levels >= 1
        self.levels, self.in_channels = levels, in_channels
        self.time_dim = time_dim or 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, self.time_dim), nn.SiLU(),
                                      nn.Linear(self.time_dim, self.time_dim))
        widths = [channels * 2 ** level for level in range(levels + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for level in range(levels):
            self.down.append(Block(c, widths[level], self.time_dim))
            c = widths[level]
        self.bottom = Block(c, widths[levels], self.time_dim)
        self.up_conv = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            self.up_conv.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
            # input: the upsampled features and the skip from the contracting path, concatenated
            self.up.append(Block(2 * widths[level], widths[level], self.time_dim))
        self.out = nn.Conv2d(widths[0], out_channels or in_channels, 1)
        # levels whose skip connection is replaced by zeros (for tests of what the skips carry)
        self.skip_off: set[int] = set()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UserError(f"the U-Net takes images shaped (batch, {self.in_channels}, height, width); "
                            f"got {tuple(x.shape)}")
        check_size(x.shape[-2], x.shape[-1], self.levels)
        emb = self.time_mlp(sinusoidal_embedding(t.reshape(-1).expand(x.shape[0]), self.time_dim))
        skips, h = [], x
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottom(h, emb)
        for i, (up_conv, block) in enumerate(zip(self.up_conv, self.up)):
            level = self.levels - 1 - i
            skip = skips[level]
            if level in self.skip_off:
                skip = torch.zeros_like(skip)
            h = block(torch.cat([up_conv(h), skip], dim=1), emb)
        return self.out(h)
