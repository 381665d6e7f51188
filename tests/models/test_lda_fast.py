"""LDA's fast paths against their reference definitions, in float64 to 1e-6: the sparse
(nonzero-entry) E-step, topic statistics, local ELBO and CAVI sweep against the dense ones in
ppl_gen/exact/lda.py; the fused loss of the explicit and amortized guides against Pyro's traced
TraceEnum_ELBO on the Pyro model and guide (value and gradients, same draws); the sparse corpus
against the dense one on Reuters; the starting topics' k-means++ seeding against the direct
distance sums (the same documents picked, bit for bit); the LDA benchmark at tiny sizes
(numbers finite, no timing)."""

import json
import math

import pyro
import pytest
import torch

from ppl_gen import Dataset
from ppl_gen.core.protocol import load_model_file
from ppl_gen.core.train import make_elbo
from ppl_gen.datasets.corpus import SparseCorpus, load_reuters, sample_corpus, sample_sparse_corpus
from ppl_gen.exact import lda

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _close(a, b, tol=1e-6):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    assert ((a - b).abs() <= tol * (1 + b.abs())).all(), (a - b).abs().max().item()


@pytest.fixture(scope="module")
def corpus():
    x, _ = sample_corpus(docs=40, vocab=30, topics=3, words=25, alpha=0.3, eta=0.1, seed=3)
    g = torch.Generator().manual_seed(1)
    lam = 0.1 + torch.rand(3, 30, generator=g, dtype=torch.float64) * 5
    gamma = 0.3 + torch.rand(40, 3, generator=g, dtype=torch.float64) * 4
    return x.double(), lam, gamma


def test_sparse_functions_equal_the_dense_reference(corpus):
    x, lam, gamma = corpus
    bag = lda.Bag.of(x)
    assert len(bag.n) == int((x > 0).sum())
    for start in (None, gamma):   # flat start and warm start
        ref, ref_stats = lda.e_step(x, lam, 0.3, start, iters=40, tol=1e-8)
        got, got_stats = lda.sparse_e_step(bag, lam, 0.3, start, iters=40, tol=1e-8)
        _close(got, ref)
        _close(got_stats, ref_stats)
    _close(lda.sparse_topic_stats(bag, gamma, lam), lda.topic_stats(x, gamma, lam))
    _close(lda.sparse_local_elbo(bag, gamma, lam, 0.3), lda.local_elbo(x, gamma, lam, 0.3))
    # phi's expected counts against phi itself (phi_optimal over the nonzero pairs)
    m, v, n = lda.word_pairs(x)
    phi = lda.phi_optimal(gamma, lam, m, v)
    s, t, log_norm = lda.phi_stats(bag, gamma, lam)
    _close(s, torch.zeros_like(lam).index_add_(1, v, (n[:, None] * phi).T))
    _close(t, torch.zeros_like(gamma).index_add_(0, m, n[:, None] * phi))
    entropy = (n[:, None] * phi * phi.log()).sum()
    _close((t * lda.expected_log(gamma)).sum() + (s * lda.expected_log(lam)).sum() - log_norm.sum(), entropy)
    # a CAVI sweep, full batch and a minibatch step (Hoffman et al.'s rho_t)
    for size, t_ in ((None, 1), (400, 3)):
        ref = lda.cavi_step(x, lam, gamma, 0.3, 0.1, size=size, t=t_, iters=40, tol=1e-8)
        got = lda.sparse_cavi_step(bag, lam, gamma, 0.3, 0.1, size=size, t=t_, iters=40, tol=1e-8)
        for a, b in zip(got, ref):
            _close(a, b)


def _spec(x, **options):
    mf = load_model_file(ROOT / "models" / "lda.py")
    opts = mf.options({"topics": 3, "alpha": 0.3, "eta": 0.1, "hidden": 8, **options})
    return mf.build(opts, Dataset(train=x), "enum")


