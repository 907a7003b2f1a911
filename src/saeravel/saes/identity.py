"""``sae=identity``: SAEBench's identity baseline, the residual stream itself as the "SAE".

``d_sae = d_model``, ``encode(x) = x`` and ``decode(f) = f`` (``W_enc = W_dec = I``, zero
biases, no nonlinearity: the ``linear`` activation of :class:`~saeravel.saes.base.SAE`), so
every eval scores the model's own basis: latents are the residual dimensions (signed), the
reconstruction is exact and L0 is the number of nonzero dimensions (about ``d_model``).

Differences from SAEBench (``sae_bench/custom_saes/identity_sae.py``, v0.6.0): none in the
maths. SAEBench's class records ``architecture: ""`` in its config; ours records
``identity``, so results and plots name it.
"""

from __future__ import annotations

import torch

from saeravel.hooks import site_hook
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.source import ModelOnlySource


def identity_sae(
    d_model: int, layer: int, family: str = "identity", site: str = "resid_post"
) -> SAE:
    """The identity dictionary at ``site`` of block ``layer``."""
    eye = torch.eye(d_model)
    return SAE(
        eye, torch.zeros(d_model), eye, torch.zeros(d_model), activation="linear",
        apply_b_dec_to_input=False, hook_name=site_hook(site, layer), identity=SAEIdentity(family),
        cfg_dict={"architecture": "identity"},
    )  # fmt: skip


class IdentitySource(ModelOnlySource):
    """SAE source of ``sae=identity`` (any model, any layer)."""

    nothing_to_fetch = "the identity matrix, nothing to fetch"

    def __init__(self, family: str = "identity", layer: int = 0, site: str = "resid_post") -> None:
        super().__init__(family, layer, site)

    def load(self, model: LoadedModel) -> SAE:
        """The identity SAE of ``model.d_model``."""
        return identity_sae(model.d_model, self.layer, self.family, self.site)
