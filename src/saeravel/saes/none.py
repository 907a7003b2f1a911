"""``sae=none``: no SAE (for evals and methods that need none)."""

from __future__ import annotations

from saeravel.models import LoadedModel
from saeravel.saes.base import SAE
from saeravel.saes.source import ModelOnlySource


class NoSource(ModelOnlySource):
    """No SAE (for methods that need none); the methods intervene at ``site`` of ``layer``."""

    nothing_to_fetch = "no SAE"

    def __init__(self, family: str = "none", layer: int = 0, site: str = "resid_post") -> None:
        super().__init__(family, layer, site)

    def load(self, model: LoadedModel) -> SAE | None:
        """None."""
        return None
