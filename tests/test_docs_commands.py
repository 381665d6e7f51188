"""Every `python -m inference.svi ...` and `python -m inference.compare ...` command shown in
README.md and docs/*.md runs, with a tiny budget appended (later flags override earlier
ones), so the docs cannot rot."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from inference.compare import main as compare_main
from inference.svi import main as svi_main
from ppl_gen.datasets.images import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# per-file budget flags on top of the tiny step count, where a file's evaluation is costly
BUDGET = {"vae.py": ["--ll-samples", "5", "--ll-points", "20", "--gap-points", "10", "--qstar-steps", "5",
                     "--local-steps", "5", "--test-points", "30"],
          "lda.py": ["--infer-docs", "20", "--local-steps", "20"],
          "vqvae.py": ["--prior-steps", "3", "--samples", "4"],
          "pixelcnn.py": ["--samples", "4", "--completions", "1"],
          "diffusion.py": ["--T", "10", "--test-points", "30", "--samples", "4"],
          "gan.py": ["--no-score", "--samples", "8"],
          "eight_schools.py": ["--diagnostic-draws", "100", "--eval-particles", "2"]}
ENTRY = {"inference.svi": svi_main, "inference.compare": compare_main}


def _commands():
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith(("python -m inference.svi", "python -m inference.compare")):
                    yield pytest.param(line, id=f"{page.name}: {line[10:70]}")


@pytest.mark.parametrize("command", list(_commands()))
def test_documented_command_runs(command, tmp_path, capsys):
    words = shlex.split(command)
    main, argv = ENTRY[words[2]], words[3:]
    if "--mcmc" in argv:
        pytest.skip("run with a small NUTS budget by tests/inference/test_posterior_mcmc.py")
    if "cuda" in argv and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "fashion-mnist" in argv and not FASHION_MNIST_DIR.is_dir():
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    if "fashion-mnist" in argv and main is compare_main:
        # every guide's train ELBO over 60,000 images takes minutes on a CPU; the same
        # comparison on the digits and `inference.svi --data fashion-mnist` are run instead
        pytest.skip("a Fashion-MNIST comparison is too slow for the test suite on a CPU")
    if argv and argv[0] == "my_model.py":  # the README's own file, copied out of the README
        code = re.search(r"```python\n# my_model\.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
        (tmp_path / "my_model.py").write_text(code.group(1))
        argv[0] = str(tmp_path / "my_model.py")
    elif argv and not Path(argv[0]).is_absolute() and argv[0].endswith(".py"):
        argv[0] = str(ROOT / argv[0])
    for i, arg in enumerate(argv[1:], 1):  # files the docs ship are found from any folder
        if argv[i - 1].startswith("--") and re.search(r"\.[A-Za-z]+$", arg) and not Path(arg).is_absolute():
            if not (ROOT / arg).exists():
                pytest.skip(f"{arg} stands for the reader's own file")
            argv[i] = str(ROOT / arg)
    files = [a for a in argv if a.endswith(".py")]
    if main is compare_main and len(files) > 1:
        # the families comparison: each file's own defaults, minutes; here every file parses the
        # command's flags and is set up on its data (tests/inference/test_families.py runs two)
        from inference import families

        names, runner, _ = families.split_argv(argv)
        assert len(families.check_files(names, runner)) == len(files)
        return
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and "--steps" in capsys.readouterr().out
        return
    budget = ["--steps", "3", "--eval-every", "3", "--no-progress", "--out", str(tmp_path / "run")]
    code = main([*argv, *budget, *BUDGET.get(Path(argv[0]).name, [])])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / ("compare.json" if main is compare_main else "metrics.json")).is_file()
