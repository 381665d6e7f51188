"""The LDA issue's targets, measured side by side in one process:

    python -m ppl_gen.bench lda --skip-synthetic --skip-large            # Reuters only
    python -m ppl_gen.bench lda --svi-steps 400 --synthetic-steps 300 --synthetic-seeds 3 --out runs/bench-lda

1. Reuters (K = 20, alpha = 0.1, eta = 0.01): every scheme's held-out perplexity against
   scikit-learn's batch VB, all scored by ``ppl_gen.exact.lda.document_completion``, with fit
   seconds (the starting topics included, as scikit-learn's initialization is part of its fit)
   and the seconds each scheme took to come within 5% of scikit-learn's perplexity (held-out
   perplexity every ``--eval-every`` steps, its time reported apart, as ``eval_seconds``, and
   left out of the fit seconds);
2. the amortized encoder's time to infer theta for 1,000 new documents against scikit-learn's
   ``transform`` (ratio);
3. topic recovery (mean TV after Hungarian matching) on 2,000 synthetic documents of 100 words,
   V = 500, K = 10, for every scheme, from ``--synthetic-seeds`` different starting points (the
   ELBO has local optima that merge two true topics: a statement about one seed is luck);
4. a large synthetic corpus (``--large-docs`` 1,000,000 x ``--large-vocab`` 10,000, 100 words
   each) held as sparse counts (``ppl_gen.datasets.corpus.SparseCorpus``), on which explicit SVI
   and the amortized encoder take ``--large-steps`` minibatch steps, the batches streamed from
   host memory to ``--device``: memory and documents per second.

Reuters and the synthetic corpus go through the runner's own set-up and training step
(``RunSetup.build``, the Pyro backend's ``Trainer``); the explicit and amortized guides' steps
use the guide's fused loss (``LDAGuide.loss``: TraceEnum_ELBO's value and gradients, written
out; ``--traced`` adds rows with Pyro's traced ELBO). Prints tables and writes ``bench.json``
in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from ppl_gen.exact import lda
from ppl_gen.datasets.corpus import load_reuters, load_synthetic


MODEL = str(Path(__file__).resolve().parents[2] / "models" / "lda.py")


def _scheme(guide: str, data: str, steps: int, batch_size, lr: float, out: Path, options: dict,
            label: str | None = None, seed: int = 0, eval_every: int = 0, target: float | None = None,
            traced: bool = False, device: str = "cpu") -> dict:
    """Fit one scheme as the runner does (its set-up, backend trainer and step), with the guide's
    fused loss unless ``traced``; every ``eval_every`` steps the held-out perplexity (not timed).
    Returns the model's metrics plus fit seconds and the seconds to ``target`` perplexity."""
    from inference import svi
    from ppl_gen.backends.pyro_backend import PyroBackend
    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.train import FittedRun

    label = label or guide
    cfg = svi.RunConfig(model_file=MODEL, guide=guide, elbo="enum", steps=steps, batch_size=batch_size, lr=lr,
                        data=data, seed=seed, progress=False, eval_particles=2, options=options, device=device,
                        threads=torch.get_num_threads())
    setup = RunSetup.build(cfg)
    trainer = PyroBackend().trainer(setup)
    if traced:  # Pyro's traced ELBO at every step, instead of the guide's written-out one (Guide.loss)
        trainer.fused_loss = None
    ds, curve, reached, evaluating = setup.dataset, [], None, 0.0
    # the starting topics (k-means++ seeding over the training documents, made in the set-up) are
    # part of the fit, as scikit-learn's initialization is part of its fit: timed by making them again
    o = setup.options
    clock = time.perf_counter()
    lda.initial_topics(ds.train, o.topics, torch.Generator().manual_seed(seed), o.init)
    start = seconds = time.perf_counter() - clock
    for t in range(1, steps + 1):
        clock = time.perf_counter()
        trainer.step(t)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        seconds += time.perf_counter() - clock
        if ds.test is not None and ((eval_every and t % eval_every == 0) or t == steps):
            clock = time.perf_counter()
            lam = pyro.param("lambda").detach()
            ppl = lda.document_completion(setup.guide.infer, lam, ds.test)["test_perplexity"]
            evaluating += time.perf_counter() - clock
            curve.append((t, round(seconds, 3), round(ppl, 2)))
            if reached is None and target is not None and ppl <= target:
                reached = seconds
    fitted = FittedRun(spec=setup.spec, guide_name=setup.guide_name, dataset=ds, options=setup.options,
                       device=setup.device, config={}, out=out, guide_obj=setup.guide)
    with torch.no_grad():
        metrics = setup.spec.evaluate(fitted)
    metrics.update(guide=label + (" (traced ELBO)" if traced and guide != "cavi" else ""), seconds=seconds,
                   start_seconds=start, eval_seconds=evaluating, steps=steps, seconds_to_target=reached, curve=curve)
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
    sk = _sklearn(reuters, 20, 0.1, 0.01, args.cavi_steps, args.infer_docs)
    rows["reuters"].append(sk)
    target = 1.05 * sk["test_perplexity"]   # target 1: within 5% of scikit-learn's held-out perplexity
    base = {"topics": 20, "alpha": 0.1, "eta": 0.01, "infer_docs": args.infer_docs}
    common = dict(out=out / "reuters", target=target, device=args.device)
    rows["reuters"].append(_scheme("cavi", "reuters", args.cavi_steps, None, 0.05, options=base,
                                   eval_every=max(args.eval_every * args.cavi_steps // args.svi_steps, 1), **common))
    for traced in ([False, True] if args.traced else [False]):
        rows["reuters"].append(_scheme("explicit", "reuters", args.svi_steps, None, 0.05, options=base,
                                       eval_every=args.eval_every, traced=traced, **common))
        rows["reuters"].append(_scheme("amortized", "reuters", args.svi_steps, None, AMORTIZED["lr"],
                                       options={**base, "topic_lr": AMORTIZED["topic_lr"]},
                                       eval_every=args.eval_every, traced=traced, **common))
    if not args.skip_adam_variant:
        rows["reuters"].append(_scheme("explicit", "reuters", args.svi_steps, None, 0.05, options={
            **base, "local_update": "adam"}, label="explicit (adam local step)", eval_every=args.eval_every,
            **common))


def _large(args) -> dict:
    """Target 3: the large corpus as sparse counts, explicit SVI and the amortized encoder trained
    on minibatches streamed from host memory to the device; documents per second."""
    import resource

    from ppl_gen.core.device import resolve_device
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.datasets.corpus import sample_sparse_corpus

    device = resolve_device(args.device)
    K, B = args.large_topics, args.large_batch
    start = time.perf_counter()
    corpus = sample_sparse_corpus(args.large_docs, args.large_vocab, K, args.large_words, 0.1, 0.01, seed=0)
    made = time.perf_counter() - start
    D = len(corpus)
    out = {"documents": D, "vocabulary": corpus.vocab_size, "words_per_document": args.large_words,
           "topics": K, "nonzero_entries": int(corpus.crow[-1]), "corpus_bytes": corpus.nbytes,
           "dense_float32_bytes": 4 * D * corpus.vocab_size, "seconds_to_draw": made, "batch_size": B,
           "device": str(device), "schemes": {}}
    mf = load_model_file(MODEL)
    for guide, lr, topic_lr in (("explicit", 0.05, 0.0), ("amortized", AMORTIZED["lr"], AMORTIZED["topic_lr"])):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        opts = mf.options({"topics": K, "alpha": 0.1, "eta": 0.01, "topic_lr": topic_lr})
        # starting topics from the first 1,000 documents (k-means++ over their word distributions)
        model = mf.module.LDA(corpus.rows(0, min(D, 1000)).to_dense(), opts, seed=0, device=device)
        loss_fn = model.guides()[guide].loss
        optim, steps, seconds = None, args.large_steps, 0.0
        for t in range(steps + 1):                        # step 0: start-up, timed on its own
            a = (t * B) % max(D - B + 1, 1)
            clock = time.perf_counter()
            batch = lda.Bag(corpus.rows(a, a + B, device))
            loss = loss_fn(batch, torch.arange(a, a + B, device=device), D)
            if optim is None:
                params = dict(pyro.get_param_store().named_parameters())
                groups = [{"params": [p for k, p in params.items() if k != "lambda"], "lr": lr},
                          {"params": [params["lambda"]], "lr": topic_lr or lr}]
                optim = torch.optim.Adam([g for g in groups if g["params"]])
            optim.zero_grad()
            loss.backward()
            optim.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if t == 0:
                startup = time.perf_counter() - clock
            else:
                seconds += time.perf_counter() - clock
        lam = pyro.param("lambda").detach()
        out["schemes"][guide] = {"steps": steps, "seconds": seconds, "startup_seconds": startup,
                                 "documents_per_second": steps * B / seconds,
                                 "loss_per_token_last": loss.item() / (D * args.large_words),
                                 "topic_tv": lda.topic_tv(lam, corpus.true_topics)[0]}
    out["peak_host_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


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
    p.add_argument("--eval-every", type=int, default=5,
                   help="Reuters: held-out perplexity every N SVI steps (and every N * cavi-steps / svi-steps "
                        "CAVI sweeps, at least 1; timed apart), for the time to target")
    p.add_argument("--traced", action="store_true",
                   help="Reuters: also fit explicit and amortized with Pyro's traced TraceEnum_ELBO (slow)")
    p.add_argument("--infer-docs", type=int, default=1000, help="Reuters: documents timed for 's to infer 1,000 docs'")
    p.add_argument("--device", default="cpu", help="where the schemes compute (scikit-learn: the CPU)")
    p.add_argument("--skip-large", action="store_true", help="leave out the large sparse corpus")
    p.add_argument("--large-docs", type=int, default=1_000_000)
    p.add_argument("--large-vocab", type=int, default=10_000)
    p.add_argument("--large-words", type=int, default=100, help="words per document of the large corpus")
    p.add_argument("--large-topics", type=int, default=20)
    p.add_argument("--large-batch", type=int, default=1000, help="documents per streamed minibatch")
    p.add_argument("--large-steps", type=int, default=30, help="timed minibatch steps per scheme")
    p.add_argument("--out", default="runs/bench-lda")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the first torch.optim optimizer imports torch._dynamo (once per process, seconds): done here,
    # so that it lands in no scheme's fit time, as importing torch or scikit-learn does not
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
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

    large = None if args.skip_large else _large(args)
    summary = {}
    if rows["reuters"]:
        sk = rows["reuters"][0]
        by = {r["guide"]: r for r in rows["reuters"]}
        summary.update({f"{name}_perplexity_vs_sklearn": by[label]["test_perplexity"] / sk["test_perplexity"]
                        for name, label in (("explicit", "explicit"), ("cavi", "cavi"), ("amortized", "amortized"),
                                            ("explicit_adam", "explicit (adam local step)")) if label in by})
        summary["sklearn_transform_over_amortized_infer"] = (sk["infer_seconds_1000"]
                                                             / by["amortized"]["infer_seconds_1000"])
        # target 1: fit seconds, and seconds to within 5% of scikit-learn's perplexity, over its fit seconds
        summary["seconds_vs_sklearn"] = {r["guide"]: round(r["seconds"] / sk["seconds"], 3) for r in rows["reuters"][1:]}
        summary["seconds_to_target_vs_sklearn"] = {
            r["guide"]: None if r.get("seconds_to_target") is None else round(r["seconds_to_target"] / sk["seconds"], 3)
            for r in rows["reuters"][1:]}
    if large is not None:
        summary["large_documents_per_second"] = {g: round(r["documents_per_second"], 1)
                                                 for g, r in large["schemes"].items()}
    if recovery:
        summary["synthetic_topic_tv_by_seed"] = {g: [round(tv, 4) for _, tv in runs] for g, runs in recovery.items()}
        # restarts as a practitioner runs them: of the seeds, keep the fit with the highest training ELBO
        summary["synthetic_topic_tv_best_elbo_of_seeds"] = {g: round(max(runs)[1], 4) for g, runs in recovery.items()}
    keys = ("test_perplexity", "train_elbo_per_token", "npmi", "seconds", "seconds_to_target", "eval_seconds",
            "infer_seconds_1000", "topic_tv", "variational_parameters")
    for name, rs in rows.items():
        if not rs:
            continue
        print(f"\n{name}\n| scheme | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
        for r in rs:
            print(f"| {r['guide']} | " + " | ".join("" if r.get(k) is None else f"{r[k]:.4g}" for k in keys) + " |")
    print("\n" + json.dumps(summary, indent=2))
    if large is not None:
        print(f"\nlarge corpus: {large['documents']:,} documents x {large['vocabulary']:,} words, "
              f"{large['nonzero_entries']:,} nonzero entries in {large['corpus_bytes'] / 2**30:.2f} GiB "
              f"(dense float32: {large['dense_float32_bytes'] / 2**30:.1f} GiB), drawn in {large['seconds_to_draw']:.1f} s; "
              f"peak host memory {large['peak_host_memory_bytes'] / 2**30:.2f} GiB; batch {large['batch_size']} on {large['device']}")
        for g, r in large["schemes"].items():
            print(f"  {g}: {r['documents_per_second']:,.0f} documents/s ({r['steps']} steps, start-up {r['startup_seconds']:.2f} s)")
    (out / "bench.json").write_text(json.dumps({"rows": rows, "summary": summary, "large": large,
                                                "threads": args.threads}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
