"""Speed benchmarks, as ratios against a baseline timed in the same process.

    python -m ppl_gen.bench vae [--batch-size 128] [--x-dim 784] [--hidden-dim 400]
                                [--latent-dim 20] [--steps 100] [--rounds 5] [--device cpu]

Times one SVI step of models/vae.py's VAE four ways, against a hand-written PyTorch step
of the identical networks, batch and single-sample Monte Carlo ELBO:

* runner        the runner's default path (ppl_gen.core.train.Trainer, torch.optim.Adam, Pyro's
                checks on the first step, then the amortized guide's written-out Trace_ELBO:
                Guide.loss, the same value and gradients for the same draws)
* runner, traced ELBO  the same with Pyro's traced Trace_ELBO at every step
* runner --jit  the same with JitTrace_ELBO
* SVI           pyro.infer.SVI + pyro.optim.Adam + Trace_ELBO, checks on (Pyro's defaults)
* SVI, no checks  the same with pyro.enable_validation(False)

The machines are shared and noisy: methods are timed in interleaved rounds and each
reports the median round; the ratio to the hand-written step is what to read.
"""

from __future__ import annotations

import statistics
import sys
import time

import pyro
import pyro.infer
import pyro.optim
import torch
from torch.nn import functional as F

from ppl_gen.bench import kit as benchkit
from ppl_gen.core.device import resolve_device
from ppl_gen.core.train import Trainer, make_elbo


def _hand_written_step(vae, optim):
    """The VAE's ELBO with one reparameterized sample, written directly in torch."""
    def loss(x):
        mu, sigma = vae.encoder(x)
        eps = torch.randn_like(mu)
        z = mu + sigma * eps                                         # reparameterization
        log_px_z = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="none").sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
        return -(log_px_z + log_pz - log_qz).sum()

    def step(x):
        optim.zero_grad(set_to_none=True)
        value = loss(x)
        value.backward()
        optim.step()
        return value.item()
    return step


def bench_vae(batch_size=128, x_dim=784, hidden_dim=400, latent_dim=20, steps=100, rounds=5,
              device="cpu", seed=0) -> dict:
    from models.vae import VAE, Options

    dev = resolve_device(device)
    pyro.set_rng_seed(seed)
    vae = VAE(x_dim, Options(latent_dim=latent_dim, hidden_dim=hidden_dim), dev)
    # random binary images: the step's cost does not depend on what the pixels show
    x = torch.bernoulli(torch.full((batch_size, x_dim), 0.3, device=dev))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    pyro.clear_param_store()
    hand_optim = torch.optim.Adam(list(vae.encoder.parameters()) + list(vae.decoder.parameters()), lr=1e-3)
    hand = _hand_written_step(vae, hand_optim)
    # the CLI's path: the amortized guide's written-out ELBO after the first, traced step (Guide.loss)
    runner = Trainer(vae.model, vae.amortized, x, make_elbo("trace"), lr=1e-3,
                     fused_loss=vae.guides()["amortized"].loss)
    traced = Trainer(vae.model, vae.amortized, x, make_elbo("trace"), lr=1e-3)
    runner_jit = Trainer(vae.model, vae.amortized, x, make_elbo("trace", jit=True), lr=1e-3)
    svi = pyro.infer.SVI(vae.model, vae.amortized, pyro.optim.Adam({"lr": 1e-3}), make_elbo("trace"))

    def svi_step(validate):
        def step(_):
            with pyro.validation_enabled(validate):
                return svi.step(x)
        return step

    methods = {
        "hand-written torch": hand,
        "runner (default)": lambda _: runner.step(1),
        "runner, traced ELBO": lambda _: traced.step(1),
        "runner --jit": lambda _: runner_jit.step(1),
        "pyro SVI (checks on)": svi_step(True),
        "pyro SVI (checks off)": svi_step(False),
    }
    for fn in methods.values():  # warm up: first calls create parameters, compile, fill caches
        for _ in range(10):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn(x)
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
    per_step = {k: statistics.median(v) for k, v in times.items()}
    base = per_step["hand-written torch"]
    return {"benchmark": "vae", "device": str(dev), "threads": torch.get_num_threads(),
            "shape": f"{x_dim}-{hidden_dim}-{latent_dim}", "batch_size": batch_size,
            "steps_per_round": steps, "rounds": rounds,
            "seconds_per_step": per_step, "ratio_to_hand_written": {k: v / base for k, v in per_step.items()}}


def _table(result: dict) -> str:
    lines = [f"VAE {result['shape']}, batch {result['batch_size']}, {result['device']} "
             f"({result['threads']} threads), median of {result['rounds']} rounds x {result['steps_per_round']} steps",
             f"{'method':24s} {'ms/step':>9s} {'ratio':>7s}"]
    for k, v in result["seconds_per_step"].items():
        lines.append(f"{k:24s} {1e3 * v:9.3f} {result['ratio_to_hand_written'][k]:7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = benchkit.parser("python -m ppl_gen.bench vae", __doc__)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--x-dim", type=int, default=784)
    p.add_argument("--hidden-dim", type=int, default=400)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--steps", type=int, default=100, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    return benchkit.run(args, lambda: bench_vae(args.batch_size, args.x_dim, args.hidden_dim, args.latent_dim,
                                                args.steps, args.rounds, args.device), _table)


if __name__ == "__main__":
    sys.exit(main())
