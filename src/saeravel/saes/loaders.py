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

import difflib
import json
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from saeravel.errors import UserError, choose
from saeravel.hub import hub_offline, hub_offline_mode
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, CustomSAE, SAEIdentity, resid_layer_of_hook
from saeravel.wandb_auth import has_wandb_credentials, wandb_host

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


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` of an exception, cut to ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of a config value (unknown objects become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# what each required (``???``) SAE field is, for the error when it is not given
_FIELD_HINTS = {
    "path": "a saved sae_lens folder or an OpenAI sparse_autoencoder .pt file",
    "_target_": "the import path of a class or factory, e.g. sae.object._target_=mypkg.saes.MySAE",
    "hook_name": "the hook it reads, e.g. blocks.5.hook_resid_post",
    "d_in": "its input width, the model's d_model",
    "release": "an sae_lens release name or regex",
}


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """The ``???`` keys under ``node``, as paths relative to it (``object._target_``)."""
    from omegaconf import DictConfig, OmegaConf

    out = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            out.append(f"{prefix}{key}")
        elif isinstance(value := node[key], DictConfig):
            out += _missing_keys(value, f"{prefix}{key}.")
    return out


def build_sae_source(cfg: Any) -> Any:
    """``saeravel.errors.instantiate(cfg.sae)`` with one-line errors: a required field not given
    (``???``) is named by its path with what it should be, a source constructor's
    :class:`UserError` is itself (``instantiate`` unwraps it), any other failure one line."""
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    from saeravel.errors import instantiate

    missing = sorted(_missing_keys(cfg))
    if missing:
        family = cfg.get("family", "?") if not OmegaConf.is_missing(cfg, "family") else "?"
        needs = "; ".join(
            f"sae.{k} ({_FIELD_HINTS.get(k.rsplit('.', 1)[-1], 'required')})" for k in missing
        )
        raise UserError(f"SAE {family} needs {needs}")
    try:
        return instantiate(cfg)
    except InstantiationException as exc:
        raise UserError(
            f"SAE {cfg.get('family', '?')}: {_first_line(exc.__cause__ or exc, limit=300)}"
        ) from exc


def check_known_width(source: Any, model_name: str, d_model: int) -> None:
    """Before the model loads: an SAE whose input width is already known (a local file's
    header, a custom SAE's ``d_in``) must match the configured ``model.d_model``."""
    known = getattr(source, "known_d_in", None)
    d_in = known() if callable(known) else None
    if d_in is not None and d_model and int(d_in) != int(d_model):
        where = f" ({source.path})" if getattr(source, "path", None) else ""
        raise UserError(
            f"SAE {source.family}{where} has d_in={d_in} but model {model_name} has "
            f"d_model={d_model}; pick an SAE trained on {model_name}"
        )


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
        with hub_offline_mode(hub_offline()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_KWARGS_WARNING)
            return SaeLensSAE.from_pretrained(release, sae_id, device=device)
    except (OSError, HfHubHTTPError) as exc:
        if _looks_offline(exc):
            from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

            folder = get_repo_id_and_folder_name(release, sae_id)[1]
            files = " ".join(f"{folder}/{f}" for f in ("cfg.json", "sae_weights.safetensors"))
            raise UserError(
                f"sae_lens SAE {release} / {sae_id} is not in the local Hugging Face cache and "
                f"the hub cannot be reached; on a machine with a network run `python -m "
                f"saeravel.prefetch` with this job's overrides (or `hf download {repo_id} "
                f"{files}`), then set HF_HUB_OFFLINE=1"
            ) from None
        raise UserError(f"could not load sae_lens SAE {release} / {sae_id}: {exc}") from exc


