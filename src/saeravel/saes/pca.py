"""``sae=pca``: SAEBench's PCA baseline, the principal components of the model's activations at
the hook as a square, exact dictionary.

The components are fit here (scikit-learn's ``IncrementalPCA``, ``n_components = d_model``,
centred, not whitened) on the activations ``sae=trained`` trains on (the embedded world's
fact chains on a model with a world, else ``n_sequences * 64`` tokens of a Hugging Face text
dataset), then cached on disk like ``sae=trained`` and checked against their checksums when
read. The SAE: ``encode(x) = (x - mean) C^T`` (latent ``i`` is the score on the ``i``-th
principal component, variance descending, signed: the ``linear`` activation),
``decode(f) = f C + mean`` (decoder row ``i`` is the unit-norm component ``i``), so the
reconstruction is exact and L0 is about ``d_model``.

Differences from SAEBench (``sae_bench/custom_saes/pca_sae.py``, v0.6.0):

* the encoder: SAEBench's ``fit_PCA`` stores ``W_enc = components_`` and
  ``W_dec = components_.T`` and encodes ``(x - mean) @ W_enc``, so its latents are
  ``(x - mean) C`` and its decoder rows the *columns* of ``C``: an orthogonal rotation of the
  centred input (the reconstruction is exact all the same) whose latents are not the
  principal-component scores unless ``C`` is symmetric. Ours uses ``W_enc = C^T``,
  ``W_dec = C``: latent ``i`` is the score on component ``i``, decoder row ``i`` the
  component, which is what a PCA baseline means for the latent-level evals (sparse probing,
  absorption, SCR/TPP, RAVEL's SAE mask).
* the data: SAEBench fits on 200M tokens of ``monology/pile-uncopyrighted`` at context 128,
  BOS included (``mask_bos_pad_eos_tokens=False``); ours on the trained SAE's text (above),
  BOS excluded, with ``sae.n_sequences`` setting the amount.
* the fit: both use ``IncrementalPCA`` (SAEBench batches of ``pca_batch_size`` tokens,
  optionally cuML on GPU; ours ``sae.batch_size`` rows, on CPU in float64). Component signs
  follow scikit-learn's convention in both.
* SAEBench's ``architecture`` is ``""``; ours ``pca``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saeravel.cache import (
    CorruptEntry,
    file_record,
    inside,
    load_or_build,
    read_json,
    torch_load,
    verify_files,
)
from saeravel.errors import UserError
from saeravel.hooks import site_hook
from saeravel.models import LoadedModel
from saeravel.results import atomic_torch_save, atomic_write_json
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.source import SAESource
from saeravel.saes.train import embedded_activations, hf_activations
from saeravel.saes.util import site_name

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def fit_pca(acts: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """``{"mean", "components", "explained_variance_ratio"}`` of ``acts`` [n, d]: all ``d``
    components (rows, variance descending) of scikit-learn's ``IncrementalPCA`` fit in float64
    batches of ``max(batch_size, d)`` rows."""
    from sklearn.decomposition import IncrementalPCA

    n, d = acts.shape
    if n <= d:
        raise UserError(
            f"sae=pca needs more activations than d_model={d} to fit {d} components (got {n}); "
            "raise sae.n_sequences"
        )
    ipca = IncrementalPCA(n_components=d, batch_size=max(batch_size, d))
    ipca.fit(acts.double().numpy())
    return {
        "mean": torch.from_numpy(np.asarray(ipca.mean_, dtype=np.float32)),
        "components": torch.from_numpy(np.asarray(ipca.components_, dtype=np.float32)),
        "explained_variance_ratio": torch.from_numpy(
            np.asarray(ipca.explained_variance_ratio_, dtype=np.float32)
        ),
    }


def pca_sae(fit: dict[str, torch.Tensor], hook_name: str, identity: SAEIdentity) -> SAE:
    """The square PCA dictionary of a fit: ``encode = (x - mean) C^T``, ``decode = f C + mean``."""
    comp = fit["components"]
    return SAE(
        comp.T.contiguous(), torch.zeros(len(comp)), comp.clone(), fit["mean"].clone(),
        activation="linear", apply_b_dec_to_input=True, hook_name=hook_name,
        identity=identity, cfg_dict={"architecture": "pca"},
    )  # fmt: skip


class PCASource(SAESource):
    """SAE source that fits (or loads from the cache) the PCA dictionary at ``layer``."""

    def __init__(
        self,
        family: str = "pca",
        layer: int = 0,
        n_sequences: int = 3000,
        batch_size: int = 4096,
        seed: int = 0,
        dataset: str = "Skylion007/openwebtext",
        cache_dir: str = ".cache",
        site: str = "resid_post",
    ) -> None:
        for key, value in (("n_sequences", n_sequences), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"sae.{key}={value} must be a positive integer")
        self.family = family
        self.layer = int(layer)
        self.site = site_name(site)
        self.hook_name = site_hook(self.site, self.layer)
        self.hparams = {
            "n_sequences": n_sequences,
            "batch_size": batch_size,
            "seed": seed,
            "dataset": dataset,
        }
        self.cache_dir = Path(cache_dir)

    def required_model_kwargs(self) -> dict[str, Any]:
        """Fit on the model as loaded: no requirement."""
        return {}

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing to download on a model with its own world (fit on first use and cached);
        on a pretrained model the fit streams text from the hub."""
        from saeravel.offline import Skip

        on = f"sae={self.family} on {ctx.model.name}"
        if not ctx.model.own_world:
            why = (
                f"fit at run time on text streamed from {self.hparams['dataset']}: the job "
                "needs network (or fit it where there is network); not prefetchable"
            )
            return [Skip(on, why)]
        return [Skip(on, "fit here on first use and cached, nothing to download")]

    def folder(self, model: LoadedModel) -> Path:
        """The cache folder of this fit on ``model`` (keyed by the model's identity, the
        layer and the settings)."""
        model_key = model.info.get("cache_folder_key") or json.dumps(
            model.processing, sort_keys=True
        )
        blob = json.dumps(
            {"v": FORMAT_VERSION, "model": model.name, "mk": model_key, "layer": self.layer,
             **({"site": self.site} if self.site != "resid_post" else {}), **self.hparams},
            sort_keys=True,
        )  # fmt: skip
        key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        tag = "" if self.site == "resid_post" else f"-{self.site}"
        return inside(self.cache_dir, "saes", f"{model.name}-L{self.layer}{tag}-pca-{key}")

    def load(self, model: LoadedModel) -> SAE:
        """Load the fit from the cache (validated), or fit and cache it."""
        folder = self.folder(model)
        return load_or_build(
            folder,
            lambda: self._load_cached(folder, model),
            lambda: self._fit(model, folder),
            what="PCA SAE",
        )

    def _load_cached(self, folder: Path, model: LoadedModel) -> SAE:
        meta = read_json(folder / "meta.json", required=("hparams", "metrics", "files"))
        verify_files(folder, meta["files"])
        fit = torch_load(folder / "pca.pt")
        d = model.d_model
        shapes = {"mean": (d,), "components": (d, d), "explained_variance_ratio": (d,)}
        for name, shape in shapes.items():
            t = fit.get(name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CorruptEntry(f"pca.pt {name} is {got}, expected {shape}")
        ident = SAEIdentity(family=self.family, path=str(folder), extra={"pca": meta["metrics"]})
        return pca_sae(fit, self.hook_name, ident)

    def _fit(self, model: LoadedModel, folder: Path) -> None:
        h = self.hparams
        if model.world is not None:
            acts, _ = embedded_activations(model, self.hook_name, h["n_sequences"], h["seed"])
        else:
            acts = hf_activations(model, self.hook_name, h["n_sequences"] * 64, h["dataset"])
        log.info("fitting PCA (%d components) on %d activations at %s",
                 acts.shape[1], len(acts), self.hook_name)  # fmt: skip
        fit = fit_pca(acts.float().cpu(), h["batch_size"])
        ratio = fit["explained_variance_ratio"]
        metrics = {
            "n_fit_activations": len(acts),
            "explained_variance_ratio_top1": float(ratio[0]),
            "components_for_90_percent": int((ratio.cumsum(0) < 0.9).sum()) + 1,
        }
        folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(folder / "pca.pt", fit)
        atomic_write_json(  # last: marks the entry complete and records the file's checksum
            folder / "meta.json",
            {"hparams": h, "metrics": metrics, "files": file_record(folder, ["pca.pt"])},
        )
