"""SAE formats: converters into :class:`~saeravel.saes.base.SAE` (sae_lens objects, Apollo
``e2e_sae`` checkpoints, OpenAI ``sparse_autoencoder`` state dicts) and the checks of SAE
files on disk, each problem a one-line :class:`~saeravel.errors.UserError`.

The conversions are explicit, so every family's maths can be checked against its reference
implementation (see ``tests/saes/``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saeravel.errors import UserError, choose
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.util import few, first_line, jsonable, plain

# sae_lens warns on construction when the SAE has model_from_pretrained_kwargs; its advice
# (from_pretrained_no_processing) does not apply here, required_model_kwargs handles them
KWARGS_WARNING = r"\s*This SAE has non-empty model_from_pretrained_kwargs"

# ----------------------------------------------------------------------------- sae_lens


def _fold_input_scale(
    W_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights that take raw activations, for an SAE trained on ``scale * x``."""
    return W_enc * scale, W_dec / scale, b_dec / scale


def from_sae_lens(sae_lens_sae: Any, identity: SAEIdentity) -> SAE:
    """Convert an sae_lens 6.x SAE (standard, topk, jumprelu) into :class:`SAE`.

    Exact: latents and reconstructions equal sae_lens' ``encode``/``decode``. TopK
    ``rescale_acts_by_decoder_norm`` is folded into the weights; JumpReLU thresholds are
    clamped at 0 (sae_lens computes ``relu(pre) * (pre > t)``, which is ``pre * (pre > max(t,
    0))``); an ``expected_average_only_in`` scaling factor from sae_lens' directory is folded in.
    """
    cfg = sae_lens_sae.cfg
    meta = cfg.metadata
    arch = cfg.architecture()
    name = identity.path or identity.family
    if identity.release:
        name = f"{identity.release} / {identity.sae_id}"
    if arch not in ("standard", "topk", "jumprelu"):
        raise UserError(
            f"SAE {name} has sae_lens architecture {arch!r}; supported: standard, topk, jumprelu"
        )
    if cfg.reshape_activations != "none" or meta.hook_head_index is not None:
        raise UserError(
            f"SAE {name} reads attention heads (hook_z / a head index), not the residual"
        )
    hook_name = meta.hook_name
    if not hook_name:
        raise UserError(f"SAE {name} does not record its hook (cfg.metadata.hook_name)")

    with torch.no_grad():
        W_enc = sae_lens_sae.W_enc.detach().clone()
        b_enc = sae_lens_sae.b_enc.detach().clone()
        W_dec = sae_lens_sae.W_dec.detach().clone()
        b_dec = sae_lens_sae.b_dec.detach().clone()
        threshold = None
        k = None
        activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
        if arch == "topk":
            k = int(cfg.k)
            if getattr(cfg, "rescale_acts_by_decoder_norm", False):
                norms = W_dec.norm(dim=-1)
                W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        if arch == "jumprelu":
            threshold = sae_lens_sae.threshold.detach().clone().clamp(min=0)

        normalize = cfg.normalize_activations
        if normalize == "expected_average_only_in":
            scale = None
            if identity.release and identity.sae_id:
                from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

                scale = get_norm_scaling_factor(identity.release, identity.sae_id)
            if scale is None:
                raise UserError(
                    f"SAE {name} expects inputs scaled by a dataset-wide factor "
                    "(normalize_activations=expected_average_only_in) that it does not record"
                )
            W_enc, W_dec, b_dec = _fold_input_scale(W_enc, W_dec, b_dec, float(scale))
            normalize = "none"
        if normalize not in ("none", "layer_norm"):
            raise UserError(
                f"SAE {name} uses normalize_activations={normalize!r}; supported: none, "
                "layer_norm, expected_average_only_in (with a known scaling factor)"
            )

    if identity.neuronpedia_id is None and meta.get("neuronpedia_id"):
        identity.neuronpedia_id = str(meta.get("neuronpedia_id"))
    kwargs = meta.model_from_pretrained_kwargs
    keep = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path")
    cfg_dict = {
        "source": "sae_lens",
        "architecture": arch,
        "sae_lens_normalize_activations": cfg.normalize_activations,
        "sae_lens_version": meta.sae_lens_version,
        "model_from_pretrained_kwargs": jsonable(kwargs or {}),
        **{key: jsonable(meta.get(key)) for key in keep},
        "neuronpedia_id": identity.neuronpedia_id,
    }
    sae = SAE(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        activation=activation,
        k=k,
        threshold=threshold,
        apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
        normalize=normalize,
        hook_name=hook_name,
        identity=identity,
        cfg_dict=cfg_dict,
    )
    sae.model_from_pretrained_kwargs = dict(kwargs or {})
    return sae


