"""The probing helpers the SAEBench evals share (saeravel/probing.py): probe fitting and its
settings, one-vs-rest sampling, latent selection and ablation, on hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saeravel.activations import model_space_latents
from saeravel.errors import UserError
from saeravel.probing import (
    ProbeConfig,
    ablate,
    accuracy,
    balanced_one_vs_rest,
    check_probe,
    effective_n_values,
    fit_probe,
    latent_effects,
    latent_order,
    linear_probe_weights,
    nanmean,
    top_k_by_mean_difference,
    top_latents,
)
from saeravel.saes.base import SAE, SAEIdentity

from helpers import HOOK0


def test_probe_settings_that_cannot_work_are_one_line_errors():
    check_probe(ProbeConfig())
    with pytest.raises(UserError, match="c_grid is empty"):
        check_probe(ProbeConfig(c_grid=[]))
    with pytest.raises(UserError, match=r"max_iter must be >= 1 \(got 0\)"):
        check_probe(ProbeConfig(max_iter=0))


def test_fit_probe_picks_c_on_validation_only():
    """The C with the best validation accuracy wins (the first on ties): with validation labels
    flipped, the fit that learned nothing (C tiny: the training majority everywhere) wins."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    y = (x[:, 0] > 0).astype(int)
    model, c, acc = fit_probe((x, y), (x, y), [1e-6, 10.0, 100.0], standardize=False)
    assert (c, acc) == (10.0, 1.0) and accuracy(model, x, y) == 1.0  # 10 and 100 tie
    _, c, acc = fit_probe((x, y), (x, 1 - y), [1e-6, 10.0], standardize=False)
    assert c == 1e-6 and acc == pytest.approx(min(y.mean(), 1 - y.mean()))  # the minority
    assert math.isnan(accuracy(model, x[:0], y[:0]))


def test_nanmean_skips_nan():
    assert nanmean([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(nanmean([math.nan])) and math.isnan(nanmean([]))


def test_latent_order_and_the_nonzero_rule():
    scores = np.array([0.5, 2.0, 0.0, 2.0, 0.0])
    assert latent_order(scores).tolist() == [1, 3, 0, 2, 4]  # ties: lower index first
    assert top_latents(scores, 4).tolist() == [1, 3, 0, 2]
    assert top_latents(scores, 4, only_nonzero=True).tolist() == [1, 3, 0]


def test_ablating_no_latent_is_the_identity():
    x = np.arange(6.0).reshape(2, 3)
    assert ablate(x, np.ones((2, 4)), np.ones((4, 3)), np.array([], dtype=int)) is x


def test_ablation_is_the_reconstruction_difference_for_layer_norm_saes():
    """x - a[:, S] W_dec[S] == x + recon(f with f_S = 0) - recon(f), for a layer-norm SAE
    with random weights (a = latents times the input's std)."""
    g = torch.Generator().manual_seed(0)
    d, m = 8, 20
    sae = SAE(
        torch.randn(d, m, generator=g), torch.randn(m, generator=g) * 0.1,
        torch.randn(m, d, generator=g), torch.randn(d, generator=g), hook_name=HOOK0,
        identity=SAEIdentity("t"), normalize="layer_norm",
    )  # fmt: skip
    x = torch.randn(5, d, generator=g) * 3 + 1
    f = sae.encode(x)
    a = model_space_latents(sae, x.numpy(), f.numpy())
    S = np.array([0, 3, 7, 11])
    f_abl = f.clone()
    f_abl[:, S] = 0
    xn, stats = sae.normalize(x)
    want = x + sae.denormalize(sae.decode(f_abl), stats) - sae.reconstruct(x)
    got = ablate(x.numpy().astype(np.float64), a, sae.W_dec.numpy().astype(np.float64), S)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    assert np.abs(a - f.numpy()).max() > 0.1  # the std matters here


@pytest.mark.parametrize("standardize", [True, False])
def test_probe_weights_are_in_the_raw_activation_space(standardize):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 0, 1]
    y = (x[:, 0] + 0.1 * x[:, 1] > 0.5).astype(int)
    model, _, _ = fit_probe((x, y), (x, y), [1.0], standardize=standardize)
    w, b = linear_probe_weights(model)
    np.testing.assert_allclose(x @ w + b, model.decision_function(x), rtol=1e-6, atol=1e-8)


def test_n_values_are_capped_at_d_sae_and_checked():
    pairs, capped = effective_n_values([2, 10, 500], 16)
    assert pairs == [(2, 2), (10, 10), (500, 16)] and capped == {"500": 16}
    with pytest.raises(UserError, match="every N must be >= 1"):
        effective_n_values([0, 2], 16)


def test_latent_effects_by_hand():
    a = np.array([[2.0, 0, 1], [4.0, 0, 1], [0.0, 3, 1], [0.0, 1, 1]])
    y = np.array([1, 1, 0, 0])
    w_dec = np.array([[1.0, 0], [0.0, 1], [1.0, 1]])
    w = np.array([0.5, -1.0])
    # mean differences 3, -2, 0; W_dec @ w = 0.5, -1, -0.5: effects 1.5, 2, 0; SAEBench
    # clamps the difference -2 at 0 first: 1.5, 0, 0.
    np.testing.assert_allclose(latent_effects(a, y, w, w_dec), [1.5, 2.0, 0.0])
    np.testing.assert_allclose(latent_effects(a, y, w, w_dec, clamp=True), [1.5, 0.0, 0.0])


def test_top_k_by_mean_difference_hand_made():
    x = np.array([[1.0, 0, 0, 5], [1.0, 0, 1, 5], [0.0, 0, 0, 0], [0.0, 0, 1, 0]])
    y = np.array([1, 1, 0, 0])
    # |mean diff| per column: 1, 0, 0, 5.
    assert top_k_by_mean_difference(x, y, 2).tolist() == [3, 0]
    assert top_k_by_mean_difference(x, y, 3).tolist() == [3, 0, 1]  # tie -> lower index


def test_balanced_one_vs_rest():
    labels = np.array(["a"] * 3 + ["b"] * 10 + ["c"] * 5)
    idx, y = balanced_one_vs_rest(labels, "a", np.random.default_rng(0))
    assert y.sum() == 3 and len(y) == 6
    assert (labels[idx][y == 1] == "a").all() and (labels[idx][y == 0] != "a").all()
    assert len(set(idx.tolist())) == 6
    idx, y = balanced_one_vs_rest(labels, "b", np.random.default_rng(0))
    assert y.sum() == 8 and len(y) == 16  # only 8 negatives exist: positives subsampled
