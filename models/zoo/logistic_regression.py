"""Bayesian logistic regression on scikit-learn's breast-cancer data: a model with covariates.

    w_d ~ N(0, 1),  b ~ N(0, 5^2),  y_n | x_n ~ Bernoulli(sigmoid(x_n . w + b)),  d = 1..30

569 tumours, 30 features each (standardized with the training split's means and sds), y = 1 for
benign (Street, Wolberg & Mangasarian 1993; the data ship with scikit-learn). ``data()`` returns
((X, y), (X_test, y_test)): the runner passes the two tensors as ``model(X, y)`` and minibatches
them by rows. With covariates the held-out score is predictive: the log pointwise predictive
density of the held-out labels, log (1/S) sum_s p(y_n | x_n, w_s, b_s) averaged over n, from S
draws of the guide, and the accuracy of its predictive mean. The posterior's mode under these
priors is L2-penalized logistic regression with C = 1, which scikit-learn fits by itself.
"""

import pyro
import pyro.distributions as dist
import torch

from ppl_gen import data_plate

REFERENCE_POSTERIOR = "references/logistic_regression.nc"   # python -m inference.reference models/zoo/logistic_regression.py
DEFAULTS = {"steps": 3000, "lr": 0.02}


def data():
    """A fixed 80/20 split (seed 0) of the 569 tumours, features standardized on the training rows."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:455], order[455:]
    mean, sd = X[train].mean(0), X[train].std(0)
    X = (X - mean) / sd
    return (X[train], y[train]), (X[test], y[test])


def model(X, y, idx=None, size=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(X.new_zeros(()), 5.0))
    with data_plate(X, idx, size):
        pyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)
