"""The lecture's pictures of a model, drawn from the model file itself.

The graphical-models lecture draws every model as a graph: one node per random variable,
shaded when observed, boxes (plates) around what repeats N times. ``pyro.render_model``
(Pyro >= 1.8) draws the same picture from a model's trace: sample sites become nodes,
``obs=`` sites are filled grey, ``pyro.plate`` becomes a box labelled with its size, and
with ``render_distributions=True`` each node carries its distribution's name. Drawn for the
guide, the same call shows the variational family q: which latents it keeps dependent
(full rank) and which it factorizes (mean field), and whether an encoder feeds it (amortized).

graphviz is an optional extra (``pip install -e ".[pictures]"``) and needs the ``dot``
program (Debian: ``apt-get install graphviz``). Without either, :func:`model_pictures`
returns one line saying how to get the pictures; nothing fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pyro
import torch

HOW_TO_GET = ("model.png/guide.png not drawn: pip install graphviz (the `pictures` extra) "
              "and the graphviz program `dot` (apt-get install graphviz)")
# rows of the data the picture is traced on: a plate is drawn with the full data set's size,
# so a few rows are enough and keep the trace of a big model cheap
ROWS = 4


def graphviz_missing() -> str | None:
    """None when pictures can be drawn, else the one line saying what to install."""
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return HOW_TO_GET
    if shutil.which("dot") is None:
        return HOW_TO_GET
    return None


def _args(fn: Callable, x: torch.Tensor | None) -> tuple[tuple, dict]:
    """The arguments the runner would pass on a minibatch of the first ROWS rows."""
    from ppl_gen.core.train import call_args

    if x is None:
        return (None,), {}
    n = len(x)
    idx = torch.arange(min(ROWS, n), device=x.device)
    return call_args(fn, x, idx, n)


def render(fn: Callable, x: torch.Tensor | None, path: Path) -> Path:
    """Draw ``fn``'s graph (plates, shaded observed nodes, distributions) into ``path`` (PNG).

    The trace runs under a forked RNG and a restored parameter store, so drawing a picture
    never changes a run's numbers or adds parameters to it."""
    args, kwargs = _args(fn, x)
    store = pyro.get_param_store()
    saved = store.get_state()
    try:
        with torch.random.fork_rng(devices=[x.device] if x is not None and x.device.type == "cuda" else []):
            try:
                graph = pyro.render_model(fn, model_args=args, model_kwargs=kwargs, render_distributions=True)
            except AttributeError:
                if x is None:
                    raise
                # Pyro's provenance tracking cannot slice a trained per-point table in a subsampled
                # plate (an explicit guide): trace the first rows as the whole data set instead, with
                # fresh parameters (the graph does not depend on their values)
                store.clear()
                rows = x[:ROWS]
                graph = pyro.render_model(fn, model_args=(rows,), render_distributions=True)
    finally:
        store.set_state(saved)
    graph.format = "png"
    # graphviz writes PATH (the dot source) next to PATH.png; keep only the picture
    source = path.with_suffix("")
    graph.render(filename=str(source), cleanup=True)
    return path


def model_pictures(spec, guide, dataset, out_dir: Path) -> list[Path] | str:
    """``model.png`` and ``guide.png`` in ``out_dir``, drawn from the code with pyro.render_model.

    ``spec``: the model file's :class:`~ppl_gen.core.protocol.Spec`; ``guide``: the fitted guide
    (function or :class:`~ppl_gen.core.protocol.Guide`); ``dataset``: its Dataset (the pictures
    are traced on a few training rows). Returns the paths written, or one line saying why
    nothing was drawn (graphviz missing, or a model Pyro cannot trace for a picture)."""
    missing = graphviz_missing()
    if missing:
        return missing
    out_dir = Path(out_dir)
    fn = getattr(guide, "fn", guide)
    written = []
    for name, f in (("model", spec.model), ("guide", fn)):
        try:
            written.append(render(f, dataset.train, out_dir / f"{name}.png"))
        except Exception as e:  # a picture is a nicety: a model Pyro cannot draw still runs
            return f"{name}.png not drawn: pyro.render_model failed ({type(e).__name__}: {str(e)[:120]})"
    return written