def directory_neuronpedia_id(release: str, sae_id: str) -> str | None:
    """The Neuronpedia id sae_lens' pretrained directory records for (release, id), if any."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    ids = getattr(lookup, "neuronpedia_id", None) or {}
    found = ids.get(sae_id)
    return str(found) if found else None


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
        "model_from_pretrained_kwargs": _jsonable(kwargs or {}),
        **{key: _jsonable(meta.get(key)) for key in keep},
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
        self.resolve()  # a layer the family lacks, an unknown id: before any model loads

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

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Its files in the release's Hugging Face repo: sae_lens' own layout (cfg.json,
        weights, optional sparsity) file by file; other layouts by one load through sae_lens,
        which caches what it reads. ``verify`` loads it offline."""
        from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        from saeravel.offline import Need, hub_cache, hub_endpoint, hub_offline_mode, repo_cache

        release, sae_id = self.resolve()
        directory = get_pretrained_saes_directory()
        if release not in directory or sae_id not in directory[release].saes_map:
            raise UserError(f"sae_lens has no SAE {sae_id!r} in release {release!r}")
        lookup = directory[release]
        repo, path = lookup.repo_id, lookup.saes_map[sae_id]
        native = lookup.conversion_func in (None, "sae_lens")
        needed = [f"{path}/{SAE_CFG_FILENAME}", f"{path}/{SAE_WEIGHTS_FILENAME}"]
        optional = f"{path}/{SPARSITY_FILENAME}"

        def load() -> None:
            load_pretrained_sae_lens(release, sae_id)

        def check() -> list[Path]:
            from huggingface_hub import try_to_load_from_cache

            if not native:
                with hub_offline_mode():
                    load()
                return [repo_cache(repo)]
            paths = []
            for filename in [*needed, optional]:
                got = try_to_load_from_cache(repo, filename)
                if isinstance(got, str):
                    paths.append(Path(got))
                elif filename != optional:
                    raise UserError(f"{filename} of {repo} is not in the Hugging Face cache")
            return paths

        def fetch() -> list[Path]:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            if not native:
                load()
                return [repo_cache(repo)]
            paths = [Path(hf_hub_download(repo, f)) for f in needed]
            try:
                paths.append(Path(hf_hub_download(repo, optional)))
            except EntryNotFoundError:
                pass  # not every SAE has a sparsity file; sae_lens does without it
            return paths

        def verify() -> None:
            with hub_offline_mode():
                load()

        endpoint = hub_endpoint()
        where = f"{path}/" if native else f"{path} (via sae_lens)"
        return [
            Need(
                "sae_lens", f"{release} {sae_id}", f"{endpoint}/{repo} {where}",
                str(hub_cache()), check, fetch, verify, hosts=(endpoint,),
            )
        ]  # fmt: skip

    def required_model_kwargs(self) -> dict[str, Any]:
        """The SAE's ``cfg.metadata.model_from_pretrained_kwargs`` ({} = TL defaults)."""
        return _sae_lens_model_kwargs(self._sae_lens())

    def load(self, model: LoadedModel) -> SAE:
        """The SAE in the common interface (the sae_lens copy is then released)."""
        release, sae_id = self.resolve()
        identity = SAEIdentity(
            family=self.family,
            release=release,
            sae_id=sae_id,
            extra={"layer": self.layer},
            neuronpedia_id=directory_neuronpedia_id(release, sae_id),
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
        self.run_id()  # a layer without a run: before anything else

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: transformer_lens' default processing, as in Apollo's training. Checks first
        (before the model loads) that the run is cached or WANDB_API_KEY is set. Not in the
        constructor: ``python -m saeravel.prefetch`` builds sources to list what is missing."""
        if self._cached(self.run_dir()) is None:
            self._check_key()
        return {}

    def _check_key(self) -> None:
        if has_wandb_credentials():
            return
        alt = _NO_KEY_ROUTES.get(self.family, "gpt2-small-res_sle-ajt")
        raise UserError(
            f"{self.family}: the SAE is read from wandb run {self.project}/{self.run_id()}, "
            f"which needs WANDB_API_KEY (or `wandb login`) even for public runs; set it, or use the same SAEs "
            f"through sae_lens without a key: sae=sae_lens sae.release={alt} "
            "(gpt2-small-res_sle-ajt = e2e, gpt2-small-res_slefr-ajt = e2e+ds)"
        )

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
        try:
            ckpt = run_dir / str(json.loads(marker.read_text())["checkpoint"])
        except (ValueError, KeyError, TypeError, OSError):
            log.warning("unreadable download marker %s; downloading again", marker)
            return None
        return ckpt if ckpt.is_file() else None

    def cached_checkpoint(self) -> Path | None:
        """The run's latest checkpoint if it is in the cache (no network), else None."""
        return self._cached(self.run_dir())

    def offline_needs(self, ctx: Any) -> list[Any]:
        """The run's config and latest checkpoint in ``cache_dir/apollo/<run>`` (fetching
        needs WANDB_API_KEY; with it, the wandb host is probed first)."""
        from saeravel.offline import Need

        run_path = f"{self.project}/{self.run_id()}"
        dest = self.run_dir()

        def check() -> list[Path]:
            ckpt = self.cached_checkpoint()
            if ckpt is None:
                hint = "" if has_wandb_credentials() else "; fetching it needs WANDB_API_KEY"
                raise UserError(f"not in the cache ({dest}){hint}")
            return [ckpt.parent]

        hosts = ()
        if has_wandb_credentials():  # without a key, fetch fails at once with the route
            hosts = (wandb_host(),)  # the host the installed client talks to
        return [
            Need(
                "apollo", run_path, f"wandb {run_path}", str(dest), check,
                lambda: [self.fetch().parent], hosts=hosts,
            )
        ]  # fmt: skip

    def fetch(self) -> Path:
        """Path of the latest checkpoint, downloading the run's files on first use."""
        run_dir = self.run_dir()
        cached = self._cached(run_dir)
        if cached is not None:
            return cached
        run_path = f"{self.project}/{self.run_id()}"
        self._check_key()
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
        try:
            state_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated / foreign files
            raise UserError(
                f"cannot read Apollo checkpoint {ckpt} ({_first_line(exc)}); delete "
                f"{ckpt.parent} to download it again"
            ) from exc
        if not isinstance(state_dict, Mapping):
            raise UserError(f"Apollo checkpoint {ckpt} holds a {type(state_dict).__name__}")
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
        raise UserError(f"{cfg_path} is not valid JSON ({_first_line(exc)})") from None
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
            f"{weights_path} is not a complete safetensors file ({_first_line(exc)})"
        ) from None
    d_in, d_sae = dims["d_in"], dims["d_sae"]
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    want.update({k: (d_sae,) for k in _SAE_LENS_EXTRA_KEYS.get(arch, ())})
    missing = [k for k in want if k not in shapes]
    if missing:
        raise UserError(
            f"{weights_path} lacks {', '.join(missing)} (a {arch} sae_lens SAE needs "
            f"{', '.join(want)}); it has: {_few(sorted(shapes)) or 'no tensors'}"
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
            f"it has: {_few(sorted(map(str, state_dict))) or 'no keys'})"
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


def _torch_load(path: Path) -> Any:
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
            f"cannot read {path} as a torch state dict, truncated or corrupt? ({_first_line(exc)})"
        ) from None


