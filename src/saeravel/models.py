"""Model sources: what ``conf/model/*.yaml`` instantiates.

A source is built from its config (``_target_``) and then ``load``-ed with the weight
processing the SAE requires, so an SAE never reads activations of a differently processed
model (see :func:`merge_processing`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from saeravel.errors import UserError

log = logging.getLogger(__name__)

# transformer_lens' from_pretrained defaults: the processing an SAE trained on
# "default transformer_lens activations" (Bloom's, Apollo's) expects.
TL_DEFAULT_PROCESSING = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    """A frozen HookedTransformer plus what the evals need to know about it."""

    model: Any
    name: str
    processing: dict[str, Any] = field(default_factory=dict)
    world: Any = None  # the embedded city world (saeravel.world.CityWorld) when there is one
    info: dict[str, Any] = field(default_factory=dict)
    truth: Any = None  # the planted ground truth (saeravel.planted.PlantedTruth) when known

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer


def merge_processing(
    model_name: str, user_kwargs: dict[str, Any], sae_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The from_pretrained kwargs to load with: the SAE's requirements on top of the user's.

    A user setting that contradicts what the SAE was trained on is an error, not a silent
    mismatch.
    """
    merged = dict(user_kwargs)
    for key, want in sae_kwargs.items():
        have = merged.get(key, TL_DEFAULT_PROCESSING.get(key))
        if key in user_kwargs and have != want:
            raise UserError(
                f"model {model_name}: from_pretrained_kwargs.{key}={have} but the SAE was trained "
                f"with {key}={want}; remove the override or choose a matching SAE"
            )
        merged[key] = want
    return merged


def offline_hint(model_name: str, hf_name: str) -> str:
    return (
        f"model {model_name!r} ({hf_name}) is not in the local Hugging Face cache and the hub "
        "cannot be reached; on a machine with a network run `python run.py model="
        f"{model_name} ...` once (or `huggingface-cli download` it), then set HF_HUB_OFFLINE=1"
    )


class TransformerLensModel:
    """A pretrained model through ``HookedTransformer.from_pretrained``."""

    def __init__(
        self,
        name: str,
        hf_name: str,
        n_layers: int,
        d_model: int,
        default_layer: int,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 16,
        from_pretrained_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.hf_name = hf_name
        self.n_layers = n_layers
        self.d_model = d_model
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.from_pretrained_kwargs = dict(from_pretrained_kwargs or {})

    def load(self, sae_kwargs: dict[str, Any] | None = None) -> LoadedModel:
        """Load the model with the SAE's processing; fail fast and clearly when offline."""
        from transformer_lens import HookedTransformer

        kwargs = merge_processing(self.name, self.from_pretrained_kwargs, sae_kwargs or {})
        log.info("loading %s (%s) with %s", self.name, self.hf_name, kwargs or "TL defaults")
        try:
            model = HookedTransformer.from_pretrained(
                self.hf_name, device=self.device, dtype=self.dtype, **kwargs
            )
        except (OSError, ValueError) as exc:
            if _looks_offline(exc):
                raise UserError(offline_hint(self.name, self.hf_name)) from exc
            raise
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        processing = {**TL_DEFAULT_PROCESSING, **kwargs}
        return LoadedModel(model=model, name=self.name, processing=processing)


def _looks_offline(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    markers = ("offline", "connection", "couldn't connect", "resolve", "cannot find the requested")
    markers += ("not found in cache", "local_files_only", "outgoing traffic", "max retries")
    return os.environ.get("HF_HUB_OFFLINE") == "1" or any(m in text for m in markers)
