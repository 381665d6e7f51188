"""``python -m ppl_gen.bench NAME [flags]``: run one benchmark (``--help`` after NAME for its flags)."""

import importlib
import sys

BENCHES = {
    "vae": "the VAE's SVI step: runner paths against a hand-written PyTorch step",
    "lda": "LDA on Reuters and a synthetic corpus: every scheme against scikit-learn",
    "hmm": "the HMM forward algorithm against hmmlearn",
    "markov": "order-k Markov chains and the char RNN on the same text",
    "bayesnet": "Bayesian-network contraction against pgmpy",
    "pixelcnn": "a PixelCNN training step through the runner against a hand-written PyTorch step",
    "diffusion": "a diffusion training step through the runner against a hand-written PyTorch step",
    "backends": "one SVI step of every model file, Pyro against NumPyro",
    "threads": "the runner's default thread count against --threads 1, quiet and under contention",
    "startup": "a 1-step run of the README's model file against import pyro",
    "autoguides": "Pyro's automatic guides against hand-written guides of the same family, per SVI step",
    "zoo": "every scheme on every zoo model against its reference posterior: k-hat, error, held-out, ms/step",
    "vi": "KL(q||p) against KL(p||q) on a bimodal target; score-function against reparameterized gradients",
    "gpu": "every CUDA test and the GPU benchmarks (VAE, LDA, PixelCNN, diffusion) in one JSON and one table",
    "distributed": "data-parallel SVI (torchrun, gloo): steps/s and samples/s on 1 and 2 ranks, VAE and LDA",
    "figures": "regenerate every figure in docs/figures from the code (--out DIR)",
    "snapshot": "every model file's tiny default run, metrics compared with an earlier snapshot",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        lines = [f"  {k:<9} {v}" for k, v in BENCHES.items()]
        print("usage: python -m ppl_gen.bench NAME [flags]\n\nbenchmarks:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"ppl_gen.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
