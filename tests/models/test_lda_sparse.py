"""models/lda.py on sparse counts (``--data sparse:SPEC``, ``ppl_gen.datasets.corpus.SparseCorpus``)
against the dense path as the oracle: the same rows, halves, NPMI and starting topics; the same
runner trace, step by step, and the same metrics; the memory of a 1,000,000 x 10,000 corpus from
its bytes per document; the CLI end to end with --data-on-host; bad specs."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch

from inference import svi
from ppl_gen.core.pipeline import data_fingerprint
from ppl_gen.core.protocol import load_model_file
from ppl_gen.datasets.corpus import (SparseCorpus, document_halves, load_reuters, sample_corpus,
                                     sample_sparse_corpus, sparse_document_halves)
from ppl_gen.exact import lda

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reuters():
    c = load_reuters()
    return c, SparseCorpus.from_dense(c.train), SparseCorpus.from_dense(c.test)


def test_rows_halves_npmi_and_starting_topics_equal_the_dense_ones(reuters, monkeypatch):
    """Everything the runner and the model read from a SparseCorpus equals what they read from
    the dense matrix, exactly: rows by number and by slice, row sums and the token total, a
    selection, the document-completion halves, NPMI and the k-means++ starting topics (small
    chunks, so that the chunked loops run more than once)."""
    c, train, test = reuters
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:40]
    assert torch.equal(train[idx], c.train[idx]) and torch.equal(train[10:50], c.train[10:50])
    assert torch.equal(train[:], c.train) and train.shape == c.train.shape and len(train) == 316
    assert torch.equal(train.sum(-1), c.train.sum(-1)) and train.sum().item() == c.train.sum().item()
    assert torch.equal(train.select(idx).dense(), c.train[idx])
    for seed in (0, 3):
        dense = document_halves(c.test, seed)
        sparse = sparse_document_halves(test, seed, chunk=9)
        assert all(torch.equal(s.dense(), d) for s, d in zip(sparse, dense))
    lam = lda.initial_topics(c.train, 20, torch.Generator().manual_seed(0)) + 0.01
    assert torch.equal(lda._sparse_npmi(lam, train, 10, chunk=50), lda.npmi(lam, c.train))
    monkeypatch.setattr(lda, "KMEANS_CHUNK", 50)
    for seed in range(3):
        assert torch.equal(lda.initial_topics(train, 20, torch.Generator().manual_seed(seed)),
                           lda.initial_topics(c.train, 20, torch.Generator().manual_seed(seed)))


def _runs(tmp_path, guide, data, batch_size, on_host, steps=8):
    mf = load_model_file(ROOT / "models" / "lda.py")
    mf.module.CHUNK = 23        # the model's evaluation chunks: several of them
    opts = {"topics": 4, "infer_docs": 10}
    cfg = svi.RunConfig(model_file=str(mf.path), guide=guide, elbo="enum", steps=steps, batch_size=batch_size,
                        lr=0.05, data=data, out=str(tmp_path / f"{guide}-{data.replace(':', '_')}-{on_host}"),
                        progress=False, eval_every=4, eval_particles=2, diagnostic_draws=20, data_on_host=on_host,
                        options={**opts, "topic_lr": 0.1} if guide == "amortized" else opts, threads=1)
    fitted, metrics = svi.run(cfg, mf)
    with open(fitted.out / "trace.csv", newline="") as f:
        trace = [float(row["loss"]) for row in csv.DictReader(f)]
    return trace, metrics


@pytest.mark.parametrize("guide", ["explicit", "amortized", "cavi"])
def test_sparse_runner_path_gives_the_dense_trace_and_metrics(guide, tmp_path):
    """The same corpus (a synthetic one, saved as counts.npz) through the runner twice: dense
    counts moved to the device, and ``sparse:`` counts kept in host memory with --data-on-host,
    minibatches made dense as they are drawn. Same seed, so the same starting topics, batches and
    draws: the ELBO of every step (trace.csv) and every metric agree to float tolerance."""
    counts, _ = sample_corpus(docs=150, vocab=40, topics=4, words=25, alpha=0.1, eta=0.05, seed=2)
    path = tmp_path / "counts.npz"
    np.savez(path, counts=counts.numpy())
    dense_trace, dense = _runs(tmp_path, guide, str(path), 24, on_host=False)
    sparse_trace, sparse = _runs(tmp_path, guide, f"sparse:{path}", 24, on_host=True)
    assert len(dense_trace) == len(sparse_trace) == 8
    assert sparse_trace == pytest.approx(dense_trace, rel=1e-6)
    for key in ("train_elbo", "test_elbo", "train_elbo_per_token", "test_perplexity", "npmi", "variational_parameters"):
        assert sparse[key] == pytest.approx(dense[key], rel=1e-6, abs=1e-9), key


def test_sparse_reuters_full_batch_equals_dense_reuters(tmp_path):
    """Reuters itself, explicit SVI, no minibatches: ``sparse:reuters`` (on the device, whole:
    the runner asks for every row, ``x[:]``) gives the trace and metrics of ``reuters``."""
    dense_trace, dense = _runs(tmp_path, "explicit", "reuters", None, on_host=False, steps=3)
    sparse_trace, sparse = _runs(tmp_path, "explicit", "sparse:reuters", None, on_host=False, steps=3)
    assert len(sparse_trace) == 3 and sparse_trace == pytest.approx(dense_trace, rel=1e-6)
    for key in ("train_elbo_per_token", "test_perplexity", "npmi"):
        assert sparse[key] == pytest.approx(dense[key], rel=1e-6), key


def test_sparse_counts_are_checked_and_fingerprinted():
    """The runner checks and fingerprints what the row store holds: the same counts give the
    same fingerprint, one changed count another."""
    from ppl_gen import Dataset

    c = sample_sparse_corpus(docs=50, vocab=30, topics=3, words=10, alpha=0.1, eta=0.05, seed=0)
    same = sample_sparse_corpus(docs=50, vocab=30, topics=3, words=10, alpha=0.1, eta=0.05, seed=0)
    assert data_fingerprint(Dataset(train=c)) == data_fingerprint(Dataset(train=same))
    same.counts[0] += 1
    assert data_fingerprint(Dataset(train=c)) != data_fingerprint(Dataset(train=same))


def test_a_million_documents_by_ten_thousand_words_fit_in_under_4_gb():
    """Bytes of the training set of 1,000,000 documents x 10,000 words, 100 words each, as a
    SparseCorpus: 8 bytes of row pointer per document plus 4 per nonzero entry (int16 word,
    int16 count). At most 100 distinct words per document bound it by 1,000,000 x (8 + 100 x 4)
    = 0.41 GB, whatever the draws; a 10,000-document corpus drawn from the model at that
    vocabulary (K = 20, alpha = 0.1, eta = 0.01, as the benchmark draws it) measures the bytes
    per document. The dense float32 matrix would take 40 GB, and a streamed minibatch of
    B = 1,000 dense rows takes 40 MB."""
    D, V, N = 1_000_000, 10_000, 100
    c = sample_sparse_corpus(docs=10_000, vocab=V, topics=20, words=N, alpha=0.1, eta=0.01, seed=0)
    per_document = c.nbytes / len(c)
    assert c.cols.dtype == c.counts.dtype == torch.int16 and c.crow.dtype == torch.int64
    assert per_document <= 8 + N * 4 + 1e-9
    assert per_document * D < 4e9 and D * (8 + N * 4) < 4e9
    assert 1000 * V * 4 == 40_000_000 and D * V * 4 == 40e9


def test_cli_end_to_end_on_a_sparse_synthetic_corpus_from_host_memory(tmp_path):
    """python -m inference.svi models/lda.py --data sparse:synthetic --data-on-host --batch-size B
    in a subprocess: exit 0 and finite metrics, for explicit and amortized."""
    for guide in ("explicit", "amortized"):
        out = tmp_path / guide
        cmd = [sys.executable, "-m", "inference.svi", str(ROOT / "models" / "lda.py"), "--guide", guide,
               "--data", "sparse:synthetic", "--docs", "200", "--vocab", "300", "--topics", "4", "--words", "30",
               "--data-on-host", "--batch-size", "40", "--steps", "6", "--eval-every", "3", "--eval-particles", "1",
               "--diagnostic-draws", "20", "--infer-docs", "20", "--threads", "1", "--no-progress", "--out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics = json.loads((out / "metrics.json").read_text())
        for key in ("train_elbo", "test_elbo", "train_elbo_per_token", "test_perplexity", "npmi", "topic_tv"):
            assert math.isfinite(metrics[key]), key


@pytest.mark.parametrize("spec, message", [
    ("sparse:", "--data sparse:: give a corpus after 'sparse:'"),
    ("sparse:sparse:reuters", "'sparse:' once is enough"),
    ("sparse:nowhere.txt", "not reuters, synthetic, a folder of .txt files"),
])
def test_bad_sparse_specs_are_one_error_line(spec, message, tmp_path, capsys):
    from inference.svi import main

    assert main([str(ROOT / "models" / "lda.py"), "--data", spec, "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    pyro.clear_param_store()