def sae_lens_model_kwargs(sae_lens_sae: Any) -> dict[str, Any]:
    kwargs = sae_lens_sae.cfg.metadata.model_from_pretrained_kwargs
    return dict(plain(kwargs) or {})


# ----------------------------------------------------------------------------- Apollo


def from_apollo_state_dict(
    state_dict: Mapping[str, torch.Tensor], hook_name: str, identity: SAEIdentity
) -> SAE:
    """Convert the SAE at ``hook_name`` of an Apollo ``e2e_sae`` checkpoint into :class:`SAE`.

    Apollo: ``c = relu(x @ enc.weight.T + enc.bias)`` (no decoder bias subtracted) and
    ``x_hat = c @ normalize(dec.weight, dim=0).T + dec.bias`` (unit-norm dictionary columns).
    """
    prefix = hook_name.replace(".", "-")
    keys = {
        "enc_w": f"{prefix}.encoder.0.weight",
        "enc_b": f"{prefix}.encoder.0.bias",
        "dec_w": f"{prefix}.decoder.weight",
        "dec_b": f"{prefix}.decoder.bias",
    }
    missing = [k for k in keys.values() if k not in state_dict]
    if missing:
        present = sorted({k.split(".")[0].replace("-", ".") for k in state_dict})
        raise UserError(
            f"Apollo checkpoint {identity.path} has no SAE at {hook_name} (missing "
            f"{', '.join(missing)}); it has SAEs at: {few(present)}"
        )
    with torch.no_grad():
        enc_w = state_dict[keys["enc_w"]].float()
        dec_w = state_dict[keys["dec_w"]].float()
        W_dec = F.normalize(dec_w, dim=0).T
        return SAE(
            enc_w.T,
            state_dict[keys["enc_b"]].float(),
            W_dec,
            state_dict[keys["dec_b"]].float(),
            activation="relu",
            apply_b_dec_to_input=False,
            normalize="none",
            hook_name=hook_name,
            identity=identity,
            cfg_dict={"source": "apollo_e2e_sae", "architecture": "standard"},
        )


# ----------------------------------------------------------------------------- OpenAI


def from_openai_state_dict(
    state_dict: Mapping[str, Any], hook_name: str, identity: SAEIdentity
) -> SAE:
    """Convert an OpenAI ``sparse_autoencoder`` state dict into :class:`SAE`.

    OpenAI: ``latents = act((LN(x) - pre_bias) @ encoder.weight.T + latent_bias)``,
    ``recons = (latents @ decoder.weight.T + pre_bias) * std + mu``; the layer norm is on for
    TopK autoencoders only (as in OpenAI's ``Autoencoder.from_state_dict``).
    """
    name = identity.path
    needed = ("pre_bias", "encoder.weight", "latent_bias")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise UserError(
            f"{name} is not an OpenAI sparse_autoencoder state dict (no {', '.join(missing)})"
        )
    act_name = str(state_dict.get("activation", "ReLU"))
    act_state = dict(state_dict.get("activation_state_dict") or {})
    for key, value in state_dict.items():
        if key.startswith("activation_state_dict."):
            act_state[key.removeprefix("activation_state_dict.")] = value
    choose("OpenAI SAE activation", act_name, ["TopK", "ReLU"])
    postact = str(act_state.get("postact_fn", "ReLU"))
    if act_name == "TopK" and postact != "ReLU":
        raise UserError(f"{name}: TopK postact_fn {postact!r} is not supported (only ReLU)")
    k = None
    if act_name == "TopK":
        if "k" not in act_state:
            raise UserError(f"{name}: TopK activation without activation_state_dict k")
        k = int(act_state["k"])
    with torch.no_grad():
        enc_w = state_dict["encoder.weight"].float()
        # a tied autoencoder saves no decoder weight: its decoder is the encoder transposed
        dec_w = state_dict["decoder.weight"].float() if "decoder.weight" in state_dict else enc_w.T
        return SAE(
            enc_w.T,
            state_dict["latent_bias"].float(),
            dec_w.T,
            state_dict["pre_bias"].float(),
            activation="topk" if act_name == "TopK" else "relu",
            k=k,
            apply_b_dec_to_input=True,
            normalize="layer_norm" if act_name == "TopK" else "none",
            hook_name=hook_name,
            identity=identity,
            cfg_dict={"source": "openai", "activation": act_name},
        )


