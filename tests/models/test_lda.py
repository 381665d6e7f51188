"""models/lda.py and ppl_gen/exact/lda.py against oracles: brute force over every topic assignment,
CAVI's ascent, CAVI's fixed point against a long SVI run, hand-computed perplexity and NPMI,
known topics, scikit-learn's batch VB; the CLI end to end and its bad-input errors."""

import itertools
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from inference import svi
from ppl_gen.exact import lda
from ppl_gen.datasets.corpus import check_counts, document_halves, load_texts, sample_corpus
from ppl_gen.core.errors import UserError
from ppl_gen.core.protocol import load_model_file
from ppl_gen.core.train import Trainer, make_elbo

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _lda(options=None, x=None):
    mf = load_model_file(ROOT / "models" / "lda.py")
    opts = mf.options(options or {})
    ds = mf.data("synthetic", opts) if x is None else __import__("ppl_gen").Dataset(train=x)
    return mf, opts, ds, mf.build(opts, ds, "enum")


def test_enumerated_elbo_equals_brute_force():
    """2 documents, 3 words, 2 topics: at fixed draws of theta and beta, Pyro's enumerated
    ELBO equals the sum over all 2^6 topic assignments of the 6 tokens, weighted by q(z)."""
    x = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    mf, opts, ds, spec = _lda({"topics": 2, "alpha": 0.7, "eta": 0.4}, x)
    lam = torch.tensor([[1.5, 0.8, 2.0], [0.6, 1.7, 1.1]], dtype=torch.float64)
    gamma = torch.tensor([[2.5, 1.5], [1.2, 2.8]], dtype=torch.float64)
    beta = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]], dtype=torch.float64)
    theta = torch.tensor([[0.7, 0.3], [0.25, 0.75]], dtype=torch.float64)
    pyro.get_param_store()["lambda"] = lam
    guide = poutine.condition(spec.model.__self__.fixed, {"beta": beta, "theta": theta})
    model = poutine.condition(spec.model, {"beta": beta, "theta": theta})
    got = -pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda x: guide(gamma, x), x)

    # brute force, token by token
    tokens = [(m, v) for m in range(2) for v in range(3) for _ in range(int(x[m, v]))]
    phi = lda.phi_optimal(gamma, lam, torch.tensor([m for m, _ in tokens]), torch.tensor([v for _, v in tokens]))
    expected = 0.0
    for z in itertools.product(range(2), repeat=len(tokens)):
        q = math.prod(phi[n, k].item() for n, k in enumerate(z))
        log_joint = sum(math.log(theta[m, k]) + math.log(beta[k, v]) - math.log(phi[n, k].item())
                        for n, ((m, v), k) in enumerate(zip(tokens, z)))
        expected += q * log_joint
    for value, prior, post in [(beta, torch.full((3,), 0.4), lam), (theta, torch.full((2,), 0.7), gamma)]:
        expected += (dist.Dirichlet(prior.double()).log_prob(value) - dist.Dirichlet(post).log_prob(value)).sum().item()
    assert got == pytest.approx(expected, rel=1e-7)


