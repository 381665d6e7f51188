"""models/char_rnn.py: the RNN as a DGM. With no latents the ELBO is log p(x) itself; the
batched, teacher-forced likelihood equals a symbol-by-symbol autoregressive computation;
p sums to 1 over all sequences of a fixed length; padding changes nothing."""

import itertools
import math

import pyro
import pytest
import torch

from models import char_rnn
from ppl_gen import Dataset
from ppl_gen.core.train import make_elbo


def _lm(cell="gru", V=3):
    alphabet = "ab\n"[:V]
    ds = Dataset(train=torch.zeros(1, 1, dtype=torch.long), meta={"alphabet": alphabet})
    return char_rnn.LanguageModel(char_rnn.Options(hidden=8, embed=4, cell=cell), ds)


def _sequential_log_p(lm, line: list[int]) -> float:
    """log p(x) = sum_t log p(x_t | x_<t), feeding one symbol at a time through the state."""
    prev, state, total = torch.tensor([[lm.V]]), None, 0.0
    for symbol in line:
        logits, state = lm.net(prev, state)
        total += torch.log_softmax(logits[0, -1], -1)[symbol].item()
        prev = torch.tensor([[symbol]])
    return total


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_elbo_is_the_autoregressive_log_likelihood(cell):
    lm = _lm(cell)
    lines = [[0, 1, 1, 2], [1, 2, -1, -1], [0, 0, 0, 2]]  # -1 pads the shorter line
    x = torch.tensor(lines)
    with torch.no_grad():
        elbo = -make_elbo("trace").loss(lm.model, lm.guide, x)
        exact = sum(_sequential_log_p(lm, [s for s in line if s >= 0]) for line in lines)
    assert elbo == pytest.approx(exact, abs=1e-4)


def test_probabilities_of_all_sequences_sum_to_one():
    """Brute force over all V^T sequences of length T (no padding): sum p(x) = 1."""
    lm = _lm(V=3)
    T = 3
    with torch.no_grad():
        x = torch.tensor(list(itertools.product(range(lm.V), repeat=T)))
        pyro.clear_param_store()
        trace = pyro.poutine.trace(lm.model).get_trace(x)
        log_p = trace.nodes["x"]["fn"].log_prob(x)
    assert torch.logsumexp(log_p, 0).exp().item() == pytest.approx(1.0, abs=1e-5)


def test_padding_changes_no_line_log_likelihood():
    lm = _lm()
    short = torch.tensor([[0, 1, 2]])
    padded = torch.tensor([[0, 1, 2, -1, -1]])
    with torch.no_grad():
        a = -make_elbo("trace").loss(lm.model, lm.guide, short)
        b = -make_elbo("trace").loss(lm.model, lm.guide, padded)
    assert a == pytest.approx(b, abs=1e-5) and math.isfinite(a)