_SAE_LENS_ARCHS = ("standard", "topk", "jumprelu")
_SAE_LENS_EXTRA_KEYS = {"jumprelu": ("threshold",)}


def _shape_error(path: Path, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> UserError:
    return UserError(f"{path}: {name} has shape {list(got)}, expected {list(want)}")


def check_sae_lens_folder(path: Path) -> dict[str, Any]:
    """A saved sae_lens SAE's own problems, each a one-line :class:`UserError`: missing or
    unparsable ``cfg.json``, missing ``d_in``/``d_sae``, an unsupported architecture, weights
    that are not a complete safetensors file, missing tensors or wrong shapes. Reads the
    weights' header only. Returns the parsed ``cfg.json``."""
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
    from safetensors import safe_open

    cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise UserError(
                f"{path} is not a saved sae_lens SAE (no {f.name}; expected the output of "
                "sae.save_model(dir): cfg.json + sae_weights.safetensors)"
            )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_path} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object")
    dims: dict[str, int] = {}
    for key in ("d_in", "d_sae"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            what = "has no" if value is None else f"has {key}={value!r}, not a positive"
            raise UserError(f"{cfg_path} {what} {key} (the SAE's widths)")
        dims[key] = value
    arch = cfg.get("architecture", "standard")
    if arch not in _SAE_LENS_ARCHS:
        raise UserError(
            f"{cfg_path}: architecture {arch!r} is not supported; valid: {', '.join(_SAE_LENS_ARCHS)}"
        )
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # SafetensorError (truncated, not safetensors), OSError
        raise UserError(
            f"{weights_path} is not a complete safetensors file ({first_line(exc)})"
        ) from None
    d_in, d_sae = dims["d_in"], dims["d_sae"]
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    want.update({k: (d_sae,) for k in _SAE_LENS_EXTRA_KEYS.get(arch, ())})
    missing = [k for k in want if k not in shapes]
    if missing:
        raise UserError(
            f"{weights_path} lacks {', '.join(missing)} (a {arch} sae_lens SAE needs "
            f"{', '.join(want)}); it has: {few(sorted(shapes)) or 'no tensors'}"
        )
    for key, shape in want.items():
        if shapes[key] != shape:
            raise _shape_error(weights_path, key, shapes[key], shape)
    return cfg


def check_openai_state_dict(path: Path, state_dict: Any) -> None:
    """An OpenAI ``sparse_autoencoder`` state dict's own problems (keys, shapes, activation),
    each a one-line :class:`UserError` naming ``path``."""
    if not isinstance(state_dict, Mapping):
        raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    needed = ("pre_bias", "encoder.weight", "latent_bias")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise UserError(
            f"{path} is not an OpenAI sparse_autoencoder state dict (no {', '.join(missing)}; "
            f"it has: {few(sorted(map(str, state_dict))) or 'no keys'})"
        )
    for key in (*needed, "decoder.weight"):
        if key in state_dict and not isinstance(state_dict[key], torch.Tensor):
            raise UserError(f"{path}: {key} is a {type(state_dict[key]).__name__}, not a tensor")
    enc = state_dict["encoder.weight"]
    if enc.dim() != 2:
        raise UserError(f"{path}: encoder.weight has shape {list(enc.shape)}, expected 2-D")
    d_sae, d_in = enc.shape
    want = {"pre_bias": (d_in,), "latent_bias": (d_sae,), "decoder.weight": (d_in, d_sae)}
    for key, shape in want.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            raise _shape_error(path, key, tuple(state_dict[key].shape), shape)


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format, legacy pickle


def torch_load_state_dict(path: Path) -> Any:
    """``torch.load`` (tensors only) with one-line errors: empty, foreign, truncated files."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror})") from None
    if not head:
        raise UserError(f"{path} is empty (0 bytes); expected a torch.save state dict")
    if not head.startswith(_TORCH_MAGIC):
        raise UserError(
            f"{path} is not a torch.save file (it starts with {head[:12]!r}); expected an "
            "OpenAI sparse_autoencoder state dict (.pt)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable / foreign files
        raise UserError(
            f"cannot read {path} as a torch state dict, truncated or corrupt? ({first_line(exc)})"
        ) from None
