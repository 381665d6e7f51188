"""Every model file runs on every device the machine has (CUDA cases skip without a GPU):
each file's default guide, a few steps through the runner, parameters and data on the
chosen device, finite metrics. On CPU this is a smoke test; its point is the CUDA case."""

import math
from pathlib import Path

import pyro
import pytest

from inference.svi import RunConfig, run
from ppl_gen.protocol import load_model_file

ROOT = Path(__file__).resolve().parents[2]
# (model file, --data, small options): each file's default guide and ELBO
CASES = {
    "lda-explicit": ("lda.py", "synthetic", {"docs": 60, "vocab": 20, "topics": 3, "words": 20, "infer_docs": 10}),
    "lda-amortized": ("lda.py", "synthetic", {"docs": 60, "vocab": 20, "topics": 3, "words": 20, "infer_docs": 10}),
    "lda-cavi": ("lda.py", "synthetic", {"docs": 60, "vocab": 20, "topics": 3, "words": 20, "infer_docs": 10}),
    "hmm": ("hmm.py", None, {"sequences": 6, "length": 12}),
    "markov_chain": ("markov_chain.py", "sample", {}),
    "bayes_net": ("bayes_net.py", None, {}),
    "gaussian_net": ("gaussian_net.py", None, {}),
    "normal_mean": ("normal_mean.py", None, {}),
    "char_rnn": ("char_rnn.py", None, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_file_runs_on_each_device(case, device, tmp_path):
    name, data, options = CASES[case]
    guide = case.split("-")[1] if "-" in case else None
    defaults = load_model_file(ROOT / "models" / name).defaults   # e.g. lda.py's --elbo enum
    cfg = RunConfig(model_file=str(ROOT / "models" / name), guide=guide, steps=3, eval_every=3, data=data,
                    elbo=defaults.get("elbo", "trace"),
                    device=device.type, out=str(tmp_path / "r"), progress=False, eval_particles=2, options=options)
    fitted, metrics = run(cfg)
    assert metrics["device"].startswith(device.type)
    assert fitted.dataset.train.device.type == device.type
    assert all(p.device.type == device.type for _, p in pyro.get_param_store().named_parameters())
    assert math.isfinite(metrics["train_elbo"])
    assert (tmp_path / "r" / "metrics.json").is_file()
