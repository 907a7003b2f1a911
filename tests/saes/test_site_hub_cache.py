"""Pretrained SAEs beyond the residual stream, loaded as a job loads them: Gemma Scope's
residual and MLP SAEs (``sae=gemma_scope``) and OpenAI's v5 MLP-out SAEs
(``sae=openai_v5_32k site=mlp_out``), read by sae_lens' own loaders from a simulated Hugging
Face cache in the hub's layout (``models--<org>--<name>/blobs``, ``snapshots/<commit>/``)
holding tiny random weights in the real formats (Gemma Scope's ``params.npz``, sae_lens'
``cfg.json`` + ``sae_weights.safetensors``); their hooks are the job's site (the pipeline's
check).

Gemma Scope's loader takes ``d_in`` (2304) and ``d_sae`` (from ``width_16k``) from the
folder names; the release's ``config_overrides`` in sae_lens' directory (the directory's own
mechanism, patched here) make them 16 and 32 so that the weights stay tiny."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sae_lens
import torch
from sae_lens.saes.sae import SAEMetadata
from saes_helpers import sae_yamls

from saeravel.errors import UserError
from saeravel.pipeline import check_sae_fits
from saeravel.saes.gemma_scope import GemmaScopeSource, catalogue
from saeravel.saes.sae_lens import SaeLensSource

from helpers import write_hub_repo

D_IN, D_SAE, LAYER = 16, 32, 5


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that huggingface_hub reads, offline."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _model(n_layers: int) -> Any:
    """What check_sae_fits reads of a loaded model."""
    return SimpleNamespace(name="tiny", d_model=D_IN, n_layers=n_layers)


def gemma_params(seed: int = 0) -> tuple[bytes, dict[str, np.ndarray]]:
    """Gemma Scope's ``params.npz`` (JumpReLU: ``w_enc``, ``b_enc``, ``threshold``, ``w_dec``,
    ``b_dec``), random."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32) / D_IN**0.5,
        "b_enc": (0.3 * rng.normal(size=D_SAE)).astype(np.float32),
        "threshold": rng.uniform(0.0, 0.8, size=D_SAE).astype(np.float32),
        "w_dec": rng.normal(size=(D_SAE, D_IN)).astype(np.float32),
        "b_dec": (0.2 * rng.normal(size=D_IN)).astype(np.float32),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), arrays


@pytest.mark.parametrize(
    ("site", "release", "hook"),
    [
        ("resid_post", "gemma-scope-2b-pt-res", f"blocks.{LAYER}.hook_resid_post"),
        ("mlp_out", "gemma-scope-2b-pt-mlp", f"blocks.{LAYER}.hook_mlp_out"),
    ],
)
@pytest.mark.parametrize("canonical", [True, False])
def test_gemma_scope_loads_from_the_hub_cache(
    hub: Path, monkeypatch: pytest.MonkeyPatch, site: str, release: str, hook: str,
    canonical: bool,
) -> None:  # fmt: skip
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for rel in (release, f"{release}-canonical"):
        monkeypatch.setattr(directory[rel], "config_overrides", {"d_in": D_IN, "d_sae": D_SAE})
    l0 = "canonical" if canonical else catalogue(site)[LAYER]["16k"][1]
    rel = f"{release}-canonical" if canonical else release
    sae_id = f"layer_{LAYER}/width_16k/" + ("canonical" if canonical else f"average_l0_{l0}")
    folder = directory[rel].saes_map[sae_id]  # canonical ids name a numbered folder
    assert folder.startswith(f"layer_{LAYER}/width_16k/average_l0_")
    blob, w = gemma_params()
    write_hub_repo(hub, directory[rel].repo_id, {f"{folder}/params.npz": blob})

    src = GemmaScopeSource("gemma_scope", LAYER, "16k", l0, site=site)
    assert src.resolve() == (rel, sae_id)
    (need,) = src.offline_needs(None)
    assert need.check()  # prefetch's check: loads offline from this cache
    assert src.required_model_kwargs() == {}  # transformer_lens' defaults
    sae = src.load(_model(26))
    assert (sae.hook_name, sae.d_in, sae.d_sae, sae.activation) == (hook, D_IN, D_SAE, "jumprelu")
    ident = sae.identity
    assert (ident.family, ident.release, ident.sae_id) == ("gemma_scope", rel, sae_id)
    assert ident.extra == {"layer": LAYER, **({"site": site} if site != "resid_post" else {})}

    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    pre = x @ torch.from_numpy(w["w_enc"]) + torch.from_numpy(w["b_enc"])
    f = pre * (pre > torch.from_numpy(w["threshold"]))  # JumpReLU, no b_dec subtracted
    x_hat = f @ torch.from_numpy(w["w_dec"]) + torch.from_numpy(w["b_dec"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x), x_hat, atol=1e-4, rtol=1e-4)
    assert 0 < (f != 0).float().mean() < 1  # a sparse, non-trivial code: the test can fail

    check_sae_fits(sae, _model(26), LAYER, site)  # the job's site: fits
    other = "mlp_out" if site == "resid_post" else "resid_post"
    with pytest.raises(UserError) as info:
        check_sae_fits(sae, _model(26), LAYER, other)
    assert str(info.value) == (
        f"SAE gemma_scope reads {hook}, which is not the job's layer={LAYER} site={other} "
        f"(blocks.{LAYER}.hook_{other}); it fits layer={LAYER} site={site}"
    )


