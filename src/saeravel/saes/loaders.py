"""SAE sources: what ``conf/sae/*.yaml`` instantiates.

Each source is built from its config (the schema fields are its keyword arguments), then
asked for :meth:`required_model_kwargs` *before* the model is loaded (the weight processing
the SAE was trained on) and finally :meth:`load`-ed into the one interface,
:class:`~saeravel.saes.base.SAE`. The conversions are explicit, so every family's maths can
be checked against its reference implementation (see ``tests/test_sae_loaders.py``).

sae_lens and wandb are imported lazily: importing sae_lens takes seconds, and Hydra imports
this module for every job, including those that need no SAE.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saeravel.errors import UserError, choose
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, CustomSAE, SAEIdentity, resid_layer_of_hook

log = logging.getLogger(__name__)

# resid_layer_of_hook needs the model depth; before the model is loaded any depth will do
# (the pipeline checks the hook against the real model after loading).
_ANY_DEPTH = 10**6
_MAX_LISTED = 8
# an sae_lens id that names its hook, possibly with a suffix: "blocks.8.hook_resid_pre_768",
# "blocks.12.hook_resid_post__trainer_0"
_ID_HOOK_RE = re.compile(r"(blocks\.\d+\.hook_resid_(?:pre|post))(?:$|_)")
_CHECKPOINT_RE = re.compile(r"samples_(\d+)\.pt")
# sae_lens warns on construction when the SAE has model_from_pretrained_kwargs; its advice
# (from_pretrained_no_processing) does not apply here, required_model_kwargs handles them
_KWARGS_WARNING = r"\s*This SAE has non-empty model_from_pretrained_kwargs"
_NO_KEY_ROUTES = {
    "apollo_e2e": "gpt2-small-res_sle-ajt",
    "apollo_e2e_ds": "gpt2-small-res_slefr-ajt",
}


def _few(items: list[str]) -> str:
    """Comma-separated, at most ``_MAX_LISTED`` items, then how many more."""
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _plain(value: Any) -> Any:
    """``value`` as plain Python containers (Hydra passes DictConfig for nested fields)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _layer_map(mapping: Mapping[Any, Any] | None) -> dict[int, str]:
    return {int(k): str(v) for k, v in (_plain(mapping) or {}).items()}


def _missing_layer(family: str, layer: int, available: Mapping[int, Any]) -> UserError:
    layers = ", ".join(str(L) for L in sorted(available))
    return UserError(f"family {family} has no SAE for layer {layer}; layers: {layers}")


