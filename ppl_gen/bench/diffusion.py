"""The diffusion model's training step through the runner against the same step in plain PyTorch.

    python -m ppl_gen.bench.diffusion [--image-size 8] [--batch-size 128] [--channels 16] [--T 100]
                                      [--steps 10] [--rounds 15] [--device cpu] [--jit]

One step of models/diffusion.py with its default options (cosine schedule, the U-Net
predicting x_0, sigma_t^2 = beta~_t; the bound's one-t estimate: a uniform t per image,
x_t ~ q(x_t | x_0), the closed-form KL T * L_{t-1} or the decoder term T * L_0, and the prior
term L_T), timed two ways on the same U-Net, batch and Adam:

* runner        ppl_gen's training path: ``Trainer`` with ``make_elbo("meanfield")``, the model
                file's model and guide (the runner's default for this file)
* hand-written  the same loss written directly in torch, no Pyro

With the same seed both draw the same t and x_t (Pyro's guide draws u, then x_t, first), so
their losses agree to rounding; the benchmark reports that difference as a check that the two
steps compute the same thing. ``--jit`` adds the runner with JitTraceMeanField_ELBO. Also:
images per second for each path and the seconds to draw 64 images by ancestral sampling (T
network calls). ``--image-size 28`` is the Fashion-MNIST shape (random pixels: a step's cost
does not depend on what they show).

Shared machines are noisy: the paths are timed in interleaved rounds and each reports its
median round; read the ratio.
"""

from __future__ import annotations

import statistics
import sys
import time

import pyro
import torch

from ppl_gen.bench import kit
from ppl_gen.core.train import Trainer, make_elbo


