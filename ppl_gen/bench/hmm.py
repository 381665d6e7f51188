"""Benchmark: the forward pass (log-likelihood) of 1,000 sequences of length 100 with K = 10.

    python -m ppl_gen.bench hmm [--device cuda] [--repeats 5]

Ours (``ppl_gen.exact.hmm.forward``, all sequences in one batch) against hmmlearn's
``CategoricalHMM.score`` (C loops over each sequence) on the same parameters and
data, in the same process; prints the time of each and their ratio, and checks the
two log-likelihoods agree.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ppl_gen.exact import hmm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=1000)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--states", type=int, default=10)
    p.add_argument("--symbols", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    K, V, n, T = a.states, a.symbols, a.sequences, a.length
    pi = torch.rand(K, generator=g, dtype=torch.float64).softmax(0)
    A = (3 * torch.rand(K, K, generator=g, dtype=torch.float64)).softmax(1)
    B = (3 * torch.rand(K, V, generator=g, dtype=torch.float64)).softmax(1)
    x = torch.randint(0, V, (n, T), generator=g)
    dev = torch.device(a.device)

    def ours():
        xs = x.to(dev)
        ll = hmm.forward(pi.log().to(dev), A.log().to(dev), B.log().T.to(dev)[xs])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return ll.sum().item()

    def best(fn):
        fn()  # warm-up
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t)
        return min(times), value

    t_ours, ll_ours = best(ours)
    print(f"{n} sequences x {T} steps, K={K}, V={V}; best of {a.repeats}; torch threads {torch.get_num_threads()}")
    print(f"  ppl_gen.exact.hmm.forward ({dev}): {t_ours * 1e3:8.1f} ms   log p = {ll_ours:.4f}")
    try:
        from hmmlearn.hmm import CategoricalHMM
    except ImportError:
        print("  hmmlearn is not installed (pip install hmmlearn): no baseline")
        return 0
    ref = CategoricalHMM(n_components=K, init_params="", params="")
    ref.startprob_, ref.transmat_, ref.emissionprob_, ref.n_features = pi.numpy(), A.numpy(), B.numpy(), V
    flat, lengths = x.numpy().reshape(-1, 1), np.full(n, T)
    t_ref, ll_ref = best(lambda: ref.score(flat, lengths))
    print(f"  hmmlearn CategoricalHMM.score:     {t_ref * 1e3:8.1f} ms   log p = {ll_ref:.4f}")
    print(f"  ratio hmmlearn / ours: {t_ref / t_ours:.2f}x   |difference in log p|: {abs(ll_ref - ll_ours):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
