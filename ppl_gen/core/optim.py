"""An Adam that updates only the rows of a parameter that received a gradient.

Per-data-point ("local") variational parameters of an explicit guide are a table with one
row per training example; a minibatch step touches only its own rows. Plain Adam would still
move every other row (its running averages keep pushing after the gradient is gone), so an
example that is not in the batch would change anyway. This optimizer keeps Adam's update,
with moments and bias correction counted per row, and leaves untouched rows exactly as they
were: the "lazy" Adam used for sparse embeddings (Kingma & Ba 2015 for the update itself).
"""

from __future__ import annotations

import torch


class RowwiseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.reshape(p.shape[0], -1)
                rows = (g != 0).any(dim=1).nonzero().squeeze(1)  # rows this step touched
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                t = state["step"][rows] + 1
                state["step"][rows] = t
                gr = p.grad[rows]
                m = state["exp_avg"][rows].mul_(beta1).add_(gr, alpha=1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(gr, gr, value=1 - beta2)
                state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
                shape = (-1,) + (1,) * (p.dim() - 1)
                m_hat = m / (1 - beta1 ** t).reshape(shape)
                v_hat = v / (1 - beta2 ** t).reshape(shape)
                p[rows] -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])
