"""Every model file runs on every device the machine has (CUDA cases skip without a GPU):
each file's default guide, a few steps through the runner, parameters and data on the
chosen device, finite metrics. On CPU this is a smoke test; its point is the CUDA case."""

import math
from pathlib import Path

import pyro
import pytest

from inference.svi import RunConfig, run
from ppl_gen.core.protocol import load_model_file

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


@pytest.mark.cuda
@pytest.mark.parametrize("guide", ["explicit", "amortized", "cavi"])
def test_lda_streams_counts_from_host_memory(guide, tmp_path):
    """--data-on-host: the counts stay in (pinned) host memory, the parameters live on the GPU,
    minibatches and evaluation chunks are copied over; the run completes with finite metrics."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    name, data, options = CASES["lda-explicit"]
    cfg = RunConfig(model_file=str(ROOT / "models" / name), guide=guide, steps=6, eval_every=3, data=data,
                    elbo="enum", batch_size=16, device="cuda", data_on_host=True, out=str(tmp_path / "r"),
                    progress=False, eval_particles=2, options=options)
    fitted, metrics = run(cfg)
    assert fitted.dataset.train.device.type == "cpu" and fitted.dataset.device.type == "cuda"
    assert all(p.device.type == "cuda" for _, p in pyro.get_param_store().named_parameters())
    for key in ("train_elbo", "test_elbo", "test_perplexity", "npmi"):
        assert math.isfinite(metrics[key]), key