def hand_written_loss(d, x: torch.Tensor) -> torch.Tensor:
    """-(the one-t estimate of the ELBO), summed over the batch, in torch alone.

    Draws in the order Pyro's guide draws (u, then x_t), so at the same seed the runner's
    mean-field loss and this one see the same t and x_t."""
    s, T = d.s, d.T
    y0 = 2 * x - 1
    t = (torch.rand(x.shape[0], device=x.device, dtype=x.dtype) * T).long().clamp(max=T - 1) + 1
    ab = s.alpha_bar[t][:, None]
    xt = ab.sqrt() * y0 + (1 - ab).sqrt() * torch.randn_like(y0)
    # the x0 form (the model file's default): the U-Net predicts x_0 for binary pixels
    x0_hat = torch.tanh(ab.sqrt() * xt / (1 - ab) + d.net(xt, t))
    eps_hat = (xt - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    beta, alpha, ab_prev = s.beta[t][:, None], s.alpha[t][:, None], s.alpha_bar[t - 1][:, None]
    mean_p = (xt - beta / (1 - ab).sqrt() * eps_hat) / alpha.sqrt()
    later = t > 1
    # the KL of step t >= 2: q(x_{t-1} | x_t, x_0) = N(mean_q, var_q) against N(mean_p, var_p)
    mean_q = (ab_prev.sqrt() * beta / (1 - ab)) * y0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * xt
    var_q = torch.where(later[:, None], s.beta_tilde[t][:, None], torch.ones_like(beta))
    var_p = torch.where(later[:, None], d.p_var(t), torch.ones_like(beta))
    kl = 0.5 * (torch.log(var_p / var_q) + var_q / var_p + (mean_q - mean_p) ** 2 / var_p - 1).sum(-1)
    # step 1: the Bernoulli decoder P(x_0 = 1 | x_1) = Phi(mu / sigma_1)
    z = mean_p / s.beta[1].sqrt()
    log_px = (x * torch.special.log_ndtr(z) + (1 - x) * torch.special.log_ndtr(-z)).sum(-1)
    ab_T = s.alpha_bar[T]
    prior = 0.5 * (ab_T * y0 ** 2 - ab_T - torch.log1p(-ab_T)).sum(-1)
    return (torch.where(later, T * kl, -T * log_px) + prior).sum()


def bench_diffusion(image_size=8, batch_size=128, channels=16, T=100, steps=10, rounds=15, device="cpu",
                    jit=False, seed=0, sample_images=64) -> dict:
    from models.diffusion import Diffusion, ImageEps, Schedule

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    net = ImageEps((image_size, image_size), channels, 2).to(dev)
    d = Diffusion(net, Schedule.named("cosine", T, dev), levels=2, variance="posterior", predict="x0")
    x = torch.bernoulli(torch.full((batch_size, image_size * image_size), 0.3, device=dev))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # the same loss at the same draws: the two paths compute one objective
    elbo = make_elbo("meanfield")
    with torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(seed + 1)
        runner_value = elbo.loss(d.model, d.guide, x)
        torch.manual_seed(seed + 1)
        hand_value = hand_written_loss(d, x).item()

    optim = torch.optim.Adam(net.parameters(), lr=1e-4)

    def hand(_):
        optim.zero_grad(set_to_none=True)
        loss = hand_written_loss(d, x)
        loss.backward()
        optim.step()
        return loss.item()

    trainers = {"runner (meanfield)": Trainer(d.model, d.guide, x, elbo, lr=1e-4)}
    if jit:
        trainers["runner --jit"] = Trainer(d.model, d.guide, x, make_elbo("meanfield", jit=True), lr=1e-4)
    methods = {"hand-written torch": hand, **{k: (lambda _, tr=tr: tr.step(1)) for k, tr in trainers.items()}}
    for fn in methods.values():  # warm-up: parameters, optimizer state, caches, JIT traces
        for _ in range(3):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn(x)
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    per_step = {k: statistics.median(v) for k, v in times.items()}
    base = per_step["hand-written torch"]

    d.sample(2, x)  # warm-up
    sync()
    start = time.perf_counter()
    d.sample(sample_images, x)
    sync()
    sample_seconds = time.perf_counter() - start
    return {"benchmark": "diffusion", "device": str(dev), "threads": torch.get_num_threads(),
            "image_size": image_size, "batch_size": batch_size, "channels": channels, "T": T,
            "n_parameters": sum(p.numel() for p in net.parameters()), "steps_per_round": steps, "rounds": rounds,
            "loss_runner": runner_value, "loss_hand_written": hand_value,
            "seconds_per_step": per_step, "ratio_to_hand_written": {k: v / base for k, v in per_step.items()},
            "images_per_second": {k: batch_size / v for k, v in per_step.items()},
            "sample_images": sample_images, "sample_seconds": sample_seconds}


def _table(r: dict) -> str:
    lines = [f"diffusion step: {r['image_size']}x{r['image_size']} images, U-Net width {r['channels']} "
             f"({r['n_parameters']} parameters), batch {r['batch_size']}, T = {r['T']}, {r['device']} "
             f"({r['threads']} threads), median of {r['rounds']} rounds x {r['steps_per_round']} steps",
             f"same draws, same loss: runner {r['loss_runner']:.4f}, hand-written {r['loss_hand_written']:.4f}",
             f"{'path':22s} {'ms/step':>9s} {'ratio':>7s} {'images/s':>10s}"]
    for k, v in r["seconds_per_step"].items():
        lines.append(f"{k:22s} {1e3 * v:9.2f} {r['ratio_to_hand_written'][k]:7.3f} {r['images_per_second'][k]:10.0f}")
    lines.append(f"ancestral sampling: {r['sample_images']} images in {r['sample_seconds']:.2f} s "
                 f"({r['sample_seconds'] / r['sample_images']:.4f} s/image)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = kit.parser("python -m ppl_gen.bench.diffusion", __doc__)
    p.add_argument("--image-size", type=int, default=8, help="8: the digits; 28: Fashion-MNIST's shape")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--channels", type=int, default=16, help="U-Net width at full resolution")
    p.add_argument("--T", type=int, default=100, help="diffusion steps (sampling calls the U-Net T times)")
    p.add_argument("--steps", type=int, default=10, help="steps per path per round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--jit", action="store_true", help="also time the runner with --jit")
    p.add_argument("--sample-images", type=int, default=64)
    args = p.parse_args(argv)
    return kit.run(args, lambda: bench_diffusion(args.image_size, args.batch_size, args.channels, args.T, args.steps,
                                                 args.rounds, args.device, args.jit, 0, args.sample_images), _table)


if __name__ == "__main__":
    sys.exit(main())
