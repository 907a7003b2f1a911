"""Model sources: what ``conf/model/*.yaml`` instantiates.

A source is built from its config (``_target_``) and then ``load``-ed with the weight
processing the SAE requires, so an SAE never reads activations of a differently processed
model (see :func:`merge_processing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saeravel.errors import UserError
from saeravel.hub import gated_message, hub_offline

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


VALID_DEVICES = "auto, cpu, cuda[:N], mps"
_DEVICE_RE = re.compile(r"(cpu|mps|cuda)(?::(\d+))?")


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu. Anything else is checked against what this
    machine has (:class:`UserError`, one line, before any model loads)."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = _DEVICE_RE.fullmatch(device)
    if m is None:
        raise UserError(f"unknown device {device!r}; valid: {VALID_DEVICES}")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device={device} but no CUDA device is visible; valid: {VALID_DEVICES}"
            )
        if index is not None and int(index) >= torch.cuda.device_count():
            raise UserError(
                f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are "
                f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif kind == "mps":
        if index is not None or not torch.backends.mps.is_available():
            raise UserError(
                f"device={device} but no MPS device is available; valid: {VALID_DEVICES}"
            )
    elif index is not None:
        raise UserError(f"unknown device {device!r}; valid: {VALID_DEVICES}")
    return device


def dtype_name(name: Any, device: str = "cpu") -> str:
    """``float32`` / ``float16`` / ``bfloat16`` (a string or the config's ``DType`` enum), or
    ``auto``: bfloat16 on a CUDA device that supports it, else float32 (CPU bfloat16 is slow)."""
    name = str(getattr(name, "value", name))
    if name == "auto":
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return name


def resolve_dtype(name: Any, device: str = "cpu") -> torch.dtype:
    """The torch dtype of :func:`dtype_name`."""
    return DTYPES[dtype_name(name, device)]


def hub_revision(repo_id: str) -> str | None:
    """The commit of ``repo_id`` in the local Hugging Face cache (no network): the snapshot
    holding its ``config.json``, else ``refs/main``; None when it is not cached."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed repo id or cache: no revision known
        hit = None
    if isinstance(hit, str):
        parent = Path(hit).parent
        if parent.parent.name == "snapshots":
            return parent.name
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        text = ref.read_text().strip()
    except OSError:
        return None
    return text or None


def pretrained_identity(
    hf_name: str, repo_id: str, revision: str | None, dtype: str, processing: dict[str, Any]
) -> str:
    """``cache_folder_key`` of a pretrained model: a hash of everything that decides its
    activations (name, hub repo and commit, dtype, from_pretrained kwargs incl. processing)."""
    blob = json.dumps(
        {
            "hf_name": hf_name,
            "repo": repo_id,
            "revision": revision,
            "dtype": dtype,
            "kwargs": processing,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
        "cannot be reached; on a machine with a network run `python -m saeravel.prefetch "
        f"model={model_name} ...` (the same overrides as the job; fetches only the files the "
        "job needs), then set HF_HUB_OFFLINE=1"
    )


class TransformerLensModel:
    """A pretrained model through ``HookedTransformer.from_pretrained``."""

    own_world = False  # its RAVEL data and SAE training text come from elsewhere

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
        self.device = resolve_device(device)
        self.dtype_name = dtype_name(dtype, self.device)  # ``auto`` resolved: what is recorded
        self.dtype = resolve_dtype(self.dtype_name)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"model.batch_size={batch_size} must be a positive integer")
        self.batch_size = batch_size
        # Unset (None) fields of the schema's known kwargs mean "transformer_lens default".
        self.from_pretrained_kwargs = {
            k: v for k, v in dict(from_pretrained_kwargs or {}).items() if v is not None
        }
        self.repo_id = official_repo(name, hf_name)

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
            if (gated := gated_message(exc, self.repo_id)) is not None:
                raise UserError(f"model {self.name}: {gated}") from exc
            if _looks_offline(exc):
                raise UserError(offline_hint(self.name, self.hf_name)) from exc
            raise
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        processing = {**TL_DEFAULT_PROCESSING, **kwargs}
        revision = hub_revision(self.repo_id)
        info = {
            "hf_name": self.hf_name,
            "hf_repo": self.repo_id,
            "revision": revision,
            "dtype": self.dtype_name,
            # Caches built on this model (knowledge filters, trained SAEs) are keyed by it.
            "cache_folder_key": pretrained_identity(
                self.hf_name, self.repo_id, revision, self.dtype_name, processing
            ),
        }
        return LoadedModel(model=model, name=self.name, processing=processing, info=info)

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Its Hugging Face repo (config, tokenizer, one set of weights) in the hub cache;
        ``verify`` loads it offline as a job would."""
        from saeravel.offline import hub_model_need, hub_offline_mode

        def verify() -> None:
            with hub_offline_mode():
                self.load({})

        label = f"model {self.repo_id} (model={self.name})"
        return [hub_model_need(self.repo_id, label, verify)]


def official_repo(model_name: str, hf_name: str) -> str:
    """The Hugging Face repo transformer_lens loads ``hf_name`` from (a one-line
    :class:`UserError` when transformer_lens does not know the name)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(hf_name)
    except ValueError:
        raise UserError(
            f"model {model_name}: hf_name={hf_name!r} is not a transformer_lens model name "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
        ) from None


def _looks_offline(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    markers = ("offline", "connection", "couldn't connect", "resolve", "cannot find the requested")
    markers += ("not found in cache", "local_files_only", "outgoing traffic", "max retries")
    return hub_offline() or any(m in text for m in markers)