def test_analytic_elbo_is_the_mean_field_elbo_at_optimal_phi():
    """lda.elbo against the ELBO written term by term (Blei et al. 2003, eq. 15) with scipy's
    Dirichlet entropies, an independent implementation; and phi_optimal maximizes it."""
    from scipy import stats
    from scipy.special import digamma

    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[3.0, 0.0, 1.0, 2.0], [0.0, 2.0, 2.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    lam = torch.rand(2, 4, generator=g, dtype=torch.float64) * 3 + 0.2
    gamma = torch.rand(3, 2, generator=g, dtype=torch.float64) * 3 + 0.2
    alpha, eta = 0.3, 0.2

    def by_hand(phi_fn):
        L = 0.0
        for k in range(2):
            El = digamma(lam[k].numpy()) - digamma(lam[k].sum().item())
            L += stats.dirichlet.entropy(lam[k].numpy()) + math.lgamma(4 * eta) - 4 * math.lgamma(eta) + (eta - 1) * El.sum()
        for m in range(3):
            Et = digamma(gamma[m].numpy()) - digamma(gamma[m].sum().item())
            L += stats.dirichlet.entropy(gamma[m].numpy()) + math.lgamma(2 * alpha) - 2 * math.lgamma(alpha) + (alpha - 1) * Et.sum()
            for v in range(4):
                p = phi_fn(m, v)
                Eb = digamma(lam[:, v].numpy()) - digamma(lam.sum(1).numpy())
                L += x[m, v].item() * float((p * (Et + Eb - np.log(p))).sum())
        return L

    optimal = lambda m, v: lda.phi_optimal(gamma, lam, torch.tensor([m]), torch.tensor([v]))[0].numpy()  # noqa
    assert lda.elbo(x, gamma, lam, alpha, eta).item() == pytest.approx(by_hand(optimal), abs=1e-9)
    assert by_hand(lambda m, v: np.array([0.5, 0.5])) < by_hand(optimal)


def _cavi(x, K, alpha, eta, sweeps, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = eta + torch._standard_gamma(torch.full((K, x.shape[1]), 100.0, dtype=x.dtype), generator=g) / 100
    gamma, history = None, []
    for _ in range(sweeps):
        lam, gamma = lda.cavi_step(x, lam, gamma, alpha, eta, tol=1e-6, iters=300)
        history.append(lda.elbo(x, gamma, lam, alpha, eta).item())
    return lam, gamma, history


def test_cavi_elbo_never_decreases():
    x, _ = sample_corpus(docs=60, vocab=25, topics=3, words=30, alpha=0.2, eta=0.1, seed=1)
    _, _, history = _cavi(x.double(), 3, 0.2, 0.1, sweeps=30)
    steps = np.diff(history)
    assert steps.min() >= -1e-8 * abs(history[-1]), steps.min()
    assert history[-1] > history[0] + 10  # and it moved


@pytest.mark.parametrize("local_update", ["estep", "adam"])
def test_cavi_fixed_point_matches_long_svi_run_of_explicit(local_update):
    """Same q, same ELBO: CAVI's fixed point and a long SVI run of the explicit guide agree on
    the topics (TV <= 0.05 after matching) and on the ELBO (within 0.5%), whether the explicit
    guide's gamma_m goes to its optimum at each visit or takes Adam steps."""
    x, _ = sample_corpus(docs=40, vocab=10, topics=2, words=40, alpha=0.5, eta=0.3, seed=2)
    lam_c, gamma_c, history = _cavi(x.double(), 2, 0.5, 0.3, sweeps=200)
    _, opts, ds, spec = _lda({"topics": 2, "alpha": 0.5, "eta": 0.3, "local_lr": 0.05,
                              "local_update": local_update}, x)
    trainer = Trainer(spec.model, spec.guides["explicit"], x, make_elbo("enum"), lr=0.05,
                      local_params=spec.resolve("explicit").local_params, local_lr=0.05)
    for t in range(1, 801):
        trainer.step(t)
    lam_s = pyro.param("lambda").detach().double()
    gamma_s = (pyro.param("gamma").detach().double() if local_update == "adam"
               else lda.e_step(x.double(), lam_s, 0.5, iters=300, tol=1e-6)[0])
    tv, _ = lda.topic_tv(lam_s, lam_c)
    assert tv < 0.05
    svi_elbo = lda.elbo(x.double(), gamma_s, lam_s, 0.5, 0.3).item()
    assert svi_elbo == pytest.approx(history[-1], rel=5e-3)


def test_amortized_encoder_splits_a_document_by_its_word_frequencies():
    """The encoder reads word frequencies, not counts: a document and the same document twice
    over (or any multiple) get the same split of their words over topics, gamma_m - alpha, scaled
    by the number of words N_m; as a half-document in document completion keeps its word
    frequencies, up to sampling."""
    _, _, ds, spec = _lda({"topics": 3, "docs": 40, "vocab": 30, "words": 20, "hidden": 8})
    encoder = spec.buffers["encoder"].eval()
    x = ds.train[:5]
    with torch.no_grad():
        once, thrice = encoder(x) - encoder.alpha, encoder(3 * x) - encoder.alpha
    assert torch.allclose(thrice, 3 * once, rtol=1e-5)
    assert torch.allclose(once.sum(-1), x.sum(-1), rtol=1e-5)


def test_document_halves_and_hand_computed_perplexity():
    counts = torch.tensor([[3.0, 0.0, 2.0], [1.0, 1.0, 0.0], [0.0, 5.0, 0.0]])
    first, second = document_halves(counts, seed=0)
    assert torch.equal(first + second, counts)
    assert first.sum(1).tolist() == [2.0, 1.0, 2.0]
    assert torch.equal(document_halves(counts, seed=0)[0], first)  # fixed seed, fixed split
    theta = torch.tensor([[0.5, 0.5]])
    topics = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    # p(words) = [0.25, 0.5, 0.25]; score one of word 0 and one of word 1: exp(-(log .25 + log .5) / 2)
    assert lda.perplexity(theta, topics, torch.tensor([[1.0, 1.0, 0.0]])) == pytest.approx(math.sqrt(8), rel=1e-6)
    # document completion: infer_theta sees the first halves only
    seen = []
    result = lda.document_completion(lambda h: (seen.append(h.clone()), torch.full((len(h), 2), 0.5))[1],
                                     topics, torch.tensor([[2.0, 2.0, 0.0]]), seed=0)
    assert seen[0].sum().item() == 2
    held = torch.tensor([[2.0, 2.0, 0.0]]) - seen[0]
    by_hand = math.exp(-(held[0, 0] * math.log(0.25) + held[0, 1] * math.log(0.5)).item() / 2)
    assert result["test_perplexity"] == pytest.approx(by_hand, rel=1e-6)


def test_true_topics_beat_random_topics_and_are_recovered_by_cavi():
    x, beta = sample_corpus(docs=300, vocab=40, topics=3, words=50, alpha=0.2, eta=0.05, seed=5)
    train, test = x[:240], x[240:]
    infer = lambda topics: lambda h: lda.e_step(h, topics, 0.2)[0]  # noqa: E731
    true = lda.document_completion(infer(beta * 1000 + 1e-3), beta, test)["test_perplexity"]
    rand = torch.rand(3, 40, generator=torch.Generator().manual_seed(0)) + 0.1
    random = lda.document_completion(infer(rand), rand, test)["test_perplexity"]
    assert true < 0.8 * random
    lam, _, _ = _cavi(train, 3, 0.2, 0.05, sweeps=40)
    tv, match = lda.topic_tv(lam, beta)
    assert tv < 0.1 and sorted(match) == [0, 1, 2]
    assert lda.topic_tv(beta[[2, 0, 1]], beta) == (0.0, [1, 2, 0])


def test_npmi_by_hand():
    # words 0 and 1 always together, word 2 in the other documents only, 3 everywhere
    counts = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    topics = torch.tensor([[5.0, 4.0, 0.1, 0.0]])
    # pairs (0,1): P = 1/2, P0 = P1 = 1/2 -> log 2 / log 2 = 1; (0,2), (1,2) never: -1
    assert lda.npmi(topics, counts, n=3).item() == pytest.approx((1 - 1 - 1) / 3, abs=1e-9)
    # (0,3): P = 1/2 = P0 * 1 -> 0
    assert lda.npmi(torch.tensor([[5.0, 0.0, 0.0, 4.0]]), counts, n=2).item() == pytest.approx(0.0, abs=1e-9)


def test_cavi_matches_scikit_learn_batch_vb():
    """The same algorithm (Blei et al. 2003 batch VB), scored by the same function: held-out
    perplexities within 3%."""
    skl = pytest.importorskip("sklearn.decomposition")
    x, _ = sample_corpus(docs=300, vocab=60, topics=4, words=60, alpha=0.1, eta=0.05, seed=4)
    train, test = x[:240], x[240:]
    sk = skl.LatentDirichletAllocation(n_components=4, doc_topic_prior=0.1, topic_word_prior=0.05,
                                       learning_method="batch", max_iter=50, random_state=0).fit(train.numpy())
    theirs = lda.document_completion(lambda h: torch.tensor(sk.transform(h.numpy()), dtype=torch.float32),
                                     torch.tensor(sk.components_, dtype=torch.float32), test)["test_perplexity"]
    lam, _, _ = _cavi(train, 4, 0.1, 0.05, sweeps=50)
    ours = lda.document_completion(lambda h: lda.e_step(h, lam, 0.1)[0], lam, test)["test_perplexity"]
    assert ours == pytest.approx(theirs, rel=0.03)


def test_counts_validation_and_text_corpus(tmp_path, capsys):
    with pytest.raises(UserError, match="negative count"):
        check_counts(np.array([[1, -1], [0, 2]]), "x")
    with pytest.raises(UserError, match="non-integer count 0.5"):
        check_counts(np.array([[1, 0.5], [0, 2]]), "x")
    kept = check_counts(np.array([[1, 2], [0, 0], [3, 0]]), "x")
    assert kept.tolist() == [[1, 2], [3, 0]] and "skipped 1 empty document" in capsys.readouterr().err
    for i, text in enumerate(["apple banana cherry apple", "banana cherry apple date", "cherry apple banana",
                              "apple banana zebra quokka", "banana cherry apple"]):
        (tmp_path / f"d{i}.txt").write_text(text)
    c = load_texts(str(tmp_path), min_df=2, max_df=1.0, test_fraction=0.4, seed=0)
    assert set(c.vocab) <= {"apple", "banana", "cherry", "date"}
    # the held-out words outside the training vocabulary are dropped and counted
    assert c.meta["heldout_oov_tokens"] >= 0 and c.test.sum() > 0


@pytest.mark.parametrize("argv, message", [
    (["--topics", "0"], "--topics must be at least 1"),
    (["--elbo", "trace"], "use --elbo enum"),
    (["--data", "EMPTY_DIR"], "no readable .txt files"),
    (["--data", "NEG_NPZ"], "negative count"),
])
def test_bad_input_is_one_error_line(argv, message, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    np.savez(tmp_path / "neg.npz", counts=np.array([[1, -2, 0], [0, 1, 1]]))
    argv = [str(empty) if a == "EMPTY_DIR" else str(tmp_path / "neg.npz") if a == "NEG_NPZ" else a for a in argv]
    code = svi.main([str(ROOT / "models" / "lda.py"), *argv, "--steps", "2", "--no-progress",
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and message in err[-1]


def test_cli_compare_end_to_end(cli, tmp_path):
    out = tmp_path / "cmp"
    r = cli("inference.compare", "models/lda.py", "--data", "synthetic", "--docs", "60", "--vocab", "30",
            "--topics", "3", "--words", "20", "--steps", "6", "--batch-size", "16", "--infer-docs", "20",
            "--local-steps", "5", "--eval-particles", "1", "--threads", "1", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["guide"] for row in rows] == ["explicit", "amortized", "cavi"]
    for row in rows:
        for key in ("train_elbo", "test_elbo", "test_perplexity", "npmi", "topic_tv", "infer_seconds_1000",
                    "train_elbo_per_token"):
            assert math.isfinite(row[key]), (row["guide"], key)
    for name in ("compare.md", "compare_elbo.png", "explicit/topics.png", "cavi/metrics.json"):
        assert (out / name).is_file()
    bad = cli("inference.svi", "models/lda.py", "--topics", "-1", "--no-progress")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("guide,lr,topic_lr", [("explicit", 0.05, 0.0), ("amortized", 0.01, 0.1)])
def test_svi_schemes_recover_the_topics_of_a_small_synthetic_corpus(guide, lr, topic_lr, tmp_path):
    """Known topics (drawn from the model, eta = 0.05, so a few words carry each topic) are
    recovered by each SVI scheme through the runner to mean TV < 0.1 after matching: the
    explicit guide with its E-step local step, the amortized one with its batch-normalized
    encoder (without which it collapses topics: TV ~0.4 on the issue's corpus)."""
    cfg = svi.RunConfig(model_file=str(ROOT / "models" / "lda.py"), guide=guide, elbo="enum", steps=200,
                        batch_size=100, lr=lr, data="synthetic", out=str(tmp_path / guide), progress=False,
                        eval_every=200, eval_particles=1,
                        options={"docs": 500, "vocab": 60, "topics": 4, "words": 50, "alpha": 0.1, "eta": 0.05,
                                 "infer_docs": 20, "topic_lr": topic_lr})
    _, metrics = svi.run(cfg)
    assert metrics["topic_tv"] < 0.1, metrics["topic_tv"]


@pytest.mark.parametrize("guide", ["explicit", "amortized", "cavi"])
def test_data_on_host_gives_the_same_run(guide, tmp_path):
    """--data-on-host keeps the counts where they were loaded and copies each minibatch and
    each evaluation chunk to the device. On one device the copies are no-ops, so every number
    must equal the ordinary run's; with CHUNK = 7 the chunked evaluation paths (train ELBO,
    held-out inference, document completion) are the ones exercised. (The GPU case, counts
    in host memory and parameters on CUDA, is tests/inference/test_devices.py's to run.)"""
    mf = load_model_file(ROOT / "models" / "lda.py")
    mf.module.CHUNK = 7
    opts = {"docs": 120, "vocab": 25, "topics": 3, "words": 20, "infer_docs": 10}
    metrics = []
    for on_host in (False, True):
        cfg = svi.RunConfig(model_file=str(mf.path), guide=guide, elbo="enum", steps=12, batch_size=24, lr=0.05,
                            data="synthetic", out=str(tmp_path / f"{on_host}"), progress=False, eval_every=6,
                            eval_particles=2, data_on_host=on_host, options=opts)
        metrics.append(svi.run(cfg, mf)[1])
    for key in ("train_elbo", "test_elbo", "train_elbo_per_token", "test_perplexity", "npmi", "topic_tv"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-6, abs=1e-9), key


def test_data_on_host_refusals(tmp_path, capsys):
    from inference.svi import main

    lda_file, vae_file = str(ROOT / "models" / "lda.py"), str(ROOT / "models" / "vae.py")
    cases = [([lda_file, "--data-on-host"], "--data-on-host copies one minibatch at a time to the device: give "
                                           "--batch-size"),
             ([vae_file, "--data-on-host", "--batch-size", "32"], "vae.py evaluates on its whole data set at once "
                                                                  "and does not support --data-on-host"),
             ([lda_file, "--data-on-host", "--batch-size", "32", "--backend", "numpyro"],
              "--data-on-host runs on the Pyro backend only")]
    for argv, message in cases:
        assert main([*argv, "--steps", "2", "--no-progress", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