class LocalSource:
    """An SAE on disk: a saved sae_lens directory or an OpenAI ``sparse_autoencoder`` file.

    ``format=auto``: a directory is read as sae_lens (``cfg.json`` +
    ``sae_weights.safetensors``, as written by ``save_model``), a file as an OpenAI state dict.
    OpenAI files do not record their hook, so ``hook_name`` is required for them.

    The file's own problems (missing, unreadable, truncated, wrong keys or shapes) are
    checked first (:meth:`check`, the first step of :meth:`required_model_kwargs`, which the
    pipeline calls before the model loads), before the weight processing the SAE needs and
    long before any model/SAE compatibility check.
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
        if not str(path or "").strip():
            raise UserError("sae.path is empty; give a saved sae_lens folder or an OpenAI .pt")
        self.path = Path(path).expanduser()
        self.format = format
        self.hook_name = hook_name
        self._sae: Any = None
        self._state_dict: Any = None
        self._checked = False
        self._d_in: int | None = None

    def resolved_format(self) -> str:
        if not self.path.exists():
            raise UserError(f"local SAE path {self.path} does not exist")
        if self.format != "auto":
            return self.format
        return "sae_lens" if self.path.is_dir() else "openai"

    def check(self) -> None:
        """The file's own problems, as one-line :class:`UserError` s (reads OpenAI files and
        sae_lens headers once; the weights are kept for :meth:`load`). The first step of
        :meth:`required_model_kwargs` and :meth:`load`; not run by the constructor, so that
        ``python -m saeravel.prefetch`` can list a job whose file is not on this machine."""
        if self._checked:
            return
        fmt = self.resolved_format()
        if fmt == "sae_lens":
            if not self.path.is_dir():
                hint = (
                    f"; give its folder, {self.path.parent}"
                    if self.path.name in ("cfg.json", "sae_weights.safetensors")
                    else ""
                )
                raise UserError(
                    f"{self.path} is a file; a saved sae_lens SAE is a folder holding cfg.json "
                    f"and sae_weights.safetensors{hint}"
                )
            self._d_in = int(check_sae_lens_folder(self.path)["d_in"])
            self._checked = True
            return
        if self.path.is_dir():
            raise UserError(
                f"{self.path} is a folder; format=openai needs an OpenAI sparse_autoencoder .pt "
                "file (a saved sae_lens SAE is read with format=sae_lens or auto)"
            )
        if self.path.suffix == ".safetensors" or self.path.name == "cfg.json":
            raise UserError(
                f"{self.path} looks like part of a saved sae_lens SAE; set sae.path to its "
                f"folder {self.path.parent}"
            )
        state_dict = _torch_load(self.path)
        check_openai_state_dict(self.path, state_dict)
        if not self.hook_name:
            raise UserError(
                f"{self.path}: OpenAI SAE files do not record their hook; set sae.hook_name "
                "(e.g. sae.hook_name=blocks.5.hook_resid_post)"
            )
        self._state_dict = state_dict
        self._d_in = int(state_dict["encoder.weight"].shape[1])
        self._checked = True

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing to fetch: it is read from disk at run time."""
        from saeravel.offline import Skip

        where = "" if self.path.exists() else " (it does not exist here)"
        return [Skip(f"sae={self.family}", f"read from disk at run time: {self.path}{where}")]

    def known_d_in(self) -> int | None:
        """The SAE's input width from its file (after :meth:`check`), else None."""
        return self._d_in

    def _sae_lens(self) -> Any:
        if self._sae is None:
            from sae_lens import SAE as SaeLensSAE

            log.info("loading sae_lens SAE from %s", self.path)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_KWARGS_WARNING)
                    self._sae = SaeLensSAE.load_from_disk(self.path, device="cpu")
            except Exception as exc:  # anything the header checks above did not catch
                raise UserError(
                    f"sae_lens cannot load the SAE in {self.path} ({_first_line(exc)})"
                ) from None
        return self._sae

    def required_model_kwargs(self) -> dict[str, Any]:
        """sae_lens: the saved ``model_from_pretrained_kwargs``. OpenAI: no centring of the
        writing weights (OpenAI's README loads GPT-2 with ``center_writing_weights=False``).
        The file's own problems are reported first (:meth:`check`)."""
        self.check()
        if self.resolved_format() == "sae_lens":
            return _sae_lens_model_kwargs(self._sae_lens())
        return {"center_writing_weights": False}

    def load(self, model: LoadedModel) -> SAE:
        """The SAE in the common interface."""
        self.check()
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
        state_dict = self._state_dict if self._state_dict is not None else _torch_load(self.path)
        check_openai_state_dict(self.path, state_dict)
        self._state_dict, self._checked = None, False
        assert self.hook_name  # checked in check()
        return from_openai_state_dict(state_dict, self.hook_name, identity)


