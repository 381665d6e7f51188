"""Corpora as bag-of-words count matrices, for topic models.

A corpus is a float tensor ``counts[m, v]``: how often word v occurs in document m (rows
are documents, so the runner minibatches documents). The word order inside a document
does not matter to LDA (Blei, Ng & Jordan 2003, "Latent Dirichlet Allocation", JMLR 3),
so the counts are the data, with no padding of ragged documents.

Sources (``--data SPEC``):

* ``reuters`` (default): the 395 Reuters articles (4,258 words, 84,010 tokens) that the
  PyPI package ``lda`` ships;
* ``synthetic``: documents drawn from the LDA model itself, with known topics;
* a folder of ``.txt`` files (one document each), or ``file.csv[:column]`` (one document
  per row; column ``text`` by default), tokenized with stop words and frequency pruning;
* ``file.npz`` with an array ``counts`` (documents x words) and optionally ``vocab``.
"""

from __future__ import annotations

import csv
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ppl_gen.core.errors import UserError

# torch marks sparse CSR tensors as beta with a warning on first use (SparseCorpus.rows)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class Corpus:
    train: torch.Tensor              # [D_train, V] counts
    test: torch.Tensor | None        # [D_test, V] counts
    vocab: list[str]
    name: str
    true_topics: torch.Tensor | None = None   # [K, V], synthetic corpora only
    meta: dict = field(default_factory=dict)


def check_counts(counts: np.ndarray, source: str) -> np.ndarray:
    """Counts must be finite, non-negative integers; empty documents are dropped with a
    warning on stderr (they carry no evidence about the topics)."""
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise UserError(f"{source}: counts must be a 2-d array (documents x words), got shape {counts.shape}; "
                        "store one row per document")
    if not np.issubdtype(counts.dtype, np.number):
        raise UserError(f"{source}: counts must be numbers, got dtype {counts.dtype}")
    if not np.all(np.isfinite(counts)):
        raise UserError(f"{source}: counts contain NaN or infinity; give non-negative integer word counts")
    if (counts < 0).any():
        m, v = np.argwhere(counts < 0)[0]
        raise UserError(f"{source}: negative count {counts[m, v]} (document {m}, word {v}); "
                        "word counts must be non-negative integers")
    if (counts != np.round(counts)).any():
        m, v = np.argwhere(counts != np.round(counts))[0]
        raise UserError(f"{source}: non-integer count {counts[m, v]} (document {m}, word {v}); "
                        "LDA needs whole word counts, not frequencies or tf-idf weights")
    empty = counts.sum(1) == 0
    if empty.all():
        raise UserError(f"{source}: every document is empty; check the data or the pruning options")
    if empty.any():
        print(f"warning: {source}: skipped {int(empty.sum())} empty document(s) "
              f"(first: row {int(np.argmax(empty))})", file=sys.stderr)
        counts = counts[~empty]
    return counts


