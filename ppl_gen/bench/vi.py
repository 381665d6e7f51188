"""``python -m ppl_gen.bench vi [--out DIR]``: the numbers and pictures of docs/variational-inference.md.

Two measurements the lecture's VI slides are about:

* **KL's asymmetry.** A Gaussian q fitted to a bimodal p by KL(q || p) (the direction VI
  minimizes: mode seeking, q sits on one bump) and by KL(p || q) (moment matching, q covers
  both bumps and the valley between). Both KLs are computed by quadrature on a fine grid.
* **Gradient estimators.** The gradient of one data point's ELBO with respect to the
  variational parameters lambda = (mu, log sigma) of a Gaussian q, estimated two ways from the
  same number of draws z ~ q:

      score function (REINFORCE; Williams 1992, Paisley, Blei & Jordan 2012, Ranganath,
      Gerrish & Blei 2014):   grad = f(z) * grad_lambda log q_lambda(z)
      reparameterized (Kingma & Welling 2014; Rezende, Mohamed & Wierstra 2014):
                              grad = grad_lambda f(mu + sigma * eps),  eps ~ N(0, I)

  with f(z) = log p(x, z) - log q_lambda(z). Both are unbiased (the score's E_q[grad log q] = 0
  removes the term from f's own dependence on lambda); their variances differ by orders of
  magnitude, which is why the VAE samples z = mu + sigma * eps. Measured on the VAE of
  models/vae.py after a short fit, at the encoder's lambda for held-out digits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ppl_gen.bench import kit

# ------------------------------------------------------------------ KL(q || p) against KL(p || q)
MODES, MODE_SD = (-2.0, 2.0), 0.6  # the bimodal target: an equal mixture of N(-2, 0.6^2), N(2, 0.6^2)
GRID = np.linspace(-9.0, 9.0, 36001)


def _normal_pdf(z, m, s):
    return np.exp(-0.5 * ((z - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))


def target_pdf(z):
    return sum(0.5 * _normal_pdf(z, m, MODE_SD) for m in MODES)


def kl(a: np.ndarray, b: np.ndarray) -> float:
    """KL(a || b) = int a log(a / b) dz on GRID (0 log 0 = 0)."""
    dz = GRID[1] - GRID[0]
    keep = a > 0
    return float(np.sum(a[keep] * (np.log(a[keep]) - np.log(np.maximum(b[keep], 1e-300)))) * dz)


def kl_fits() -> dict:
    """The Gaussian minimizing each direction of KL to the bimodal target, and both KLs of each."""
    from scipy.optimize import minimize

    p = target_pdf(GRID)
    reverse = lambda th: kl(_normal_pdf(GRID, th[0], math.exp(th[1])), p)  # noqa: E731  KL(q || p)
    # started off-centre; from exactly 0 the symmetric saddle is a fixed point
    best = min((minimize(reverse, [m0, 0.0], method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-10})
                for m0 in (0.5, 1.5, 3.0)), key=lambda r: r.fun)
    m_rev, s_rev = float(best.x[0]), math.exp(best.x[1])
    # KL(p || q) over Gaussians is minimized by matching p's mean and variance (moment matching)
    dz = GRID[1] - GRID[0]
    m_fwd = float(np.sum(GRID * p) * dz)
    s_fwd = math.sqrt(float(np.sum((GRID - m_fwd) ** 2 * p) * dz))
    out = {}
    for name, (m, s) in {"KL(q||p)": (m_rev, s_rev), "KL(p||q)": (m_fwd, s_fwd)}.items():
        q = _normal_pdf(GRID, m, s)
        out[name] = {"mean": m, "sd": s, "KL(q||p)": kl(q, p), "KL(p||q)": kl(p, q)}
    return out


def plot_kl(fits: dict, path: Path) -> Path:
    from ppl_gen.core import plotting  # noqa: F401  (Agg backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.fill_between(GRID, target_pdf(GRID), color="0.85", label="p(z): two bumps")
    for k, (name, f) in enumerate(fits.items()):
        ax.plot(GRID, _normal_pdf(GRID, f["mean"], f["sd"]), color=f"C{k}", lw=2,
                label=f"q minimizing {name}: N({f['mean']:.2f}, {f['sd']:.2f}^2)")
    ax.set_xlim(-6, 6)
    ax.set_xlabel("z")
    ax.set_ylabel("density")
    ax.set_title("fitting a Gaussian q to a bimodal p: mode seeking against mass covering", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ score function against reparameterization
def gradient_draws(log_joint: Callable[[torch.Tensor], torch.Tensor], mu: torch.Tensor, log_sigma: torch.Tensor,
                   draws: int, samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``draws`` independent estimates of grad_lambda ELBO, lambda = (mu, log_sigma), each from
    ``samples`` draws z ~ q = N(mu, diag sigma^2), by both estimators. ``log_joint(z)`` is
    log p(x, z) for z of shape (..., d). Returns {"score": (draws, 2d), "reparam": (draws, 2d)}."""
    d = mu.shape[-1]
    eps = torch.randn(draws, samples, d, generator=generator, dtype=mu.dtype, device=mu.device)
    out = {}
    for how in ("score", "reparam"):
        m, ls = mu.detach().clone().requires_grad_(), log_sigma.detach().clone().requires_grad_()
        q = torch.distributions.Normal(m, ls.exp())
        if how == "reparam":
            z = m + ls.exp() * eps  # the path from lambda to z is differentiable
            f = log_joint(z) - q.log_prob(z).sum(-1)
            surrogate = f.mean(1)
        else:
            z = (m + ls.exp() * eps).detach()  # z is only a sample: no path from lambda
            f = (log_joint(z) - q.log_prob(z).sum(-1)).detach()
            surrogate = (f * q.log_prob(z).sum(-1)).mean(1)
        rows = []
        for r in range(draws):  # one gradient per independent estimate
            g_m, g_ls = torch.autograd.grad(surrogate[r], (m, ls), retain_graph=r < draws - 1)
            rows.append(torch.cat([g_m, g_ls]))
        out[how] = torch.stack(rows)
    return out


