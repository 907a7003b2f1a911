"""``sae=pca``: SAEBench's PCA baseline: the fit finds the true principal axes, the SAE's
latent i is the score on component i (variance descending), the fit is cached and healed like
``sae=trained``, and the option runs eval=core and eval=ravel on the embedded default model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_identity import CORE, RAVEL, run_job

from saeravel.errors import UserError
from saeravel.saes import pca as pca_module
from saeravel.saes.base import SAEIdentity
from saeravel.saes.pca import PCASource, fit_pca, pca_sae


def anisotropic(n: int = 4000, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points with standard deviations 6, 5, ..., 1 along the rows of a random rotation
    ``Q`` (returned), offset by a mean of 3."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.arange(d, 0, -1, dtype=torch.float64)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) * scales
    return (z @ q.T + 3.0).float(), q.T.float()


def test_fit_finds_the_principal_axes_in_order() -> None:
    x, axes = anisotropic()
    fit = fit_pca(x, batch_size=500)  # several IncrementalPCA batches
    cos = (fit["components"] @ axes.T).abs()
    assert torch.all(cos.diagonal() > 0.99), cos  # component i = true axis i (up to sign)
    ratio = fit["explained_variance_ratio"]
    assert torch.all(ratio[:-1] > ratio[1:]) and ratio.sum() == pytest.approx(1.0, abs=1e-5)
    assert fit["mean"] == pytest.approx(torch.full((6,), 3.0), abs=0.3)


def test_latent_i_is_the_score_on_component_i_and_reconstruction_is_exact() -> None:
    x, _ = anisotropic()
    fit = fit_pca(x, batch_size=4096)
    sae = pca_sae(fit, hook_name="blocks.1.hook_resid_post", identity=SAEIdentity("pca"))
    f = sae.encode(x)
    assert torch.allclose(f, (x - fit["mean"]) @ fit["components"].T, atol=1e-4)
    var = f.var(0)
    assert torch.all(var[:-1] > var[1:])  # variance descending, as the components
    assert var[0] == pytest.approx(36, rel=0.1) and var[-1] == pytest.approx(1, rel=0.1)
    assert f.min() < 0  # signed latents (no ReLU)
    assert torch.allclose(sae.reconstruct(x), x, atol=1e-4)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(6), atol=1e-5)
    # SAEBench's fit_PCA orientation, (x - mean) @ components_, is a rotation whose
    # coordinates are not the scores: its variances are not the eigenvalues in order.
    theirs = ((x - fit["mean"]) @ fit["components"]).var(0)
    assert not torch.allclose(theirs, var, rtol=0.05)


def test_too_few_activations_is_one_line() -> None:
    with pytest.raises(
        UserError, match=r"more activations than d_model=6 .* raise sae.n_sequences"
    ):
        fit_pca(torch.randn(6, 6), batch_size=10)


@pytest.mark.parametrize("key", ["n_sequences", "batch_size"])
def test_bad_settings_fail_when_the_source_is_built(key: str) -> None:
    with pytest.raises(UserError, match=rf"sae.{key}=0 must be a positive integer"):
        PCASource(**{key: 0})


def test_fit_is_cached_checked_and_rebuilt_when_corrupt(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = pca_module.fit_pca
    monkeypatch.setattr(pca_module, "fit_pca", lambda *a, **k: calls.append(1) or real(*a, **k))
    source = PCASource(layer=0, n_sequences=40, cache_dir=str(tmp_path))
    sae = source.load(tiny_model)
    assert len(calls) == 1 and sae.d_sae == tiny_model.d_model == 64
    assert sae.identity.extra["pca"]["n_fit_activations"] > 64
    again = source.load(tiny_model)  # from the cache
    assert len(calls) == 1 and torch.equal(again.W_dec, sae.W_dec)
    folder = source.folder(tiny_model)
    (folder / "pca.pt").write_bytes(b"not a tensor file")  # fails its checksum
    healed = source.load(tiny_model)
    assert len(calls) == 2 and torch.allclose(healed.W_dec, sae.W_dec)
    assert PCASource(layer=1, cache_dir=str(tmp_path)).folder(tiny_model) != folder
    assert PCASource(layer=0, n_sequences=41, cache_dir=str(tmp_path)).folder(tiny_model) != folder


def test_pca_runs_core_and_ravel_on_the_embedded_model(tmp_path: Path) -> None:
    cache = f"sae.cache_dir={tmp_path / 'saes'}"
    core = run_job(tmp_path / "core", ["sae=pca", "sae.n_sequences=300", cache, *CORE])
    m = core["eval_result_metrics"]
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-4)
    assert core["sae_cfg_dict"]["architecture"] == "pca"
    assert core["saeravel"]["sae_identity"]["family"] == "pca"
    ravel = run_job(tmp_path / "ravel", ["sae=pca", "sae.n_sequences=300", cache, *RAVEL])
    for attr, score in ravel["eval_result_metrics"]["ravel"]["sae"].items():
        assert not math.isnan(score["first_token"]["cause"]), attr