def split(counts: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents into train and held-out sets, by a fixed permutation."""
    perm = np.random.default_rng(seed).permutation(len(counts))
    n_test = int(round(test_fraction * len(counts)))
    return counts[perm[n_test:]], counts[perm[:n_test]]


def load_reuters(test_fraction: float = 0.2, seed: int = 0) -> Corpus:
    try:
        import lda.datasets
    except ImportError:
        raise UserError("the Reuters corpus comes with the PyPI package lda: pip install lda") from None
    counts = check_counts(lda.datasets.load_reuters(), "reuters")
    train, test = split(counts, test_fraction, seed)
    return Corpus(torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32),
                  list(lda.datasets.load_reuters_vocab()), "reuters")


def sample_corpus(docs: int, vocab: int, topics: int, words: int, alpha: float, eta: float,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents drawn from LDA itself: beta_k ~ Dir(eta), theta_m ~ Dir(alpha),
    z_mn ~ Cat(theta_m), x_mn ~ Cat(beta_{z_mn}); returns (counts [docs, vocab], beta).
    Sampled in float64 so that a tiny eta gives tiny probabilities, not log 0."""
    g = torch.Generator().manual_seed(seed)
    gamma = lambda conc: torch._standard_gamma(conc, generator=g)  # noqa: E731
    beta = gamma(torch.full((topics, vocab), eta, dtype=torch.float64)).clamp(min=1e-300)
    beta = beta / beta.sum(-1, keepdim=True)
    theta = gamma(torch.full((docs, topics), alpha, dtype=torch.float64)).clamp(min=1e-300)
    theta = theta / theta.sum(-1, keepdim=True)
    # given theta and beta the words of a document are Multinomial(N, theta_m @ beta)
    counts = torch.stack([torch.bincount(torch.multinomial(p, words, replacement=True, generator=g),
                                         minlength=vocab) for p in theta @ beta])
    return counts.float(), beta.float()


def load_synthetic(docs: int, vocab: int, topics: int, words: int, alpha: float, eta: float,
                   test_fraction: float = 0.2, seed: int = 0) -> Corpus:
    counts, beta = sample_corpus(docs, vocab, topics, words, alpha, eta, seed)
    train, test = split(counts.numpy(), test_fraction, seed)
    return Corpus(torch.from_numpy(train), torch.from_numpy(test), [f"w{v}" for v in range(vocab)],
                  "synthetic", true_topics=beta)


def read_texts(spec: str) -> tuple[list[str], str]:
    """Documents from a folder of .txt files or a CSV column (``file.csv:column``)."""
    path, _, column = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    p = Path(path)
    if p.is_dir():
        texts, skipped = [], []
        for f in sorted(p.glob("*.txt")):
            try:
                raw = f.read_bytes()
                if b"\x00" in raw[:8192]:  # a binary file named .txt: its bytes are not words
                    raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "NUL byte")
                texts.append(raw.decode("utf-8"))
            except (OSError, UnicodeDecodeError):
                skipped.append(f.name)
        if skipped:
            print(f"warning: skipped {len(skipped)} file(s) in {p} that are not UTF-8 text: "
                  f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
        if not texts:
            raise UserError(f"folder {p} has no readable .txt files; put one document per .txt file in it")
        return texts, p.name
    if p.suffix.lower() == ".csv" and p.is_file():
        column = column or "text"
        with open(p, newline="", errors="replace") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise UserError(f"{p} has no column {column!r} (columns: {', '.join(reader.fieldnames or [])}); "
                                f"give --data {p}:COLUMN")
            texts = [row[column] or "" for row in reader]
        if not texts:
            raise UserError(f"{p} has no rows")
        return texts, p.stem
    raise UserError(f"--data {spec}: not reuters, synthetic, a folder of .txt files, a .csv or an .npz; "
                    "give one of those")


def load_texts(spec: str, min_df: int = 2, max_df: float = 0.5, test_fraction: float = 0.2,
               seed: int = 0) -> Corpus:
    """Tokenize with scikit-learn's CountVectorizer: English stop words out, words in fewer
    than ``min_df`` training documents or in more than ``max_df`` of them pruned. The
    vocabulary comes from the training documents only; held-out words outside it are
    ignored and counted (``meta['heldout_oov_tokens']``)."""
    from sklearn.feature_extraction.text import CountVectorizer

    texts, name = read_texts(spec)
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_test = int(round(test_fraction * len(texts)))
    train_texts = [texts[i] for i in perm[n_test:]]
    test_texts = [texts[i] for i in perm[:n_test]]
    vectorizer = CountVectorizer(stop_words="english", min_df=min(min_df, max(len(train_texts), 1)),
                                 max_df=max_df if len(train_texts) > 2 else 1.0)
    try:
        train = vectorizer.fit_transform(train_texts).toarray()
    except ValueError as e:  # empty vocabulary
        raise UserError(f"--data {spec}: no words left after stop words and pruning ({e}); "
                        "use more documents or a smaller --min-df") from None
    train = check_counts(train, spec)
    vocab = list(vectorizer.get_feature_names_out())
    test, oov = None, 0
    if test_texts:
        test = vectorizer.transform(test_texts).toarray()
        analyze = vectorizer.build_analyzer()
        oov = int(sum(len(analyze(t)) for t in test_texts) - test.sum())
        test = check_counts(test, f"{spec} (held-out)") if test.sum() > 0 else None
    c = Corpus(torch.tensor(train, dtype=torch.float32),
               None if test is None else torch.tensor(test, dtype=torch.float32), vocab, name)
    c.meta["heldout_oov_tokens"] = oov
    return c


def load_npz(path: str, test_fraction: float = 0.2, seed: int = 0) -> Corpus:
    try:
        arrays = np.load(path, allow_pickle=False)
        counts = arrays["counts"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot read an array 'counts' from it ({e}); save one with "
                        "numpy.savez(path, counts=...)") from None
    vocab = [str(w) for w in arrays["vocab"]] if "vocab" in arrays else [f"w{v}" for v in range(counts.shape[-1])]
    train, test = split(check_counts(counts, path), test_fraction, seed)
    return Corpus(torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32),
                  vocab, Path(path).stem)