def normal_normal_gradient(x: float, mu: float, log_sigma: float) -> tuple[float, float]:
    """The exact grad of the ELBO of z ~ N(0, 1), x | z ~ N(z, 1), q = N(mu, sigma^2):
    ELBO = -log 2pi - (mu^2 + sigma^2)/2 - ((x - mu)^2 + sigma^2)/2 + log sigma + (1 + log 2pi)/2,
    so d/dmu = x - 2 mu and d/dlog sigma = 1 - 2 sigma^2. The oracle of the tests."""
    return x - 2 * mu, 1 - 2 * math.exp(2 * log_sigma)


def vae_gradient_variance(steps: int = 1000, points: int = 8, draws: int = 200,
                          samples=(1, 10, 100), seed: int = 0) -> dict:
    """Fit models/vae.py on the digits for ``steps`` (the runner's defaults otherwise), then at
    the encoder's lambda for ``points`` held-out digits measure each estimator's variance (per
    coordinate of grad lambda, averaged over coordinates and points) from ``draws`` estimates."""
    import pyro

    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.settings import RunConfig
    from ppl_gen.core.train import Trainer, make_elbo

    root = Path(__file__).resolve().parents[2]
    setup = RunSetup.build(RunConfig(model_file=str(root / "models" / "vae.py"), steps=steps, threads=1,
                                     options={"latent_dim": 2}))
    vae = setup.spec.model.__self__
    trainer = Trainer(setup.spec.model, setup.guide, setup.dataset.train, make_elbo("trace"), lr=1e-3,
                      batch_size=128, seed=seed)
    for t in range(1, steps + 1):
        trainer.step(t)
    pyro.clear_param_store()
    x = setup.dataset.test[:points]
    gen = torch.Generator().manual_seed(seed)
    rows = {s: {"score": [], "reparam": [], "z_gap": []} for s in samples}
    with torch.no_grad():
        mu, sigma = vae.encoder(x)
    for i in range(points):
        log_joint = lambda z, xi=x[i]: vae.prior(xi).log_prob(z) + vae.likelihood(z).log_prob(xi)  # noqa: E731
        for s in samples:
            g = gradient_draws(log_joint, mu[i], sigma[i].log(), draws, s, gen)
            for how in ("score", "reparam"):
                rows[s][how].append(g[how].var(0).mean().item())
            # unbiasedness: the two means differ by no more than their standard errors allow
            se = (g["score"].var(0) / draws + g["reparam"].var(0) / draws).sqrt()
            rows[s]["z_gap"].append(((g["score"].mean(0) - g["reparam"].mean(0)).abs() / se).max().item())
    table = {s: {"score_var": float(np.mean(r["score"])), "reparam_var": float(np.mean(r["reparam"])),
                 "ratio": float(np.mean(r["score"]) / np.mean(r["reparam"])), "max_z": float(max(r["z_gap"]))}
             for s, r in rows.items()}
    return {"steps": steps, "points": points, "draws": draws, "latent_dim": 2, "by_samples": table}


