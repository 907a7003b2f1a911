"""``sae=none``: no SAE (for evals and methods that need none)."""

from __future__ import annotations

from typing import Any

from saeravel.models import LoadedModel
from saeravel.saes.base import SAE
from saeravel.saes.source import SAESource
from saeravel.saes.util import site_name


class NoSource(SAESource):
    """No SAE (for methods that need none); the methods intervene at ``site`` of ``layer``."""

    def __init__(self, family: str = "none", layer: int = 0, site: str = "resid_post") -> None:
        self.family = family
        self.layer = int(layer)
        self.site = site_name(site)

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: TL defaults."""
        return {}

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing."""
        from saeravel.offline import Skip

        return [Skip(f"sae={self.family}", "no SAE")]

    def load(self, model: LoadedModel) -> SAE | None:
        """None."""
        return None
