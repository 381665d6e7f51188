"""docs/model-files.md's flag table is the one ppl_gen.core.settings makes from the settings."""

import re
from pathlib import Path

from ppl_gen.core.settings import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_flag_table_matches_settings():
    text = (ROOT / "docs" / "model-files.md").read_text()
    table = re.search(r"<!-- flags table:.*?-->\n(.*?)\n<!-- end of flags table -->", text, re.S).group(1)
    assert table == markdown_table()