def plot_gradients(result: dict, path: Path) -> Path:
    from ppl_gen.core import plotting  # noqa: F401
    import matplotlib.pyplot as plt

    s = sorted(result["by_samples"])
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for k, (key, name) in enumerate((("score_var", "score function  f(z) grad log q(z)"),
                                     ("reparam_var", "reparameterized  grad f(mu + sigma eps)"))):
        v = [result["by_samples"][n][key] for n in s]
        ax.loglog(s, v, "o-", color=f"C{k}", label=name)
    ax.set_xlabel("samples z ~ q per gradient estimate")
    ax.set_ylabel("variance of the gradient estimate\n(mean over coordinates of lambda)")
    ax.set_title(f"VAE on held-out digits ({result['points']} points, {result['draws']} estimates each)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = kit.parser("python -m ppl_gen.bench vi", __doc__)
    p.add_argument("--out", help="folder for kl-asymmetry.png and gradient-variance.png")
    p.add_argument("--steps", type=int, default=1000, help="VAE training steps before measuring")
    p.add_argument("--points", type=int, default=8, help="held-out digits the gradients are measured at")
    p.add_argument("--draws", type=int, default=200, help="independent gradient estimates per point")
    args = p.parse_args(argv)

    def measure():
        result = {"kl": kl_fits(), "gradients": vae_gradient_variance(args.steps, args.points, args.draws)}
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            plot_kl(result["kl"], out / "kl-asymmetry.png")
            plot_gradients(result["gradients"], out / "gradient-variance.png")
        return result

    def report(r):
        lines = ["a Gaussian q fitted to p = 0.5 N(-2, 0.6^2) + 0.5 N(2, 0.6^2):"]
        for name, f in r["kl"].items():
            lines.append(f"  minimizing {name}: q = N({f['mean']:.3f}, {f['sd']:.3f}^2)   "
                         f"KL(q||p) = {f['KL(q||p)']:.3f}   KL(p||q) = {f['KL(p||q)']:.3f}")
        g = r["gradients"]
        lines.append(f"grad of the ELBO wrt lambda = (mu, log sigma), VAE (latent 2, {g['steps']} steps), "
                     f"{g['points']} held-out digits, {g['draws']} estimates each:")
        lines.append("  samples   score-function var   reparameterized var   ratio   max |mean gap| / se")
        for s, row in sorted(g["by_samples"].items()):
            lines.append(f"  {s:>7}   {row['score_var']:>18.4g}   {row['reparam_var']:>19.4g}   "
                         f"{row['ratio']:>5.0f}   {row['max_z']:.2f}")
        return "\n".join(lines)

    return kit.run(args, measure, report)
