"""``sae=planted``: the planted world's exact SAE, or its random-dictionary control.

Built from the truth of ``model=planted-city-lm`` (:class:`~saeravel.planted.PlantedTruth`):
one atom per attribute value, +- atoms per identity coordinate, ReLU encoder = decoder
transposed, the entity marker as ``b_dec``; it reconstructs every entity exactly. The
control is +- a random orthonormal basis of the same subspace.
"""

from __future__ import annotations

from typing import Any

import torch

from saeravel.errors import UserError
from saeravel.hooks import resid_post
from saeravel.models import LoadedModel
from saeravel.planted import PlantedTruth
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.source import SAESource
from saeravel.saes.util import residual_only

DICTIONARIES = ("planted", "random")


def exact_sae(atoms: torch.Tensor, b_dec: torch.Tensor, layer: int, identity: SAEIdentity) -> SAE:
    """ReLU SAE with orthonormal (or +- orthonormal) atoms: encoder = decoder transposed."""
    return SAE(
        atoms.T.clone(), torch.zeros(len(atoms)), atoms.clone(), b_dec.clone(),
        activation="relu", apply_b_dec_to_input=True, hook_name=resid_post(layer),
        identity=identity, cfg_dict={"planted": identity.extra},
    )  # fmt: skip


def planted_sae(truth: PlantedTruth, layer: int) -> SAE:
    """The truth's exact SAE (:meth:`PlantedTruth.sae_weights`): one atom per value (its value
    vector; with ``model.absorption`` a country's atom carries its continent's) and +- per
    identity coordinate; exact on every h(e) (a JumpReLU in superposition)."""
    kw = truth.sae_weights()
    ident = SAEIdentity(
        family="planted", extra={"dictionary": "planted", "n_atoms": len(kw["W_dec"])}
    )
    return SAE(**kw, apply_b_dec_to_input=True, hook_name=resid_post(layer), identity=ident,
               cfg_dict={"planted": ident.extra})  # fmt: skip


def random_dictionary(truth: PlantedTruth, layer: int, seed: int = 0) -> SAE:
    """+- a random orthonormal basis of the planted subspace (exact, chance-level control)."""
    S = torch.cat([truth.block_basis(b) for b in truth.blocks], dim=1).double()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(S.shape[1], S.shape[1], generator=gen, dtype=torch.float64))
    basis = (S @ q).T.float()
    atoms = torch.cat([basis, -basis])
    ident = SAEIdentity(family="planted", extra={"dictionary": "random", "seed": seed,
                                                 "n_atoms": len(atoms)})  # fmt: skip
    return exact_sae(atoms, truth.marker, layer, ident)


class PlantedSAESource(SAESource):
    """SAE source for ``sae=planted`` (only on ``model=planted-city-lm``)."""

    def __init__(
        self, family: str, layer: int, dictionary: Any = "planted", seed: int = 0,
        site: str = "resid_post",
    ) -> None:  # fmt: skip
        self.family = family
        self.layer = layer
        self.site = residual_only(family, site)  # the planted world lives in the residual
        self.dictionary = str(getattr(dictionary, "value", dictionary))  # an Enum or its string
        self.seed = seed

    def required_model_kwargs(self) -> dict[str, Any]:
        return {}

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing: it is built from the planted world at run time."""
        from saeravel.offline import Skip

        why = "built from the planted world at run time, nothing to fetch"
        return [Skip(f"sae={self.family}", why)]

    def load(self, model: LoadedModel) -> SAE:
        if self.dictionary not in DICTIONARIES:
            raise UserError(
                f"unknown sae.dictionary {self.dictionary!r}; valid: {', '.join(DICTIONARIES)}"
            )
        truth = getattr(model, "truth", None)
        if not isinstance(truth, PlantedTruth):
            raise UserError(f"sae=planted needs model=planted-city-lm (got model {model.name})")
        if not 0 <= self.layer <= model.n_layers - 2:
            raise UserError(
                f"sae=planted: layer={self.layer} is not a site of {model.name} (0..{model.n_layers - 2})"
            )
        if self.dictionary == "random":
            sae = random_dictionary(truth, self.layer, self.seed)
        else:
            sae = planted_sae(truth, self.layer)
        sae.identity.family = self.family
        return sae
