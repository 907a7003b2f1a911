"""Probes below the evals: one probe config (``eval.probe``) and the probe fitting, latent
ranking and ablation that sparse_probing, scr, tpp and absorption share.

Every probe is a scikit-learn logistic regression fit on the train split for each ``C`` of
``probe.c_grid``; the one with the best validation accuracy is kept, and the test split is
only used for the reported numbers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saeravel.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """``eval.probe``: how every logistic-regression probe of an eval is fit."""

    # inverse L2 regularisation strengths tried; the best on validation is used
    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0])
    standardize: bool = False  # z-score features first (false: raw activations, as SAEBench)
    max_iter: int = 1000  # lbfgs iterations per probe

    def __post_init__(self) -> None:
        check_probe(self)


def check_probe(probe: Any) -> None:
    """One-line errors for probe settings that cannot work (before anything loads:
    :class:`ProbeConfig` runs it when the config is built)."""
    if not probe.c_grid:
        raise UserError("eval.probe.c_grid is empty; give at least one inverse regularisation C")
    bad = [c for c in probe.c_grid if not c > 0]
    if bad:
        raise UserError(f"eval.probe.c_grid has {bad[0]}; every C must be > 0")
    if probe.max_iter < 1:
        raise UserError(f"eval.probe.max_iter must be >= 1 (got {probe.max_iter})")


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    c_grid: Sequence[float],
    *,
    standardize: bool = True,
    max_iter: int = 1000,
) -> tuple[Any, float, float]:
    """Logistic regression fit on ``train`` for every ``C``; returns the model with the best
    validation accuracy (first on ties), its ``C`` and that accuracy. Sees no test data."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best: tuple[Any, float, float] | None = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=max_iter)
        model = make_pipeline(StandardScaler(), clf) if standardize else clf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(*train)
        acc = float((model.predict(val[0]) == val[1]).mean())
        if best is None or acc > best[2]:
            best = (model, float(c), acc)
    assert best is not None
    return best


def fit(
    probe: Any, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]
) -> tuple[Any, float, float]:
    """:func:`fit_probe` with the settings of ``probe`` (an ``eval.probe`` config)."""
    return fit_probe(
        train, val, probe.c_grid, standardize=probe.standardize, max_iter=probe.max_iter
    )


def saebench_epoch_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    seed: int = 0,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 250,
    patience: int = 10,
) -> float:
    """Test accuracy of SAEBench's full-width probe (``sparse_probing/probe_training.py``,
    ``train_probe_gpu``, v0.6.0; reimplemented from its description): a linear layer with a bias
    trained by AdamW on binary cross-entropy in shuffled mini-batches; after every epoch the
    accuracy on ``test`` is measured, the best so far kept, and training stops after
    ``patience`` epochs without a new best. Returns that best test accuracy: the epoch is
    chosen on the test set, so the number is optimistic (kept only to compare with SAEBench)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.as_tensor(a, dtype=torch.float32) for a in train)
    xt, yt = torch.as_tensor(test[0], dtype=torch.float32), torch.as_tensor(test[1])
    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best, since = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            rows = order[start : start + batch_size]
            with torch.enable_grad():
                loss = loss_fn(layer(x[rows]).squeeze(-1), y[rows])
                opt.zero_grad()
                loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float(((layer(xt).squeeze(-1) > 0).long() == yt).float().mean())
        if acc > best:
            best, since = acc, 0
        else:
            since += 1
        if since >= patience:
            break
    return best


def linear_probe_weights(model: Any) -> tuple[np.ndarray, float]:
    """``(w, b)`` of a binary probe from :func:`fit_probe` in the space of its raw input:
    ``decision_function(x) == x @ w + b`` (a standardising scaler is folded in)."""
    clf = model[-1] if hasattr(model, "steps") else model
    w = np.asarray(clf.coef_[0], dtype=np.float64)
    b = float(clf.intercept_[0])
    if hasattr(model, "steps"):
        scaler = model[0]
        w = w / scaler.scale_
        b = b - float(np.dot(w, scaler.mean_))
    return w, b


def balanced_one_vs_rest(
    labels: np.ndarray, cls: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices and 0/1 targets: every row of ``cls`` (or a random subset) and as many
    rows drawn uniformly from the other classes."""
    pos = np.flatnonzero(labels == cls)
    neg = np.flatnonzero(labels != cls)
    n = min(len(pos), len(neg))
    pos = rng.choice(pos, n, replace=False) if len(pos) > n else pos
    neg = rng.choice(neg, n, replace=False)
    idx = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    order = rng.permutation(len(idx))
    return idx[order], y[order]


