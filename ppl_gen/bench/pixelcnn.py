"""PixelCNN training step: the runner's path against a hand-written PyTorch step.

    python -m ppl_gen.bench.pixelcnn [--batch-size 128] [--image-size 8] [--layers 5]
                                     [--channels 16] [--kernel-size 5] [--steps 30]
                                     [--rounds 5] [--device cpu] [--threads N] [--json FILE]

models/pixelcnn.py has no latent variables, so its ELBO is log p(x) and an SVI step is a
maximum-likelihood step: Pyro only traces the model (one ``pyro.module``, one observed
site) and the guide (empty). This times that step three ways on the same network and batch
of random binary images, in the same process:

* hand-written torch   logits = net(x); loss = BCE-with-logits summed; backward; Adam
* runner (default)     ppl_gen.core.train.Trainer with make_elbo("trace"), Pyro's checks off
                       after the first step (what ``python -m inference.svi`` runs)
* runner --jit         the same with JitTrace_ELBO

Methods are timed in interleaved rounds and each reports its median round; the ratio to the
hand-written step is what to read (target: 1.05 or less). Images per second are batch size /
seconds per step; ``--image-size 28`` gives Fashion-MNIST's shape; ``--kernel-size`` is the side
of every masked kernel (mask A and mask B alike).

A second table times sampling ``--samples`` images at once from each explicit-density image
model at its model file's default size (the PixelCNN at the sizes above): the VAE (one
decoder pass), the PixelCNN (one pass per pixel, H W in all) and the VQ-VAE (one pass of
its PixelCNN prior per code cell, then one decoder pass). Weights are as initialized: the
cost of a pass does not depend on their values.
"""

from __future__ import annotations

import statistics
import sys
import time

import pyro
import torch
from torch.nn import functional as F

from ppl_gen.bench import kit
from ppl_gen.core.device import resolve_device
from ppl_gen.core.train import Trainer, make_elbo


def bench_pixelcnn(batch_size=128, image_size=8, layers=5, channels=16, kernel_size=5, steps=30, rounds=5,
                   device="cpu", seed=0) -> dict:
    from models.pixelcnn import Options, PixelCNNModel

    dev = resolve_device(device)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    opts = Options(layers=layers, channels=channels, kernel_size=kernel_size, first_kernel_size=kernel_size)
    pcnn = PixelCNNModel(image_size, image_size, opts, dev)
    # random binary images: a step's cost does not depend on what the pixels show
    x = torch.bernoulli(torch.full((batch_size, image_size * image_size), 0.3, device=dev))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    hand_optim = torch.optim.Adam(pcnn.net.parameters(), lr=1e-3)

    def hand(_t):
        hand_optim.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(pcnn.logits(x), x, reduction="sum")
        loss.backward()
        hand_optim.step()
        return loss.item()

    runner = Trainer(pcnn.model, pcnn.guide, x, make_elbo("trace"), lr=1e-3)
    runner_jit = Trainer(pcnn.model, pcnn.guide, x, make_elbo("trace", jit=True), lr=1e-3)
    # the same objective at the same parameters: Pyro's -ELBO is the hand-written loss
    with torch.no_grad():
        hand_loss = F.binary_cross_entropy_with_logits(pcnn.logits(x), x, reduction="sum").item()
        runner_loss = runner.loss(1).item()
    methods = {"hand-written torch": hand, "runner (default)": runner.step, "runner --jit": runner_jit.step}
    for fn in methods.values():  # warm up: parameters, optimizer state, JIT trace, caches
        for t in range(1, 6):
            fn(t)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            for t in range(steps):
                fn(6 + t)
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
    per_step = {k: statistics.median(v) for k, v in times.items()}
    base = per_step["hand-written torch"]
    return {"benchmark": "pixelcnn", "device": str(dev), "threads": torch.get_num_threads(),
            "image": f"{image_size}x{image_size}", "layers": layers, "channels": channels,
            "kernel_size": kernel_size, "batch_size": batch_size, "steps_per_round": steps, "rounds": rounds,
            "parameters": sum(p.numel() for p in pcnn.net.parameters()),
            "loss_per_image": {"hand-written torch": hand_loss / batch_size, "runner": runner_loss / batch_size},
            "seconds_per_step": per_step,
            "images_per_second": {k: batch_size / v for k, v in per_step.items()},
            "ratio_to_hand_written": {k: v / base for k, v in per_step.items()}}


