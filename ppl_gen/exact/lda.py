"""Latent Dirichlet allocation: mean-field quantities, CAVI, and one evaluator for every scheme.

Symbols follow the lecture and Blei, Ng & Jordan (2003, "Latent Dirichlet Allocation", JMLR 3):
K topics, V words, documents m with word counts n_mv (the bag of words ``x[m, v]``);

    beta_k ~ Dir(eta),  theta_m ~ Dir(alpha),  z_mn ~ Cat(theta_m),  x_mn ~ Cat(beta_{z_mn})

and the mean-field family q(beta_k) = Dir(lambda_k), q(theta_m) = Dir(gamma_m),
q(z_mn) = Cat(phi_mn). Tokens of the same word in the same document share their optimal
phi, so phi is indexed by (m, v) pairs and weighted by n_mv.

* :func:`elbo`: the exact mean-field ELBO, with phi at its optimum given (gamma, lambda);
* :func:`e_step` / :func:`cavi_step`: the closed-form coordinate-ascent updates (Blei et al.
  2003, section 5.3 and appendix A.3) and their stochastic form (Hoffman, Blei, Wang &
  Paisley 2013, "Stochastic Variational Inference", JMLR 14);
* :func:`perplexity`: held-out per-word perplexity by document completion (Wallach, Murray,
  Salakhutdinov & Mimno 2009, "Evaluation Methods for Topic Models", ICML);
* :func:`npmi`: topic coherence (Newman, Lau, Grieser & Baldwin 2010; Lau, Newman & Baldwin
  2014, "Machine Reading Tea Leaves");
* :func:`topic_tv`: topic recovery, mean total-variation distance after Hungarian matching.
"""

from __future__ import annotations

import math
import warnings
from functools import cached_property
from typing import Callable

import torch
from torch.distributions import Dirichlet, kl_divergence


def expected_log(conc: torch.Tensor) -> torch.Tensor:
    """E[log p] under Dir(conc), row-wise: psi(conc) - psi(sum conc)."""
    return torch.digamma(conc) - torch.digamma(conc.sum(-1, keepdim=True))


