"""`python -m ppl_gen.bench figures --tiny` makes every figure the docs link under a run's name,
and every other linked figure is a file in docs/figures."""

import re
from pathlib import Path

import pytest

from ppl_gen.bench import figures
from ppl_gen.core.pictures import graphviz_missing

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def linked_figures() -> set[str]:
    found = set()
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        found |= set(re.findall(r"\(figures/([^)\s]+\.png)\)", page.read_text()))
    return found


def test_regenerates_every_linked_figure(tmp_path):
    made = figures.regenerate(tmp_path, tiny=True)
    runs = set(figures.RUNS) | {"vi"}
    assert set(made) == runs
    missing = []
    for rel in sorted(linked_figures()):
        run = rel.split("/")[0]
        if run not in runs:
            # a figure from another command (NUTS comparisons, diffusion): it must at least be shipped
            assert (DOCS / "figures" / rel).is_file(), f"docs link figures/{rel}, which no one made"
            continue
        if graphviz_missing() and Path(rel).name in ("model.png", "guide.png"):
            continue  # drawn only with graphviz; test_pictures says so
        if not (tmp_path / rel).is_file():
            missing.append(rel)
    assert not missing, f"linked by the docs, not made by `ppl_gen.bench figures`: {missing}"


def test_unknown_run_is_one_line():
    with pytest.raises(figures.kit.UserError, match="unknown figure run"):
        figures.regenerate(Path("/nonexistent"), tiny=True, only=["nope"])