@pytest.mark.parametrize("guide", ["explicit", "amortized"])
@pytest.mark.parametrize("batch", [None, [1, 4, 7, 9, 20, 33]])
def test_fused_loss_equals_traced_elbo_value_and_gradients(corpus, guide, batch):
    """LDAGuide.loss against TraceEnum_ELBO.differentiable_loss on the Pyro model and guide:
    the same draws (same seed), the same -ELBO and the same gradient in every parameter (lambda
    and, amortized, the encoder's weights), full batch and a minibatch scaled to D = 40."""
    x = corpus[0]
    spec = _spec(x)
    g = spec.resolve(guide)
    spec.buffers["encoder"].double()
    args, kwargs = ((x,), {}) if batch is None else ((x[batch], torch.tensor(batch)), {"size": 40})
    elbo = make_elbo("enum")
    elbo.loss(spec.model, g.fn, *args, **kwargs)   # creates the parameters; guesses max_plate_nesting
    params = dict(pyro.get_param_store().named_parameters())
    pyro.set_rng_seed(5)
    traced = elbo.differentiable_loss(spec.model, g.fn, *args, **kwargs)
    traced_grads = torch.autograd.grad(traced, list(params.values()), allow_unused=True)
    pyro.set_rng_seed(5)
    fused = g.loss(*args, **kwargs)
    fused_grads = torch.autograd.grad(fused, list(params.values()), allow_unused=True)
    _close(fused.detach(), traced.detach())
    assert any(t is not None for t in traced_grads)
    for name, a, b in zip(params, fused_grads, traced_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            _close(a, b)


def test_explicit_local_step_is_the_e_step_of_the_current_topics(corpus):
    """The explicit guide's gamma (kept between calls for the same batch and equal lambda) is
    the E-step's for the lambda it is given: again after lambda moves, and for another batch."""
    x = corpus[0]
    spec = _spec(x)
    model = spec.guides["explicit"].fn.__self__
    lam = model.lambda0 + 0.1
    for topics, batch in ((lam, x), (lam, x), (lam * 1.5, x), (lam * 1.5, x[:7].clone())):
        got = model._local_gamma(batch, topics)
        assert torch.equal(got, lda.sparse_e_step(batch, topics, 0.3, iters=100, stats=False)[0])


def test_sparse_corpus_equals_dense_on_reuters():
    """Reuters as SparseCorpus (compact CSR) gives back the dense counts, and the E-step and the
    held-out perplexity from its sparse batches equal those from the dense matrix, and the dense
    reference E-step (float64)."""
    c = load_reuters()
    sparse = SparseCorpus.from_dense(c.train)
    assert torch.equal(sparse.dense(), c.train)
    assert sparse.nbytes < c.train.numel() * 4 / 20     # 5% dense; 2-byte columns and counts
    lam = lda.initial_topics(c.train, 20, torch.Generator().manual_seed(0)).double() + 0.01
    x = c.train.double()
    ref = lda.e_step(x, lam, 0.1, iters=20)[0]
    from_dense = lda.sparse_e_step(x, lam, 0.1, iters=20)[0]
    batch = sparse.rows(0, len(sparse))
    from_sparse = lda.sparse_e_step(lda.Bag(torch.sparse_csr_tensor(
        batch.crow_indices(), batch.col_indices(), batch.values().double(), batch.shape, check_invariants=False)),
        lam, 0.1, iters=20)[0]
    _close(from_dense, ref)
    assert torch.equal(from_sparse, from_dense)
    infer = lambda h: lda.sparse_e_step(h, lam, 0.1)[0]   # noqa: E731
    dense_ppl = lda.document_completion(lambda h: lda.e_step(h, lam, 0.1)[0], lam, c.test.double())
    assert lda.document_completion(infer, lam, c.test.double())["test_perplexity"] == pytest.approx(
        dense_ppl["test_perplexity"], rel=1e-6)


def _kmeanspp_direct(x, K, generator):
    """lda.initial_topics written directly: squared distances as sums of squared differences
    over the whole vocabulary."""
    noise = torch._standard_gamma(torch.full((K, x.shape[1]), 100.0, dtype=torch.float64),
                                  generator=generator).div(100)
    words = (x / x.sum(-1, keepdim=True).clamp(min=1)).double()
    picked = [int(torch.randint(len(words), (1,), generator=generator))]
    d2 = ((words - words[picked[0]]) ** 2).sum(-1)
    for _ in range(K - 1):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        picked.append(int(torch.multinomial(weights / weights.sum(), 1, generator=generator)))
        d2 = torch.minimum(d2, ((words - words[picked[-1]]) ** 2).sum(-1))
    return (noise + x[picked].double()).float()


def test_starting_topics_pick_the_documents_of_direct_kmeanspp():
    """initial_topics' distances from the nonzero entries (||a||^2 + ||b||^2 - 2 a.b) pick the
    same documents as the direct sums, so the same starting topics for every seed: on Reuters,
    on a synthetic corpus, and on one with fewer distinct documents than K (where the direct
    distances are exactly 0 and the picks uniform)."""
    reuters = load_reuters().train
    synthetic, _ = sample_corpus(docs=300, vocab=80, topics=5, words=40, alpha=0.1, eta=0.05, seed=1)
    repeated = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 1.0, 1.0]]).repeat(4, 1)
    for x, K, seeds in ((reuters, 20, range(4)), (synthetic, 10, range(10)), (repeated, 5, range(10))):
        for seed in seeds:
            got = lda.initial_topics(x, K, torch.Generator().manual_seed(seed))
            assert torch.equal(got, _kmeanspp_direct(x, K, torch.Generator().manual_seed(seed))), (K, seed)


def test_sparse_synthetic_corpus_is_compact_and_complete():
    c = sample_sparse_corpus(docs=500, vocab=2000, topics=4, words=30, alpha=0.1, eta=0.01, seed=0, chunk=128)
    assert len(c) == 500 and c.cols.dtype == torch.int16 and c.counts.dtype == torch.int16
    x = c.rows(100, 164)
    assert x.shape == (64, 2000) and torch.equal(x.to_dense().sum(1), torch.full((64,), 30.0))
    assert c.nbytes < 500 * 2000 * 4 / 10
    _close(c.true_topics.double().sum(1), torch.ones(4))


def test_lda_benchmark_runs_at_tiny_sizes(tmp_path):
    """python -m ppl_gen.bench lda with tiny budgets: every number it reports is finite."""
    pytest.importorskip("sklearn")
    from ppl_gen.bench import lda as bench

    code = bench.main(["--svi-steps", "2", "--cavi-steps", "2", "--eval-every", "1", "--skip-synthetic",
                       "--skip-adam-variant", "--infer-docs", "20", "--large-docs", "300", "--large-vocab", "200", "--large-batch", "50",
                       "--large-steps", "2", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]["reuters"]
    assert [r["guide"] for r in rows] == ["scikit-learn batch VB", "cavi", "explicit", "amortized"]
    for r in rows:
        assert math.isfinite(r["test_perplexity"]) and math.isfinite(r["seconds"])
    for r in result["large"]["schemes"].values():
        assert math.isfinite(r["documents_per_second"]) and math.isfinite(r["loss_per_token_last"])
