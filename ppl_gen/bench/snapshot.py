"""Snapshot: every model file's default run with a tiny budget, its metrics.json collected, and
two snapshots compared number by number: the check that a change to the pipeline changed no
result.

    python -m ppl_gen.bench snapshot --out runs/snap-before [--root OTHER_CHECKOUT]
    python -m ppl_gen.bench snapshot --out runs/snap-after --against runs/snap-before/all.json

Timings (seconds, startup_seconds, seconds_per_step ...) are left out of the comparison; every
other number must agree to ``--rtol`` (default 1e-6).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from ppl_gen.bench import kit as benchkit

ROOT = Path(__file__).resolve().parents[2]
FILES = ["bayes_net", "char_rnn", "gaussian_net", "hmm", "lda", "markov_chain", "normal_mean", "vae"]
# per-file flags that keep a tiny run tiny (the same as the docs test's)
BUDGET = {"vae": ["--ll-samples", "5", "--ll-points", "20", "--gap-points", "10", "--qstar-steps", "5",
                  "--local-steps", "5", "--test-points", "30"],
          "lda": ["--infer-docs", "20", "--local-steps", "20"]}
TIMING = ("seconds", "startup", "per_step", "ms_per", "infer_seconds", "sampling_seconds", "train_seconds")


def snapshot(out: Path, root: Path = ROOT, steps: int = 20, files=FILES) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in files:
        folder = out / name
        cmd = [sys.executable, "-m", "inference.svi", str(root / "models" / f"{name}.py"), "--steps", str(steps),
               "--eval-every", str(max(steps // 2, 1)), "--no-progress", "--threads", "1", "--out", str(folder),
               *BUDGET.get(name, [])]
        if folder.exists():
            cmd.append("--overwrite")
        p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if p.returncode:
            result[name] = {"failed": p.stderr.strip().splitlines()[-1:]}
            continue
        result[name] = json.loads((folder / "metrics.json").read_text())
    (out / "all.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _numbers(prefix: str, v, out: dict):
    if isinstance(v, bool) or v is None:
        return
    if isinstance(v, (int, float)):
        out[prefix] = float(v)
    elif isinstance(v, dict):
        for k, w in v.items():
            _numbers(f"{prefix}.{k}", w, out)
    elif isinstance(v, list):
        for i, w in enumerate(v):
            _numbers(f"{prefix}[{i}]", w, out)


def compare(a: dict, b: dict, rtol: float = 1e-6) -> list[str]:
    """The numbers that differ between two snapshots (timings left out)."""
    diffs = []
    for name in sorted(set(a) | set(b)):
        na, nb = {}, {}
        _numbers(name, a.get(name, {}), na)
        _numbers(name, b.get(name, {}), nb)
        for k in sorted(set(na) | set(nb)):
            if any(t in k for t in TIMING):
                continue
            x, y = na.get(k), nb.get(k)
            if x is None and y is not None and k not in na:
                continue  # a number the older snapshot did not report yet: new, not changed
            if x is None or y is None:
                diffs.append(f"{k}: {x} vs {y}")
            elif not math.isclose(x, y, rel_tol=rtol, abs_tol=rtol):
                diffs.append(f"{k}: {x!r} vs {y!r}")
    return diffs


def main(argv=None) -> int:
    p = benchkit.parser("python -m ppl_gen.bench snapshot", __doc__)
    p.add_argument("--out", required=True, help="folder for the runs and all.json")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose model files and runner to run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--against", help="an earlier snapshot's all.json to compare with")
    p.add_argument("--rtol", type=float, default=1e-6)
    args = p.parse_args(argv)

    def measure():
        snap = snapshot(Path(args.out), Path(args.root), args.steps)
        diffs = compare(json.loads(Path(args.against).read_text()), snap, args.rtol) if args.against else None
        return {"files": sorted(snap), "failed": [k for k, v in snap.items() if "failed" in v], "differences": diffs}

    def report(r):
        lines = [f"{len(r['files'])} model files; failed: {', '.join(r['failed']) or 'none'}"]
        if r["differences"] is not None:
            lines.append(f"{len(r['differences'])} numbers differ" + (":" if r["differences"] else ""))
            lines += [f"  {d}" for d in r["differences"]]
        return "\n".join(lines)
    return benchkit.run(args, measure, report)


if __name__ == "__main__":
    sys.exit(main())
