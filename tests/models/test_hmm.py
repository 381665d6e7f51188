"""HMM: exact inference against brute force over all K^T paths and against hmmlearn;
masks; parameter recovery on the dishonest casino; the command line and its errors."""

import itertools
import json
import math

import pytest
import torch

from ppl_gen.exact import hmm
from ppl_gen.core.protocol import load_model_file
from ppl_gen.core.train import Trainer, make_elbo

K, V = 3, 4


def random_hmm(seed=0):
    g = torch.Generator().manual_seed(seed)
    pi = torch.rand(K, generator=g, dtype=torch.float64).softmax(0)
    A = (2 * torch.rand(K, K, generator=g, dtype=torch.float64)).softmax(1)
    B = (2 * torch.rand(K, V, generator=g, dtype=torch.float64)).softmax(1)
    return pi, A, B


def brute_force(pi, A, log_b):
    """log p(x, z) for every one of the K^T paths z of one sequence: [K^T], and the paths."""
    T = log_b.shape[0]
    paths = torch.tensor(list(itertools.product(range(K), repeat=T)))        # [K^T, T]
    log_joint = pi.log()[paths[:, 0]] + log_b[0, paths[:, 0]]
    for t in range(1, T):
        log_joint = log_joint + A.log()[paths[:, t - 1], paths[:, t]] + log_b[t, paths[:, t]]
    return log_joint, paths