def bench_sampling(n=64, image_size=8, layers=5, channels=16, kernel_size=5, rounds=3, device="cpu",
                   seed=0) -> dict:
    """Seconds per image to draw n images at once from the VAE, the PixelCNN and the VQ-VAE."""
    from models import pixelcnn, vae, vqvae

    dev = resolve_device(device)
    pyro.set_rng_seed(seed)
    side = image_size
    v = vae.VAE(side * side, vae.Options(), dev)
    p = pixelcnn.PixelCNNModel(side, side, pixelcnn.Options(layers=layers, channels=channels, kernel_size=kernel_size,
                                                            first_kernel_size=kernel_size), dev)
    q = vqvae.VQVAE(side, side, vqvae.Options(), dev)
    like = torch.zeros(1, side * side, device=dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def vae_sample():
        return torch.bernoulli(torch.sigmoid(v.decoder(v.prior(like).sample((n,)))))

    draws = {"VAE (1 decoder pass)": vae_sample,
             f"PixelCNN ({side * side} passes)": lambda: p.sample(n, like),
             f"VQ-VAE ({q.cells} prior passes + 1 decoder pass)": lambda: q.sample_images(n, "learned")}
    times: dict[str, list[float]] = {k: [] for k in draws}
    for fn in draws.values():
        fn()
    for _ in range(rounds):
        for name, fn in draws.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) / n)
    per_image = {k: statistics.median(t) for k, t in times.items()}
    base = per_image["VAE (1 decoder pass)"]
    return {"samples": n, "rounds": rounds, "seconds_per_image": per_image,
            "ratio_to_vae": {k: t / base for k, t in per_image.items()}}


def _table(r: dict) -> str:
    lines = [f"PixelCNN {r['layers']} masked {r['kernel_size']}x{r['kernel_size']} layers x {r['channels']} "
             f"channels ({r['parameters']} parameters), {r['image']} images, batch {r['batch_size']}, "
             f"{r['device']} ({r['threads']} threads), median of {r['rounds']} rounds x {r['steps_per_round']} steps",
             f"{'method':22s} {'ms/step':>9s} {'images/s':>10s} {'ratio':>7s}"]
    for k, v in r["seconds_per_step"].items():
        lines.append(f"{k:22s} {1e3 * v:9.3f} {r['images_per_second'][k]:10.0f} {r['ratio_to_hand_written'][k]:7.3f}")
    s = r["sampling"]
    lines += ["", f"sampling {s['samples']} images at once, median of {s['rounds']} rounds",
              f"{'model':42s} {'ms/image':>9s} {'x VAE':>8s}"]
    for k, v in s["seconds_per_image"].items():
        lines.append(f"{k:42s} {1e3 * v:9.4f} {s['ratio_to_vae'][k]:8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = kit.parser("python -m ppl_gen.bench.pixelcnn", __doc__)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=8, help="side of the square images (28: Fashion-MNIST)")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=64, help="images drawn at once in the sampling table")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    def measure():
        r = bench_pixelcnn(a.batch_size, a.image_size, a.layers, a.channels, a.kernel_size, a.steps, a.rounds,
                           a.device)
        r["sampling"] = bench_sampling(a.samples, a.image_size, a.layers, a.channels, a.kernel_size,
                                       device=a.device)
        return r
    return kit.run(a, measure, _table)


if __name__ == "__main__":
    sys.exit(main())
