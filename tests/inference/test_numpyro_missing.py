"""Without numpyro importable, --backend numpyro is one error line naming the extra, exit 2;
the Pyro backend is untouched. Runs whether or not numpyro is installed."""

import sys
from pathlib import Path

from inference.svi import main

CONJ = str(Path(__file__).parent / "conjugate_model.py")


def test_missing_numpyro_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "numpyro", None)  # import numpyro now raises ImportError
    assert main([CONJ, "--backend", "numpyro", "--steps", "5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == 'error: --backend numpyro needs the numpyro extra: pip install -e ".[numpyro]"\n'
    assert not (tmp_path / "r").exists()  # failed before writing anything
    assert main([CONJ, "--steps", "5", "--no-progress", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "metrics.json").is_file()