def batch(seed=1, lengths=(5, 1, 3, 4)):
    """Sequences of different lengths, padded with -1, and their emission log-densities."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    return x.masked_fill(~mask, -1), mask


def log_b_of(B, x):
    return B.log().T[x.clamp(min=0)]


def test_forward_equals_sum_over_all_paths():
    pi, A, B = random_hmm()
    x, mask = batch()
    log_b = log_b_of(B, x)
    got = hmm.forward(pi.log(), A.log(), log_b, mask)
    for n, T in enumerate(mask.sum(1).tolist()):
        log_joint, _ = brute_force(pi, A, log_b[n, :T])
        assert got[n].item() == pytest.approx(torch.logsumexp(log_joint, 0).item(), abs=1e-6)


def test_forward_backward_marginals_equal_brute_force():
    pi, A, B = random_hmm(2)
    x, mask = batch(3)
    log_b = log_b_of(B, x)
    gamma, log_px = hmm.forward_backward(pi.log(), A.log(), log_b, mask)
    torch.testing.assert_close(log_px, hmm.forward(pi.log(), A.log(), log_b, mask), atol=1e-6, rtol=0)
    for n, T in enumerate(mask.sum(1).tolist()):
        log_joint, paths = brute_force(pi, A, log_b[n, :T])
        post = torch.softmax(log_joint, 0)                                   # p(z | x) for every path
        for t in range(T):
            expected = torch.zeros(K, dtype=post.dtype).index_add_(0, paths[:, t], post)
            torch.testing.assert_close(gamma[n, t], expected, atol=1e-6, rtol=0)
        assert gamma[n, T:].abs().sum() == 0                                 # padding carries no mass


def test_viterbi_equals_brute_force_argmax():
    pi, A, B = random_hmm(4)
    x, mask = batch(5)
    log_b = log_b_of(B, x)
    path, score = hmm.viterbi(pi.log(), A.log(), log_b, mask)
    for n, T in enumerate(mask.sum(1).tolist()):
        log_joint, paths = brute_force(pi, A, log_b[n, :T])
        assert path[n, :T].tolist() == paths[log_joint.argmax()].tolist()
        assert score[n].item() == pytest.approx(log_joint.max().item(), abs=1e-6)
        assert (path[n, T:] == -1).all()


def test_padding_never_changes_a_sequence():
    """Each sequence alone, and inside a batch padded to length 40 with junk emissions at
    the padded steps: the same log-likelihood, marginals and Viterbi path."""
    pi, A, B = random_hmm(6)
    x, mask = batch(7, lengths=(6, 2, 9))
    alone = [hmm.forward(pi.log(), A.log(), log_b_of(B, x[n:n + 1, :T]))
             for n, T in enumerate(mask.sum(1).tolist())]
    padded = torch.full((3, 40), -1)
    padded[:, :9] = x
    m = padded >= 0
    log_b = log_b_of(B, padded) + (~m).unsqueeze(-1) * torch.randn(3, 40, K, dtype=torch.float64) * 50
    torch.testing.assert_close(hmm.forward(pi.log(), A.log(), log_b, m), torch.cat(alone), atol=1e-9, rtol=0)
    for fn in (hmm.forward_backward, hmm.viterbi):
        big, small = fn(pi.log(), A.log(), log_b, m)[0], fn(pi.log(), A.log(), log_b_of(B, x), mask)[0]
        torch.testing.assert_close(big[:, :9], small, atol=1e-9, rtol=0)


def test_gaussian_emissions_far_in_the_tails_do_not_underflow():
    pi, A, _ = random_hmm()
    log_b = torch.full((1, 3, K), -2000.0, dtype=torch.float64) + torch.arange(K)  # densities exp(-2000)
    log_joint, _ = brute_force(pi, A, log_b[0])
    assert hmm.forward(pi.log(), A.log(), log_b).item() == pytest.approx(torch.logsumexp(log_joint, 0).item(),
                                                                          abs=1e-6)


def test_against_hmmlearn():
    hmmlearn = pytest.importorskip("hmmlearn.hmm")
    pi, A, B = random_hmm(8)
    x, mask = batch(9, lengths=(12, 7, 30))
    ref = hmmlearn.CategoricalHMM(n_components=K, init_params="", params="")
    ref.startprob_, ref.transmat_, ref.emissionprob_, ref.n_features = pi.numpy(), A.numpy(), B.numpy(), V
    log_b = log_b_of(B, x)
    ours = hmm.forward(pi.log(), A.log(), log_b, mask)
    path, _ = hmm.viterbi(pi.log(), A.log(), log_b, mask)
    for n, T in enumerate(mask.sum(1).tolist()):
        seq = x[n, :T].numpy().reshape(-1, 1)
        assert ours[n].item() == pytest.approx(ref.score(seq), abs=1e-6)
        assert path[n, :T].tolist() == ref.decode(seq, algorithm="viterbi")[1].tolist()


def test_casino_parameters_are_recovered():
    """MAP on 160 sampled casino sequences (~12,000 rolls): A and B within 0.06 of the
    truth after matching states (sampling error alone is ~0.01-0.03 here)."""
    mf = load_model_file("models/hmm.py")
    options = mf.options({"sequences": 200})
    ds = mf.data(None, options)
    spec = mf.build(options, ds)
    trainer = Trainer(spec.model, spec.guides["map"], ds.train, make_elbo("trace"), lr=0.05)
    for t in range(1, 301):
        trainer.step(t)
    metrics = spec.evaluate(type("Run", (), {"dataset": ds, "guide_name": "map", "guide": spec.guides["map"]})())
    assert metrics["recovery_max_abs_error_A"] < 0.06
    assert metrics["recovery_max_abs_error_B"] < 0.06
    assert metrics["viterbi_accuracy"] > 0.75
    # the fitted model predicts held-out rolls almost as well as the true one
    assert metrics["test_log_likelihood_per_step"] > metrics["truth_test_log_likelihood_per_step"] - 0.01


def _check_metrics(out, keys):
    metrics = json.loads((out / "metrics.json").read_text())
    for k in keys:
        assert math.isfinite(metrics[k]), k
    return metrics


def test_cli_casino(cli, tmp_path):
    r = cli("inference.svi", "models/hmm.py", "--steps", "30", "--sequences", "40", "--length", "40",
            "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    _check_metrics(tmp_path / "r", ["test_log_likelihood_per_step", "recovery_max_abs_error_A",
                                    "recovery_max_abs_error_B", "viterbi_accuracy", "test_elbo"])
    assert (tmp_path / "r" / "decoded.png").is_file() and (tmp_path / "r" / "transitions.png").is_file()


def test_gaussian_csv_with_ragged_rows(tmp_path):
    from inference.svi import main

    csv = tmp_path / "series.csv"
    csv.write_text("0.1,0.3,2.5,2.7\n-1,0.2,\n3.1,3.0,2.9,0.0,0.1\n0.5,2.2\n1,2,3\n")
    assert main(["models/hmm.py", "--emission", "gaussian", "--states", "2", "--data", str(csv), "--guide",
                 "map", "--steps", "30", "--no-progress", "--out", str(tmp_path / "g")]) == 0
    _check_metrics(tmp_path / "g", ["train_log_likelihood_per_step", "test_log_likelihood_per_step"])


@pytest.mark.parametrize("content, args, message", [
    ("1.0,2.0\n3.0,abc\n", ["--emission", "gaussian"], "row 2, column 2 is 'abc', not a number"),
    ("1,2\n\n3,4\n", [], "row 2 is an empty sequence"),
    (",,\n1,2\n1\n", [], "row 1 is an empty sequence"),
    ("0,1\n1,0\n", ["--states", "0"], "--states must be at least 1"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, content, args, message):
    """In-process for speed (main() is what ``python -m inference.svi`` runs); one case
    below goes through a real subprocess."""
    from inference.svi import main

    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    code = main(["models/hmm.py", "--data", str(csv), "--steps", "2", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_bad_csv_from_the_command_line(cli, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("1.0,2.0\n3.0,abc\n")
    r = cli("inference.svi", "models/hmm.py", "--emission", "gaussian", "--data", str(csv), "--out",
            str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {csv}: row 2, column 2 is 'abc', not a number; every cell must be numeric"