def document_halves(counts: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each document's tokens at random into two halves (Wallach et al. 2009,
    document completion): the first floor(N_m / 2) tokens of a random order, and the rest.
    Deterministic given the seed; returns two count matrices that add up to ``counts``."""
    D, V = counts.shape
    n = counts.round().long().cpu()
    doc = torch.arange(D).repeat_interleave(n.sum(1))
    word = torch.arange(V).repeat(D).repeat_interleave(n.reshape(-1))
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(doc.double() + torch.rand(len(doc), generator=g, dtype=torch.float64))
    doc, word = doc[order], word[order]
    start = torch.cumsum(n.sum(1), 0) - n.sum(1)
    first = (torch.arange(len(doc)) - start[doc]) < n.sum(1)[doc] // 2
    half = torch.zeros(D * V, dtype=torch.float64)
    half.index_add_(0, doc[first] * V + word[first], torch.ones(int(first.sum()), dtype=torch.float64))
    first_half = half.reshape(D, V).to(counts)
    return first_half, counts - first_half


@dataclass
class SparseCorpus:
    """A count matrix too large to hold dense, by its nonzero entries in CSR form: the entries of
    document m are ``cols[crow[m]:crow[m + 1]]`` (words) with ``counts[...]`` (how often). Compact
    types (int16 columns and counts where they fit) keep 1,000,000 documents x 10,000 words,
    100 words each, near 0.4 GB where the dense float32 matrix would take 40 GB."""

    crow: torch.Tensor          # [D + 1] int64
    cols: torch.Tensor          # [P] int16 (V <= 32,767) or int32
    counts: torch.Tensor        # [P] int16 (counts <= 32,767) or int32
    vocab_size: int
    true_topics: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.crow) - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.cols, self.counts))

    def rows(self, start: int, stop: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Documents start..stop-1 as a float32 sparse CSR tensor [stop - start, V] (on ``device``)."""
        a, b = int(self.crow[start]), int(self.crow[stop])
        crow = self.crow[start:stop + 1] - a
        t = torch.sparse_csr_tensor(crow, self.cols[a:b].long(), self.counts[a:b].float(),
                                    (stop - start, self.vocab_size), check_invariants=False)
        return t if device is None else t.to(device, non_blocking=True)

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseCorpus":
        csr = x.to_sparse_csr()
        return cls(csr.crow_indices(), _compact(csr.col_indices()), _compact(csr.values().round().long()),
                   x.shape[1])

    def dense(self) -> torch.Tensor:
        return self.rows(0, len(self)).to_dense()

    # -- the rows as the runner takes them (ppl_gen.core.dataset: a row store) --------------
    # ``x[idx]`` gives the documents idx as a dense float32 [B, V] count matrix, what the model
    # and guides take (a minibatch, an evaluation chunk); the corpus itself stays compact.
    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self), self.vocab_size])

    @property
    def device(self) -> torch.device:
        return self.crow.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the corpus holds (the runner checks and fingerprints these)."""
        return self.crow, self.cols, self.counts

    def _entries(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows idx: for each of their nonzero entries, its position in cols/counts and its row in idx."""
        start, length = self.crow[idx], self.crow[idx + 1] - self.crow[idx]
        row = torch.repeat_interleave(torch.arange(len(idx), device=self.device), length)
        first = torch.cumsum(length, 0) - length                       # where each row's entries begin
        at = start[row] + torch.arange(len(row), device=self.device) - first[row]
        return at, row

    def __getitem__(self, idx) -> torch.Tensor:
        """Documents idx (a slice, or row numbers) as a dense float32 count matrix [B, V]."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step == 1:
                return self.rows(start, max(start, stop)).to_dense()
            idx = torch.arange(start, stop, step)
        idx = torch.as_tensor(idx, device=self.device).long().reshape(-1)
        at, row = self._entries(idx)
        out = torch.zeros(len(idx), self.vocab_size, device=self.device)
        out[row, self.cols[at].long()] = self.counts[at].float()
        return out

    def select(self, idx: torch.Tensor) -> "SparseCorpus":
        """The documents idx (row numbers, or a boolean mask), in that order, as a SparseCorpus."""
        idx = torch.as_tensor(idx, device=self.device)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long().reshape(-1)
        at, _ = self._entries(idx)
        crow = torch.zeros(len(idx) + 1, dtype=torch.int64, device=self.device)
        crow[1:] = torch.cumsum(self.crow[idx + 1] - self.crow[idx], 0)
        return SparseCorpus(crow, self.cols[at], self.counts[at], self.vocab_size, self.true_topics)

    def sum(self, dim: int | None = None) -> torch.Tensor:
        """The tokens of the corpus (a 0-d float64 tensor: exact beyond float32's 2^24), or with
        ``dim=-1`` (or 1) those of each document, N_m [D]."""
        if dim is None:
            return self.counts.sum(dtype=torch.int64).double()
        if dim not in (-1, 1):
            raise ValueError(f"SparseCorpus.sum: dim must be None, 1 or -1, got {dim}")
        row = torch.repeat_interleave(torch.arange(len(self), device=self.device), self.crow.diff())
        return torch.zeros(len(self), device=self.device).index_add_(0, row, self.counts.float())

    def _map(self, fn) -> "SparseCorpus":
        return SparseCorpus(fn(self.crow), fn(self.cols), fn(self.counts), self.vocab_size, self.true_topics)

    def to(self, device=None, non_blocking: bool = False, **_) -> "SparseCorpus":
        if device is None or torch.device(device) == self.device:
            return self
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SparseCorpus":
        return self._map(lambda t: t.pin_memory())


def _compact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int16) if t.numel() == 0 or int(t.max()) < 2 ** 15 else t.to(torch.int32)


def sample_sparse_corpus(docs: int, vocab: int, topics: int, words: int, alpha: float, eta: float,
                         seed: int = 0, chunk: int = 50_000) -> SparseCorpus:
    """Documents drawn from LDA itself, as :func:`sample_corpus` draws them (the same model; other
    draws), ``chunk`` documents at a time straight into CSR form, so that memory never holds a
    dense [docs, vocab] matrix: each token's topic z ~ Cat(theta_m), its word x ~ Cat(beta_z),
    then the (document, word) pairs are counted."""
    g = torch.Generator().manual_seed(seed)
    beta = torch._standard_gamma(torch.full((topics, vocab), eta, dtype=torch.float64), generator=g).clamp(min=1e-300)
    beta = beta / beta.sum(-1, keepdim=True)
    crows, cols, counts = [torch.zeros(1, dtype=torch.int64)], [], []
    offset = 0
    for start in range(0, docs, chunk):
        c = min(chunk, docs - start)
        theta = torch._standard_gamma(torch.full((c, topics), alpha, dtype=torch.float64), generator=g).clamp(min=1e-300)
        z = torch.multinomial(theta / theta.sum(-1, keepdim=True), words, replacement=True, generator=g)   # [c, N]
        x = torch.empty_like(z)
        for k in range(topics):
            at = z == k
            x[at] = torch.multinomial(beta[k], int(at.sum()), replacement=True, generator=g) if at.any() else x[at]
        key = (torch.arange(c)[:, None] * vocab + x).reshape(-1)
        pairs, n = torch.unique(key, sorted=True, return_counts=True)
        per_doc = torch.bincount(pairs // vocab, minlength=c)
        crows.append(offset + torch.cumsum(per_doc, 0))
        offset += len(pairs)
        cols.append((pairs % vocab).to(torch.int16 if vocab < 2 ** 15 else torch.int32))
        counts.append(n.to(torch.int16 if words < 2 ** 15 else torch.int32))
    return SparseCorpus(torch.cat(crows), torch.cat(cols), torch.cat(counts), vocab, beta.float())


def split_sparse(corpus: SparseCorpus, test_fraction: float, seed: int) -> tuple[SparseCorpus, SparseCorpus]:
    """Documents into train and held-out sets by the permutation :func:`split` uses."""
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(corpus)))
    n_test = int(round(test_fraction * len(corpus)))
    return corpus.select(perm[n_test:]), corpus.select(perm[:n_test])


def as_sparse(c: Corpus) -> Corpus:
    """The same corpus with its counts held as SparseCorpus (compact CSR) instead of dense."""
    test = None if c.test is None else SparseCorpus.from_dense(c.test)
    return Corpus(SparseCorpus.from_dense(c.train), test, c.vocab, c.name, c.true_topics, dict(c.meta))


def load_sparse_synthetic(docs: int, vocab: int, topics: int, words: int, alpha: float, eta: float,
                          test_fraction: float = 0.2, seed: int = 0) -> Corpus:
    """A synthetic corpus drawn straight into sparse form (:func:`sample_sparse_corpus`, never a
    dense [docs, vocab] matrix), split as :func:`split` splits; other draws than :func:`load_synthetic`."""
    whole = sample_sparse_corpus(docs, vocab, topics, words, alpha, eta, seed)
    train, test = split_sparse(whole, test_fraction, seed)
    del whole
    return Corpus(train, test, [f"w{v}" for v in range(vocab)], "synthetic", true_topics=train.true_topics)


def sparse_document_halves(counts: SparseCorpus, seed: int = 0, chunk: int = 65_536) -> tuple[SparseCorpus, SparseCorpus]:
    """:func:`document_halves` of a SparseCorpus, from its nonzero entries: the same tokens in the
    same order (document by document, words in increasing order), the same random numbers, so the
    same halves; ``chunk`` documents at a time, so no array has one entry per token of the corpus
    except the random numbers."""
    n = counts.counts.long().cpu()
    crow = counts.crow.cpu()
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(int(n.sum()), generator=g, dtype=torch.float64)
    tokens_before = torch.zeros(len(n) + 1, dtype=torch.int64)
    tokens_before[1:] = torch.cumsum(n, 0)                    # tokens before entry e
    first = torch.zeros(len(n), dtype=torch.int64)            # first-half tokens of each entry
    for a in range(0, len(counts), chunk):
        b = min(a + chunk, len(counts))
        e0, e1 = int(crow[a]), int(crow[b])
        entry = torch.repeat_interleave(torch.arange(e0, e1), n[e0:e1])          # the chunk's tokens
        per_doc = tokens_before[crow[a + 1:b + 1]] - tokens_before[crow[a:b]]    # N_m
        doc = torch.repeat_interleave(torch.arange(a, b), per_doc)
        # the global document number, as document_halves adds it: the same keys, the same order
        order = torch.argsort(doc.double() + u[int(tokens_before[e0]):int(tokens_before[e1])])
        start = torch.cumsum(per_doc, 0) - per_doc
        pos = torch.arange(len(doc)) - start[doc - a]
        kept = entry[order][pos < per_doc[doc - a] // 2]
        first[e0:e1] += torch.bincount(kept - e0, minlength=e1 - e0)

    def part(values: torch.Tensor) -> SparseCorpus:
        keep = values > 0
        row = torch.repeat_interleave(torch.arange(len(counts)), crow.diff())
        new_crow = torch.zeros(len(counts) + 1, dtype=torch.int64)
        new_crow[1:] = torch.cumsum(torch.bincount(row[keep], minlength=len(counts)), 0)
        return SparseCorpus(new_crow, counts.cols.cpu()[keep], values[keep].to(counts.counts.dtype),
                            counts.vocab_size).to(counts.device)
    return part(first), part(n - first)
