"""inference.compare over schemes: automatic guides crossed with objectives, several seeds."""

import json
import re
from pathlib import Path

HERE = Path(__file__).parent
PAIR = str(HERE / "conjugate_pair_model.py")


def test_seeds_give_a_table_with_intervals(tmp_path, cli):
    out = tmp_path / "cmp"
    r = cli("inference.compare", PAIR, "--guides", "AutoNormal", "--elbos", "trace,renyi:0.5",
            "--num-particles", "2", "--seeds", "3", "--steps", "100", "--lr", "0.05", "--diagnostic-draws", "100",
            "--eval-particles", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "compare.json").read_text())
    assert [row["guide"] for row in report["rows"]] == ["AutoNormal+trace", "AutoNormal+renyi:0.5"]
    for row in report["rows"]:
        assert row["seeds"] == [0, 1, 2] and len(row["train_elbo_values"]) == 3
        vals = row["train_elbo_values"]
        mean = sum(vals) / 3
        se = (sum((v - mean) ** 2 for v in vals) / 2 / 3) ** 0.5
        assert abs(row["train_elbo"] - mean) < 1e-9 and abs(row["train_elbo_se"] - se) < 1e-9
    md = (out / "compare.md").read_text()
    assert "mean ± standard error over 3 seeds" in md
    assert re.search(r"\| AutoNormal\+trace \| -?\d+\.\d+ ± \d+\.\d+ \|", md), md
    assert (out / "AutoNormal+renyi_0.5" / "seed-2" / "metrics.json").is_file()
    assert "PSIS k-hat" in md
