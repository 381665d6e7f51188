"""`python -m ppl_gen.bench figures` is where every docs figure comes from: each figure a page
links is a file in docs/figures, under a run of the command (figures/<run>/<file>.png) or shipped
by another command; a few runs regenerated with --tiny make exactly the files the docs link.

The whole `--tiny` regeneration (every run) takes about two minutes on a quiet 2-core CPU, too
long for the suite: `python -m ppl_gen.bench figures --tiny --out /tmp/figures` runs it."""

import re
from pathlib import Path

import pytest

from ppl_gen.bench import figures
from ppl_gen.core.pictures import graphviz_missing

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# runs that are quick with --tiny and between them exercise svi runs, render_model and the vi bench
QUICK = ["bayes_net-lecture", "vae", "vi"]


def linked_figures() -> set[str]:
    found = set()
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        found |= set(re.findall(r"\(figures/([^)\s]+\.png)\)", page.read_text()))
    return found


def test_every_linked_figure_is_shipped_and_named_by_its_run():
    runs = set(figures.RUNS) | {"vi"}
    for rel in sorted(linked_figures()):
        assert (DOCS / "figures" / rel).is_file(), f"docs link figures/{rel}, which is not in docs/figures"
        if "/" in rel:  # made by `ppl_gen.bench figures`: the folder is one of its runs
            assert rel.split("/")[0] in runs, f"figures/{rel}: no run of ppl_gen.bench figures is named so"


def test_quick_runs_make_what_the_docs_link(tmp_path):
    made = figures.regenerate(tmp_path, tiny=True, only=QUICK)
    assert set(made) == set(QUICK)
    missing = [rel for rel in sorted(linked_figures()) if rel.split("/")[0] in QUICK
               and not (graphviz_missing() and Path(rel).name in ("model.png", "guide.png"))
               and not (tmp_path / rel).is_file()]
    assert not missing, f"linked by the docs, not made by `ppl_gen.bench figures`: {missing}"


def test_unknown_run_is_one_line():
    with pytest.raises(figures.kit.UserError, match="unknown figure run"):
        figures.regenerate(Path("/nonexistent"), tiny=True, only=["nope"])