def test_openai_v5_mlp_out_loads_from_the_hub_cache(hub: Path, tmp_path: Path) -> None:
    """sae_lens' own layout, written by sae_lens (``save_model``), in Bloom's repo of the
    release ``sae=openai_v5_32k site=mlp_out`` picks for the layer."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    hook = f"blocks.{LAYER}.hook_mlp_out"
    meta = SAEMetadata(hook_name=hook, model_name="gpt2-small")
    theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, normalize_activations="layer_norm", metadata=meta,
    ))  # fmt: skip
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    theirs.save_model(tmp_path / "saved")
    release = "gpt2-small-mlp-out-v5-32k"
    lookup = get_pretrained_saes_directory()[release]
    folder = lookup.saes_map[hook]  # the repo's folder of the id (v5_32k_layer_5)
    files = {f"{folder}/{p.name}": p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    write_hub_repo(hub, lookup.repo_id, files)

    src = SaeLensSource(
        "openai_v5_32k", LAYER, sae_yamls()["openai_v5_32k"].release, site="mlp_out"
    )
    assert src.resolve() == (release, hook)
    (need,) = src.offline_needs(None)
    assert {p.name for p in need.check()} == {"cfg.json", "sae_weights.safetensors"}
    sae = src.load(_model(12))
    assert (sae.hook_name, sae.d_in, sae.d_sae, sae.normalize_mode) == (
        hook, D_IN, D_SAE, "layer_norm",
    )  # fmt: skip
    x = torch.randn(32, D_IN, generator=g) * 3 + 1
    with torch.no_grad():
        f_ref = theirs.encode(x)
        x_ref = theirs.decode(f_ref)  # right after encode: sae_lens keeps the LN statistics
        torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae.reconstruct(x), x_ref, atol=1e-5, rtol=0)
    assert ((sae.encode(x) != 0).sum(-1) == 4).all()  # TopK, k=4
    check_sae_fits(sae, _model(12), LAYER, "mlp_out")
    with pytest.raises(UserError, match="it fits layer=5 site=mlp_out"):
        check_sae_fits(sae, _model(12), LAYER, "resid_post")


def test_gemma_scope_not_cached_names_its_folder(hub: Path) -> None:
    """Offline and not cached: one line naming the repo folder to fetch (Gemma Scope's layout is
    ``params.npz``, not sae_lens' ``cfg.json`` + weights)."""
    src = GemmaScopeSource("gemma_scope", LAYER, "16k", "canonical", site="mlp_out")
    with pytest.raises(UserError) as info:
        src.required_model_kwargs()
    msg = str(info.value)
    assert (
        "gemma-scope-2b-pt-mlp-canonical / layer_5/width_16k/canonical is not in the local" in msg
    )
    assert (
        "hf download google/gemma-scope-2b-pt-mlp --include 'layer_5/width_16k/average_l0_" in msg
    )
    assert "cfg.json" not in msg and "\n" not in msg
