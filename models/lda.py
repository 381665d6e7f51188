"""Latent Dirichlet allocation with explicit mean-field, amortized and CAVI inference
(Blei, Ng & Jordan 2003, "Latent Dirichlet Allocation", JMLR 3).

Generative process (the lecture's), K topics over V words:

    beta_k ~ Dir(eta)                 k = 1..K        topics
    theta_m ~ Dir(alpha)              m = 1..D        topic proportions of document m
    z_mn ~ Cat(theta_m)               n = 1..N_m      topic of word n
    x_mn ~ Cat(beta_{z_mn})                           the word

A document is its bag of words: counts n_mv (a row of the data). Word order does not
matter to the model, so the tokens of word v in document m form one (m, v) pair that
carries weight n_mv (``poutine.scale``): ragged documents, no padding.

Variational family, the lecture's "uncollapsed variational inference, aka explicit V.I.":

    q(beta, theta, z) = prod_k Dir(beta_k | lambda_k) prod_m Dir(theta_m | gamma_m) prod_mn Cat(z_mn | phi_mn)

Three guides, ``--guide NAME``, for the same q(beta) and q(z):

* ``explicit``: one gamma_m per document, fitted for that document alone, with SVI on
  minibatches of documents: at each visit gamma_m goes to its optimum given the topics and
  q(beta) takes an Adam step (Hoffman et al. 2013's local/global split; ``--local-update adam``:
  gamma_m a free parameter moved by Adam jointly with the topics, RowwiseAdam);
* ``amortized``: an encoder network maps a document's counts to gamma_m, a Dirichlet q(theta)
  (AVITM-style inference for the LDA model, Srivastava & Sutton 2017, "Autoencoding
  Variational Inference for Topic Models", ICLR; they used a logistic-normal because Dirichlet
  samples were not yet reparameterizable; Pyro's Dirichlet is, by implicit gradients), with
  their batch-normalized topic logits against component collapse;
* ``cavi``: the closed-form coordinate-ascent updates of Blei et al. (2003) (stochastic
  form with minibatches, Hoffman et al. 2013), in Pyro's parameter store: the reference.

The expectation over z is exact, never a score-function estimate: z is enumerated in the
guide (``TraceEnum_ELBO``, ``--elbo enum``, this file's default), and q(z_mn) = Cat(phi_mn) is
set to its coordinate optimum phi_mvk ∝ exp(E[log theta_mk] + E[log beta_kv]) at every step
(as Hoffman et al.'s SVI does), so the ELBO is the lecture's mean-field ELBO maximized over phi.
theta and beta are sampled by reparameterization.

Data: ``reuters`` (default, the PyPI package lda's 395 documents), ``synthetic`` (drawn from
this model: ``--docs --vocab --topics --words``), a folder of .txt files, ``file.csv:column``,
or an .npz with ``counts``; ``sparse:`` before any of them holds the counts as their nonzero
entries (``SparseCorpus``), for corpora too large to hold dense (``--data-on-host``). Metrics: held-out perplexity by document completion (Wallach et
al. 2009), NPMI coherence (Lau et al. 2014), topic recovery on synthetic data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.ops.indexing import Vindex
from torch import nn

from ppl_gen import Dataset, Metric, Spec, UserError, data_plate
from ppl_gen.core.protocol import Guide
from ppl_gen.datasets import corpus as corpora
from ppl_gen.exact import lda


@dataclass
class Options:
    topics: int = field(default=20, metadata={"help": "K, the number of topics"})
    alpha: float = field(default=0.1, metadata={"help": "Dirichlet prior on each theta_m (symmetric)"})
    eta: float = field(default=0.01, metadata={"help": "Dirichlet prior on each topic beta_k (symmetric)"})
    docs: int = field(default=2000, metadata={"help": "--data synthetic: documents to draw (train + held-out)"})
    vocab: int = field(default=500, metadata={"help": "--data synthetic: V, words in the vocabulary"})
    words: int = field(default=100, metadata={"help": "--data synthetic: words per document"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of documents held out (fixed split)"})
    data_seed: int = field(default=0, metadata={"help": "seed of the train/held-out split and synthetic draws"})
    min_df: int = field(default=2, metadata={"help": "text data: drop words in fewer training documents"})
    max_df: float = field(default=0.5, metadata={"help": "text data: drop words in more than this share of them"})
    hidden: int = field(default=100, metadata={"help": "width of the amortized encoder's two hidden layers"})
    init: str = field(default="documents", metadata={
        "choices": ("documents", "random"),
        "help": "starting topics of every scheme: documents (K training documents picked by k-means++ "
                "seeding, plus noise) or random (near-uniform Gamma(100, 1/100) noise only)"})
    topic_lr: float = field(default=0.0, metadata={
        "help": "Adam rate of the topics' log(lambda - eta) in the SVI guides; 0: --lr. The amortized guide "
                "wants a small --lr for its encoder and a larger one here: the topics travel from ~1 to "
                "thousands in concentration, at most about one rate per step in log space"})
    local_update: str = field(default="estep", metadata={
        "choices": ("estep", "adam"),
        "help": "explicit guide: how a document's gamma_m moves when the document is visited. estep: to "
                "its optimum given the topics, by coordinate ascent (Hoffman et al. 2013's local step); "
                "adam: one Adam step of a free per-document parameter, jointly with the topics"})
    local_lr: float = field(default=0.1, metadata={
        "help": "--local-update adam: Adam rate of the per-document log gamma (training and held-out fits)"})
    local_steps: int = field(default=200, metadata={
        "help": "--local-update adam: Adam steps that fit gamma of a new document with the topics fixed"})
    cavi_iters: int = field(default=100, metadata={"help": "most E-step sweeps per CAVI step"})
    infer_docs: int = field(default=200, metadata={
        "help": "documents timed for 'seconds to infer theta of 1,000 new documents' (scaled to 1,000)"})

    def validate(self):
        if self.topics < 1:
            raise UserError(f"--topics must be at least 1, got {self.topics}")
        if self.topic_lr < 0:
            raise UserError(f"--topic-lr must be positive (or 0 for --lr), got {self.topic_lr}")
        for name in ("alpha", "eta", "local_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("docs", "vocab", "words", "hidden", "local_steps", "cavi_iters", "infer_docs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.test_fraction < 1:
            raise UserError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")


# full-batch steps on Reuters (316 training documents); Adam on log lambda and log gamma.
DEFAULTS = {"elbo": "enum", "steps": 1500, "lr": 0.05}

# the corpora this process loaded, so build() finds their vocabulary and true topics
_CORPORA: dict[str, corpora.Corpus] = {}


SPARSE = "sparse:"


def data(spec: str | None = None, options: Options | None = None) -> Dataset:
    """The corpus of ``--data SPEC`` as dense counts, or with ``sparse:SPEC`` (``sparse:reuters``,
    ``sparse:synthetic``, ``sparse:counts.npz``, ...) as a SparseCorpus: the nonzero entries in
    compact CSR form, from which each minibatch and evaluation chunk is made dense as it is
    needed, so a corpus too large to hold dense (1,000,000 documents x 10,000 words: 40 GB
    dense, 0.4 GB sparse) trains with ``--data-on-host --batch-size B``. ``sparse:synthetic`` is
    drawn straight into sparse form (other draws than ``synthetic``, the same model)."""
    o = options or Options()
    spec = spec or "reuters"
    sparse = spec.startswith(SPARSE)
    source = spec[len(SPARSE):] if sparse else spec
    if sparse and not source:
        raise UserError(f"--data {spec}: give a corpus after '{SPARSE}' (e.g. {SPARSE}synthetic or {SPARSE}reuters)")
    if source.startswith(SPARSE):
        raise UserError(f"--data {spec}: '{SPARSE}' once is enough")
    if sparse and source == "synthetic":
        c = corpora.load_sparse_synthetic(o.docs, o.vocab, o.topics, o.words, o.alpha, o.eta, o.test_fraction,
                                          o.data_seed)
    elif source == "reuters":
        c = corpora.load_reuters(o.test_fraction, o.data_seed)
    elif source == "synthetic":
        c = corpora.load_synthetic(o.docs, o.vocab, o.topics, o.words, o.alpha, o.eta, o.test_fraction, o.data_seed)
    elif source.endswith(".npz"):
        c = corpora.load_npz(source, o.test_fraction, o.data_seed)
    else:
        c = corpora.load_texts(source, o.min_df, o.max_df, o.test_fraction, o.data_seed)
    if sparse and not isinstance(c.train, corpora.SparseCorpus):
        c = corpora.as_sparse(c)
    key = f"{spec}:{id(c)}"
    _CORPORA[key] = c
    test = c.test if c.test is not None and len(c.test) else None
    return Dataset(train=c.train, test=test, name=c.name,
                   meta={"corpus": key, "vocab_size": len(c.vocab), "train_tokens": int(c.train.sum()),
                         "test_tokens": 0 if test is None else int(test.sum()), **c.meta})


# theta and beta are sampled in float64: a Dirichlet draw with concentrations near alpha = 0.1
# or eta = 0.01 underflows float32 (P[Gamma(0.01) < 1e-38] is about 0.4), and the
# reparameterized gradient of an underflowed draw is NaN; float64's range makes it negligible
F64 = torch.float64


class Encoder(nn.Module):
    """Counts x_m -> gamma_m = alpha + N_m softmax(BN(f(sqrt(x_m / N_m)))).

    The form of the CAVI fixed point, gamma_m = alpha + sum_v n_mv phi_mv, whose entries
    sum to K alpha + N_m: the network only says how the document's N_m words split over topics.

    The network reads the square roots of the document's word frequencies x_mv / N_m (the
    Hellinger embedding: a vector of unit length whatever N_m), so the split depends on which
    words the document uses and not on how many it has; N_m enters only as gamma's scale, as in
    the fixed point. Held-out documents are scored by document completion, from half of their
    words: fed log(1 + counts), the encoder met shorter inputs than any it was trained on, and
    its held-out perplexity on Reuters stayed 12-13% above that of the E-step on its own topics
    (seeds 0-2, 160 steps); from frequencies it is within 2% of it.

    BN, batch normalization of the K topic logits (no learned scale or shift), is Srivastava &
    Sutton's (2017) remedy for component collapse: without it the encoder stops sending
    documents to some topics, those topics get no expected counts, and they are never used
    again (measured here: 4 of 10 topics unused on the synthetic corpus, recovery TV 0.39;
    with it 0.03). Normalizing each topic's logit over the batch keeps every topic in play.
    New documents use the running statistics (eval mode), so a document's gamma does not
    depend on which others are inferred with it."""

    def __init__(self, V: int, hidden: int, K: int, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.net = nn.Sequential(nn.Linear(V, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
                                 nn.Linear(hidden, K), nn.BatchNorm1d(K, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            raise UserError("the amortized encoder normalizes topic logits over the batch: it needs at "
                            "least 2 training documents per step (--batch-size 2 or more)")
        N = x.sum(-1, keepdim=True)
        return self.alpha + N * torch.softmax(self.net((x / N.clamp(min=1)).sqrt()), -1)


# documents per chunk that evaluation copies to the device (--data-on-host) and infers at once
CHUNK = 4096


class LDA:
    def __init__(self, x: torch.Tensor, options: Options, seed: int = 0, device: torch.device | None = None):
        self.K, self.V, self.options = options.topics, x.shape[-1], options
        self.alpha, self.eta = options.alpha, options.eta
        # where the parameters live; x may stay in host memory (--data-on-host)
        self.device = x.device if device is None else device
        self.encoder = Encoder(self.V, options.hidden, self.K, self.alpha).to(self.device)
        # every scheme starts from the same topics for the same --seed (see lda.initial_topics)
        g = torch.Generator().manual_seed(seed)
        self.lambda0 = lda.initial_topics(x, self.K, g, options.init).to(self.device)

    def _chunks(self, x: torch.Tensor):
        """Rows of x, CHUNK documents at a time, on the parameters' device."""
        for start in range(0, x.shape[0], CHUNK):
            yield x[start:start + CHUNK].to(self.device, non_blocking=True)

    # -- model -------------------------------------------------------------------
    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        with pyro.plate("topics", self.K):
            beta = pyro.sample("beta", dist.Dirichlet(x.new_full((self.V,), self.eta, dtype=F64)))  # [K, V]
        with data_plate(x, idx, size, name="documents"):
            theta = pyro.sample("theta", dist.Dirichlet(x.new_full((self.K,), self.alpha, dtype=F64)))  # [B, K]
        m, v, n = lda.word_pairs(x)
        with self._words(n, x, idx, size):
            z = pyro.sample("z", dist.Categorical(theta[m]))
            # log p(x_mn = v | z_mn, beta) = log beta_{z_mn, v}; z is enumerated, shape [K, 1]
            pyro.factor("x", Vindex(beta)[z, v].log())

    @staticmethod
    def _words(n, x, idx, size):
        """The plate of (m, v) pairs, each weighted by its count n_mv (and by D / B in a minibatch)."""
        scale = 1.0 if idx is None else size / x.shape[0]
        return _Both(pyro.plate("words", len(n)), poutine.scale(scale=n.to(F64) * scale))

    def _q_beta(self, x):
        # lambda_kv = eta + expected counts >= eta at every CAVI step and at the optimum, so the
        # family is lambda > eta: SVI noise cannot drive it to the tiny concentrations where
        # Dirichlet samples underflow
        lam = pyro.param("lambda", lambda: self.eta + self.lambda0.clone(),
                         constraint=dist.constraints.greater_than(self.eta))
        with pyro.plate("topics", self.K):
            pyro.sample("beta", dist.Dirichlet(lam.double()))
        return lam

    def _q_z(self, x, idx, size, gamma, lam):
        """q(z_mn) = Cat(phi_mn) at its optimum given gamma and lambda, enumerated exactly."""
        m, v, n = lda.word_pairs(x)
        phi = lda.phi_optimal(gamma.detach().to(F64), lam.detach().to(F64), m, v)
        with self._words(n, x, idx, size):
            pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})

    def _bag(self, x: torch.Tensor) -> lda.Bag:
        """x's nonzero entries, kept for the last x seen (full-batch steps see the same x every step)."""
        if isinstance(x, lda.Bag) or x.layout == torch.sparse_csr:   # streamed sparse batches (bench lda)
            return lda.Bag.of(x)
        if type(x) is not torch.Tensor:   # pyro.render_model's provenance-tracking subclass: its values
            x = x.as_subclass(torch.Tensor)  # (the picture needs no edge from the data into the E-step)
        # the tensor itself is held, so that no other batch can take its memory (and its data_ptr)
        if getattr(self, "_bag_x", None) is not x or self._bag_version != x._version:
            self._bag_x, self._bag_version, self._bag_value = x, x._version, lda.Bag.of(x)
        return self._bag_value

    def _local_gamma(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The explicit guide's local step: each gamma_m at its optimum given the topics, by the
        E-step from a flat start (``lda.sparse_e_step``: ``lda.e_step`` from the nonzero counts).
        A function of (x, lambda) only, so the last answer is kept and given again for the same
        batch and equal lambda (Pyro traces the guide more than once in one traced step)."""
        lam = lam.detach().as_subclass(torch.Tensor)   # plain values (render_model's provenance tensors)
        bag, last = self._bag(x), getattr(self, "_last_gamma", None)
        if last is not None and last[0] is bag and torch.equal(last[1], lam):
            return last[2]
        gamma = lda.sparse_e_step(bag, lam, self.alpha, iters=self.options.cavi_iters, stats=False)[0]
        self._last_gamma = (bag, lam.clone(), gamma)
        return gamma

    def _encoded(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The amortized guide's gamma = encoder(x), with the module in Pyro's store (as :meth:`amortized`)."""
        pyro.module("encoder", self.encoder)
        self.encoder.train(torch.is_grad_enabled())
        return self.encoder(x.csr.to_dense() if isinstance(x, lda.Bag) else x)

    # -- the fused loss ----------------------------------------------------------------
    def fused_loss(self, gamma_of: Callable, x: torch.Tensor, idx: torch.Tensor | None = None,
                   size: int | None = None) -> torch.Tensor:
        """-ELBO of ``model`` with the explicit or amortized guide, the number TraceEnum_ELBO's
        ``differentiable_loss`` returns, draw for draw (the same two draws in the same order:
        beta ~ Dir(lambda), then theta ~ Dir(gamma)) and with the same gradients, written out
        instead of traced. ``gamma_of(x, lambda)`` is the guide's gamma (:meth:`_local_gamma`,
        :meth:`_encoded`). With phi at its optimum and detached, the enumerated sum over z is

            sum_mvk n_mv phi_mvk (log theta_mk + log beta_kv - log phi_mvk)
              = sum_mk t_mk log theta_mk + sum_kv s_kv log beta_kv - sum_mvk n_mv phi_mvk log phi_mvk

        with s and t phi's expected counts (``lda.phi_stats``, from the nonzero counts only), plus
        log p(beta) - log q(beta) + log p(theta) - log q(theta); document terms scaled by D / B
        in a minibatch, as ``data_plate`` and the word plate's scale do. The traced form stays the
        definition; tests/models/test_lda_fast.py checks value and gradients against it."""
        lam = pyro.param("lambda", lambda: self.eta + self.lambda0.clone(),
                         constraint=dist.constraints.greater_than(self.eta))
        q_beta = dist.Dirichlet(lam.double())
        beta = q_beta.rsample()                                                     # [K, V]
        gamma = gamma_of(x, lam)
        q_theta = dist.Dirichlet(gamma.double())
        theta = q_theta.rsample()                                                   # [B, K]
        g, l = gamma.detach().double(), lam.detach().double()
        topics = lda.Topics(l)                                                      # E[log beta], once
        s, t, log_norm = lda.phi_stats(self._bag(x), g, topics)
        # sum n phi log phi = sum t E[log theta] + sum s E[log beta] - sum n log norm (lda.phi_stats)
        words = ((t * (theta.log() - lda.expected_log(g))).sum() + (s * (beta.log() - topics.Elog)).sum()
                 + log_norm.sum())
        globals_ = (dist.Dirichlet(l.new_full((self.V,), self.eta)).log_prob(beta) - q_beta.log_prob(beta)).sum()
        docs = (dist.Dirichlet(g.new_full((self.K,), self.alpha)).log_prob(theta) - q_theta.log_prob(theta)).sum()
        scale = 1.0 if idx is None else size / x.shape[0]
        return -(globals_ + scale * (words + docs))

    # -- guides --------------------------------------------------------------------
    def explicit(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(theta_m) = Dir(gamma_m), one gamma_m per document, found for that document alone.

        ``--local-update estep`` (default): at each visit gamma_m goes to its optimum given the
        current topics (the E-step from a flat start), and only q(beta) takes the gradient step:
        the local/global split of Hoffman et al. (2013, Algorithm 1), with Adam on lambda instead
        of their natural gradient. gamma_m is then a function of (x_m, lambda), so it needs no
        storage. ``--local-update adam``: gamma_m is a free parameter that takes one Adam step
        per visit, jointly with lambda (:meth:`free`)."""
        if self.options.local_update == "adam":
            return self.free(x, idx, size)
        lam = self._q_beta(x)
        # the optimum of each document's ELBO in gamma_m with the topics fixed; no gradient flows
        # into it: by the envelope theorem the gradient in lambda at the optimum is the total one
        gamma = self._local_gamma(x, lam)
        with data_plate(x, idx, size, name="documents"):
            pyro.sample("theta", dist.Dirichlet(gamma.double()))
        self._q_z(x, idx, size, gamma, lam)

    def free(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(theta_m) = Dir(gamma_m) with a free parameter gamma_m per training document (in
        Pyro's store, row-wise Adam); also the guide that CAVI's closed-form updates fill."""
        lam = self._q_beta(x)
        D = x.shape[0] if size is None else size
        with data_plate(x, idx, size, name="documents"):
            gamma = pyro.param("gamma", lambda: self._gamma0(D, x),  # gamma_mk = alpha + counts >= alpha
                               constraint=dist.constraints.greater_than(self.alpha), event_dim=1)
            pyro.sample("theta", dist.Dirichlet(gamma.double()))
        self._q_z(x, idx, size, gamma, lam)

    def _gamma0(self, D, x):
        g = torch.Generator().manual_seed(1)
        return self.alpha + torch._standard_gamma(torch.full((D, self.K), 100.0), generator=g).div(100).to(x.device)

    def amortized(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """q(theta_m) = Dir(gamma_m) with gamma_m = encoder(x_m)."""
        pyro.module("encoder", self.encoder)
        # batch statistics while training; running statistics when scoring (no gradient)
        self.encoder.train(torch.is_grad_enabled())
        lam = self._q_beta(x)
        with data_plate(x, idx, size, name="documents"):
            gamma = self.encoder(x)
            pyro.sample("theta", dist.Dirichlet(gamma.double()))
        self._q_z(x, idx, size, gamma, lam)

    def fixed(self, gamma: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """The mean-field guide with given gamma rows (for held-out documents)."""
        lam = self._q_beta(x)
        gamma = gamma if idx is None else gamma[idx]
        with data_plate(x, idx, size, name="documents"):
            pyro.sample("theta", dist.Dirichlet(gamma.double()))
        self._q_z(x, idx, size, gamma, lam)

    # -- CAVI -----------------------------------------------------------------------
    @torch.no_grad()
    def cavi_update(self, x: torch.Tensor, idx: torch.Tensor | None, size: int, t: int) -> float:
        """One coordinate-ascent sweep (E-step on the batch, then lambda); returns -ELBO."""
        store = pyro.get_param_store()
        lam, gamma = pyro.param("lambda").detach(), pyro.param("gamma").detach().clone()
        rows = slice(None) if idx is None else idx
        lam, gamma[rows] = lda.sparse_cavi_step(self._bag(x), lam, None if t == 1 else gamma[rows], self.alpha, self.eta,
                                         size=None if idx is None else size, t=t, iters=self.options.cavi_iters)
        # strictly inside lambda > eta, gamma > alpha, where the store's log(lambda - eta) is finite
        store["lambda"] = torch.maximum(lam, torch.nextafter(lam.new_tensor(self.eta), lam.new_tensor(1.0)) * 1.0001)
        store["gamma"] = torch.maximum(gamma, gamma.new_tensor(self.alpha) * 1.0001)
        scale = 1.0 if idx is None else size / x.shape[0]
        words = lda.sparse_local_elbo(self._bag(x), gamma[rows], lam, self.alpha).sum()
        return -(scale * words - lda.kl_topics(lam, self.eta)).item()   # lda.elbo, from the nonzero counts

    # -- each scheme's own inference of theta for new documents -------------------------
    @torch.no_grad()
    def _by_chunks(self, infer: Callable, x: torch.Tensor) -> torch.Tensor:
        """infer(chunk, lambda) -> gamma, CHUNK documents at a time (each document's inference is
        its own; only memory is shared). On the device."""
        lam = pyro.param("lambda").detach()
        return torch.cat([infer(chunk, lam) for chunk in self._chunks(x)])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """gamma_m = encoder(x_m), with BatchNorm's running statistics (amortized)."""
        return self._by_chunks(lambda chunk, lam: self.encoder.eval()(chunk), x)

    def e_step(self, x: torch.Tensor) -> torch.Tensor:
        """gamma_m at its optimum given the topics, by coordinate ascent (explicit, CAVI)."""
        iters = self.options.cavi_iters
        return self._by_chunks(lambda chunk, lam: lda.sparse_e_step(chunk, lam, self.alpha, iters=iters,
                                                                    stats=False)[0], x)

    def fit_gamma(self, x: torch.Tensor) -> torch.Tensor:
        """gamma_m by ``local_steps`` Adam steps with the topics fixed (explicit, --local-update adam)."""
        o = self.options
        fit = lambda chunk, lam: lda.fit_gamma(chunk, lam, self.alpha, o.local_steps, o.local_lr)  # noqa: E731
        return self._by_chunks(fit, x)

    def guides(self) -> dict[str, LDAGuide]:
        """The three schemes, each with its own inference of gamma for new documents. A guide
        whose gamma_m are free rows in Pyro's store (one per training document, row-wise Adam at
        --local-lr) cannot score a new document with them: its held-out form takes the gamma that
        the scheme's own inference gives the new documents (:meth:`fixed`)."""
        o = self.options
        rows = dict(local_params=("gamma",), local_lr=o.local_lr)
        if o.local_update == "adam":
            explicit = LDAGuide(self.explicit, infer=self.fit_gamma, **rows,
                                heldout=lambda x: partial(self.fixed, self.fit_gamma(x)))
        else:  # gamma_m is recomputed from (x_m, lambda) at each visit: new documents are no different
            explicit = LDAGuide(self.explicit, infer=self.e_step, loss=partial(self.fused_loss, self._local_gamma))
        return {"explicit": explicit,
                "amortized": LDAGuide(self.amortized, infer=self.encode, encoder=self.encoder,
                                      loss=partial(self.fused_loss, self._encoded)),
                "cavi": LDAGuide(self.free, infer=self.e_step, update=self.cavi_update, **rows,
                                 heldout=lambda x: partial(self.fixed, self.e_step(x)))}

    # -- evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, run) -> dict:
        guide, ds = run.guide, run.dataset
        lam = pyro.param("lambda").detach()
        train = ds.train
        gamma = guide.train_gamma(train)
        # the mean-field ELBO (lda.elbo), its document terms summed chunk by chunk
        words = sum(lda.sparse_local_elbo(chunk, gamma[i * CHUNK:(i + 1) * CHUNK], lam, self.alpha).sum()
                    for i, chunk in enumerate(self._chunks(train)))
        out = {"train_elbo_per_token": (words - lda.kl_topics(lam, self.eta)).item() / train.sum().item(),
               "npmi": lda.npmi(lam.to(train.device), train).mean().item(),   # where the counts are
               "local_parameters_per_document": 0 if guide.encoder is not None else self.K,
               # lambda, plus gamma (K per training document; under --local-update estep recomputed
               # at each visit, not stored) or the encoder's weights, which do not grow with D
               "variational_parameters": self.K * self.V + (sum(p.numel() for p in guide.encoder.parameters())
                                                            if guide.encoder is not None else self.K * train.shape[0])}
        if ds.test is not None:
            out.update(lda.document_completion(guide.infer, lam, ds.test))
            # infer_docs documents, the held-out ones over again as often as needed
            new = ds.test[torch.arange(self.options.infer_docs) % len(ds.test)]
            start = time.perf_counter()
            guide.infer(new)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            out["infer_seconds_1000"] = (time.perf_counter() - start) * 1000 / len(new)
        true = self.corpus.true_topics if self.corpus is not None else None
        if true is not None:
            out["topic_tv"], _ = lda.topic_tv(lam, true)
        return out

    def plots(self, run, out: Path) -> list[Path]:
        lam = pyro.param("lambda").detach().cpu()
        vocab = self.corpus.vocab if self.corpus is not None else [f"w{v}" for v in range(self.V)]
        return [lda.top_words_figure(lam, vocab, out / "topics.png",
                                 f"top words of each topic (E[beta_k] = lambda_k / sum lambda_k), {run.guide_name}",
                                 coherence=lda.npmi(lam.to(run.dataset.train.device), run.dataset.train).cpu())]


@dataclass
class LDAGuide(Guide):
    """A guide of this file with its scheme's own inference of gamma for new documents,
    ``infer(x) -> gamma`` (the E-step, an Adam fit, or the encoder), and the ``encoder`` that
    replaces per-document parameters in an amortized guide (None in the others)."""

    infer: Callable[[torch.Tensor], torch.Tensor] | None = None
    encoder: nn.Module | None = None

    @torch.no_grad()
    def train_gamma(self, x: torch.Tensor) -> torch.Tensor:
        """gamma of the training documents as the fitted guide has them: its rows in Pyro's
        store where it keeps them (``local_params``), else its inference applied to x."""
        return pyro.param("gamma").detach() if "gamma" in self.local_params else self.infer(x)


class _Both:
    """Enter two context managers as one (a plate and a scale)."""

    def __init__(self, *managers):
        self.managers = managers

    def __enter__(self):
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.managers):
            m.__exit__(*exc)


def build(options: Options, dataset: Dataset, elbo: str | None = None) -> Spec:
    if elbo not in (None, "enum"):
        raise UserError(f"models/lda.py sums over the topic assignments z exactly; use --elbo enum "
                        f"(its default), not --elbo {elbo}")
    o = options or Options()
    x = dataset.train
    # a SparseCorpus holds whole numbers by its type: only their sign is left to check
    bad = (x.counts < 0).any() if isinstance(x, corpora.SparseCorpus) else (x < 0).any() or (x != x.round()).any()
    if bad:
        raise UserError("LDA needs non-negative integer word counts as data")
    # the runner seeds torch with --seed before build(): the starting topics follow --seed,
    # so runs with different seeds are restarts from different points
    model = LDA(x, o, seed=torch.initial_seed(), device=dataset.device)
    model.doc_lengths = x.sum(-1).cpu()
    model.corpus = _CORPORA.get(dataset.meta.get("corpus", ""))
    return Spec(model=model.model,
                guides=model.guides(), evaluate=model.evaluate, plots=model.plots,
                param_lr={"lambda": o.topic_lr} if o.topic_lr > 0 else {}, buffers={"encoder": model.encoder},
                streams=True, metrics=METRICS,
                description=__doc__.split("\n")[0])


# the numbers inference.compare shows for this file, beside the runner's own
METRICS = (
    Metric("train_elbo_per_token", "train ELBO/token", "{:.3f}", higher_is_better=True),
    Metric("test_perplexity", "held-out perplexity", "{:.1f}", higher_is_better=False, bar=True),
    Metric("npmi", "mean NPMI", "{:.3f}", higher_is_better=True, bar=True),
    Metric("variational_parameters", "variational parameters", "{:,}"),
    Metric("topic_tv", "topic TV", "{:.3f}", higher_is_better=False),
    Metric("infer_seconds_1000", "s to infer 1,000 docs", "{:.3f}", higher_is_better=False),
)


def numpyro_twin(options: Options, dataset: Dataset):
    """The NumPyro twin (``--backend numpyro``; Phan et al. 2019) of the ``explicit`` guide, both
    ``--local-update`` forms, with the Pyro store's parameters: ``lambda`` (greater_than(eta),
    unconstrained as log(lambda - eta) on both sides) and, for ``adam``, the per-document rows
    ``gamma`` (greater_than(alpha), event_dim 1, row-wise Adam). theta and beta are float64
    Dirichlet draws, as ``F64`` above, reparameterized; the E-step is ``ppl_gen.backends.lda_jax.e_step``
    (the same sweeps and stopping rule as ``lda.e_step``, in ``lax.while_loop``).

    The sum over z. Pyro enumerates z_mn under q(z_mn) = Cat(phi_mn), phi at its optimum given
    (gamma, lambda) and detached, so its ELBO is, per draw of (theta, beta),

        sum_mv n_mv sum_k phi_mvk (log theta_mk + log beta_kv - log phi_mvk)
          + log p(theta) p(beta) - log q(theta) q(beta)

    (Blei et al. 2003, eq. 15, with theta and beta sampled instead of integrated). That sum over
    k is linear in log theta and log beta, so the twin writes it as factors with the sites' Pyro
    names: the model's ``z`` = sum n phi log theta and ``x`` = sum n phi log beta (E_q(z) of
    log p(z | theta) and of log p(x | z, beta)), the guide's ``z`` = sum n phi log phi (E_q(z) of
    log q(z); a guide factor enters log q). phi is a function of q's parameters, which the model
    reads from the parameter store (for ``estep`` it reruns the E-step, a function of x and
    lambda), under ``stop_gradient`` where Pyro detaches it; so this model is the ELBO's half for
    this guide, not a standalone density (NUTS, ``--mcmc``, uses the Pyro model). Nothing
    discrete is left to sample, and theta and beta are reparameterized, where TraceEnum_ELBO and
    Trace_ELBO are the same estimator, so ``--elbo enum`` runs NumPyro's Trace_ELBO here (``enum_as="trace"``) and gives
    the same estimate, draw for draw, as Pyro's enumeration (and the same gradient: phi is
    constant on both sides, no score-function term on either). NumPyro's own TraceEnum_ELBO
    would need funsor.

    ``amortized`` is not mirrored: its encoder's BatchNorm1d updates running statistics as a
    side effect of the forward pass, which NumPyro's functional SVI state would not carry, so
    the held-out inference (eval mode) would read stale statistics. ``cavi`` is closed-form
    updates, which the backend runs on the Pyro side only."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends import lda_jax
    from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate

    K, (D, V) = options.topics, tuple(dataset.train.shape)
    alpha, eta, f32, f64 = options.alpha, options.eta, jnp.float32, jnp.float64
    frozen = jax.lax.stop_gradient
    # the Pyro store's names and constraints; the values here only give shapes (the runner
    # starts from the Pyro side's initial lambda and gamma)
    lam_site = dict(init_value=jnp.full((K, V), eta + 1.0, f32), constraint=nd.constraints.greater_than(eta))
    gamma_site = dict(init_value=jnp.full((D, K), alpha + 1.0, f32), constraint=nd.constraints.greater_than(alpha),
                      event_dim=1)

    def local_gamma(x, idx, lam):
        """gamma of the batch's documents as the explicit guide has them: the E-step's optimum
        given lambda (no gradient: the envelope theorem, see LDA.explicit), or the free rows."""
        if options.local_update == "adam":
            gamma = numpyro.param("gamma", **gamma_site)
            return gamma if idx is None else gamma[idx]
        return lda_jax.e_step(x, frozen(lam), alpha, iters=options.cavi_iters)[0]

    def q_z(x, idx, lam):
        """phi at its optimum given (gamma, lambda), in float64 and detached (LDA._q_z)."""
        gamma = local_gamma(x, idx, lam)
        return lda_jax.phi_factors(frozen(gamma).astype(f64), frozen(lam).astype(f64)), gamma

    def model(x, idx=None, size=None):
        with numpyro.plate("topics", K):
            beta = numpyro.sample("beta", nd.Dirichlet(jnp.full((V,), eta, f64)))          # [K, V]
        (log_a, log_b), _ = q_z(x, idx, numpyro.param("lambda", **lam_site))
        with data_plate(x, idx, size, name="documents"):
            theta = numpyro.sample("theta", nd.Dirichlet(jnp.full((K,), alpha, f64)))      # [B, K]
            # E_q(z)[log p(z | theta)] and E_q(z)[log p(x | z, beta)], per document
            numpyro.factor("z", lda_jax.phi_expectation(x, log_a, log_b, theta_term=jnp.log(theta)))
            numpyro.factor("x", lda_jax.phi_expectation(x, log_a, log_b, topic_term=jnp.log(beta)))

    def explicit(x, idx=None, size=None):
        """q(beta) q(theta) q(z) as LDA.explicit, either --local-update."""
        lam = numpyro.param("lambda", **lam_site)
        with numpyro.plate("topics", K):
            numpyro.sample("beta", nd.Dirichlet(lam.astype(f64)))
        (log_a, log_b), gamma = q_z(x, idx, lam)
        with data_plate(x, idx, size, name="documents"):
            numpyro.sample("theta", nd.Dirichlet(gamma.astype(f64)))
            numpyro.factor("z", lda_jax.phi_log_phi(x, log_a, log_b))     # E_q(z)[log q(z)] = -H[q(z)]

    return NumpyroTwin(model=model, guides={"explicit": explicit}, x64=True, enum_as="trace",
                       local_params=("gamma",) if options.local_update == "adam" else (),
                       refused={"amortized": "its encoder's BatchNorm1d keeps running statistics, which "
                                             "NumPyro's SVI state would not update"},
                       description="LDA, the sum over topic assignments z in closed form (phi at its optimum)")
