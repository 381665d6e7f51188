"""Linear-Gaussian networks in closed form: the joint, conditioning, and Gaussian KL.

A linear-Gaussian network sets each node to a linear function of its parents plus
independent noise, x_t = b_t + sum_s W_ts x_s + eps_t, eps_t ~ N(0, v_t) (Koller & Friedman
2009, sec. 7.2). In vector form x = b + W x + eps, so with L = (I - W)^{-1}

    x ~ N(L b, L diag(v) L^T).

Conditioning a joint Gaussian on observed coordinates o (Bishop 2006, eq. 2.81-2.82):

    mu_{h|o}    = mu_h + S_ho S_oo^{-1} (x_o - mu_o)
    Sigma_{h|o} = S_hh - S_ho S_oo^{-1} S_oh
"""

from __future__ import annotations

import torch


def linear_gaussian_joint(b: torch.Tensor, W: torch.Tensor, v: torch.Tensor):
    """Mean and covariance of x = b + W x + eps, eps ~ N(0, diag v); W strictly lower
    triangular in a topological order."""
    n = b.shape[-1]
    L = torch.linalg.inv(torch.eye(n, dtype=W.dtype, device=W.device) - W)
    return L @ b, L @ torch.diag(v) @ L.T


def condition(mean: torch.Tensor, cov: torch.Tensor, observed: list[int], values: torch.Tensor):
    """The Gaussian of the other coordinates given x[observed] = values."""
    hidden = [i for i in range(mean.shape[-1]) if i not in observed]
    if not observed:
        return mean.clone(), cov.clone()
    S_hh, S_ho, S_oo = cov[hidden][:, hidden], cov[hidden][:, observed], cov[observed][:, observed]
    gain = torch.linalg.solve(S_oo, S_ho.T).T          # S_ho S_oo^{-1}
    mu = mean[hidden] + gain @ (values - mean[observed])
    Sigma = S_hh - gain @ S_ho.T
    return mu, (Sigma + Sigma.T) / 2


def kl_gaussian(m0: torch.Tensor, S0: torch.Tensor, m1: torch.Tensor, S1: torch.Tensor) -> torch.Tensor:
    """KL(N(m0, S0) || N(m1, S1)) = 1/2 [tr(S1^-1 S0) + d^T S1^-1 d - k + log det S1 - log det S0]."""
    k = m0.shape[-1]
    d = m1 - m0
    S1_inv_S0 = torch.linalg.solve(S1, S0)
    return 0.5 * (torch.trace(S1_inv_S0) + d @ torch.linalg.solve(S1, d) - k
                  + torch.logdet(S1) - torch.logdet(S0))