# ============================================================================ custom, none


def import_object(path: str) -> Any:
    """The object at dotted ``path`` (``pkg.module.Class``), or a one-line :class:`UserError`
    naming the part that is missing (Hydra's ``get_object`` logs several lines instead)."""
    import importlib

    parts = path.split(".")
    if not all(p.isidentifier() for p in parts):
        raise UserError(f"custom SAE target {path!r} is not a dotted import path")
    module, error = None, None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not name.startswith(exc.name):
                error = exc  # the module exists but itself imports something missing
                break
            continue
        except Exception as exc:  # the user's module raised on import
            error = exc
            break
        obj = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise UserError(
                    f"custom SAE target {path!r} cannot be imported: {name} has no {attr!r}"
                )
            obj = getattr(obj, attr)
        return obj
    if error is not None:
        raise UserError(
            f"custom SAE target {path!r} cannot be imported ({_first_line(error)})"
        ) from None
    raise UserError(f"custom SAE target {path!r} cannot be imported: no module named {parts[0]!r}")


class CustomSource:
    """Any object with ``encode``/``decode``, built by Hydra's own ``_target_`` from the
    ``sae.object`` node (``sae.object._target_=mypkg.saes.MySAE +sae.object.d_sae=4096``; nested
    ``_target_``s, ``_args_`` and ``_partial_`` work as anywhere in Hydra) and wrapped in
    :class:`CustomSAE`.

    The target is imported in the constructor; the object is built and probed with a zero
    input of width ``d_in`` by :meth:`required_model_kwargs`, i.e. before the model loads.
    (``sae=custom``'s schema sets ``_recursive_: false``, so Hydra hands the node to this source
    instead of building the user's object before these checks.)
    """

    def __init__(
        self,
        family: str,
        layer: int,
        object: Mapping[str, Any] | None = None,  # noqa: A002 (the config key)
        hook_name: str = "",
        d_in: int = 0,
    ) -> None:
        self.family = family
        self.layer = int(layer)
        self.object = dict(_plain(object) or {})
        self.target = str(self.object.get("_target_") or "").strip()
        self.kwargs = {k: v for k, v in self.object.items() if k != "_target_"}
        self.hook_name = hook_name
        self.d_in = int(d_in)
        if not self.target:
            raise UserError(
                "sae=custom needs sae.object._target_, the import path of a class or factory "
                "(e.g. sae.object._target_=mypkg.saes.MySAE)"
            )
        self.object["_target_"] = self.target
        if self.d_in < 1:
            raise UserError(f"sae.d_in={self.d_in}: the custom SAE's input width must be >= 1")
        factory = import_object(self.target)  # one line naming what is missing
        if not callable(factory):
            raise UserError(f"custom SAE target {self.target!r} is a {type(factory).__name__}")
        self._sae: CustomSAE | None = None

    def _build(self) -> CustomSAE:
        from hydra.errors import InstantiationException

        from saeravel.errors import instantiate

        if self._sae is not None:
            return self._sae
        try:
            obj = instantiate(self.object)
        except InstantiationException as exc:  # the user's constructor raised
            raise UserError(
                f"custom SAE {self.target}(**{self.kwargs}) raised "
                f"{_first_line(exc.__cause__ or exc)}"
            ) from None
        for name in ("encode", "decode"):
            if not callable(getattr(obj, name, None)):
                raise UserError(
                    f"custom SAE {self.target} built a {type(obj).__name__}, which has no "
                    f"callable {name}(); it needs encode(x) -> latents and decode(latents) -> x"
                )
        with torch.no_grad():
            try:
                f = obj.encode(torch.zeros(1, self.d_in))
                x_hat = obj.decode(f)
            except Exception as exc:
                raise UserError(
                    f"custom SAE {self.target}: encode/decode of a zero input of width "
                    f"sae.d_in={self.d_in} failed ({_first_line(exc)}); is d_in its input width?"
                ) from None
        for name, out in (("encode", f), ("decode", x_hat)):
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(
                    f"custom SAE {self.target}: {name} of a [1, {self.d_in}] input returned "
                    f"{got}, expected a [1, width] tensor"
                )
        if x_hat.shape[-1] != self.d_in:
            raise UserError(
                f"custom SAE {self.target}: decode returns width {x_hat.shape[-1]} but "
                f"sae.d_in={self.d_in}"
            )
        identity = SAEIdentity(
            family=self.family, extra={"target": self.target, "kwargs": _jsonable(self.kwargs)}
        )
        self._sae = CustomSAE(obj, d_in=self.d_in, hook_name=self.hook_name, identity=identity)
        return self._sae

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing to fetch: user code builds it."""
        from saeravel.offline import Skip

        why = f"built by user code ({self.target}), nothing to download"
        return [Skip(f"sae={self.family}", why)]

    def known_d_in(self) -> int:
        """``sae.d_in`` (probed against the object by :meth:`required_model_kwargs`)."""
        return self.d_in

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: nothing is known about a custom SAE's training (TL defaults). Builds and
        probes the object first, so its errors come before the model loads."""
        self._build()
        return {}

    def load(self, model: LoadedModel) -> SAE:
        """Build the user's object (once) and adapt it."""
        sae = self._build()
        self._sae = None
        return sae


class NoSource:
    """No SAE (for methods that need none)."""

    def __init__(self, family: str = "none", layer: int = 0) -> None:
        self.family = family
        self.layer = int(layer)

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
