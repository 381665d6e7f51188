"""Data-parallel SVI: steps and samples per second against the number of ranks.

    python -m ppl_gen.bench distributed [--ranks 1 2] [--steps 100] [--rounds 1] [--models vae vae-explicit lda] [--out DIR]

Each configuration is a real ``torchrun --nproc-per-node W -m inference.svi FILE`` (gloo on the
CPU; ``--device cuda`` puts one rank on each GPU); its figure is the run's own
``seconds_per_step`` (rank 0's median step, the first step left out, which waits for every rank
at each step's collectives). Samples per second = global batch size / seconds per step: the
global batch is the same for every W, so the two columns move together. On a machine with
fewer cores than ranks times threads, more ranks share the same cores: the figure then shows
what splitting costs (collectives, one process per rank), not a speed-up.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ppl_gen.bench import kit as benchkit
from ppl_gen.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

# the model files' own defaults, with a small budget for the evaluation that follows training
MODELS = {
    "vae": ["models/vae.py", "--guide", "amortized", "--batch-size", "128", "--ll-samples", "5", "--ll-points",
            "20", "--gap-points", "0", "--test-points", "50", "--diagnostic-draws", "20", "--eval-particles", "2"],
    "vae-explicit": ["models/vae.py", "--guide", "explicit", "--batch-size", "128", "--ll-samples", "5",
                     "--ll-points", "20", "--gap-points", "0", "--local-steps", "5", "--test-points", "50",
                     "--diagnostic-draws", "20", "--eval-particles", "2"],
    "lda": ["models/lda.py", "--data", "synthetic", "--guide", "explicit", "--local-update", "adam", "--batch-size",
            "64", "--infer-docs", "20", "--local-steps", "20", "--diagnostic-draws", "20", "--eval-particles", "2"],
}


def command(model: str, ranks: int, steps: int, out: Path, device: str) -> list[str]:
    return ["torchrun", "--nproc-per-node", str(ranks), "-m", "inference.svi", *MODELS[model], "--steps", str(steps),
            "--eval-every", str(steps), "--device", device, "--no-progress", "--out", str(out)]


def measure_one(model: str, ranks: int, steps: int, out: Path, device: str) -> dict:
    cmd = command(model, ranks, steps, out, device)
    # torchrun itself: `python -m torch.distributed.run` is the same program, found without PATH
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode:
        last = [line for line in r.stderr.splitlines() if line.startswith("error:")] or r.stderr.splitlines()[-1:]
        raise UserError(f"{shlex.join(cmd)} failed: {last[0] if last else r.returncode}")
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    per_step, batch = metrics["seconds_per_step"], config["batch_size_used"]
    return {"model": model, "ranks": ranks, "world_size": config["world_size"], "steps": steps, "batch_size": batch,
            "seconds_per_step": per_step, "steps_per_second": 1 / per_step, "samples_per_second": batch / per_step,
            "startup_seconds": metrics["startup_seconds"], "device": metrics["device"],
            "command": shlex.join(command(model, ranks, steps, Path("OUT"), device))}


def measure(models: list[str], ranks: list[int], steps: int, out: Path | None, device: str, rounds: int = 1) -> dict:
    """Every (model, ranks) once per round, interleaved, so that drift in a shared machine's load
    hits every configuration alike; the figure is the median over rounds."""
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = out / "runs" if out else Path(tmp)
        for _ in range(rounds):
            for model in models:
                for w in ranks:
                    folder = root / f"{model}-{w}"
                    if folder.exists():  # the previous round's, or an earlier invocation's
                        shutil.rmtree(folder)
                    runs.setdefault((model, w), []).append(measure_one(model, w, steps, folder, device))
    rows = []
    for (model, w), done in runs.items():
        row = sorted(done, key=lambda r: r["seconds_per_step"])[len(done) // 2]  # the median round
        rows.append(dict(row, rounds=[r["seconds_per_step"] for r in done]))
    for row in rows:  # each against the same model's run on the fewest ranks
        base = next(r for r in rows if r["model"] == row["model"] and r["ranks"] == min(ranks))
        row["speedup"] = row["steps_per_second"] / base["steps_per_second"]
    return {"rows": rows, "cpu_count": os.cpu_count(), "steps": steps, "rounds": rounds}


def report(result: dict) -> str:
    lines = [f"data-parallel SVI, {result['steps']} steps each, median of {result['rounds']} round(s), "
             f"{result['cpu_count']} CPU cores",
             f"{'model':<13}{'ranks':>6}{'batch':>7}{'ms/step':>10}{'steps/s':>10}{'samples/s':>11}{'vs 1':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<13}{r['ranks']:>6}{r['batch_size']:>7}{1e3 * r['seconds_per_step']:>10.2f}"
                     f"{r['steps_per_second']:>10.1f}{r['samples_per_second']:>11.0f}{r['speedup']:>7.2f}")
    lines.append("commands (OUT: the run folder):")
    lines += [f"  {r['command']}" for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = benchkit.parser("python -m ppl_gen.bench distributed", __doc__)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run (default: 1 2)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run (default: 100)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   help=f"which runs (default: {' '.join(MODELS)})")
    p.add_argument("--rounds", type=int, default=1, help="runs of each configuration, interleaved; the median "
                   "is reported (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--out", help="folder for distributed.json and the run folders")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None

    def run():
        result = measure(args.models, args.ranks, args.steps, out, args.device, args.rounds)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
        return result
    return benchkit.run(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
