"""The docs site builds with `mkdocs build --strict` (no broken links or anchors), from the
configuration inside docs/; and the lecture's numbers on the pages are the ones the commands print."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is not installed")
    # run from inside docs/, as the README says: MkDocs refuses a docs_dir that is the folder of an
    # absolute config path, and docs_dir "." keeps pages and configuration together
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml",
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=DOCS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "variational-inference" / "index.html").is_file()


def test_every_page_in_the_index_links_back():
    index = (DOCS / "index.md").read_text()
    for page in ("graphical-models", "markov-models", "variational-inference", "lda", "vae",
                 "explicit-vs-amortized", "autoregressive-and-discrete"):
        assert f"({page}.md" in index, page
        assert "(index.md" in (DOCS / f"{page}.md").read_text(), f"{page}.md has no link back to the index"


def _stated(page: str, key: str) -> float:
    """The value a page shows for `key: value` in a command's printed output."""
    m = re.search(rf"^\s*{key}: (-?[0-9.]+)$", (DOCS / page).read_text(), re.M)
    assert m, f"{page} shows no {key}"
    return float(m.group(1))


def test_lecture_network_numbers_are_what_the_command_prints(tmp_path):
    """log P(e), the ELBO, its two terms and the KL on variational-inference.md are the default
    run of models/bayes_net.py (exact numbers: enumeration, seed 0), to the 4 decimals shown."""
    from inference.svi import main

    assert main([str(ROOT / "models" / "bayes_net.py"), "--no-progress", "--out", str(tmp_path / "bn")]) == 0
    m = json.loads((tmp_path / "bn" / "metrics.json").read_text())
    for key in ("log_evidence", "elbo_final", "elbo_expected_log_joint", "elbo_entropy_q", "kl_vi_to_exact"):
        assert _stated("variational-inference.md", key) == pytest.approx(m[key], abs=5e-5), key
    # and the identity the page states: log P(e) = ELBO + KL
    assert m["log_evidence"] == pytest.approx(m["elbo_final"] + m["kl_vi_to_exact"], abs=1e-6)
