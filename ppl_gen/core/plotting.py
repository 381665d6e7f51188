"""Plots a person would rather look at than read. Every function writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def elbo_curve(trace: list[dict], path: Path, title: str = "") -> Path:
    """Training ELBO per data point against step (raw and smoothed), held-out ELBO as dots."""
    steps = np.array([int(r["step"]) for r in trace])
    elbo = -np.array([float(r["loss"]) for r in trace])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if len(steps):
        ax.plot(steps, elbo, color="tab:blue", alpha=0.25, lw=0.8, label="train ELBO (batch estimate)")
        ax.plot(steps, _smooth(elbo, max(len(elbo) // 50, 1)), color="tab:blue", lw=1.6, label="smoothed")
        test = [(int(r["step"]), float(r["test_elbo"])) for r in trace if r.get("test_elbo") not in (None, "")]
        if test:
            ts, tv = zip(*test)
            ax.plot(ts, tv, "o-", color="tab:orange", ms=4, label="held-out ELBO")
        lo = np.percentile(elbo[len(elbo) // 10:], 1) if len(elbo) > 20 else elbo.min()
        ax.set_ylim(bottom=lo - 0.1 * (elbo.max() - lo + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO per data point (nats)")
    ax.set_title(title or "ELBO during training")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tile(images: torch.Tensor, shape: list[int], nrow: int) -> np.ndarray:
    """Flat images (n, H*W) as one canvas of ``nrow`` rows, with light grey gutters."""
    imgs = images.detach().float().cpu().reshape(-1, *shape).numpy()
    ncol = int(np.ceil(len(imgs) / nrow))
    h, w = shape
    canvas = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1), 0.15)
    for k, img in enumerate(imgs):
        r, c = divmod(k, ncol)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = img
    return canvas


def image_grid(images: torch.Tensor, shape: list[int], path: Path, title: str = "",
               nrow: int | None = None, row_labels: list[str] | None = None) -> Path:
    """Tile flat images (n, H*W) with values in [0, 1] into one grayscale PNG."""
    n = len(images)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    h, w = shape
    canvas = tile(images, shape, nrow)
    # pixels become inches at a rate that keeps 8x8 digits legible and 28x28 grids on a page
    inch = min(1 / 12, 9 / canvas.shape[1], 9 / canvas.shape[0])
    fig, ax = plt.subplots(figsize=(max(canvas.shape[1] * inch + 1.2, 5.0), canvas.shape[0] * inch + 0.8))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([1 + r * (h + 1) + h / 2 for r in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_2d(points: torch.Tensor, labels: torch.Tensor | None, path: Path, title: str = "",
               xlabel: str = "z1", ylabel: str = "z2") -> Path:
    pts = points.detach().float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    if labels is not None:
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6, alpha=0.8)
        fig.colorbar(sc, ax=ax, label="label")
    else:
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_curves(traces: dict[str, list[dict]], path: Path) -> Path:
    """ELBO per data point against step and against training seconds, one line per guide."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    lows = []
    for k, (name, trace) in enumerate(traces.items()):
        color = f"C{k}"
        steps = np.array([int(r["step"]) for r in trace])
        secs = np.array([float(r["seconds"]) for r in trace])
        elbo = _smooth(-np.array([float(r["loss"]) for r in trace]), max(len(trace) // 50, 1))
        test = [(int(r["step"]), float(r["seconds"]), float(r["test_elbo"])) for r in trace
                if r.get("test_elbo") not in (None, "")]
        for ax, x in ((axes[0], steps), (axes[1], secs)):
            ax.plot(x, elbo, color=color, lw=1.5, label=f"{name} (train, smoothed)")
        if test:
            ts, tsec, tv = zip(*test)
            axes[0].plot(ts, tv, "o--", color=color, ms=3.5, lw=0.8, label=f"{name} (held-out)")
            axes[1].plot(tsec, tv, "o--", color=color, ms=3.5, lw=0.8)
        if len(elbo) > 10:
            lows.append(np.percentile(elbo[len(elbo) // 5:], 1))
    if lows:
        top = max(ax.get_ylim()[1] for ax in axes)
        axes[0].set_ylim(min(lows) - 0.05 * (top - min(lows)), top)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel("ELBO per data point (nats)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("same model, data, seed and step budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_bars(rows: list[dict], metrics: list, path: Path) -> Path | None:
    """One panel per declared metric (``ppl_gen.Metric``): each guide's value as a dot with its
    number, the better direction in the title. Dots, not bars: ELBOs are negative and differ
    far less than their size, so bars from zero would hide the differences. A row from several
    seeds (``<key>_se``, ``<key>_values``) shows its mean with a +-1 standard error bar and each
    seed as a small grey dot. None: nothing to draw."""
    panels = [m for m in metrics if any(r.get(m.key) is not None for r in rows)]
    if not panels:
        return None
    names = [r["guide"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.2, 0.45 * len(rows) + 1.6),
                             squeeze=False, sharey=True)
    y = np.arange(len(rows))
    for ax, m in zip(axes[0], panels):
        vals = [r.get(m.key) for r in rows]
        finite = [v for v in vals if v is not None]
        for yi, v, r in zip(y, vals, rows):
            if v is None:
                continue
            seeds, se = r.get(f"{m.key}_values") or [], r.get(f"{m.key}_se")
            if seeds:
                ax.plot(seeds, [yi] * len(seeds), "o", color="0.6", ms=3, zorder=1)
                finite += list(seeds)
            if se:
                ax.errorbar([v], [yi], xerr=[se], fmt="o", color="C0", ms=6, capsize=3, zorder=2)
            else:
                ax.plot([v], [yi], "o", color="C0", ms=6, zorder=2)
            text = m.fmt.format(v) + (f" ± {m.fmt.format(se)}" if se else "")
            ax.annotate(text, (v, yi), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
        lo, hi = min(finite), max(finite)
        pad = 0.25 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
        ax.set_xlim(lo - pad, hi + pad)
        better = {True: " (higher is better)", False: " (lower is better)"}.get(m.higher_is_better, "")
        ax.set_title(m.header + better, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0, 0].set_yticks(y, names)
    axes[0, 0].set_ylim(-0.6, len(rows) - 0.4)
    axes[0, 0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def posterior_panels(panels: list[dict], path: Path, title: str = "") -> Path:
    """Each panel: a density on a grid (filled contours) and Gaussians drawn as 1- and 2-sd
    ellipses (axis-aligned: diagonal covariance). Optional per panel: ``label`` (which data
    point, e.g. its class) for the title and ``image`` (the data point, flat, with ``shape``)
    shown as an inset, so a reader sees which x each posterior belongs to."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.3), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        z1, z2 = panel["z1"].cpu().numpy(), panel["z2"].cpu().numpy()
        ax.contourf(z1, z2, panel["density"].cpu().numpy(), levels=12, cmap="Greys")
        if panel.get("image") is not None:
            inset = ax.inset_axes([0.74, 0.74, 0.24, 0.24])
            inset.imshow(panel["image"].detach().float().cpu().reshape(panel["shape"]).numpy(), cmap="gray_r",
                         vmin=0, vmax=1, interpolation="nearest")
            inset.set_xticks([])
            inset.set_yticks([])
        for k, (label, (mu, sigma)) in enumerate(panel["gaussians"].items()):
            mu, sigma = mu.cpu().numpy(), sigma.cpu().numpy()
            t = np.linspace(0, 2 * np.pi, 200)
            for r, style in ((1, "-"), (2, ":")):
                ax.plot(mu[0] + r * sigma[0] * np.cos(t), mu[1] + r * sigma[1] * np.sin(t), style,
                        color=f"C{k + 1}", lw=1.6, label=label if r == 1 else None)
        head = f"{panel['label']}: " if panel.get("label") else ""
        ax.set_title(f"{head}log p(x) = {panel['log_px']:.2f}", fontsize=9)
        ax.set_xlabel("z1")
        ax.set_aspect("equal")
    axes[0, 0].set_ylabel("z2")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.5, 0.01, "grey: p(z | x) on a grid (darker = more mass); lines: q's 1-sd (solid) and 2-sd (dotted) "
             "ellipses", ha="center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_panels(panels: dict, shape: list[int], path: Path, title: str = "") -> Path:
    """One square grid of flat images (n, H*W), values in [0, 1], per named panel, side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 0.4, 3.0), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels.items()):
        ax.imshow(tile(images, shape, int(np.ceil(np.sqrt(len(images))))), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trace_terms(trace: list[dict], labels: dict[str, str], path: Path, title: str = "") -> Path | None:
    """One panel per logged ELBO term of trace.csv (``labels``: column -> axis label), against
    step, with a moving average over 2% of the steps; None when no row holds the terms."""
    panels = {k: [(int(r["step"]), float(r[k])) for r in trace if r.get(k) not in (None, "")] for k in labels}
    if not any(panels.values()):
        return None
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], labels.items()):
        points = panels[key]
        if not points:
            continue
        steps, values = np.array(points).T
        ax.plot(steps, values, lw=0.5, alpha=0.4, color="C0")
        w = max(len(values) // 50, 1)
        if w > 1:
            smooth = np.convolve(values, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, lw=1.5, color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
