"""SAE families: one interface (:class:`~saeravel.saes.base.SAE`), one module per source
behind the :class:`~saeravel.saes.source.SAESource` contract."""

from saeravel.saes.base import SAE, CustomSAE, SAEIdentity
from saeravel.saes.source import SAESource

__all__ = ["SAE", "CustomSAE", "SAEIdentity", "SAESource"]
