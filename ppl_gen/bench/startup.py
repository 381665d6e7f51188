"""Start-up: the wall time of a 1-step run of the README's model file against ``import pyro``
alone, both as fresh processes on the same machine, interleaved.

    python -m ppl_gen.bench startup [--rounds 5]

The difference is what the runner adds to Pyro's own import: the library's imports, the data,
one step, the evaluation, the run folder (config, trace, checkpoint, metrics, elbo.png,
posterior.nc). Target: at most 1.5 s.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ppl_gen.bench import kit as benchkit

ROOT = Path(__file__).resolve().parents[2]


def _wall(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t


def bench(rounds: int = 5) -> dict:
    code = re.search(r"```python\n# my_model\.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    pyro_only, run = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "my_model.py").write_text(code)
        for k in range(rounds):
            pyro_only.append(_wall([sys.executable, "-c", "import pyro"], tmp))
            run.append(_wall([sys.executable, "-m", "inference.svi", "my_model.py", "--steps", "1", "--no-progress",
                              "--out", str(tmp / f"r{k}")], tmp))
    a, b = statistics.median(pyro_only), statistics.median(run)
    return {"rounds": rounds, "import_pyro_seconds": a, "one_step_run_seconds": b, "beyond_import_pyro": b - a}


def _table(r: dict) -> str:
    return (f"median of {r['rounds']} fresh processes each\n"
            f"  python -c 'import pyro'                          {r['import_pyro_seconds']:.2f} s\n"
            f"  python -m inference.svi my_model.py --steps 1    {r['one_step_run_seconds']:.2f} s\n"
            f"  beyond import pyro                               {r['beyond_import_pyro']:.2f} s (target <= 1.5)")


def main(argv=None) -> int:
    p = benchkit.parser("python -m ppl_gen.bench startup", __doc__)
    p.add_argument("--rounds", type=int, default=5, help="processes of each kind, interleaved (default: 5)")
    args = p.parse_args(argv)
    return benchkit.run(args, lambda: bench(args.rounds), _table)


if __name__ == "__main__":
    sys.exit(main())
