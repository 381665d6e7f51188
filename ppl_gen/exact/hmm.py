"""Exact inference in a hidden Markov model, batched over sequences of different lengths.

Notation follows Rabiner (1989), "A tutorial on hidden Markov models and selected
applications in speech recognition", Proc. IEEE 77(2):257-286:

    pi_i   = p(z_1 = i)                       initial distribution        (log_pi, [K])
    A_ij   = p(z_t = j | z_{t-1} = i)         transition matrix           (log_A, [K, K])
    b_j(x) = p(x_t | z_t = j)                 emission densities          (log_b, [n, T, K])

Every function takes the emission log-densities already evaluated at the data, so one
implementation serves categorical, Gaussian or any other emissions.

Batching: ``n`` sequences are padded to a common length ``T``; ``mask[n, t]`` is True
where step t of sequence n is real. Masks must be prefixes (True then False): a
sequence starts at t = 0. Padded steps leave the recursions unchanged, so padding a
batch never changes a sequence's result. The only Python loop is over time; every
step is one tensor operation over all sequences, so the same code runs on a GPU.
"""

from __future__ import annotations

import torch


def _full_mask(log_b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(log_b.shape[:2], dtype=torch.bool, device=log_b.device)
    return mask.to(device=log_b.device, dtype=torch.bool)


def forward(log_pi: torch.Tensor, log_A: torch.Tensor, log_b: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x_1..x_T) per sequence, by the forward algorithm (Rabiner 1989, eqs. 19-21).

    alpha_t(j) = p(x_1..x_t, z_t = j) obeys alpha_t(j) = [sum_i alpha_{t-1}(i) A_ij] b_j(x_t).
    We carry the scaled alpha_t / p(x_t | x_<t) (Rabiner's section V-A scaling), so each
    step is a matrix product instead of a log-sum-exp, and sum the log scale factors:
    log p(x) = sum_t log c_t. Emissions are shifted by their max over states first, so
    Gaussian densities far in the tails do not underflow. Differentiable in all inputs.
    """
    mask = _full_mask(log_b, mask)
    shift = log_b.max(-1, keepdim=True).values                  # [n, T, 1]
    b = torch.exp(log_b - shift)                                  # in (0, 1], max 1 per step
    A = log_A.exp()
    alpha = log_pi.exp() * b[:, 0]                               # [n, K]
    c = alpha.sum(-1)
    alpha = alpha / c.unsqueeze(-1)
    log_px = torch.where(mask[:, 0], c.log() + shift[:, 0, 0], torch.zeros_like(c))
    for t in range(1, log_b.shape[1]):
        a = (alpha @ A) * b[:, t]
        c = a.sum(-1)
        m = mask[:, t]
        alpha = torch.where(m.unsqueeze(-1), a / c.unsqueeze(-1), alpha)
        log_px = log_px + torch.where(m, c.log() + shift[:, t, 0], torch.zeros_like(c))
    return log_px


def forward_backward(log_pi: torch.Tensor, log_A: torch.Tensor, log_b: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior state marginals gamma_t(j) = p(z_t = j | x_1..x_T) (Rabiner 1989, eq. 27).

    In log space: alpha_t as in :func:`forward`, beta_t(i) = p(x_{t+1}..x_T | z_t = i)
    from beta_t(i) = sum_j A_ij b_j(x_{t+1}) beta_{t+1}(j), and gamma = alpha beta / p(x).
    Returns (gamma [n, T, K], zero at padded steps; log p(x) [n]).
    """
    mask = _full_mask(log_b, mask)
    n, T, K = log_b.shape
    log_alpha = [log_pi + log_b[:, 0]]
    for t in range(1, T):
        new = torch.logsumexp(log_alpha[-1].unsqueeze(-1) + log_A, dim=-2) + log_b[:, t]
        log_alpha.append(torch.where(mask[:, t].unsqueeze(-1), new, log_alpha[-1]))
    log_beta = [torch.zeros_like(log_alpha[0])]                  # beta_T = 1
    for t in range(T - 2, -1, -1):
        new = torch.logsumexp(log_A + (log_b[:, t + 1] + log_beta[0]).unsqueeze(-2), dim=-1)
        log_beta.insert(0, torch.where(mask[:, t + 1].unsqueeze(-1), new, torch.zeros_like(new)))
    log_alpha, log_beta = torch.stack(log_alpha, 1), torch.stack(log_beta, 1)
    log_px = torch.logsumexp(log_alpha[:, -1], -1)              # alpha is carried through padding
    gamma = torch.exp(log_alpha + log_beta - log_px[:, None, None])
    return gamma * mask.unsqueeze(-1), log_px


def viterbi(log_pi: torch.Tensor, log_A: torch.Tensor, log_b: torch.Tensor,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable state path argmax_z p(z | x), by the Viterbi recursion (Rabiner 1989, eqs. 32-35).

    delta_t(j) = max_i delta_{t-1}(i) + log A_ij + log b_j(x_t), with back-pointers
    psi_t(j) = argmax_i; backtracking from argmax_j delta_T(j). At padded steps the
    back-pointer is the identity, so backtracking walks through the padding to each
    sequence's own last step. Returns (paths [n, T] with -1 at padding; log p(x, z*) [n]).
    """
    mask = _full_mask(log_b, mask)
    n, T, K = log_b.shape
    stay = torch.arange(K, device=log_b.device).expand(n, K)
    delta = log_pi + log_b[:, 0]
    psi = []
    for t in range(1, T):
        best, arg = (delta.unsqueeze(-1) + log_A).max(dim=-2)   # over the previous state i
        m = mask[:, t].unsqueeze(-1)
        delta = torch.where(m, best + log_b[:, t], delta)
        psi.append(torch.where(m, arg, stay))
    score, last = delta.max(-1)
    path = [last]
    for t in range(T - 2, -1, -1):
        path.insert(0, psi[t].gather(-1, path[0].unsqueeze(-1)).squeeze(-1))
    path = torch.stack(path, 1)
    return torch.where(mask, path, torch.full_like(path, -1)), score


def sample_states(pi: torch.Tensor, A: torch.Tensor, n: int, T: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """n hidden paths of length T from the Markov chain (pi, A): z_1 ~ pi, z_t ~ A[z_{t-1}]."""
    z = [torch.multinomial(pi.expand(n, -1), 1, generator=generator).squeeze(-1)]
    for _ in range(1, T):
        z.append(torch.multinomial(A[z[-1]], 1, generator=generator).squeeze(-1))
    return torch.stack(z, 1)


def match_states(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The relabelling perm (estimate[perm] ~ truth) that minimizes the summed squared
    distance between per-state parameter rows; an HMM's states are only identified up
    to such a permutation (the label-switching problem)."""
    from scipy.optimize import linear_sum_assignment

    est = estimate.detach().reshape(len(estimate), -1).double().cpu()
    tru = truth.detach().reshape(len(truth), -1).double().cpu()
    cost = torch.cdist(tru, est) ** 2                            # [true state, estimated state]
    _, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols, device=estimate.device)