def top_k_by_mean_difference(
    x: np.ndarray, y: np.ndarray, k: int, signed: bool = False
) -> np.ndarray:
    """Indices of the ``k`` columns with the largest ``|mean(x | y=1) - mean(x | y=0)|``
    (``signed=True``: the largest ``mean(x | y=1) - mean(x | y=0)``, i.e. the columns most
    positively associated with class 1; ties broken by lower index)."""
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    if not signed:
        diff = np.abs(diff)
    return np.argsort(-diff, kind="stable")[:k]


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows classified correctly."""
    return float((model.predict(x) == y).mean()) if len(y) else math.nan


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN if there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


# ----------------------------------------------------------------------------- latent ablation


def latent_effects(
    a: np.ndarray, y: np.ndarray, w: np.ndarray, w_dec: np.ndarray, clamp: bool = False
) -> np.ndarray:
    """``(mean(a | y=1) - mean(a | y=0)) * (W_dec @ w)``: each latent's mean effect on the
    logit of a linear probe with raw-space weight ``w``; ``clamp`` sets negative mean
    differences to 0 first (SAEBench's TPP: only latents more active on the class count)."""
    diff = a[y == 1].mean(0) - a[y == 0].mean(0)
    if clamp:
        diff = np.maximum(diff, 0.0)
    return diff * (w_dec @ w)


def latent_order(scores: np.ndarray) -> np.ndarray:
    """Latent indices by descending score (ties broken by lower index)."""
    return np.argsort(-scores, kind="stable")


def n_selected(scores: np.ndarray, n: int, only_nonzero: bool) -> int:
    """How many of the top latents are ablated for ``N = n``: ``n``, or with
    ``only_nonzero`` (SAEBench's rule) ``min(n, number of nonzero scores)``."""
    return min(n, int(np.count_nonzero(scores))) if only_nonzero else n


def top_latents(scores: np.ndarray, n: int, only_nonzero: bool = False) -> np.ndarray:
    """The latents ablated for ``N = n``: the ``n_selected`` largest scores, largest first."""
    return latent_order(scores)[: n_selected(scores, n, only_nonzero)]


def ablate(x: np.ndarray, a: np.ndarray, w_dec: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Zero-ablate ``latents`` keeping the SAE error: ``x - a[:, S] @ W_dec[S]``."""
    if len(latents) == 0:
        return x
    return x - a[:, latents] @ w_dec[latents]


def effective_n_values(n_values: Sequence[int], d_sae: int) -> tuple[list[tuple[int, int]], dict]:
    """``[(N, min(N, d_sae))]`` and ``{N: d_sae}`` for every capped ``N``; N < 1 is an error."""
    check_n_values(n_values)
    capped = {str(n): d_sae for n in n_values if n > d_sae}
    if capped:
        log.warning("n_values %s exceed d_sae=%d: capped at d_sae", sorted(capped), d_sae)
    return [(n, min(n, d_sae)) for n in n_values], capped


def check_n_values(n_values: Sequence[int]) -> None:
    """``eval.n_values`` (numbers of latents to ablate) must be a non-empty list of N >= 1."""
    if not n_values:
        raise UserError("eval.n_values is empty; give at least one number of latents to ablate")
    bad = [n for n in n_values if n < 1]
    if bad:
        raise UserError(f"eval.n_values has {bad[0]}, but every N must be >= 1")
