"""Time per SVI step on each backend: the same model file, data, batch and starting point.

    python -m ppl_gen.bench backends                      # every model file with a NumPyro twin
    python -m ppl_gen.bench backends models/vae.py --steps 200 --rounds 5 --threads 1

For each model file: the Pyro runner's step (``ppl_gen.core.train.Trainer``, what
``inference.svi`` runs), NumPyro's JIT-compiled ``svi.update`` (``--backend numpyro``;
Phan et al. 2019), and for the VAE a hand-written PyTorch step (``ppl_gen.bench.vae``'s) as the
baseline. Timed in one process, rounds interleaved, median over rounds, after warm-up
steps (JIT compilation is excluded here; the run folder's ``seconds`` include it). Speed is
reported as ratios against the baseline, never asserted in a test.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (model file, model options, --data, batch size): each file's own defaults, small data
CASES = {
    "vae": ("models/vae.py", {}, None, 128),
    "vae-784": ("models/vae.py", {}, "random-784", 128),
    "conjugate": ("tests/inference/conjugate_model.py", {}, None, None),
    "gaussian_net": ("models/gaussian_net.py", {}, None, None),
    "markov_chain": ("models/markov_chain.py", {}, "sample", None),
    "bayes_net": ("models/bayes_net.py", {"learn_from": str(ROOT / "models/networks/lecture_500.csv")}, None, None),
    "char_rnn": ("models/char_rnn.py", {}, None, 32),
    "hmm": ("models/hmm.py", {}, None, None),
    "normal_mean": ("models/normal_mean.py", {}, None, None),
    # explicit guide, E-step local update (the defaults) on a small synthetic corpus, full batch
    "lda": ("models/lda.py", {"docs": 200, "vocab": 50, "topics": 3, "words": 40}, "synthetic", None),
}


def _random_784(n: int = 1024, seed: int = 0):
    """MNIST-sized binary vectors (the step's cost does not depend on what the pixels show)."""
    import torch

    from ppl_gen.core.dataset import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset(torch.bernoulli(torch.full((n, 784), 0.3), generator=g), None, name="random-784")


def bench_case(name: str, steps: int = 100, rounds: int = 5, seed: int = 0) -> dict:
    import pyro
    import torch

    from ppl_gen.backends import numpyro_backend as nb
    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.core.settings import RunConfig
    from ppl_gen.core.train import Trainer, make_elbo

    path, opts, data_spec, batch = CASES[name]
    mf = load_model_file(ROOT / path)
    elbo = mf.defaults.get("elbo", "trace")
    cfg = RunConfig(model_file=str(mf.path), data=None if data_spec == "random-784" else data_spec, seed=seed,
                    batch_size=batch, elbo=elbo, device="cpu", threads=torch.get_num_threads(), options=dict(opts))
    setup = RunSetup.build(cfg, mf, dataset=_random_784() if data_spec == "random-784" else None)
    spec, dataset, options, guide_name = setup.spec, setup.dataset, setup.options, setup.guide_name
    runner = Trainer(spec.model, setup.guide.fn, dataset.train, make_elbo(elbo), lr=1e-3,
                     batch_size=batch, seed=seed)
    runner.init_params()
    twin = nb.load_twin(mf, options, dataset)
    numpyro = nb.NumpyroTrainer(twin.model, twin.guides[guide_name], nb.to_jax(dataset.train), runner.schedule,
                                nb.twin_elbo(twin, elbo), 1e-3, seed, nb.pyro_params())
    methods = {"pyro runner": runner.step, "numpyro jit": numpyro.step}
    if name.startswith("vae"):
        from ppl_gen.bench.vae import _hand_written_step

        vae = spec.model.__self__
        hand_optim = torch.optim.Adam(list(vae.encoder.parameters()) + list(vae.decoder.parameters()), lr=1e-3)
        hand = _hand_written_step(vae, hand_optim)
        x = dataset.train

        def hand_step(t):
            idx = runner.schedule(t)
            return hand(x if idx is None else x[idx])
        methods = {"hand-written torch": hand_step, **methods}
    t = 0
    for fn in methods.values():  # warm-up: parameters, JIT compilation, caches
        for k in range(10):
            fn(k + 1)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for key, fn in methods.items():
            t0 = time.perf_counter()
            for k in range(steps):
                fn(t + k + 1)
            times[key].append((time.perf_counter() - t0) / steps)
        t += steps
    per_step = {k: statistics.median(v) for k, v in times.items()}
    base_name = next(iter(methods))
    return {"case": name, "model_file": path, "guide": guide_name, "elbo": elbo,
            "batch": runner.schedule.batch_size, "n_train": len(dataset.train),
            "threads": torch.get_num_threads(), "steps_per_round": steps, "rounds": rounds,
            "baseline": base_name, "seconds_per_step": per_step,
            "ratio_to_baseline": {k: v / per_step[base_name] for k, v in per_step.items()}}


def table(results: list[dict]) -> str:
    lines = ["| model file | guide | batch | hand-written torch | Pyro runner | NumPyro JIT | Pyro / NumPyro |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["seconds_per_step"]
        ms = lambda k: f"{1e3 * s[k]:.3f} ms" if k in s else "n/a"  # noqa: E731
        lines.append(f"| {r['case']} ({r['model_file']}) | {r['guide']} | {r['batch']} | {ms('hand-written torch')} | "
                     f"{ms('pyro runner')} | {ms('numpyro jit')} | {s['pyro runner'] / s['numpyro jit']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ppl_gen.bench import kit as benchkit
    from ppl_gen.core.errors import UserError

    p = benchkit.parser("python -m ppl_gen.bench backends", __doc__)
    p.add_argument("cases", nargs="*", help=f"which: {', '.join(CASES)} (default: all)")
    p.add_argument("--steps", type=int, default=100, help="steps per round (default: 100)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported (default: 5)")
    args = p.parse_args(argv)

    def measure():
        from ppl_gen.backends.numpyro_backend import require_numpyro

        require_numpyro()
        unknown = [c for c in args.cases if c not in CASES]
        if unknown:
            raise UserError(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
        return [bench_case(c, args.steps, args.rounds) for c in (args.cases or list(CASES))]
    return benchkit.run(args, measure, table)


if __name__ == "__main__":
    sys.exit(main())
