"""ppl_gen/nets/unet.py: output shape, what the skip connections and t carry, the sizes it takes."""

import pytest
import torch

from ppl_gen import UserError
from ppl_gen.nets.unet import UNet, check_size, sinusoidal_embedding


@pytest.mark.parametrize("channels_in, size, levels", [(1, 8, 2), (1, 28, 2), (3, 16, 3)])
def test_output_has_the_input_shape(channels_in, size, levels):
    torch.manual_seed(0)
    net = UNet(channels_in, channels=8, levels=levels)
    x = torch.randn(3, channels_in, size, size)
    out = net(x, torch.tensor([1, 5, 9]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_each_skip_connection_reaches_the_output():
    """Same weights, one skip replaced by zeros: the output changes, at every level."""
    torch.manual_seed(0)
    net = UNet(1, channels=8, levels=3)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        full = net(x, t)
        for level in range(3):
            net.skip_off = {level}
            change = (net(x, t) - full).abs().max().item()
            assert change > 1e-3 * full.abs().max().item(), (level, change)
        net.skip_off = set()
        assert torch.equal(net(x, t), full)  # switching them back on restores the output exactly


def test_time_step_changes_the_output_and_every_parameter_learns():
    torch.manual_seed(0)
    net = UNet(1, channels=8, levels=2)
    x = torch.randn(2, 1, 8, 8)
    a, b = net(x, torch.tensor([1, 1])), net(x, torch.tensor([50, 50]))
    assert (a - b).abs().max().item() > 1e-4
    (a.square().mean() + b.square().mean()).backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, dead


def test_sinusoidal_embedding_matches_its_formula():
    t = torch.tensor([0, 3, 17])
    emb = sinusoidal_embedding(t, 8)
    k = torch.arange(4, dtype=torch.float64)
    freqs = 10000.0 ** (-k / 4)
    want = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], -1)
    assert torch.allclose(emb.double(), want, atol=1e-5)


@pytest.mark.parametrize("h, w, levels, works", [(8, 8, 2, True), (28, 28, 2, True), (32, 16, 3, True),
                                                  (7, 7, 2, False), (10, 8, 2, False), (28, 28, 3, False),
                                                  (2, 2, 2, False)])
def test_sizes_it_takes_and_the_error_for_others(h, w, levels, works):
    if works:
        check_size(h, w, levels)
        return
    with pytest.raises(UserError) as e:
        check_size(h, w, levels)
    msg = str(e.value)
    assert f"multiples of {2 ** levels}" in msg and f"got {h}x{w}" in msg and "8x8" in msg


def test_forward_refuses_an_image_it_cannot_take():
    net = UNet(1, channels=8, levels=2)
    with pytest.raises(UserError, match="multiples of 4"):
        net(torch.randn(1, 1, 7, 7), torch.tensor([1]))
    with pytest.raises(UserError, match=r"\(batch, 1, height, width\)"):
        net(torch.randn(1, 64), torch.tensor([1]))


def test_unet_on_each_device(device):
    torch.manual_seed(0)
    net = UNet(1, channels=8, levels=2).to(device)
    x = torch.randn(2, 1, 28, 28, device=device)
    out = net(x, torch.tensor([1, 7], device=device))
    assert out.device.type == device.type and out.shape == x.shape
