"""ppl_gen/nets/masked.py: the masks, the autoregressive property of stacked masked
convolutions, the receptive field against a brute-force enumeration, raster sampling."""

import itertools

import pytest
import torch

from ppl_gen.nets.masked import MaskedConv2d, PixelCNN, causal_mask, dependency_map, sample_raster


def _random_net(in_ch, out_ch, seed, **kw):
    torch.manual_seed(seed)
    net = PixelCNN(in_ch, out_ch, **kw).double()
    with torch.no_grad():  # larger weights than the default init: every path carries signal
        for p in net.parameters():
            p.mul_(2.0)
    return net


def test_masks_are_the_papers():
    A = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    B = A.clone()
    B[1, 1] = 1
    assert torch.equal(causal_mask(3, "A"), A)
    assert torch.equal(causal_mask(3, "B"), B)
    m5 = causal_mask(5, "A")
    assert m5.sum() == 12 and m5[:2].sum() == 10 and m5[2, :2].sum() == 2 and m5[2:, 2:].sum() == 0
    with pytest.raises(ValueError):
        causal_mask(4, "A")


@pytest.mark.parametrize("in_ch,out_ch,kernel,layers,seed", [(1, 1, 3, 4, 0), (3, 3, 5, 2, 1), (1, 2, 3, 1, 2)])
def test_no_conditional_depends_on_its_own_or_a_later_pixel(in_ch, out_ch, kernel, layers, seed):
    """Change pixel j: the logits of pixels 0..j stay exactly as they were (float64, 1e-12),
    and the next pixel's do change (so the check has something to see)."""
    net = _random_net(in_ch, out_ch, seed, channels=6, layers=layers, kernel_size=kernel)
    H, W = 4, 5  # not square: a row/column mix-up would show
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (3, in_ch, H, W), generator=g).double()
    base = net(x).flatten(2)
    for j in range(H * W):
        r, c = divmod(j, W)
        x2 = x.clone()
        x2[:, :, r, c] = 1 - x2[:, :, r, c]
        diff = (net(x2).flatten(2) - base).abs().amax((0, 1))
        assert diff[: j + 1].max() < 1e-12, (j, diff[: j + 1])
        if j + 1 < H * W and c + 1 < W:  # the right neighbour reads pixel j through every mask
            assert diff[j + 1] > 1e-6, (j, diff[j + 1])


def test_the_check_catches_a_leak():
    """Mask B in the first layer lets pixel i see itself: the property above must fail."""
    net = _random_net(1, 1, 0, channels=4, layers=2, kernel_size=3)
    leaky = MaskedConv2d(1, 4, 3, "B").double()
    leaky.weight.data.copy_(net.first.weight.data)
    leaky.bias.data.copy_(net.first.bias.data)
    net.first = leaky
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x2 = x.clone()
    x2[0, 0, 1, 1] = 1
    assert (net(x2) - net(x))[0, 0, 1, 1].abs() > 1e-6


def _reachable(kernel, layers):
    """Offsets (dy, dx) of input pixels the output can read, by enumeration: one mask-A
    offset, then layers - 1 mask-B offsets (B contains (0, 0), so shorter paths are included)."""
    c = kernel // 2
    offs = lambda t: {(dy - c, dx - c) for dy in range(kernel) for dx in range(kernel)  # noqa: E731
                      if causal_mask(kernel, t)[dy, dx] > 0}
    reach = offs("A")
    for _ in range(layers - 1):
        reach = {(a + b, c2 + d) for (a, c2), (b, d) in itertools.product(reach, offs("B"))}
    return reach


@pytest.mark.parametrize("kernel,layers", [(3, 1), (3, 3), (5, 2)])
def test_dependency_map_is_the_receptive_field_with_its_blind_spot(kernel, layers):
    net = _random_net(1, 1, 3, channels=5, layers=layers, kernel_size=kernel)
    H = W = 9
    r, c = 6, 4
    x = torch.randint(0, 2, (8, 1, H, W), generator=torch.Generator().manual_seed(0)).double()
    seen = dependency_map(net, x, r, c) > 0
    expected = torch.zeros(H, W, dtype=torch.bool)
    for dy, dx in _reachable(kernel, layers):
        if 0 <= r + dy < H and 0 <= c + dx < W:
            expected[r + dy, c + dx] = True
    assert torch.equal(seen, expected)
    if layers > 1 and kernel == 3:
        # the blind spot: one row up, three columns right is a previous pixel never read
        assert not seen[r - 1, c + 3]


def test_sample_raster_draws_each_pixel_from_its_conditional():
    """With a deterministic draw (a function of the logit alone), the finished sample is a
    fixed point: the network run on it gives back every pixel, because pixel i's logit
    reads pixels < i only, which were final when pixel i was drawn."""
    net = _random_net(1, 1, 4, channels=6, layers=3, kernel_size=3)
    draw = lambda logit: (torch.sin(100 * logit) > 0).double()  # noqa: E731  (both values occur)
    x = sample_raster(net, torch.zeros(5, 1, 4, 6, dtype=torch.float64), draw)
    assert torch.equal(draw(net(x)), x)
    assert 0.1 < x.mean() < 0.9
    # completion: positions before start are kept as given
    top = torch.ones(5, 1, 4, 6, dtype=torch.float64)
    y = sample_raster(net, top.clone(), draw, start=7)
    assert torch.equal(y.flatten(1)[:, :7], top.flatten(1)[:, :7])
    assert torch.equal(draw(net(y)).flatten(1)[:, 7:], y.flatten(1)[:, 7:])
