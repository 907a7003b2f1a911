"""``sae=trained``: an SAE trained here on the chosen model's activations (the training is
:mod:`saeravel.saes.train`), cached on disk and checked against its checksums when read."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

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
from saeravel.errors import UserError, choose
from saeravel.hooks import site_hook
from saeravel.models import LoadedModel
from saeravel.results import atomic_torch_save, atomic_write_json
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.source import SAESource
from saeravel.saes.train import embedded_activations, explained_variance, hf_activations, train_sae
from saeravel.saes.util import site_name

log = logging.getLogger(__name__)
# 3: embedded text restricted to the model's trained attributes; checksums in meta.json
FORMAT_VERSION = 3


def check_trained_hparams(**h: Any) -> None:
    """One-line :class:`UserError` for an ``sae=trained`` setting out of range, raised when
    the source is built (before any model loads or training starts)."""
    for key in ("expansion", "steps", "batch_size", "n_sequences"):
        if not isinstance(h[key], int) or isinstance(h[key], bool) or h[key] < 1:
            raise UserError(f"sae.{key}={h[key]} must be a positive integer")
    if h["architecture"] == "topk" and (
        not isinstance(h["k"], int) or isinstance(h["k"], bool) or h["k"] < 1
    ):
        raise UserError(f"sae.k={h['k']} must be a positive integer (active latents per token)")
    if not h["lr"] > 0:
        raise UserError(f"sae.lr={h['lr']} must be > 0")
    if not h["l1_coefficient"] >= 0:
        raise UserError(f"sae.l1_coefficient={h['l1_coefficient']} must be >= 0")
    if not 0 <= h["entity_weight"] <= 1:
        raise UserError(f"sae.entity_weight={h['entity_weight']} must be in [0, 1]")


class TrainedSource(SAESource):
    """SAE source that trains (or loads from the cache) an SAE on the model's activations at
    ``site`` of block ``layer``."""

    def __init__(
        self,
        family: str,
        layer: int,
        architecture: str = "topk",
        k: int = 16,
        expansion: int = 8,
        l1_coefficient: float = 5.0,
        steps: int = 3000,
        batch_size: int = 256,
        lr: float = 1e-3,
        positions: str = "all",
        entity_weight: float = 0.5,
        seed: int = 0,
        cache_dir: str = ".cache",
        n_sequences: int = 3000,
        dataset: str = "Skylion007/openwebtext",
        site: str = "resid_post",
    ) -> None:
        choose("SAE architecture", architecture, ["topk", "relu"])
        choose("SAE positions", positions, ["all"])
        check_trained_hparams(
            architecture=architecture, k=k, expansion=expansion, l1_coefficient=l1_coefficient,
            steps=steps, batch_size=batch_size, lr=lr, entity_weight=entity_weight,
            n_sequences=n_sequences,
        )  # fmt: skip
        self.family = family
        self.layer = layer
        self.site = site_name(site)
        self.hook_name = site_hook(self.site, layer)
        self.hparams = {
            "architecture": architecture,
            "k": k,
            "expansion": expansion,
            "l1_coefficient": l1_coefficient,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "positions": positions,
            "entity_weight": entity_weight,
            "seed": seed,
            "n_sequences": n_sequences,
            "dataset": dataset,
        }
        self.cache_dir = Path(cache_dir)

    def required_model_kwargs(self) -> dict[str, Any]:
        """Trained on the model as loaded: no requirement."""
        return {}

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing to download. On a model with its own world and ``ctx.train``
        (``--train-embedded``): this SAE trained now, on the model its need trains."""
        from saeravel.offline import Need, Skip

        on = f"sae={self.family} on {ctx.model.name}"
        if not ctx.model.own_world:
            why = (
                f"trained at run time on text streamed from {self.hparams['dataset']}: the job "
                "needs network (or train it where there is network); not prefetchable"
            )
            return [Skip(on, why)]
        trains = [n for n in ctx.model_needs if n.product is not None]
        if not trains:
            why = "trained here on first use and cached, nothing to download"
            return [Skip(on, why + ("" if ctx.train else " (--train-embedded trains it now)"))]
        model_need = trains[0]

        def check() -> list[Path]:
            model_need.check()
            folder = self._folder(model_need.product())
            if not (folder / "meta.json").is_file():  # written last: marks it complete
                raise UserError(f"not trained yet ({folder})")
            return [folder]

        def fetch() -> list[Path]:
            model = model_need.product()
            self.load(model)
            return [self._folder(model)]

        name = f"sae=trained on {ctx.model.name} layer {self.layer}{self._site_tag(' ')}"
        key = json.dumps([model_need.dest, self.layer, self.site, self.hparams], sort_keys=True)
        return [
            Need(
                "train", name, "", str(self.cache_dir / "saes"), check, fetch, label=name,
                key=("train", key),
            )
        ]  # fmt: skip

    def _site_tag(self, sep: str = "-") -> str:
        """The site in cache names: none at resid_post (the names from before sites existed
        stay valid), else ``sep`` and the site."""
        return "" if self.site == "resid_post" else f"{sep}{self.site}"

    def _folder(self, model: LoadedModel) -> Path:
        model_key = model.info.get("cache_folder_key") or json.dumps(
            model.processing, sort_keys=True
        )
        site = {"site": self.site} if self.site != "resid_post" else {}  # old keys stay valid
        blob = json.dumps(
            {
                "v": FORMAT_VERSION,
                "model": model.name,
                "mk": model_key,
                "layer": self.layer,
                **site,
                **self.hparams,
            },
            sort_keys=True,
        )
        key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        name = f"{model.name}-L{self.layer}{self._site_tag()}-{key}"
        return inside(self.cache_dir, "saes", name)

    def load(self, model: LoadedModel) -> SAE:
        """Load from the cache (validated), or train and cache."""
        if (
            self.hparams["architecture"] == "topk"
            and self.hparams["k"] > self.hparams["expansion"] * model.d_model
        ):
            raise UserError(
                f"sae.k={self.hparams['k']} exceeds d_sae = sae.expansion * d_model = "
                f"{self.hparams['expansion'] * model.d_model}"
            )
        folder = self._folder(model)
        return load_or_build(
            folder,
            lambda: self._load_cached(folder, model),
            lambda: self._train(model, folder),
            what="trained SAE",
        )

    def _load_cached(self, folder: Path, model: LoadedModel) -> SAE:
        """The SAE in ``folder``: files checked against meta.json's checksums (written last),
        tensors against the expected shapes; any problem raises ``CorruptEntry``."""
        meta = read_json(folder / "meta.json", required=("hparams", "metrics", "files"))
        verify_files(folder, meta["files"])
        w = torch_load(folder / "sae.pt")
        d_in, d_sae = model.d_model, self.hparams["expansion"] * model.d_model
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in)}
        shapes["b_dec"] = (d_in,)
        for name, shape in shapes.items():
            t = w.get(name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CorruptEntry(f"sae.pt {name} is {got}, expected {shape}")
        ident = SAEIdentity(
            family=self.family, path=str(folder), extra={"trained": meta["metrics"]}
        )
        return SAE(
            w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"],
            activation=self.hparams["architecture"], k=self.hparams["k"],
            apply_b_dec_to_input=True, hook_name=self.hook_name, identity=ident,
            cfg_dict={"training": self.hparams, "train_metrics": meta["metrics"]},
        )  # fmt: skip

    def _train(self, model: LoadedModel, folder: Path) -> None:
        h = self.hparams
        if model.world is not None:
            acts, ent = embedded_activations(model, self.hook_name, h["n_sequences"], h["seed"])
        else:
            acts = hf_activations(model, self.hook_name, h["n_sequences"] * 64, h["dataset"])
            ent = None
        d_sae = h["expansion"] * acts.shape[1]
        log.info(
            "training a %s SAE (d_sae %d) on %d activations at %s",
            h["architecture"],
            d_sae,
            len(acts),
            self.hook_name,
        )
        w = train_sae(
            acts, ent, d_sae=d_sae, architecture=h["architecture"], k=h["k"],
            l1_coefficient=h["l1_coefficient"], steps=h["steps"], batch_size=h["batch_size"],
            lr=h["lr"], entity_weight=h["entity_weight"], seed=h["seed"],
        )  # fmt: skip
        sae = SAE(
            w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], activation=h["architecture"],
            k=h["k"], hook_name=self.hook_name, identity=SAEIdentity(self.family),
        )  # fmt: skip
        with torch.no_grad():
            l0 = float((sae.encode(acts) > 0).float().sum(-1).mean())
            alive = float((sae.encode(acts[:20000]) > 0).any(0).float().mean())
        metrics = {
            "explained_variance": explained_variance(sae, acts),
            "explained_variance_entity": explained_variance(sae, ent)
            if ent is not None and len(ent)
            else None,
            "l0": l0,
            "frac_alive": alive,
            "n_train_activations": len(acts),
        }
        log.info("trained SAE: %s", metrics)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(folder / "sae.pt", w)
        atomic_write_json(  # last: marks the entry complete and records the weights' checksum
            folder / "meta.json",
            {"hparams": h, "metrics": metrics, "files": file_record(folder, ["sae.pt"])},
        )
