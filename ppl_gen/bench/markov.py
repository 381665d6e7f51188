"""The Markov assumption against full history: held-out perplexity of order-1..k chains
and of the character RNN, on the same lines and the same split, in one table.

    python -m ppl_gen.bench markov [--max-order 5] [--alpha 0.1] [--rnn RUN_DIR ...]

Each chain is scored with its exact conjugate posterior predictive (the point SVI
converges to; ``models/markov_chain.py``'s tests hold SVI to it), so the table needs
no training runs for the chains. RNN rows are read from run folders of
``python -m inference.svi models/char_rnn.py`` (their metrics.json).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ppl_gen.core.errors import UserError


def main(argv=None) -> int:
    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.core.settings import RunConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-order", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--data", default=None, help="text file (default: the Reuters headlines)")
    p.add_argument("--rnn", nargs="*", default=[], help="run folders of models/char_rnn.py")
    a = p.parse_args(argv)
    try:
        mf = load_model_file(Path(__file__).resolve().parents[2] / "models" / "markov_chain.py")
        rows = []
        for k in range(1, a.max_order + 1):
            setup = RunSetup.build(RunConfig(model_file=str(mf.path), data=a.data, device="cpu",
                                             options={"order": k, "alpha": a.alpha}), mf)
            ds, chain = setup.dataset, setup.spec.model.__self__
            post = chain.exact_posterior(ds.train)
            mean = post / post.sum(-1, keepdim=True)
            ll = chain.log_likelihood_per_symbol(ds.test, mean)
            rows.append((f"Markov chain, order {k} (alpha {a.alpha})", chain.R * (chain.V - 1),
                         chain.log_likelihood_per_symbol(ds.train, mean), ll))
        for run in a.rnn:
            m = json.loads((Path(run) / "metrics.json").read_text())
            cfg = json.loads((Path(run) / "config.json").read_text())
            o = cfg["settings"]["options"]
            rows.append((f"{o['cell'].upper()} {o['hidden']} ({cfg['settings']['steps']} steps)", m["parameters"],
                         m["train_log_likelihood_per_symbol"], m["test_log_likelihood_per_symbol"]))
    except (UserError, OSError, KeyError) as e:
        print(f"error: {e}")
        return 2
    print("| model | free parameters | train log-lik / symbol | held-out log-lik / symbol | held-out perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, n, tr, te in rows:
        print(f"| {name} | {n:,} | {tr:.3f} | {te:.3f} | {math.exp(-te):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
