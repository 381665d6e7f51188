"""The LDA issue's three targets, measured side by side in one process:

    python -m ppl_gen.bench lda
    python -m ppl_gen.bench lda --svi-steps 400 --synthetic-steps 300 --synthetic-seeds 3 --out runs/bench-lda

1. explicit mean-field SVI's held-out perplexity against scikit-learn's batch VB on Reuters
   (K = 20, alpha = 0.1, eta = 0.01), both scored by ``ppl_gen.exact.lda.document_completion``;
2. the amortized encoder's time to infer theta for 1,000 new documents against scikit-learn's
   ``transform`` (ratio);
3. topic recovery (mean TV after Hungarian matching) on 2,000 synthetic documents of 100 words,
   V = 500, K = 10, for every scheme, from ``--synthetic-seeds`` different starting points (the
   ELBO has local optima that merge two true topics: a statement about one seed is luck).

Every scheme runs through ``inference.svi.run`` exactly as the CLI does. Prints a table and
writes ``bench.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ppl_gen.exact import lda
from ppl_gen.datasets.corpus import load_reuters, load_synthetic


def _scheme(guide: str, data: str, steps: int, batch_size, lr: float, out: Path, options: dict,
            label: str | None = None, seed: int = 0) -> dict:
    from inference import svi

    label = label or guide
    cfg = svi.RunConfig(model_file=str(Path(__file__).resolve().parents[2] / "models" / "lda.py"), guide=guide,
                        elbo="enum", steps=steps, batch_size=batch_size, lr=lr, data=data, seed=seed,
                        out=str(out / f"{label.replace(' ', '_')}-seed{seed}"),
                        progress=False, eval_every=steps, eval_particles=2, options=options)
    _, metrics = svi.run(cfg)
    metrics["guide"] = label
    return metrics


# the amortized guide: a small rate for the encoder (--lr), a larger one for the topics
AMORTIZED = {"lr": 0.01, "topic_lr": 0.1}


def _sklearn(corpus, K, alpha, eta, iters, infer_docs, seed: int = 0) -> dict:
    from sklearn.decomposition import LatentDirichletAllocation

    sk = LatentDirichletAllocation(n_components=K, doc_topic_prior=alpha, topic_word_prior=eta,
                                   learning_method="batch", max_iter=iters, random_state=seed)
    start = time.perf_counter()
    sk.fit(corpus.train.numpy())
    seconds = time.perf_counter() - start
    topics = torch.tensor(sk.components_, dtype=torch.float32)
    out = lda.document_completion(lambda h: torch.tensor(sk.transform(h.numpy()), dtype=torch.float32),
                                  topics, corpus.test)
    new = corpus.test.repeat(-(-infer_docs // len(corpus.test)), 1)[:infer_docs].numpy()
    start = time.perf_counter()
    sk.transform(new)
    out.update(seconds=seconds, infer_seconds_1000=(time.perf_counter() - start) * 1000 / len(new),
               npmi=lda.npmi(topics, corpus.train).mean().item(), guide="scikit-learn batch VB")
    # scikit-learn's score() is its variational bound on the training log-likelihood: the ELBO
    out["train_elbo_per_token"] = sk.score(corpus.train.numpy()) / corpus.train.sum().item()
    if corpus.true_topics is not None:
        out["topic_tv"] = lda.topic_tv(topics, corpus.true_topics)[0]
    return out


def _reuters(args, out: Path, rows: dict) -> None:
    reuters = load_reuters()
    rows["reuters"].append(_sklearn(reuters, 20, 0.1, 0.01, args.cavi_steps, 1000))
    base = {"topics": 20, "alpha": 0.1, "eta": 0.01, "infer_docs": 1000}
    rows["reuters"].append(_scheme("cavi", "reuters", args.cavi_steps, None, 0.05, out / "reuters", base))
    rows["reuters"].append(_scheme("explicit", "reuters", args.svi_steps, None, 0.05, out / "reuters", base))
    if not args.skip_adam_variant:
        rows["reuters"].append(_scheme("explicit", "reuters", args.svi_steps, None, 0.05, out / "reuters",
                                       {**base, "local_update": "adam"}, label="explicit (adam local step)"))
    rows["reuters"].append(_scheme("amortized", "reuters", args.svi_steps, None, AMORTIZED["lr"], out / "reuters",
                                   {**base, "topic_lr": AMORTIZED["topic_lr"]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppl_gen.bench lda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--svi-steps", type=int, default=400, help="full-batch SVI steps on Reuters (explicit, amortized)")
    p.add_argument("--cavi-steps", type=int, default=50, help="CAVI sweeps (scikit-learn gets as many iterations)")
    p.add_argument("--synthetic-steps", type=int, default=300, help="SVI steps on the synthetic corpus")
    p.add_argument("--synthetic-batch", type=int, default=200, help="documents per SVI step on the synthetic corpus")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--synthetic-seeds", type=int, default=3,
                   help="seeds (starting topics) of the recovery runs; the table shows seed 0, the summary all")
    p.add_argument("--skip-reuters", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-adam-variant", action="store_true",
                   help="leave out the explicit guide with --local-update adam")
    p.add_argument("--out", default="runs/bench-lda")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"reuters": [], "synthetic": []}

    if args.skip_reuters:
        rows["reuters"] = []
    else:
        _reuters(args, out, rows)
    recovery = {}
    if not args.skip_synthetic:
        syn = {"docs": 2000, "words": 100, "vocab": 500, "topics": 10, "alpha": 0.1, "eta": 0.01, "infer_docs": 400}
        corpus = load_synthetic(2000, 500, 10, 100, 0.1, 0.01)
        for seed in range(args.synthetic_seeds):   # each seed: other starting topics (and sklearn's random_state)
            here = [_sklearn(corpus, 10, 0.1, 0.01, args.cavi_steps, 400, seed),
                    _scheme("cavi", "synthetic", args.cavi_steps, None, 0.05, out / "synthetic", syn, seed=seed),
                    _scheme("explicit", "synthetic", args.synthetic_steps, args.synthetic_batch, 0.05,
                            out / "synthetic", syn, seed=seed),
                    _scheme("amortized", "synthetic", args.synthetic_steps, args.synthetic_batch, AMORTIZED["lr"],
                            out / "synthetic", {**syn, "topic_lr": AMORTIZED["topic_lr"]}, seed=seed)]
            for r in here:
                recovery.setdefault(r["guide"], []).append((r["train_elbo_per_token"], r["topic_tv"]))
            if seed == 0:
                rows["synthetic"] = here

    summary = {}
    if rows["reuters"]:
        sk = rows["reuters"][0]
        by = {r["guide"]: r for r in rows["reuters"]}
        summary.update({f"{name}_perplexity_vs_sklearn": by[label]["test_perplexity"] / sk["test_perplexity"]
                        for name, label in (("explicit", "explicit"), ("cavi", "cavi"), ("amortized", "amortized"),
                                            ("explicit_adam", "explicit (adam local step)")) if label in by})
        summary["sklearn_transform_over_amortized_infer"] = (sk["infer_seconds_1000"]
                                                             / by["amortized"]["infer_seconds_1000"])
    if recovery:
        summary["synthetic_topic_tv_by_seed"] = {g: [round(tv, 4) for _, tv in runs] for g, runs in recovery.items()}
        # restarts as a practitioner runs them: of the seeds, keep the fit with the highest training ELBO
        summary["synthetic_topic_tv_best_elbo_of_seeds"] = {g: round(max(runs)[1], 4) for g, runs in recovery.items()}
    keys = ("test_perplexity", "train_elbo_per_token", "npmi", "seconds", "infer_seconds_1000", "topic_tv",
            "variational_parameters")
    for name, rs in rows.items():
        if not rs:
            continue
        print(f"\n{name}\n| scheme | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
        for r in rs:
            print(f"| {r['guide']} | " + " | ".join("" if r.get(k) is None else f"{r[k]:.4g}" for k in keys) + " |")
    print("\n" + json.dumps(summary, indent=2))
    (out / "bench.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                                "threads": args.threads}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
