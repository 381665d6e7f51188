"""Data-parallel SVI (ppl_gen.core.distributed) on 2 gloo ranks, spawned by the tests as
subprocesses with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one of
them through torchrun itself. Every spawned run has a timeout, so nothing can hang the suite.

The oracle of one step is one process on the same global batch: the conjugate model (global
parameters only) steps exactly as one process does; for the VAE (amortized and explicit, with
per-point noise) the one-process reference sums the gradients of rank 0's rows and rank 1's
rows, each drawn from the random state the ranks used, before one Adam step. float64, 1e-6.

``python tests/inference/test_distributed.py equal OUT.json`` is the worker of that check.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONJUGATE = ROOT / "tests" / "inference" / "conjugate_model.py"
VAE = ROOT / "models" / "vae.py"
TIMEOUT = 120  # seconds for one spawned run; a healthy one takes a few
# the VAE's evaluation at a tiny budget (as tests/test_docs_commands.py gives it)
VAE_TINY = ["--latent-dim", "3", "--hidden-dim", "8", "--ll-samples", "3", "--ll-points", "10", "--gap-points", "0",
            "--local-steps", "3", "--qstar-steps", "3", "--test-points", "20", "--diagnostic-draws", "20"]
SMALL = ["--diagnostic-draws", "50", "--eval-particles", "2", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int = 2, env: dict | None = None, timeout: float = TIMEOUT):
    """``python ARGS`` as ``world`` ranks (what torchrun's environment gives each); returns the
    ranks' CompletedProcess-like (returncode, stdout, stderr), in rank order."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), PPL_GEN_DIST_TIMEOUT="30", OMP_NUM_THREADS="1",
                 PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def svi(*argv) -> list[str]:
    return ["-m", "inference.svi", *map(str, argv)]


def trace(folder: Path) -> list[dict]:
    with open(folder / "trace.csv", newline="") as f:
        return list(csv.DictReader(f))


def one_process(monkeypatch, *argv) -> int:
    """inference.svi in this process, as one rank (no torchrun environment)."""
    from inference.svi import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return main([str(a) for a in argv])


def ok(runs) -> None:
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------- one step equals one process
def test_one_step_on_two_ranks_equals_one_process(tmp_path):
    out = tmp_path / "equal.json"
    ok(launch([__file__, "equal", str(out)]))
    result = json.loads(out.read_text())
    for case in ("conjugate", "amortized", "explicit"):
        r = result[case]
        assert r["rows_per_rank"] == [3, 9], r  # unequal shares: the rescaling of local terms is at work
        assert r["max_param_diff"] < 1e-6 and r["max_grad_rel_diff"] < 1e-6, (case, r)
        assert abs(r["loss"] - r["ref_loss"]) < 1e-6 * max(1.0, abs(r["ref_loss"])), (case, r)
    conjugate = result["conjugate"]
    assert conjugate["one_process_diff"] < 1e-6
    assert abs(conjugate["one_process_loss"] - conjugate["loss"]) < 1e-6 * abs(conjugate["loss"])
    # the explicit guide's table: 30 rows on each rank, 60 in the gathered checkpoint
    assert result["explicit"]["table_rows"] == [30, 30] and result["explicit"]["checkpoint_rows"] == 60
    assert result["explicit"]["rows_changed"] == result["explicit"]["batch"]  # only the batch's rows moved


def _equality_worker(out: str) -> None:
    import pyro
    import pyro.poutine as poutine

    from ppl_gen.backends.pyro_backend import PyroBackend
    from ppl_gen.core import distributed
    from ppl_gen.core.pipeline import RunSetup
    from ppl_gen.core.protocol import load_model_file
    from ppl_gen.core.settings import RunConfig
    from ppl_gen.core.train import BatchSchedule, Optimizers

    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    w = distributed.world()
    tiny = {"latent_dim": 2, "hidden_dim": 8}
    cases = {"conjugate": (CONJUGATE, None, {}), "amortized": (VAE, "amortized", tiny),
             "explicit": (VAE, "explicit", tiny)}
    results = {}
    for case, (path, guide, options) in cases.items():
        mf = load_model_file(path)
        cfg = RunConfig(model_file=str(path), guide=guide, batch_size=12, lr=0.05, seed=1, options=options, threads=1)
        ds = mf.data(None, mf.options(options))
        ds.train, ds.test = ds.train[:60].double(), ds.test[:10].double()
        setup = RunSetup.build(cfg, mf, dataset=ds)
        trainer = distributed.start(setup, PyroBackend().trainer(setup), w)
        rng = torch.get_rng_state()
        loss = trainer.step(1)
        table_rows = pyro.param("q_mu").shape[0] if case == "explicit" else None
        state = trainer.state_dict(1)
        # the gradients the step used: the global ones summed over the ranks, the local rows gathered
        grads = {k: (trainer.gather_rows(v.grad) if k in trainer.local_params else v.grad.clone())
                 for k, v in sorted(pyro.get_param_store().named_parameters())}
        import torch.distributed as dist

        seen = [None] * w.size
        dist.all_gather_object(seen, (rng, table_rows))
        if not w.main:
            continue
        assert all(torch.equal(s[0], rng) for s in seen)  # every rank drew from the same state
        # the one-process reference on the same global batch
        ref = RunSetup.build(cfg, mf, dataset=ds)
        model, g, x, n = ref.spec.model, ref.guide, ref.dataset.train, ref.dataset.train.shape[0]
        idx = BatchSchedule(n, 12, cfg.seed, x.device)(1)
        parts = [idx[(idx >= lo) & (idx < hi)] for lo, hi in (w.bounds(n, r) for r in range(w.size))]
        elbo, ref_loss = pyro.infer.Trace_ELBO(), 0.0
        with pyro.validation_enabled(True):
            for rows in parts:
                torch.set_rng_state(rng)
                with poutine.scale(scale=len(rows) / len(idx)):
                    part = elbo.differentiable_loss(model, g.fn, x[rows], rows, size=n)
                part.backward()
                ref_loss += part.item()
        before = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
        named = dict(pyro.get_param_store().named_parameters())
        # Adam's first step is nearly lr * sign(gradient): the gradients are the sharper test
        grad_diff = max(((grads[k] - v.grad).abs().max() / v.grad.abs().max()).item() for k, v in named.items())
        opt = Optimizers(cfg.lr, g.local_params, g.local_lr, ref.spec.param_lr)
        opt.add(sorted(named), named)
        opt.step()
        diff = max((state["params"][k] - v).abs().max().item() for k, v in named.items())
        r = {"max_param_diff": diff, "max_grad_rel_diff": grad_diff, "loss": loss, "ref_loss": ref_loss / n,
             "rows_per_rank": [len(p) for p in parts], "batch": len(idx)}
        if case == "explicit":
            r["table_rows"] = [s[1] for s in seen]
            r["checkpoint_rows"] = state["params"]["q_mu"].shape[0]
            r["rows_changed"] = int((state["params"]["q_mu"] != before["q_mu"]).any(1).sum())
            assert set(state["params"]) == set(named)
        if case == "conjugate":  # global parameters only: the plain one-process step itself
            plain = RunSetup.build(cfg, mf, dataset=ds)
            one = PyroBackend().trainer(plain)
            torch.set_rng_state(rng)
            r["one_process_loss"] = one.step(1)
            r["one_process_diff"] = max((state["params"][k] - v).abs().max().item()
                                        for k, v in pyro.get_param_store().named_parameters())
        results[case] = r
    if w.main:
        Path(out).write_text(json.dumps(results))


# ---------------------------------------------------------------- resume across world sizes
def test_resume_across_world_sizes_continues_the_one_process_trajectory(tmp_path, monkeypatch):
    """Conjugate model: 1 process to step 4, 2 ranks (through torchrun) to 8, 1 process to 12
    equals an uninterrupted 1-process run of 12 steps, row for row. Batches of 2 rows: at many
    steps one rank has none of them (it keeps its share of the global terms)."""
    run, alone = tmp_path / "run", tmp_path / "alone"
    common = ["--batch-size", "2", "--eval-every", "2", "--lr", "0.05", *SMALL]
    assert one_process(monkeypatch, CONJUGATE, *common, "--steps", "12", "--out", alone) == 0
    assert one_process(monkeypatch, CONJUGATE, *common, "--steps", "4", "--out", run) == 0
    argv = svi("--resume", run, "--steps", "8", "--no-progress")
    if shutil.which("torchrun"):
        r = subprocess.run(["torchrun", "--nproc-per-node", "2", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=TIMEOUT, env=dict(os.environ, PPL_GEN_DIST_TIMEOUT="30"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("run folder:") == 1  # one summary, from rank 0
    else:
        ok(launch(argv))
    assert one_process(monkeypatch, "--resume", run, "--steps", "12", "--no-progress") == 0
    got, want = trace(run), trace(alone)
    assert [r["step"] for r in got] == [str(s) for s in range(1, 13)]
    for a, b in zip(got, want):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5, abs=1e-5), (a, b)
        if b["test_elbo"]:
            assert float(a["test_elbo"]) == pytest.approx(float(b["test_elbo"]), rel=1e-5), (a, b)
    p, q = (torch.load(d / "checkpoint.pt", weights_only=True)["params"] for d in (run, alone))
    for k in q:
        assert torch.allclose(p[k], q[k], atol=1e-5), k
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 1 and [e["world_size"] for e in config["resumed"]] == [2, 1]


# a model file that is models/vae.py with its explicit guide raising on rank 1 at training step FAIL
FAILING_VAE = """
import importlib.util, os, sys
import torch

_spec = importlib.util.spec_from_file_location("vae_under_test", VAE_PATH)
vae = importlib.util.module_from_spec(_spec)
sys.modules["vae_under_test"] = vae
_spec.loader.exec_module(vae)
Options, DEFAULTS, data = vae.Options, vae.DEFAULTS, vae.data


def build(options, dataset):
    spec = vae.build(options, dataset)
    guide, steps = spec.guides["explicit"], [0]
    explicit = guide.fn

    def failing(x, idx=None, size=None):
        steps[0] += torch.is_grad_enabled()  # evaluations run without gradients
        if os.environ.get("RANK") == "1" and steps[0] == FAIL:
            raise ValueError("rank one broke")
        return explicit(x, idx, size)
    guide.fn = failing
    return spec
"""


def test_a_failing_rank_keeps_the_gathered_checkpoint_and_one_process_resumes(tmp_path, monkeypatch):
    """The explicit VAE on 2 ranks, rank 1 raising mid-run: rank 0 alone prints one error line,
    both exit 2; the checkpoint holds the full tables (and their Adam moments) in row order, and
    one process resumes from it, keeping the trace and every row no later step visited."""
    f, run = tmp_path / "failing_vae.py", tmp_path / "run"
    f.write_text(FAILING_VAE.replace("VAE_PATH", repr(str(VAE))).replace("FAIL", "7"))
    common = ["--guide", "explicit", "--batch-size", "16", "--eval-every", "2", *VAE_TINY, *SMALL]
    rank0, rank1 = launch(svi(f, *common, "--steps", "10", "--out", run))
    lines = [line for line in rank0.stderr.splitlines() if line.strip()]
    assert rank0.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 failed: "
                                                                             "failing_vae.py:"), rank0.stderr
    assert "ValueError: rank one broke" in lines[0]
    assert rank1.returncode == 2 and not rank1.stderr.strip(), rank1.stderr
    kept = int(re.search(r"the last checkpoint \(step (\d+)\)", lines[0]).group(1))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == kept >= 2 and state["world_size"] == 2
    first = trace(run)
    assert int(first[-1]["step"]) == int(re.search(r"stopped at step (\d+)", lines[0]).group(1)) - 1
    n = json.loads((run / "config.json").read_text())["data"]["train"]
    assert state["params"]["q_mu"].shape[0] == n
    local = state["optimizer"]["states"]["local"]["state"]
    visited = {int(i) for s in local.values() for i in s["step"].nonzero().flatten()}
    moved = set((state["params"]["q_mu"] != 0).any(1).nonzero().flatten().tolist())
    assert moved == visited and 0 < len(moved) <= kept * 16  # rows moved exactly where Adam counted a visit
    assert one_process(monkeypatch, "--resume", run, "--steps", str(kept + 2), "--no-progress") == 0
    again = trace(run)
    assert again[:kept] == first[:kept] and [int(r["step"]) for r in again] == list(range(1, kept + 3))
    after = torch.load(run / "checkpoint.pt", weights_only=True)
    changed = (after["params"]["q_mu"] != state["params"]["q_mu"]).any(1)
    assert 0 < int(changed.sum()) <= 2 * 16  # the two new steps' rows only
    assert torch.equal(after["params"]["q_mu"][~changed], state["params"]["q_mu"][~changed])


KILLED = """
import os, signal
import pyro, pyro.distributions as dist, torch
from ppl_gen import data_plate

steps = 0


def data():
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    return x[:30], x[30:]


def model(x, idx=None, size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with data_plate(x, idx, size):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def guide(x, idx=None, size=None):
    global steps
    steps += torch.is_grad_enabled()
    if os.environ.get("RANK") == "1" and steps == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
"""


def test_a_killed_rank_ends_the_run_with_one_error_line(tmp_path):
    f = tmp_path / "killed.py"
    f.write_text(KILLED)
    rank0, rank1 = launch(svi(f, "--steps", "10", "--batch-size", "6", "--eval-every", "2", "--out", tmp_path / "run",
                              *SMALL), timeout=90)
    lines = [line for line in rank0.stderr.splitlines() if line.strip()]
    assert rank1.returncode == -9
    assert rank0.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: another rank stopped answering")
    kept = int(re.search(r"the last checkpoint \(step (\d+)\)", lines[0]).group(1))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == kept >= 2


@pytest.mark.parametrize("argv, expected", [
    (["--batch-size", "15"], "--batch-size 15 does not split over 2 ranks; give a multiple of 2: the nearest is "
                             "--batch-size 16"),
    (["--backend", "numpyro"], "--backend numpyro does not run under torchrun"),
])
@pytest.mark.parametrize("rank", [0, 1])
def test_bad_input_is_one_line_from_rank_0(argv, expected, rank, monkeypatch, capsys, tmp_path):
    """Refused before any process group exists, on every rank alike; only rank 0 says so."""
    from inference.svi import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    assert main([str(CONJUGATE), *argv, "--steps", "2", "--out", str(tmp_path / "r")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert (len(lines) == 1 and lines[0].startswith(f"error: {expected}")) if rank == 0 else lines == []
    assert not (tmp_path / "r").exists()


def test_a_model_file_that_does_not_minibatch_is_refused(monkeypatch, capsys, tmp_path):
    from inference.svi import main

    f = tmp_path / "whole.py"
    f.write_text("import pyro, pyro.distributions as dist, torch\n"
                 "def data():\n    return torch.randn(20), torch.randn(5)\n"
                 "def model(x):\n    mu = pyro.sample('mu', dist.Normal(0., 1.))\n"
                 "    with pyro.plate('d', len(x)):\n        pyro.sample('x', dist.Normal(mu, 1.), obs=x)\n"
                 "def guide(x):\n    pyro.sample('mu', dist.Normal(pyro.param('m', torch.tensor(0.)), 1.))\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([str(f), "--steps", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: whole.py: the model takes only x"), err


def test_the_torchrun_commands_of_docs_scaling_are_valid(monkeypatch):
    """Every `torchrun ... -m inference.svi` line on docs/scaling.md parses, and its batch size
    splits over its ranks (its figures come from the benchmark's own commands; the resume and
    the one-process and two-rank runs above run the same code)."""
    import shlex

    from inference.svi import parse_args, resolve_config
    from ppl_gen.core.distributed import World, check_config

    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "docs" / "scaling.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("torchrun ")]
    assert len(commands) >= 4
    for words in commands:
        ranks, argv = int(words[words.index("--nproc-per-node") + 1]), words[words.index("inference.svi") + 1:]
        if "--resume" in argv:
            continue
        args, model_file, resumed = parse_args(argv)
        check_config(resolve_config(args, model_file, resumed), World(rank=0, size=ranks))


if __name__ == "__main__" and sys.argv[1:2] == ["equal"]:
    _equality_worker(sys.argv[2])
