"""Threads: the runner's default against fixed thread counts, on a quiet machine and under
contention (two runs at once), with ``models/hmm.py`` by default.

    python -m ppl_gen.bench threads [--model models/hmm.py] [--steps 100] [--rounds 3]

Each configuration is a real ``python -m inference.svi`` process; its figure is the run's own
``seconds_per_step`` (training only, the first step left out), the median over rounds. Ratios
are against the best thread count measured in the same invocation (quiet) and against two
``--threads 1`` runs started together (contention).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ppl_gen.bench import kit as benchkit

ROOT = Path(__file__).resolve().parents[2]


def _start(model: str, steps: int, threads: int | None, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "inference.svi", model, "--steps", str(steps), "--no-progress", "--out", str(out),
           "--eval-every", str(steps), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _per_step(procs: list[tuple[subprocess.Popen, Path]]) -> list[float]:
    out = []
    for p, folder in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"a benchmark run failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
        out.append(json.loads((folder / "metrics.json").read_text())["seconds_per_step"])
    return out


def bench(model: str, steps: int = 100, rounds: int = 3, extra: list[str] | None = None,
          counts: list[int] | None = None) -> dict:
    """``counts``: the fixed thread counts to set against the default (default 1, 2 and every core)."""
    extra = extra or []
    cores = os.cpu_count() or 1
    counts = sorted(set(counts or {1, 2, cores}) | {1})
    quiet: dict[str, list[float]] = {"default": [], **{str(n): [] for n in counts}}
    pair: dict[str, list[float]] = {"default": [], **{str(n): [] for n in {1, max(counts)}}}
    with tempfile.TemporaryDirectory() as tmp:
        k = 0
        for _ in range(rounds):  # interleaved: drift in the machine's load hits every configuration alike
            for label in quiet:
                k += 1
                folder = Path(tmp) / f"q{k}"
                quiet[label] += _per_step([(_start(model, steps, None if label == "default" else int(label), folder,
                                                   extra), folder)])
            for label in pair:
                runs = []
                for _ in range(2):
                    k += 1
                    folder = Path(tmp) / f"p{k}"
                    runs.append((_start(model, steps, None if label == "default" else int(label), folder, extra),
                                 folder))
                pair[label].append(statistics.mean(_per_step(runs)))
    q = {k: statistics.median(v) for k, v in quiet.items()}
    c = {k: statistics.median(v) for k, v in pair.items()}
    best = min(v for k, v in q.items() if k != "default")
    return {"model": model, "steps": steps, "rounds": rounds, "cores": cores,
            "quiet_ms_per_step": {k: 1e3 * v for k, v in q.items()},
            "contended_ms_per_step": {k: 1e3 * v for k, v in c.items()},
            "quiet_default_vs_best": q["default"] / best,
            "contended_default_vs_threads1": c["default"] / c["1"],
            "contended_most_threads_vs_threads1": c[str(max(counts))] / c["1"]}


def _table(r: dict) -> str:
    lines = [f"{r['model']}, {r['steps']} steps, median of {r['rounds']} rounds, {r['cores']} cores",
             "| threads | quiet ms/step | two runs at once, ms/step |", "|---|---:|---:|"]
    for k in r["quiet_ms_per_step"]:
        c = r["contended_ms_per_step"].get(k)
        lines.append(f"| {k} | {r['quiet_ms_per_step'][k]:.2f} | {'' if c is None else f'{c:.2f}'} |")
    lines += [f"quiet: default / best thread count = {r['quiet_default_vs_best']:.3f} (target <= 1.10)",
              f"two at once: default / --threads 1 = {r['contended_default_vs_threads1']:.3f} (target <= 1.2)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = benchkit.parser("python -m ppl_gen.bench threads", __doc__)
    p.add_argument("--model", default=str(ROOT / "models" / "hmm.py"), help="model file (default: models/hmm.py)")
    p.add_argument("--steps", type=int, default=100, help="steps per run (default: 100)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, interleaved (default: 3)")
    args = p.parse_args(argv)
    return benchkit.run(args, lambda: bench(args.model, args.steps, args.rounds), _table)


if __name__ == "__main__":
    sys.exit(main())
