"""Masked convolutions: the network of PixelCNN (van den Oord, Kalchbrenner & Kavukcuoglu
2016, "Pixel Recurrent Neural Networks", ICML; van den Oord, Kalchbrenner, Vinyals,
Espeholt, Graves & Kavukcuoglu 2016, "Conditional Image Generation with PixelCNN
Decoders", NeurIPS).

The chain rule in raster order (row by row, left to right), the lecture's

    p_W(x) = prod_i p_W(x_i | x_1, ..., x_{i-1}),

is computed for every pixel i in one pass of a convolutional network if no output at i
depends on the input at i or after it. A convolution whose kernel is zeroed at the
"future" offsets does that:

* mask ``"A"`` (first layer): the kernel sees the rows above and, in its own row, the
  pixels to the left; not the centre. The output at i depends on x_<i only.
* mask ``"B"`` (every later layer): the centre is allowed too. The feature at i already
  depends on x_<i only, so letting a layer read its own position keeps that.

Stacking such layers leaves a *blind spot*: a 3x3 mask reaches one row up and one column
right per layer, so pixels above and to the right of a line at 45 degrees are never seen,
however deep the stack (the second paper's vertical and horizontal stacks remove it; this
module has the original, blind-spot-and-all form). :func:`dependency_map` shows it from
the network itself.

Used by ``models/pixelcnn.py`` (Bernoulli pixels: one input channel, one logit) and by
``models/vqvae.py``'s prior over the grid of codes (one-hot codes in, K logits out).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

MASK_TYPES = ("A", "B")


def causal_mask(kernel_size: int, mask_type: str) -> torch.Tensor:
    """The (k, k) 0/1 mask: 1 on the rows above the centre and left of it in its row,
    plus the centre itself for mask B."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"a masked convolution needs an odd kernel size, got {kernel_size}")
    c = kernel_size // 2
    mask = torch.zeros(kernel_size, kernel_size)
    mask[:c, :] = 1.0
    mask[c, :c] = 1.0
    if mask_type == "B":
        mask[c, c] = 1.0
    return mask


class MaskedConv2d(nn.Conv2d):
    """A same-size 2-D convolution whose kernel is multiplied by :func:`causal_mask`. All
    input channels at one position belong to one pixel (one binary value, or one code as a
    one-hot vector), so the mask is the same for every channel pair."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.mask_type = mask_type
        # a buffer: it follows the module to its device, and is not a trained parameter
        self.register_buffer("mask", causal_mask(kernel_size, mask_type), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # masking the weight in every call (rather than once) keeps the future offsets at
        # exactly zero whatever the optimizer does to the stored weight
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Logits of p(x_i | x_<i) for every position at once.

    ``layers`` masked convolutions: the first mask A with a ``first_kernel_size`` kernel
    (the papers use 7x7), the rest mask B with ``kernel_size`` kernels (3x3 in the papers),
    each mask-B layer a residual block h <- h + conv(relu(h)) (legal under mask B since h at
    i depends on x_<i only); then two 1x1 convolutions (position-wise, so still causal) to
    ``out_channels`` logits per position. Input (n, in_channels, H, W), output
    (n, out_channels, H, W); any H, W.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 32, layers: int = 5,
                 kernel_size: int = 3, first_kernel_size: int | None = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a PixelCNN needs at least one (mask A) layer, got {layers}")
        self.first = MaskedConv2d(in_channels, channels, first_kernel_size or kernel_size, "A")
        self.hidden = nn.ModuleList(MaskedConv2d(channels, channels, kernel_size, "B")
                                    for _ in range(layers - 1))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        for layer in self.hidden:
            h = h + layer(torch.relu(h))
        return self.head(h)


@torch.no_grad()
def sample_raster(net: nn.Module, x: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor],
                  start: int = 0) -> torch.Tensor:
    """Ancestral sampling in raster order: for each position i >= ``start``, run the whole
    network and set ``x[:, :, r, c] = draw(logits[:, :, r, c])`` (``draw`` returns the input
    channels for the drawn value, e.g. a 0/1 pixel or a one-hot code). One network pass per
    position: the lecture's "generation must proceed sequentially". Positions before
    ``start`` are kept (completion from a given top). Fills ``x`` in place and returns it."""
    H, W = x.shape[-2:]
    for i in range(start, H * W):
        r, c = divmod(i, W)
        x[:, :, r, c] = draw(net(x)[:, :, r, c]).to(x.dtype)
    return x


def dependency_map(net: nn.Module, x: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """|d logits[:, :, row, col] / d x| summed over the batch, the output and the input
    channels: an (H, W) map that is nonzero exactly where the conditional at (row, col) can
    read the input (for generic weights). Computed by autograd from the network itself, so
    it shows the masks' receptive field, blind spot included."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = net(x)[:, :, row, col]
        # sum of |.| over outputs would need one backward per output; a random projection
        # reaches every input an output depends on, with probability one
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return grad.abs().sum((0, 1))