def phi_optimal(gamma: torch.Tensor, lam: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """phi_mvk ∝ exp(E[log theta_mk] + E[log beta_kv]) (Blei et al. 2003, eq. 6), for pairs (m, v)."""
    return torch.softmax(expected_log(gamma)[m] + expected_log(lam)[:, v].T, -1)


def word_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzero entries of a count matrix: document rows m, words v, counts n_mv."""
    m, v = x.nonzero(as_tuple=True)
    return m, v, x[m, v]


def local_elbo(x: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor, alpha: float,
               Elog_beta_pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Each document's share of the ELBO with phi at its optimum:

        sum_v n_mv log sum_k exp(E[log theta_mk] + E[log beta_kv]) - KL(Dir(gamma_m) || Dir(alpha))

    (log-sum-exp over k is max over phi_mv of sum_k phi_mvk (E[log theta_mk] + E[log beta_kv]
    - log phi_mvk): E_q[log p(z, x | theta, beta)] + H[q(z)]). Over the nonzero (m, v) pairs
    only; ``Elog_beta_pairs`` [P, K] may be passed when the topics are fixed."""
    m, v, n = word_pairs(x)
    if Elog_beta_pairs is None:
        Elog_beta_pairs = expected_log(lam)[:, v].T
    per_pair = n * torch.logsumexp(expected_log(gamma)[m] + Elog_beta_pairs, -1)
    words = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add_(0, m, per_pair)
    kl = kl_divergence(Dirichlet(gamma), Dirichlet(torch.full_like(gamma, alpha)))
    return words - kl


def elbo(x: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor, alpha: float, eta: float,
         size: int | None = None) -> torch.Tensor:
    """The mean-field ELBO of a corpus (or of a minibatch scaled to ``size`` documents):

        sum_m local_elbo_m - sum_k KL(Dir(lambda_k) || Dir(eta))."""
    scale = 1.0 if size is None else size / x.shape[0]
    return scale * local_elbo(x, gamma, lam, alpha).sum() - kl_topics(lam, eta)


def kl_topics(lam: torch.Tensor, eta: float) -> torch.Tensor:
    """The ELBO's global term, sum_k KL(Dir(lambda_k) || Dir(eta))."""
    return kl_divergence(Dirichlet(lam), Dirichlet(torch.full_like(lam, eta))).sum()


def e_step(x: torch.Tensor, lam: torch.Tensor, alpha: float, gamma: torch.Tensor | None = None,
           iters: int = 100, tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate ascent on each document's (gamma_m, phi_m) with the topics fixed:

        phi_mvk ∝ exp(E[log theta_mk]) exp(E[log beta_kv]),   gamma_mk = alpha + sum_v n_mv phi_mvk

    until the mean change of gamma is below ``tol``. Returns gamma and the sufficient
    statistics s_kv = sum_m n_mv phi_mvk of the final phi (for the lambda update)."""
    B, K = x.shape[0], lam.shape[0]
    exp_Elog_beta = torch.exp(expected_log(lam))                                   # [K, V]
    if gamma is None:  # a flat start, as scikit-learn's (near 1): a warm start from the last sweep
        gamma = x.new_ones(B, K)  # locks documents into early topics (a worse optimum on Reuters)
    for _ in range(iters):
        exp_Elog_theta = torch.exp(expected_log(gamma))                             # [B, K]
        norm = (exp_Elog_theta @ exp_Elog_beta).clamp(min=1e-30)                    # [B, V]
        new = alpha + exp_Elog_theta * ((x / norm) @ exp_Elog_beta.T)
        done = (new - gamma).abs().mean() < tol
        gamma = new
        if done:
            break
    return gamma, topic_stats(x, gamma, lam)


def topic_stats(x: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """s_kv = sum_m n_mv phi_mvk with phi at its optimum given (gamma, lambda). [K, V]"""
    exp_Elog_theta, exp_Elog_beta = torch.exp(expected_log(gamma)), torch.exp(expected_log(lam))
    norm = (exp_Elog_theta @ exp_Elog_beta).clamp(min=1e-30)
    return exp_Elog_beta * (exp_Elog_theta.T @ (x / norm))


def cavi_step(x: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor | None, alpha: float, eta: float,
              size: int | None = None, t: int = 1, tau0: float = 1.0, kappa: float = 0.7,
              iters: int = 100, tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """One CAVI sweep: the E-step for the documents in ``x``, then the topics,

        lambda_kv = eta + sum_m n_mv phi_mvk                          (all documents: Blei et al. 2003)
        lambda <- (1 - rho_t) lambda + rho_t (eta + (D / B) s)        (a minibatch: Hoffman et al. 2013)

    with rho_t = (tau0 + t)^(-kappa). ``gamma``: the documents' last gamma (None: none yet). Returns the new
    (lambda, gamma)."""
    fresh, _ = e_step(x, lam, alpha, None, iters, tol)
    if gamma is None:
        gamma = fresh
    else:  # the flat start finds better optima; the warm start guarantees ascent: keep, per
        # document, whichever has the higher ELBO, so the ELBO never decreases
        warm, _ = e_step(x, lam, alpha, gamma, iters, tol)
        better = local_elbo(x, warm, lam, alpha) > local_elbo(x, fresh, lam, alpha)
        gamma = torch.where(better[:, None], warm, fresh)
    stats = topic_stats(x, gamma, lam)
    if size is None or size == x.shape[0]:
        return eta + stats, gamma
    rho = (tau0 + t) ** (-kappa)
    return (1 - rho) * lam + rho * (eta + size / x.shape[0] * stats), gamma


def initial_topics(x: torch.Tensor, K: int, generator: torch.Generator, init: str = "documents") -> torch.Tensor:
    """Starting lambda [K, V] shared by every scheme: Gamma(100, 1/100) noise (Hoffman et al.
    2013; scikit-learn), which breaks the symmetry between topics, plus with ``init="documents"``
    the word counts of K training documents picked by k-means++ seeding on their word
    distributions (Arthur & Vassilvitskii 2007, "k-means++: the advantages of careful
    seeding"): each next document is drawn with probability proportional to its squared
    distance from the nearest one already picked, so the topics start spread over the corpus.
    Why: from near-uniform noise alone, coordinate ascent on a corpus of sparse topics often
    merges two true topics into one and splits another (a local optimum of the ELBO); spread
    starts land there less often (measured in docs/lda.md)."""
    noise = torch._standard_gamma(torch.full((K, x.shape[1]), 100.0, dtype=torch.float64),
                                  generator=generator).div(100)
    if init == "random":
        return noise.float().to(x.device)
    if _is_sparse_corpus(x):   # counts too large to hold dense: the same sums, chunk by chunk
        def chunks():
            for a in range(0, len(x), KMEANS_CHUNK):
                yield _frequencies(x.rows(a, min(a + KMEANS_CHUNK, len(x))).cpu())

        sq = torch.cat([_row_sums(w, w.values() ** 2) for w in chunks()])
        row_of = lambda i: _frequencies(x.rows(i, i + 1).cpu()).to_dense()[0]        # noqa: E731
        products = lambda w: torch.cat([(c @ w[:, None])[:, 0] for c in chunks()])    # noqa: E731
    else:
        words = (x / x.sum(-1, keepdim=True).clamp(min=1)).double().cpu()
        nonzero, sq = words.to_sparse_csr(), (words * words).sum(-1)
        row_of = lambda i: words[i]                                   # noqa: E731
        products = lambda w: (nonzero @ w[:, None])[:, 0]             # noqa: E731

    def distance2(i: int) -> torch.Tensor:
        """||w_j - w_i||^2 = ||w_j||^2 + ||w_i||^2 - 2 w_j . w_i for every document j, the dot
        products from the nonzero entries; below 1e-13 (rounding: the squared norms are at most
        1) it is 0, as the direct sum gives for a document identical to w_i."""
        d2 = sq + sq[i] - 2 * products(row_of(i))
        return torch.where(d2 > 1e-13, d2, torch.zeros_like(d2))

    first = int(torch.randint(len(x), (1,), generator=generator))
    picked = [first]
    d2 = distance2(first)
    for _ in range(K - 1):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)   # fewer distinct documents than K
        i = int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
        picked.append(i)
        d2 = torch.minimum(d2, distance2(i))
    return (noise + x[torch.tensor(picked)].double().cpu()).float().to(x.device)


# documents per chunk of the starting topics' k-means++ over a SparseCorpus
KMEANS_CHUNK = 65_536


def _is_sparse_corpus(x) -> bool:
    from ppl_gen.datasets.corpus import SparseCorpus

    return isinstance(x, SparseCorpus)


def _row_sums(csr: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of a CSR tensor, the sum of ``values`` (one per nonzero entry)."""
    row = torch.repeat_interleave(torch.arange(csr.shape[0], device=values.device), csr.crow_indices().diff())
    return values.new_zeros(csr.shape[0]).index_add_(0, row, values)


def _frequencies(csr: torch.Tensor) -> torch.Tensor:
    """Rows of a float32 CSR count matrix divided by their sums, as the dense path divides
    (float32, then float64), so both give the same numbers."""
    crow, v, n = csr.crow_indices(), csr.col_indices(), csr.values()
    f = (n / _row_sums(csr, n).clamp(min=1).repeat_interleave(crow.diff())).double()
    return torch.sparse_csr_tensor(crow, v, f, csr.shape, check_invariants=False)


def fit_gamma(x: torch.Tensor, lam: torch.Tensor, alpha: float, steps: int = 200, lr: float = 0.1) -> torch.Tensor:
    """Explicit VI's own local inference: gradient ascent (Adam) on each document's ELBO over
    its free log gamma_m, with the topics fixed. phi is at its optimum inside local_elbo."""
    log_gamma = x.new_zeros(x.shape[0], lam.shape[0]).requires_grad_()   # gamma = 1, as the E-step
    optim = torch.optim.Adam([log_gamma], lr=lr)
    Elog_beta_pairs = expected_log(lam.detach())[:, word_pairs(x)[1]].T
    with torch.enable_grad():
        for _ in range(steps):
            optim.zero_grad()
            loss = -local_elbo(x, log_gamma.exp(), lam, alpha, Elog_beta_pairs).sum()
            log_gamma.grad, = torch.autograd.grad(loss, [log_gamma])
            optim.step()
    return log_gamma.detach().exp()


# ---------------------------------------------------------------- the evaluator
def perplexity(theta: torch.Tensor, topics: torch.Tensor, counts: torch.Tensor, chunk: int = 4096) -> float:
    """Per-word perplexity exp(-sum_mv n_mv log sum_k theta_mk topics_kv / sum_mv n_mv).
    ``chunk`` documents at a time on the topics' device (``counts`` may stay in host memory)."""
    log_lik = 0.0
    for start in range(0, counts.shape[0], chunk):
        p = (theta[start:start + chunk] @ topics).clamp(min=1e-30)
        log_lik += (counts[start:start + chunk].to(p.device) * p.log()).sum().item()
    return math.exp(-log_lik / counts.sum().item())


def document_completion(infer_theta: Callable[[torch.Tensor], torch.Tensor], topics: torch.Tensor,
                        heldout: torch.Tensor, seed: int = 0) -> dict:
    """Held-out perplexity by document completion (Wallach et al. 2009): each held-out
    document's tokens are split at random (``seed``) into halves; ``infer_theta`` (the
    scheme's own inference: an encoder pass, an E-step, a local fit, scikit-learn's
    ``transform``) sees the first half and returns each document's topic proportions
    theta [B, K]; the second half is scored under ``topics`` [K, V] (posterior means).
    The one function every scheme and library is scored by."""
    from ppl_gen.datasets.corpus import document_halves, sparse_document_halves

    if _is_sparse_corpus(heldout):   # the same halves from the nonzero entries, kept sparse
        observed, scored = sparse_document_halves(heldout, seed)
        keep = (observed.sum(-1) > 0) & (scored.sum(-1) > 0)
        observed, scored = observed.select(keep), scored.select(keep)
    else:
        observed, scored = document_halves(heldout, seed)
        keep = (observed.sum(-1) > 0) & (scored.sum(-1) > 0)
        observed, scored = observed[keep], scored[keep]
    theta = infer_theta(observed).to(topics)
    theta = theta / theta.sum(-1, keepdim=True)
    return {"test_perplexity": perplexity(theta, topics / topics.sum(-1, keepdim=True), scored),
            "perplexity_documents": int(keep.sum()), "perplexity_tokens": int(scored.sum().item())}


def top_words(topics: torch.Tensor, n: int = 10) -> torch.Tensor:
    return topics.topk(n, dim=-1).indices


def npmi(topics: torch.Tensor, counts: torch.Tensor, n: int = 10) -> torch.Tensor:
    """NPMI of each topic's top-n words (Lau et al. 2014), probabilities from document
    co-occurrence in ``counts``: for each pair of top words,

        NPMI(w_i, w_j) = log(P(w_i, w_j) / (P(w_i) P(w_j))) / -log P(w_i, w_j)

    (-1 for a pair that never co-occurs), averaged over the n(n-1)/2 pairs. Shape [K].
    ``counts``: a dense matrix or a SparseCorpus (its co-occurrences from the nonzero entries)."""
    if _is_sparse_corpus(counts):
        return _sparse_npmi(topics, counts, n)
    present = (counts > 0).to(torch.float64)
    D = present.shape[0]
    out = []
    for words in top_words(topics, n):
        d = present[:, words]                                           # [D, n]
        p_joint = (d.T @ d) / D
        out.append(_npmi_of(p_joint))
    return torch.stack(out)


def _npmi_of(p_joint: torch.Tensor) -> torch.Tensor:
    """Mean NPMI over the pairs of n words, from their joint document frequencies [n, n]."""
    p = p_joint.diagonal()
    i, j = torch.triu_indices(len(p), len(p), 1)
    pij, pi, pj = p_joint[i, j], p[i], p[j]
    score = torch.where(pij > 0, torch.log(pij / (pi * pj)) / -torch.log(pij.clamp(max=1 - 1e-12)),
                        torch.full_like(pij, -1.0))
    return score.mean()


def _sparse_npmi(topics: torch.Tensor, counts, n: int, chunk: int = 65_536) -> torch.Tensor:
    """:func:`npmi` from a SparseCorpus: which documents hold each of the U distinct top words
    (a [D, U] indicator, built chunk by chunk from the nonzero entries), their co-occurrence
    counts C = P^T P (whole numbers, exact), and each topic's n x n block of C / D."""
    top = top_words(topics, n).cpu()
    union = torch.unique(top)
    where = torch.full((counts.vocab_size,), -1, dtype=torch.int64)
    where[union] = torch.arange(len(union))
    crow, cols = counts.crow.cpu(), counts.cols.cpu()
    C = torch.zeros(len(union), len(union), dtype=torch.float64)
    for a in range(0, len(counts), chunk):
        b = min(a + chunk, len(counts))
        e0, e1 = int(crow[a]), int(crow[b])
        u = where[cols[e0:e1].long()]
        doc = torch.repeat_interleave(torch.arange(b - a), crow[a + 1:b + 1] - crow[a:b])
        present = torch.zeros(b - a, len(union), dtype=torch.float64)
        present[doc[u >= 0], u[u >= 0]] = 1.0
        C += present.T @ present
    return torch.stack([_npmi_of(C[where[w]][:, where[w]] / len(counts)) for w in top])


def topic_tv(estimated: torch.Tensor, true: torch.Tensor) -> tuple[float, list[int]]:
    """Mean total-variation distance between true topics and estimated ones after the
    optimal one-to-one matching (Hungarian algorithm on the TV cost matrix)."""
    from scipy.optimize import linear_sum_assignment

    est = (estimated / estimated.sum(-1, keepdim=True)).double().cpu()
    tru = (true / true.sum(-1, keepdim=True)).double().cpu()
    cost = 0.5 * (tru[:, None, :] - est[None, :, :]).abs().sum(-1)                  # [K_true, K_est]
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[rows, cols].mean()), [int(c) for c in cols]


def top_words_figure(topics: torch.Tensor, vocab: list[str], path, title: str = "", n: int = 8,
                     coherence: torch.Tensor | None = None):
    """One line per topic: its top-n words, most probable first, with its NPMI if given."""
    from ppl_gen.core import plotting# noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    probs = (topics / topics.sum(-1, keepdim=True)).cpu()
    words = top_words(probs, n)
    K = len(words)
    fig, ax = plt.subplots(figsize=(9.0, 0.28 * K + 0.9))
    ax.axis("off")
    for k in range(K):
        label = f"{k:2d}" + ("" if coherence is None else f"  ({float(coherence[k]):+.2f})")
        text = "  ".join(vocab[int(w)] for w in words[k])
        ax.text(0.0, 1 - (k + 0.5) / K, label, family="monospace", fontsize=8, va="center", color="0.4")
        ax.text(0.13, 1 - (k + 0.5) / K, text, family="monospace", fontsize=8, va="center")
    ax.set_title(title + ("\n(in brackets: NPMI of the top 10 words)" if coherence is not None else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the sparse fast path
# The functions above are the reference definitions, written over dense [B, V] count matrices.
# The ones below compute the same quantities from the nonzero (m, v) pairs only (Reuters'
# training set: 49,001 of 1.35M entries): each E-step iteration is two sparse products,
# phi's normalizer norm_mv = sum_k exp(E[log theta_mk]) exp(E[log beta_kv]) at the nonzero
# entries (a sampled dense-dense product) and (n / norm) @ exp(E[log beta]).T (a sparse-dense
# product), never a [B, V] or [P, K] intermediate. Same updates, same stopping rule, same
# order of operations where it matters: tests/models/test_lda_fast.py ties each to its
# reference to 1e-6 in float64.

# torch marks sparse CSR support as beta with a warning on each first use; the operations used
# here (construction, sampled_addmm, CSR @ dense) are tested against the dense reference
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class Bag:
    """A count matrix by its nonzero entries: a sparse CSR tensor [B, V] (rows are documents,
    column indices the words v, values the counts n_mv), with the row m of each entry and the
    transposed pattern (words x documents) for products over documents."""

    def __init__(self, csr: torch.Tensor):
        self.csr, self.shape = csr, tuple(csr.shape)
        self.crow, self.v, self.n = csr.crow_indices(), csr.col_indices(), csr.values()
        self.m = torch.repeat_interleave(torch.arange(self.shape[0], device=csr.device), self.crow.diff())
        self._templates: dict = {}

    # the same entries ordered by word: the CSR pattern of the transpose [V, B], made on first
    # use (the topic statistics need it; an E-step for new documents does not)
    @cached_property
    def by_word(self) -> torch.Tensor:
        return torch.argsort(self.v, stable=True)

    @cached_property
    def crow_T(self) -> torch.Tensor:
        crow_T = torch.zeros(self.shape[1] + 1, dtype=self.crow.dtype, device=self.csr.device)
        crow_T[1:] = torch.cumsum(torch.bincount(self.v, minlength=self.shape[1]), 0)
        return crow_T

    @cached_property
    def m_T(self) -> torch.Tensor:
        return self.m[self.by_word]

    @classmethod
    def of(cls, x: "torch.Tensor | Bag") -> "Bag":
        """A Bag of a dense count matrix, of a sparse CSR tensor or a SparseCorpus, or the Bag itself."""
        if isinstance(x, Bag):
            return x
        if _is_sparse_corpus(x):
            return cls(x.rows(0, len(x)))
        return cls(x if x.layout == torch.sparse_csr else x.to_sparse_csr())

    def like(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR tensor with this pattern and other values (one per nonzero entry)."""
        return torch.sparse_csr_tensor(self.crow, self.v, values, self.shape, check_invariants=False)

    def like_T(self, values: torch.Tensor) -> torch.Tensor:
        """The transpose [V, B] of ``like(values)``, as CSR."""
        return torch.sparse_csr_tensor(self.crow_T, self.m_T, values[self.by_word], self.shape[::-1],
                                       check_invariants=False)

    def counts(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._templates:
            self._templates[dtype] = self.like(self.n.to(dtype))
        return self._templates[dtype]

    def at_entries(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a @ b)[m, v] at each nonzero entry, for a [B, K] and b [K, V]: [P]."""
        return torch.sparse.sampled_addmm(self.counts(a.dtype), a, b, beta=0.0).values()

    def rows(self, per_entry: torch.Tensor) -> torch.Tensor:
        """Sum over each document's entries: [P] -> [B]."""
        return per_entry.new_zeros(self.shape[0]).index_add_(0, self.m, per_entry)


class Topics:
    """What every document's update reads from q(beta) = Dir(lambda), computed once per lambda
    (each part on first use): E[log beta] [K, V], exp(E[log beta]) [K, V] and its transpose
    [V, K] (the E-step's), and exp(E[log beta_kv] - b_v) with b_v = max_k E[log beta_kv] (the
    ELBO's, which must not underflow). The exponentials are stored word-major ([V, K] in memory),
    the [K, V] forms being views: the layout in which a sampled product reads them without a copy."""

    def __init__(self, lam: torch.Tensor):
        self.lam = lam
        self.Elog = expected_log(lam)

    @cached_property
    def exp_T(self) -> torch.Tensor:
        return torch.exp(self.Elog).T.contiguous()

    @cached_property
    def exp(self) -> torch.Tensor:
        return self.exp_T.T

    @cached_property
    def shifted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp(E[log beta] - b) [K, V], b [1, V])."""
        b = self.Elog.max(0, keepdim=True).values
        return torch.exp(self.Elog - b).T.contiguous().T, b

    @classmethod
    def of(cls, lam: "torch.Tensor | Topics") -> "Topics":
        return lam if isinstance(lam, Topics) else cls(lam)


def sparse_e_step(x: "torch.Tensor | Bag", lam: "torch.Tensor | Topics", alpha: float,
                  gamma: torch.Tensor | None = None, iters: int = 100, tol: float = 1e-3,
                  stats: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`e_step` from the nonzero entries only: the same sweeps, start and stopping rule
    (mean change of gamma over the whole batch below ``tol``), in lambda's dtype. ``stats=False``
    leaves out the topic statistics (None)."""
    bag, topics = Bag.of(x), Topics.of(lam)
    B, K = bag.shape[0], topics.lam.shape[0]
    n = bag.n.to(topics.lam.dtype)
    counts, exp_Elog_beta, exp_Elog_beta_T = bag.counts(n.dtype), topics.exp, topics.exp_T
    if gamma is None:
        gamma = n.new_ones(B, K)
    for _ in range(iters):
        # exp(E[log theta_mk]) up to a factor per document, exp(-psi(sum_k gamma_mk)), which
        # cancels between phi's normalizer and the update (phi is normalized over k)
        exp_Elog_theta = torch.digamma(gamma).exp_()                                # [B, K]
        norm = torch.sparse.sampled_addmm(counts, exp_Elog_theta, exp_Elog_beta, beta=0.0).values()
        new = (bag.like(n / norm.clamp_(min=1e-30)) @ exp_Elog_beta_T).mul_(exp_Elog_theta).add_(alpha)
        done = bool((new - gamma).abs_().mean() < tol)
        gamma = new
        if done:
            break
    return gamma, sparse_topic_stats(bag, gamma, topics) if stats else None


def sparse_topic_stats(x: "torch.Tensor | Bag", gamma: torch.Tensor, lam: "torch.Tensor | Topics") -> torch.Tensor:
    """:func:`topic_stats` from the nonzero entries: s_kv = sum_m n_mv phi_mvk. [K, V]"""
    bag, topics = Bag.of(x), Topics.of(lam)
    exp_Elog_theta = torch.exp(expected_log(gamma))
    norm = bag.at_entries(exp_Elog_theta, topics.exp).clamp(min=1e-30)
    w = bag.n.to(topics.lam.dtype) / norm
    return topics.exp * (bag.like_T(w) @ exp_Elog_theta).T


def _shifted(x: "torch.Tensor | Bag", gamma: torch.Tensor, topics: "Topics"):
    """exp(E[log theta] - a_m) and exp(E[log beta] - b_v), each exponent shifted by its largest
    value over k so that nothing underflows, their product at the entries, and log norm."""
    bag = Bag.of(x)
    Elog_theta = expected_log(gamma)
    a = Elog_theta.max(-1, keepdim=True).values                                     # [B, 1]
    (eb, b), et = topics.shifted, torch.exp(Elog_theta - a)                         # b: [1, V]
    norm = bag.at_entries(et, eb)                                                   # norm_mv / exp(a_m + b_v)
    return bag, Elog_theta, et, eb, norm, norm.log() + a[bag.m, 0] + b[0, bag.v]


def phi_stats(x: "torch.Tensor | Bag", gamma: torch.Tensor, lam: "torch.Tensor | Topics"):
    """What the ELBO needs from phi at its optimum given (gamma, lambda), phi_mvk ∝
    exp(E[log theta_mk] + E[log beta_kv]) (:func:`phi_optimal`), without forming phi [P, K]:

        s_kv = sum_m n_mv phi_mvk,   t_mk = sum_v n_mv phi_mvk,   and
        sum_v n_mv log norm_mv,      norm_mv = sum_k exp(E[log theta_mk] + E[log beta_kv]),

    so that sum_mvk n_mv phi_mvk log phi_mvk = sum t E[log theta] + sum s E[log beta] - sum n log norm.
    Returns (s [K, V], t [B, K], per-document sum_v n_mv log norm_mv [B])."""
    bag, _, et, eb, norm, log_norm = _shifted(x, gamma, Topics.of(lam))
    n = bag.n.to(gamma.dtype)
    w = n / norm
    t = et * (bag.like(w) @ eb.T)
    s = eb * (bag.like_T(w) @ et).T
    return s, t, bag.rows(n * log_norm)


def sparse_local_elbo(x: "torch.Tensor | Bag", gamma: torch.Tensor, lam: "torch.Tensor | Topics",
                      alpha: float) -> torch.Tensor:
    """:func:`local_elbo` from the nonzero entries: sum_v n_mv log norm_mv - KL(Dir(gamma_m) || Dir(alpha))."""
    bag, *_, log_norm = _shifted(x, gamma, Topics.of(lam))
    words = bag.rows(bag.n.to(gamma.dtype) * log_norm)
    kl = kl_divergence(Dirichlet(gamma), Dirichlet(torch.full_like(gamma, alpha)))
    return words - kl


def sparse_cavi_step(x: "torch.Tensor | Bag", lam: torch.Tensor, gamma: torch.Tensor | None, alpha: float,
                     eta: float, size: int | None = None, t: int = 1, tau0: float = 1.0, kappa: float = 0.7,
                     iters: int = 100, tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cavi_step` from the nonzero entries (the same sweep: flat and warm E-steps, the
    better per document, then lambda)."""
    bag, topics = Bag.of(x), Topics(lam)
    fresh, _ = sparse_e_step(bag, topics, alpha, None, iters, tol, stats=False)
    if gamma is None:
        gamma = fresh
    else:
        warm, _ = sparse_e_step(bag, topics, alpha, gamma, iters, tol, stats=False)
        better = sparse_local_elbo(bag, warm, topics, alpha) > sparse_local_elbo(bag, fresh, topics, alpha)
        gamma = torch.where(better[:, None], warm, fresh)
    stats = sparse_topic_stats(bag, gamma, topics)
    if size is None or size == bag.shape[0]:
        return eta + stats, gamma
    rho = (tau0 + t) ** (-kappa)
    return (1 - rho) * lam + rho * (eta + size / bag.shape[0] * stats), gamma
