"""SAE families: one interface (:class:`~saeravel.saes.base.SAE`), loaders per family."""

from saeravel.saes.base import SAE, CustomSAE, SAEIdentity, resid_layer_of_hook, resid_post_hook

__all__ = ["SAE", "CustomSAE", "SAEIdentity", "resid_layer_of_hook", "resid_post_hook"]