def _jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of a config value (unknown objects become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ============================================================================ sae_lens


def hook_of_sae_id(sae_id: str, release_hook: str | None = None) -> str | None:
    """The residual hook an sae_lens id reads, when the id names it (``blocks.6.hook_resid_pre``
    or that plus a ``_suffix``), else the release-wide ``hook_name`` override, else None."""
    m = _ID_HOOK_RE.match(sae_id)
    if m is not None:
        return m.group(1)
    return release_hook


def resolve_sae_lens_id(
    release: str,
    sae_id: str | None,
    layer: int,
    directory: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """The one (release, id) pair of sae_lens' pretrained directory matching the regexes.

    ``release`` and ``sae_id`` are matched with :func:`re.fullmatch`. ``sae_id=None`` selects
    the ids whose hook is the residual after block ``layer`` (ids that do not name their hook
    cannot be selected this way). ``directory`` defaults to sae_lens' own (a YAML file shipped
    with the package: no network). Zero or several matches raise a :class:`UserError`.
    """
    if directory is None:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
    try:
        release_re = re.compile(release)
        id_re = re.compile(sae_id) if sae_id is not None else None
    except re.error as exc:
        raise UserError(
            f"sae_lens: invalid regex ({exc}) in release={release!r} or sae_id={sae_id!r}"
        ) from exc
    releases = [r for r in directory if release_re.fullmatch(r)]
    if not releases:
        close = difflib.get_close_matches(release, list(directory), n=_MAX_LISTED, cutoff=0.5)
        hint = f"; close: {_few(close)}" if close else ""
        raise UserError(f"no sae_lens release matches {release!r}{hint}")

    pairs: list[tuple[str, str]] = []
    unnamed: list[str] = []  # releases whose ids do not say which hook they read
    for rel in releases:
        lookup = directory[rel]
        ids = list(lookup.saes_map)
        if id_re is not None:
            pairs += [(rel, i) for i in ids if id_re.fullmatch(i)]
            continue
        overrides = lookup.config_overrides or {}
        release_hook = overrides.get("hook_name") if isinstance(overrides, Mapping) else None
        hooks = {i: hook_of_sae_id(i, release_hook) for i in ids}
        if all(h is None for h in hooks.values()):
            unnamed.append(rel)
        pairs += [
            (rel, i)
            for i, h in hooks.items()
            if h is not None and resid_layer_of_hook(h, _ANY_DEPTH) == layer
        ]

    if len(pairs) == 1:
        return pairs[0]
    if pairs:
        listed = _few([f"{r} {i}" for r, i in pairs])
        raise UserError(
            f"sae_lens: {len(pairs)} SAEs match release={release!r} sae_id={sae_id!r} at layer "
            f"{layer}; narrow sae.release / sae.sae_id to one of: {listed}"
        )
    what = f"sae_id={sae_id!r}" if sae_id is not None else f"the residual after block {layer}"
    some_ids = _few([f"{r} {i}" for r in releases for i in directory[r].saes_map])
    hint = (
        f"; the ids of {_few(unnamed)} do not name their hook, so set sae.sae_id"
        if unnamed and sae_id is None
        else ""
    )
    raise UserError(
        f"sae_lens: no SAE in release(s) {_few(releases)} matches {what}{hint}; ids: {some_ids}"
    )


@contextlib.contextmanager
def _hub_offline_from_env() -> Iterator[None]:
    """Honour ``HF_HUB_OFFLINE=1`` even when it was set after huggingface_hub was imported
    (the hub library reads it once, at import; without it an offline load retries for ~30 s)."""
    import huggingface_hub.constants as hub_constants

    wanted = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    before = hub_constants.HF_HUB_OFFLINE
    if wanted and not before:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def _looks_offline(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
        return True
    text = str(exc).lower()
    return any(m in text for m in ("offline", "connection", "local cache", "resolve host"))


def load_pretrained_sae_lens(release: str, sae_id: str, device: str = "cpu") -> Any:
    """``sae_lens.SAE.from_pretrained`` with one-line errors (unknown id, not cached offline)."""
    from huggingface_hub.errors import HfHubHTTPError
    from sae_lens import SAE as SaeLensSAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise UserError(f"sae_lens has no release {release!r} (see its pretrained_saes.yaml)")
    if sae_id not in directory[release].saes_map:
        raise UserError(
            f"sae_lens release {release} has no SAE {sae_id!r}; ids: "
            f"{_few(list(directory[release].saes_map))}"
        )
    repo_id = directory[release].repo_id
    log.info("loading sae_lens SAE %s / %s (%s)", release, sae_id, repo_id)
    try:
        with _hub_offline_from_env(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_KWARGS_WARNING)
            return SaeLensSAE.from_pretrained(release, sae_id, device=device)
    except (OSError, HfHubHTTPError) as exc:
        if _looks_offline(exc):
            raise UserError(
                f"sae_lens SAE {release} / {sae_id} is not in the local Hugging Face cache and "
                f"the hub cannot be reached; on a machine with a network run the same job once "
                f"(or `huggingface-cli download {repo_id}`), then set HF_HUB_OFFLINE=1"
            ) from exc
        raise UserError(f"could not load sae_lens SAE {release} / {sae_id}: {exc}") from exc


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

    kwargs = meta.model_from_pretrained_kwargs
    keep = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path")
    cfg_dict = {
        "source": "sae_lens",
        "architecture": arch,
        "sae_lens_normalize_activations": cfg.normalize_activations,
        "sae_lens_version": meta.sae_lens_version,
        "model_from_pretrained_kwargs": _jsonable(kwargs or {}),
        **{key: _jsonable(meta.get(key)) for key in keep},
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


def _sae_lens_model_kwargs(sae_lens_sae: Any) -> dict[str, Any]:
    kwargs = sae_lens_sae.cfg.metadata.model_from_pretrained_kwargs
    return dict(_plain(kwargs) or {})


class SaeLensSource:
    """A pretrained sae_lens SAE, from a layer->id catalogue or regexes over sae_lens' directory.

    With ``sae_ids`` (a catalogue family such as ``jbloom``) the id is ``sae_ids[layer]``;
    without (``sae=sae_lens``), ``release`` and ``sae_id`` are regexes resolved by
    :func:`resolve_sae_lens_id`. The SAE is loaded once (by :meth:`required_model_kwargs`,
    which needs its metadata) and cached on the object.
    """

    def __init__(
        self,
        family: str,
        layer: int,
        release: str,
        sae_ids: Mapping[int, str] | None = None,
        sae_id: str | None = None,
    ) -> None:
        self.family = family
        self.layer = int(layer)
        self.release = release
        self.sae_ids = _layer_map(sae_ids)
        self.sae_id = sae_id
        self._resolved: tuple[str, str] | None = None
        self._sae: Any = None

    def resolve(self) -> tuple[str, str]:
        """(release, sae_id) for this layer, without loading anything."""
        if self._resolved is None:
            if self.sae_ids:
                if self.layer not in self.sae_ids:
                    raise _missing_layer(self.family, self.layer, self.sae_ids)
                if self.sae_id is not None:
                    log.warning(
                        "sae.sae_id=%s ignored: %s picks ids by layer", self.sae_id, self.family
                    )
                self._resolved = (self.release, self.sae_ids[self.layer])
            else:
                self._resolved = resolve_sae_lens_id(self.release, self.sae_id, self.layer)
        return self._resolved

    def _sae_lens(self) -> Any:
        if self._sae is None:
            self._sae = load_pretrained_sae_lens(*self.resolve())
        return self._sae

    def required_model_kwargs(self) -> dict[str, Any]:
        """The SAE's ``cfg.metadata.model_from_pretrained_kwargs`` ({} = TL defaults)."""
        return _sae_lens_model_kwargs(self._sae_lens())

    def load(self, model: LoadedModel) -> SAE:
        """The SAE in the common interface (the sae_lens copy is then released)."""
        release, sae_id = self.resolve()
        identity = SAEIdentity(
            family=self.family, release=release, sae_id=sae_id, extra={"layer": self.layer}
        )
        sae = from_sae_lens(self._sae_lens(), identity)
        self._sae = None
        return sae


# ============================================================================ Apollo (wandb)


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
            f"{', '.join(missing)}); it has SAEs at: {_few(present)}"
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


def _checkpoint_step(name: str) -> int | None:
    m = _CHECKPOINT_RE.fullmatch(Path(name).name)
    return int(m.group(1)) if m else None


class ApolloWandbSource:
    """Apollo Research e2e SAEs, downloaded from their public wandb runs (once, then cached).

    Files go to ``cache_dir/apollo/<run_id>/``: ``final_config.yaml`` and the latest
    checkpoint ``samples_<N>.pt``. Apollo trained on ``HookedTransformer.from_pretrained``
    activations with transformer_lens' default weight processing, so
    :meth:`required_model_kwargs` is ``{}`` (TL defaults).
    """

    MARKER = "saeravel_download.json"

    def __init__(
        self,
        family: str,
        layer: int,
        project: str = "sparsify/gpt2",
        run_ids: Mapping[int, str] | None = None,
        hooks: Mapping[int, str] | None = None,
        cache_dir: str = ".cache",
    ) -> None:
        self.family = family
        self.layer = int(layer)
        self.project = project
        self.run_ids = _layer_map(run_ids)
        self.hooks = _layer_map(hooks)
        self.cache_dir = Path(cache_dir)

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: transformer_lens' default processing, as in Apollo's training."""
        return {}

    def run_id(self) -> str:
        if self.layer not in self.run_ids:
            raise _missing_layer(self.family, self.layer, self.run_ids)
        return self.run_ids[self.layer]

    def run_dir(self) -> Path:
        return self.cache_dir / "apollo" / self.run_id()

    def _cached(self, run_dir: Path) -> Path | None:
        marker = run_dir / self.MARKER
        if not marker.is_file():
            return None
        ckpt = run_dir / json.loads(marker.read_text())["checkpoint"]
        return ckpt if ckpt.is_file() else None

    def fetch(self) -> Path:
        """Path of the latest checkpoint, downloading the run's files on first use."""
        run_dir = self.run_dir()
        cached = self._cached(run_dir)
        if cached is not None:
            return cached
        run_path = f"{self.project}/{self.run_id()}"
        if not os.environ.get("WANDB_API_KEY"):
            alt = _NO_KEY_ROUTES.get(self.family, "gpt2-small-res_sle-ajt")
            raise UserError(
                f"{self.family}: the SAE is read from wandb run {run_path}, which needs "
                f"WANDB_API_KEY even for public runs; set it, or use the same SAEs through "
                f"sae_lens without a key: sae=sae_lens sae.release={alt} "
                "(gpt2-small-res_sle-ajt = e2e, gpt2-small-res_slefr-ajt = e2e+ds)"
            )
        import wandb
        import wandb.errors

        log.info("downloading Apollo SAE %s to %s", run_path, run_dir)
        try:
            run = wandb.Api().run(run_path)
            files = list(run.files())
            config = [f for f in files if Path(f.name).name == "final_config.yaml"]
            ckpts = [f for f in files if _checkpoint_step(f.name) is not None]
            if not ckpts:
                raise UserError(f"wandb run {run_path} has no samples_<N>.pt checkpoint")
            latest = max(ckpts, key=lambda f: _checkpoint_step(f.name))
            run_dir.mkdir(parents=True, exist_ok=True)
            for f in config[:1] + [latest]:
                stale = run_dir / f.name
                if stale.exists():  # left by an interrupted download (no marker)
                    stale.unlink()
                handle = f.download(root=str(run_dir), replace=False)
                if handle is not None and hasattr(handle, "close"):
                    handle.close()
        except (wandb.errors.Error, OSError, ValueError) as exc:
            raise UserError(f"could not download wandb run {run_path}: {exc}") from exc
        (run_dir / self.MARKER).write_text(
            json.dumps(
                {"project": self.project, "run_id": self.run_id(), "checkpoint": latest.name}
            )
        )
        return run_dir / latest.name

    def load(self, model: LoadedModel) -> SAE:
        """The SAE for this layer from the latest checkpoint of its run."""
        ckpt = self.fetch()
        state_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
        hook_name = self.hooks.get(self.layer)
        if hook_name is None:
            prefixes = sorted({k.split(".")[0] for k in state_dict})
            if len(prefixes) != 1:
                raise UserError(
                    f"{self.family}: no hook given for layer {self.layer} and the checkpoint "
                    f"holds several SAEs ({_few(prefixes)}); set sae.hooks.{self.layer}"
                )
            hook_name = prefixes[0].replace("-", ".")
        extra: dict[str, Any] = {"layer": self.layer, "checkpoint": ckpt.name}
        config_path = ckpt.parent / "final_config.yaml"
        if config_path.is_file():
            import yaml

            config = yaml.safe_load(config_path.read_text()) or {}
            extra["tlens_model_name"] = config.get("tlens_model_name")
        identity = SAEIdentity(
            family=self.family,
            release=self.project,
            sae_id=self.run_id(),
            path=str(ckpt),
            extra=extra,
        )
        return from_apollo_state_dict(state_dict, hook_name, identity)


# ============================================================================ local files


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


class LocalSource:
    """An SAE on disk: a saved sae_lens directory or an OpenAI ``sparse_autoencoder`` file.

    ``format=auto``: a directory is read as sae_lens (``cfg.json`` +
    ``sae_weights.safetensors``, as written by ``save_model``), a file as an OpenAI state dict.
    OpenAI files do not record their hook, so ``hook_name`` is required for them.
    """

    FORMATS = ("auto", "sae_lens", "openai")

    def __init__(
        self,
        family: str,
        layer: int,
        path: str,
        format: str = "auto",
        hook_name: str | None = None,
    ) -> None:
        choose("local SAE format", format, self.FORMATS)
        self.family = family
        self.layer = int(layer)
        self.path = Path(path).expanduser()
        self.format = format
        self.hook_name = hook_name
        self._sae: Any = None

    def resolved_format(self) -> str:
        if not self.path.exists():
            raise UserError(f"local SAE path {self.path} does not exist")
        if self.format != "auto":
            return self.format
        return "sae_lens" if self.path.is_dir() else "openai"

    def _sae_lens(self) -> Any:
        if self._sae is None:
            from sae_lens import SAE as SaeLensSAE
            from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

            for fname in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
                if not (self.path / fname).is_file():
                    raise UserError(
                        f"{self.path} is not a saved sae_lens SAE (no {fname}; expected the "
                        "output of sae.save_model(dir))"
                    )
            log.info("loading sae_lens SAE from %s", self.path)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_KWARGS_WARNING)
                self._sae = SaeLensSAE.load_from_disk(self.path, device="cpu")
        return self._sae

    def required_model_kwargs(self) -> dict[str, Any]:
        """sae_lens: the saved ``model_from_pretrained_kwargs``. OpenAI: no centring of the
        writing weights (OpenAI's README loads GPT-2 with ``center_writing_weights=False``)."""
        if self.resolved_format() == "sae_lens":
            return _sae_lens_model_kwargs(self._sae_lens())
        return {"center_writing_weights": False}

    def load(self, model: LoadedModel) -> SAE:
        """The SAE in the common interface."""
        fmt = self.resolved_format()
        identity = SAEIdentity(
            family=self.family, path=str(self.path), extra={"format": fmt, "layer": self.layer}
        )
        if fmt == "sae_lens":
            sae_lens_sae = self._sae_lens()
            saved_hook = sae_lens_sae.cfg.metadata.hook_name
            if self.hook_name and saved_hook and self.hook_name != saved_hook:
                raise UserError(
                    f"{self.path} was trained on {saved_hook} but sae.hook_name={self.hook_name}"
                )
            if self.hook_name and not saved_hook:
                sae_lens_sae.cfg.metadata.hook_name = self.hook_name
            sae = from_sae_lens(sae_lens_sae, identity)
            self._sae = None
            return sae
        if not self.hook_name:
            raise UserError(
                f"{self.path}: OpenAI SAE files do not record their hook; set sae.hook_name "
                "(e.g. sae.hook_name=blocks.5.hook_resid_post)"
            )
        if not self.path.is_file():
            raise UserError(f"{self.path} is not a file (format=openai needs a .pt state dict)")
        try:
            state_dict = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for unreadable / foreign files
            raise UserError(f"cannot read {self.path} as a torch state dict: {exc}") from exc
        if not isinstance(state_dict, Mapping):
            raise UserError(f"{self.path} holds a {type(state_dict).__name__}, not a state dict")
        return from_openai_state_dict(state_dict, self.hook_name, identity)


# ============================================================================ custom, none


class CustomSource:
    """Any object with ``encode``/``decode``: ``target(**kwargs)``, wrapped in :class:`CustomSAE`."""

    def __init__(
        self,
        family: str,
        layer: int,
        target: str,
        kwargs: Mapping[str, Any] | None = None,
        hook_name: str = "",
        d_in: int = 0,
    ) -> None:
        self.family = family
        self.layer = int(layer)
        self.target = target
        self.kwargs = dict(_plain(kwargs) or {})
        self.hook_name = hook_name
        self.d_in = int(d_in)

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: nothing is known about a custom SAE's training (TL defaults)."""
        return {}

    def load(self, model: LoadedModel) -> SAE:
        """Build the user's object and adapt it."""
        from hydra.utils import get_object

        try:
            factory = get_object(self.target)
        except (ImportError, AttributeError, ValueError) as exc:
            raise UserError(f"custom SAE target {self.target!r} cannot be imported: {exc}") from exc
        try:
            obj = factory(**self.kwargs)
        except TypeError as exc:
            raise UserError(f"custom SAE {self.target}(**{self.kwargs}) failed: {exc}") from exc
        identity = SAEIdentity(
            family=self.family, extra={"target": self.target, "kwargs": _jsonable(self.kwargs)}
        )
        try:
            return CustomSAE(obj, d_in=self.d_in, hook_name=self.hook_name, identity=identity)
        except TypeError as exc:
            raise UserError(str(exc)) from exc


class NoSource:
    """No SAE (for methods that need none)."""

    def __init__(self, family: str = "none", layer: int = 0) -> None:
        self.family = family
        self.layer = int(layer)

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: TL defaults."""
        return {}

    def load(self, model: LoadedModel) -> SAE | None:
        """None."""
        return None
