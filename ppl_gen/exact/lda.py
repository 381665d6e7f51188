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
    words = (x / x.sum(-1, keepdim=True).clamp(min=1)).double().cpu()
    first = int(torch.randint(len(words), (1,), generator=generator))
    picked = [first]
    d2 = ((words - words[first]) ** 2).sum(-1)
    for _ in range(K - 1):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)   # fewer distinct documents than K
        i = int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
        picked.append(i)
        d2 = torch.minimum(d2, ((words - words[i]) ** 2).sum(-1))
    return (noise + x[picked].double().cpu()).float().to(x.device)


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
    from ppl_gen.datasets.corpus import document_halves

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

    (-1 for a pair that never co-occurs), averaged over the n(n-1)/2 pairs. Shape [K]."""
    present = (counts > 0).to(torch.float64)
    D = present.shape[0]
    out = []
    for words in top_words(topics, n):
        d = present[:, words]                                           # [D, n]
        p_joint = (d.T @ d) / D
        p = p_joint.diagonal()
        i, j = torch.triu_indices(len(words), len(words), 1)
        pij, pi, pj = p_joint[i, j], p[i], p[j]
        score = torch.where(pij > 0, torch.log(pij / (pi * pj)) / -torch.log(pij.clamp(max=1 - 1e-12)),
                            torch.full_like(pij, -1.0))
        out.append(score.mean())
    return torch.stack(out)


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
