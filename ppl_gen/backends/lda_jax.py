"""Latent Dirichlet allocation's mean-field quantities in JAX, for ``models/lda.py``'s NumPyro twin.

The JAX counterparts of :mod:`ppl_gen.exact.lda`'s :func:`~ppl_gen.exact.lda.expected_log`,
:func:`~ppl_gen.exact.lda.phi_optimal`, :func:`~ppl_gen.exact.lda.topic_stats` and
:func:`~ppl_gen.exact.lda.e_step` (Blei, Ng & Jordan 2003, "Latent Dirichlet Allocation", JMLR 3,
section 5.3 and appendix A.3), written so they trace under ``jax.jit``: no data-dependent
shapes, and the E-step's sweeps run in ``jax.lax.while_loop`` with the torch version's
stopping rule, so both return the same gamma.

With the topics fixed, the optimal q(z_mn) = Cat(phi_mn) of a token of word v in document m is

    phi_mvk = exp(E[log theta_mk] + E[log beta_kv]) / c_mv = a_mk b_kv / c_mv,   c_mv = sum_k a_mk b_kv

(Blei et al. 2003, eq. 6). Sums over tokens, sum_v n_mv sum_k phi_mvk f(m, v, k), are then
matrix products of a [B, K], b [K, V] and n / c [B, V]: :func:`phi_expectation` computes them
without the [B, V, K] array (or the list of nonzero (m, v) pairs, whose number depends on the
data) that ``ppl_gen.exact.lda`` indexes.

Nothing here imports numpyro; jax is imported with the module (``ppl_gen`` itself never imports
this module at top level).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma


def expected_log(conc):
    """E[log p] under Dir(conc), row-wise: psi(conc) - psi(sum conc)."""
    return digamma(conc) - digamma(conc.sum(-1, keepdims=True))


def phi_optimal(gamma, lam, m, v):
    """phi_mvk ∝ exp(E[log theta_mk] + E[log beta_kv]) (Blei et al. 2003, eq. 6), for pairs (m, v)."""
    return jax.nn.softmax(expected_log(gamma)[m] + expected_log(lam)[:, v].T, -1)


def topic_stats(x, gamma, lam):
    """s_kv = sum_m n_mv phi_mvk with phi at its optimum given (gamma, lambda). [K, V]"""
    exp_Elog_theta, exp_Elog_beta = jnp.exp(expected_log(gamma)), jnp.exp(expected_log(lam))
    norm = jnp.maximum(exp_Elog_theta @ exp_Elog_beta, 1e-30)
    return exp_Elog_beta * (exp_Elog_theta.T @ (x / norm))


def e_step(x, lam, alpha: float, gamma=None, iters: int = 100, tol: float = 1e-3):
    """Coordinate ascent on each document's (gamma_m, phi_m) with the topics fixed:

        phi_mvk ∝ exp(E[log theta_mk]) exp(E[log beta_kv]),   gamma_mk = alpha + sum_v n_mv phi_mvk

    from a flat start (gamma = 1) unless ``gamma`` is given, until the mean change of gamma is
    below ``tol`` or after ``iters`` sweeps: ``ppl_gen.exact.lda.e_step``'s rule, as a
    ``lax.while_loop``. The early stop is over the whole batch, as in the torch version, so each
    document's gamma is the same number there and here. Returns gamma and the sufficient
    statistics s_kv = sum_m n_mv phi_mvk."""
    if gamma is None:
        gamma = jnp.ones((x.shape[0], lam.shape[0]), x.dtype)
    gamma = _sweeps(x, lam, alpha, gamma.astype(jnp.result_type(x, lam)), iters, tol)
    return gamma, topic_stats(x, gamma, lam)


# compiled once per (shapes, iters, tol): called outside jit too (NumPyro traces model and guide
# eagerly at initialization), where a fresh while_loop would otherwise be compiled at every call
@partial(jax.jit, static_argnums=(4, 5))
def _sweeps(x, lam, alpha, gamma, iters: int, tol: float):
    exp_Elog_beta = jnp.exp(expected_log(lam))                                     # [K, V]

    def sweep(state):
        i, gamma, _ = state
        exp_Elog_theta = jnp.exp(expected_log(gamma))                              # [B, K]
        norm = jnp.maximum(exp_Elog_theta @ exp_Elog_beta, 1e-30)                  # [B, V]
        new = alpha + exp_Elog_theta * ((x / norm) @ exp_Elog_beta.T)
        return i + 1, new.astype(gamma.dtype), jnp.abs(new - gamma).mean() < tol

    def more(state):
        i, _, done = state
        return (i < iters) & ~done

    return jax.lax.while_loop(more, sweep, (0, gamma, jnp.array(False)))[1]


def phi_factors(gamma, lam):
    """log a [B, K] and log b [K, V] of phi_mvk = a_mk b_kv / c_mv: E[log theta_m] and E[log beta_:v],
    each shifted by its maximum over k (phi is unchanged, and a, b stay in (0, 1]: no overflow,
    and underflow only where phi itself is below ~1e-300 in float64)."""
    log_a = expected_log(gamma)
    log_b = expected_log(lam)
    return log_a - log_a.max(-1, keepdims=True), log_b - log_b.max(0, keepdims=True)


def phi_expectation(x, log_a, log_b, theta_term=None, topic_term=None):
    """Per document m: sum_v n_mv sum_k phi_mvk (theta_term_mk + topic_term_kv), [B], where phi is
    given by :func:`phi_factors`. Either term may be None (zero). With n_mv / c_mv = w_mv:

        sum_v n_mv sum_k phi_mvk G_mk = sum_k G_mk a_mk (w b^T)_mk
        sum_v n_mv sum_k phi_mvk F_kv = sum_k a_mk (w (b * F)^T)_mk"""
    a, b = jnp.exp(log_a), jnp.exp(log_b)
    w = x / jnp.maximum(a @ b, jnp.finfo(a.dtype).tiny)                           # n_mv / c_mv, [B, V]
    out = jnp.zeros(x.shape[:1], a.dtype)
    if theta_term is not None:
        out = out + (theta_term * a * (w @ b.T)).sum(-1)
    if topic_term is not None:
        out = out + (a * (w @ (b * topic_term).T)).sum(-1)
    return out


def phi_log_phi(x, log_a, log_b):
    """Per document m: sum_v n_mv sum_k phi_mvk log phi_mvk = -H[q(z_m)], [B]. Since
    log phi_mvk = log a_mk + log b_kv - log c_mv and sum_k phi_mvk = 1, it is
    :func:`phi_expectation` of (log a, log b) minus sum_v n_mv log c_mv."""
    c = jnp.maximum(jnp.exp(log_a) @ jnp.exp(log_b), jnp.finfo(log_a.dtype).tiny)
    return phi_expectation(x, log_a, log_b, log_a, log_b) - (x * jnp.log(c)).sum(-1)
