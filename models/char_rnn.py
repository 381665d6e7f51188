"""Character-level recurrent language model: the lecture's "RNN as a DGM" (Elman 1990; the
GRU of Cho et al. 2014; the LSTM of Hochreiter & Schmidhuber 1997; as a character model,
Sutskever, Martens & Hinton 2011 and Karpathy's char-rnn).

The chain rule with no independence assumption at all:

    p(x_1..x_T) = prod_t p(x_t | x_1..x_{t-1}),   p(x_t | x_<t) = Categorical(softmax(W h_t))
    h_t = GRU(h_{t-1}, embed(x_{t-1})),           x_0 = <s>,  h_0 = 0

As a DGM every x_t has all earlier symbols as parents (a complete DAG); the hidden
state h_t is a deterministic summary of them, not a latent variable. So the model
has no latents, the guide is empty, and SVI's ELBO *is* log p(x): training is maximum
likelihood on the network weights. Same data and split as models/markov_chain.py,
so held-out perplexities compare directly (``python -m ppl_gen.bench.markov``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_gen import Dataset, Spec, UserError, data_plate
from ppl_gen.datasets import text as texts


@dataclass
class Options:
    hidden: int = field(default=128, metadata={"help": "size of the recurrent state h_t"})
    embed: int = field(default=32, metadata={"help": "size of the symbol embedding"})
    cell: str = field(default="gru", metadata={"help": "recurrent cell", "choices": ["gru", "lstm"]})
    samples: int = field(default=8, metadata={"help": "lines of text sampled from the fitted model"})

    def validate(self):
        if self.hidden < 1 or self.embed < 1:
            raise UserError("--hidden and --embed must be at least 1")


DEFAULTS = {"elbo": "trace", "steps": 2000, "lr": 3e-3, "batch_size": 32}


def data(spec: str | None = None, options: Options | None = None) -> Dataset:
    """The same lines and split as the Markov chain: Reuters headlines or --data FILE."""
    return texts.load_text(spec)


class CharRNN(nn.Module):
    def __init__(self, V: int, options: Options):
        super().__init__()
        self.V = V
        self.embed = nn.Embedding(V + 1, options.embed)                 # id V is <s>
        rnn = nn.GRU if options.cell == "gru" else nn.LSTM
        self.rnn = rnn(options.embed, options.hidden, batch_first=True)
        self.out = nn.Linear(options.hidden, V)

    def forward(self, prev: torch.Tensor, state=None):
        h, state = self.rnn(self.embed(prev), state)
        return self.out(h), state                                        # logits of p(x_t | x_<t)


class LanguageModel:
    def __init__(self, options: Options, dataset: Dataset):
        self.alphabet, self.options = dataset.meta["alphabet"], options
        self.V = len(self.alphabet)
        self.net = CharRNN(self.V, options).to(dataset.train.device)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs (x_0 = <s>, x_1, ..., x_{T-1}): the history each x_t conditions on."""
        return torch.cat([x.new_full((len(x), 1), self.V), x[:, :-1].clamp(min=0)], 1)

    def model(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        pyro.module("char_rnn", self.net)
        logits, _ = self.net(self.shifted(x))
        with data_plate(x, idx, size):
            pyro.sample("x", dist.Categorical(logits=logits).mask(x >= 0).to_event(1), obs=x.clamp(min=0))

    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, size: int | None = None):
        """No latent variables: nothing to approximate."""

    @torch.no_grad()
    def log_likelihood_per_symbol(self, x: torch.Tensor) -> float:
        logits, _ = self.net(self.shifted(x))
        lp = torch.log_softmax(logits, -1).gather(-1, x.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return lp[x >= 0].mean().item()

    @torch.no_grad()
    def sample_text(self, n: int, max_len: int = 120) -> list[str]:
        """Ancestral sampling, one symbol at a time given the whole history (through h_t)."""
        device = next(self.net.parameters()).device
        prev = torch.full((n, 1), self.V, dtype=torch.long, device=device)
        state, out = None, []
        for _ in range(max_len):
            logits, state = self.net(prev, state)
            prev = torch.distributions.Categorical(logits=logits[:, -1]).sample().unsqueeze(1)
            out.append(prev)
        return texts.decode(torch.cat(out, 1).cpu(), self.alphabet)

    def evaluate(self, run) -> dict:
        self.net.eval()
        out = {"parameters": sum(p.numel() for p in self.net.parameters())}
        for split, x in (("train", run.dataset.train), ("test", run.dataset.test)):
            if x is not None:
                ll = self.log_likelihood_per_symbol(x)
                out[f"{split}_log_likelihood_per_symbol"] = ll
                out[f"{split}_perplexity"] = math.exp(-ll)
        out["sampled_text"] = self.sample_text(self.options.samples)
        return out


def build(options: Options, dataset: Dataset) -> Spec:
    lm = LanguageModel(options, dataset)
    return Spec(model=lm.model, guides={"none": lm.guide}, evaluate=lm.evaluate,
                description=__doc__.split("\n")[0])


# ---------------------------------------------------------------- the NumPyro twin
def numpyro_twin(options: Options, dataset: Dataset):
    """The NumPyro twin (``--backend numpyro``; Phan et al. 2019): CharRNN in JAX with the
    torch module's parameters under their Pyro store names (``char_rnn$$$rnn.weight_ih_l0``
    ...), torch's layouts and gate order, so the runner starts both backends from the same
    weights and evaluates the NumPyro fit with the torch network above.

    torch.nn.GRU (Cho et al. 2014) stacks the gates r, z, n along the rows of
    ``weight_ih_l0`` [3H, E] and ``weight_hh_l0`` [3H, H], with two bias vectors, and puts
    the reset gate on the recurrent term *after* its bias (as cuDNN does):

        r = s(W_ir x + b_ir + W_hr h + b_hr),   z = s(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),   h' = (1 - z) * n + z * h

    torch.nn.LSTM (Hochreiter & Schmidhuber 1997) stacks i, f, g, o [4H, .]:
    c' = s(f) * c + s(i) * tanh(g),  h' = s(o) * tanh(c').
    """
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    from ppl_gen.backends.numpyro_twin import NumpyroTwin, data_plate, linear

    V, E, H = len(dataset.meta["alphabet"]), options.embed, options.hidden
    gates = 3 if options.cell == "gru" else 4
    sigmoid = jax.nn.sigmoid

    def param(name, *shape):
        return numpyro.param(f"char_rnn$$${name}", jnp.zeros(shape, jnp.float32))

    def gru(h, gi, W_hh, b_hh):
        i_r, i_z, i_n = jnp.split(gi, 3, -1)
        h_r, h_z, h_n = jnp.split(h @ W_hh.T + b_hh, 3, -1)
        r, z = sigmoid(i_r + h_r), sigmoid(i_z + h_z)
        n = jnp.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, h

    def lstm(state, gi, W_hh, b_hh):
        h, c = state
        i, f, g, o = jnp.split(gi + h @ W_hh.T + b_hh, 4, -1)
        c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
        h = sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    def logits_of(x):
        """CharRNN.forward on LanguageModel.shifted(x): the logits of p(x_t | x_<t)."""
        n = x.shape[0]
        prev = jnp.concatenate([jnp.full((n, 1), V, x.dtype), jnp.clip(x[:, :-1], 0)], 1)
        emb = param("embed.weight", V + 1, E)[prev]
        W_ih, W_hh = param("rnn.weight_ih_l0", gates * H, E), param("rnn.weight_hh_l0", gates * H, H)
        b_ih, b_hh = param("rnn.bias_ih_l0", gates * H), param("rnn.bias_hh_l0", gates * H)
        gi = jnp.swapaxes(emb @ W_ih.T + b_ih, 0, 1)    # [T, n, gH]: input terms of every step at once
        h0 = jnp.zeros((n, H), emb.dtype)
        cell, state = (gru, h0) if options.cell == "gru" else (lstm, (h0, h0))
        _, hs = jax.lax.scan(lambda s, g: cell(s, g, W_hh, b_hh), state, gi)
        return linear("char_rnn$$$out", jnp.swapaxes(hs, 0, 1), H, V)

    def model(x, idx=None, size=None):
        logits = logits_of(x)
        with data_plate(x, idx, size):
            numpyro.sample("x", nd.Categorical(logits=logits).mask(x >= 0).to_event(1), obs=jnp.clip(x, 0))

    def guide(x, idx=None, size=None):
        """No latent variables: nothing to approximate."""

    return NumpyroTwin(model=model, guides={"none": guide}, description=__doc__.split("\n")[0])
