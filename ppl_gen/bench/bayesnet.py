"""Exact inference speed on ALARM (Beinlich et al. 1989; 37 nodes, 46 edges).

    python -m ppl_gen.bench bayesnet [--repeats 5] [--threads 1]

All posterior marginals given evidence on 5 variables: ppl_gen's one contraction plus
its gradient (``ppl_gen.exact.bayesnet.posterior``) against pgmpy's variable elimination
(``VariableElimination.query``, one call per unobserved variable), timed in the same process; the
two answers are compared too. The ALARM network is the BIF file that pgmpy ships
(a test-extra dependency); nothing is downloaded.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from ppl_gen.exact import bayesnet as bn
from ppl_gen.bench import kit as benchkit
from ppl_gen.core.errors import UserError

# five observed clinical measurements, in the spirit of ALARM's monitoring use
EVIDENCE = "HRBP=HIGH,CO=LOW,BP=LOW,SAO2=LOW,EXPCO2=LOW"


def alarm_path() -> Path:
    try:
        import pgmpy
    except ImportError:
        raise UserError("the ALARM benchmark reads the BIF file shipped with pgmpy: "
                        'pip install -e ".[test]"') from None
    path = Path(pgmpy.__file__).parent / "utils" / "example_models" / "alarm.bif.gz"
    if not path.is_file():
        raise UserError(f"this pgmpy has no {path.name}; install pgmpy>=0.1.25")
    return path


def bench(repeats: int = 5) -> dict:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # pgmpy's own deprecation notices
    from pgmpy.inference import VariableElimination
    from pgmpy.readwrite import BIFReader

    path = alarm_path()
    net = bn.read_bif(path)
    evidence = net.parse_assignment(EVIDENCE)
    named = {v: net.states[v][s] for v, s in evidence.items()}
    latents = [v for v in net.order if v not in evidence]
    import gzip

    ref = VariableElimination(BIFReader(string=gzip.open(path, "rt").read()).get_model())

    ours_t, theirs_t = [], []
    for _ in range(repeats):  # interleaved, median: the machine is shared and noisy
        t0 = time.perf_counter()
        post = bn.posterior(net, evidence)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        # one query per variable: asking pgmpy for all 32 at once builds their joint table
        theirs = {v: ref.query([v], evidence=named, show_progress=False) for v in latents}
        theirs_t.append(time.perf_counter() - t0)
    diff = 0.0
    for v in latents:
        order = [theirs[v].state_names[v].index(s) for s in net.states[v]]
        diff = max(diff, (post.marginals[v] - torch.as_tensor(theirs[v].values[order])).abs().max().item())
    ours, pg = statistics.median(ours_t), statistics.median(theirs_t)
    return {"network": "alarm", "nodes": len(net.order), "evidence": EVIDENCE, "queried": len(latents),
            "repeats": repeats, "ppl_gen_seconds": ours, "pgmpy_seconds": pg, "pgmpy_over_ppl_gen": pg / ours,
            "max_abs_marginal_difference": diff, "log_evidence": post.log_evidence,
            "threads": torch.get_num_threads()}


def report(r: dict) -> str:
    return "\n".join([
        f"ALARM ({r['nodes']} nodes), evidence {r['evidence']}: all {r['queried']} posterior marginals, "
        f"median of {r['repeats']}",
        f"  ppl_gen (one contraction + gradient): {1e3 * r['ppl_gen_seconds']:.1f} ms",
        f"  pgmpy VariableElimination.query:      {1e3 * r['pgmpy_seconds']:.1f} ms",
        f"  ratio pgmpy / ppl_gen: {r['pgmpy_over_ppl_gen']:.2f}; largest marginal difference "
        f"{r['max_abs_marginal_difference']:.1e}; log P(e) = {r['log_evidence']:.4f}"])


def main(argv=None) -> int:
    p = benchkit.parser("python -m ppl_gen.bench bayesnet", __doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    return benchkit.run(args, lambda: bench(args.repeats), report)


if __name__ == "__main__":
    sys.exit(main())
