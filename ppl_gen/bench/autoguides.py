"""Pyro's automatic guides against hand-written guides of the same family, per SVI step.

    python -m ppl_gen.bench autoguides [--steps 200] [--rounds 5] [--threads 1]

On models/gaussian_net.py (a linear-Gaussian network whose file writes its mean-field and
full-rank Gaussian guides by hand), every guide is set up by the runner (``RunSetup.build``) and
stepped by the runner's trainer, in interleaved rounds; each reports its median round. The ratios
to read: AutoNormal against the hand-written ``mean_field`` (the same family, a diagonal Normal),
AutoMultivariateNormal against ``full_rank`` (a full-covariance Normal); the others (low rank,
an inverse autoregressive flow, a point mass, the Laplace approximation's MAP phase) against
``mean_field``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from ppl_gen.bench import kit as benchkit

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "gaussian_net.py")
# guide -> the hand-written guide of its family, the baseline of its ratio
PAIRS = {"mean_field": "mean_field", "full_rank": "full_rank", "AutoNormal": "mean_field",
         "AutoMultivariateNormal": "full_rank", "AutoLowRankMultivariateNormal": "mean_field",
         "AutoIAFNormal": "mean_field", "AutoDelta": "mean_field", "AutoLaplaceApproximation": "mean_field"}


def bench(steps: int = 200, rounds: int = 5, seed: int = 0) -> dict:
    import pyro
    import torch

    from ppl_gen.backends.pyro_backend import PyroBackend
    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.settings import RunConfig

    threads = torch.get_num_threads()
    trainers, stores = {}, {}
    for name in PAIRS:  # each guide its own parameter store, swapped in for its steps
        cfg = RunConfig(model_file=MODEL, guide=name, seed=seed, steps=steps, progress=False, threads=threads)
        setup = RunSetup.build(cfg)
        trainers[name] = PyroBackend().trainer(setup)
        for t in range(1, 11):  # warm up: parameters, Pyro's first-step checks, caches
            trainers[name].step(t)
        stores[name] = pyro.get_param_store().get_state()
    times: dict[str, list[float]] = {k: [] for k in PAIRS}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            pyro.get_param_store().set_state(stores[name])
            t0 = time.perf_counter()
            for t in range(11, 11 + steps):
                trainer.step(t)
            times[name].append((time.perf_counter() - t0) / steps)
            stores[name] = pyro.get_param_store().get_state()
    per_step = {k: statistics.median(v) for k, v in times.items()}
    return {"benchmark": "autoguides", "model": "models/gaussian_net.py", "threads": threads, "steps": steps,
            "rounds": rounds, "seconds_per_step": per_step, "baseline": PAIRS,
            "ratio_to_hand_written": {k: per_step[k] / per_step[b] for k, b in PAIRS.items()}}


def _table(r: dict) -> str:
    lines = [f"{r['model']}, {r['threads']} thread(s), median of {r['rounds']} rounds x {r['steps']} steps",
             f"{'guide':32s} {'ms/step':>8s}  ratio to the hand-written guide"]
    for k, v in r["seconds_per_step"].items():
        lines.append(f"{k:32s} {1e3 * v:8.3f}  {r['ratio_to_hand_written'][k]:.2f} (vs {r['baseline'][k]})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = benchkit.parser("python -m ppl_gen.bench autoguides", __doc__)
    p.add_argument("--steps", type=int, default=200, help="steps per guide per round (default: 200)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    args = p.parse_args(argv)
    return benchkit.run(args, lambda: bench(args.steps, args.rounds), _table)


if __name__ == "__main__":
    sys.exit(main())
