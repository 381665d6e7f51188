"""Shared fixtures: one seed, a clear parameter store and Pyro's checks on, for every test."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tests are many small tensor ops; on a busy 2-core machine torch's thread pool makes
    them many times slower (threads wait on each other), while results do not change."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_pyro():
    """No test sees another's parameters or random state."""
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every device the machine has; CUDA cases skip without a GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch.device(request.param)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in a subprocess from the repository root, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def jax_x64_restored():
    """JAX's x64 flag is process-wide: whatever a test sets, the next test finds it as it was."""
    jax = sys.modules.get("jax")
    before = jax.config.read("jax_enable_x64") if jax else None
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.config.update("jax_enable_x64", bool(before))


def readme_model(folder: Path) -> str:
    """The README's own model file (``my_model.py``), copied out of the README into ``folder``."""
    code = re.search(r"```python\n# my_model\.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    path = Path(folder) / "my_model.py"
    path.write_text(code)
    return str(path)


@pytest.fixture
def build_run():
    """How a test sets a run up: the pipeline's own ``RunSetup.build`` (seed, data, checks, device,
    fresh parameter store, seed, build), as every entry point does. ``build_run(path, guide=...,
    options={...}, **settings)`` -> RunSetup; settings default to the CPU and one thread."""
    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.settings import RunConfig

    def build(model_file, options=None, dataset=None, **settings):
        settings.setdefault("device", "cpu")
        settings.setdefault("threads", 1)
        cfg = RunConfig(model_file=str(model_file), options=dict(options or {}), **settings)
        return RunSetup.build(cfg, dataset=dataset)
    return build
