"""``sae=sae_lens`` and the catalogue families (``jbloom``, ``openai_v5_32k``,
``openai_v5_128k``): a pretrained SAE chosen in sae_lens' pretrained directory.

Without ``sae.sae_id`` the id is the one whose hook is the job's ``site`` of block ``layer``
(:func:`saeravel.hooks.hook_site`: ``blocks.6.hook_resid_pre`` is ``resid_post`` of block 5),
read from the id (``blocks.5.hook_mlp_out``) or the release's ``hook_name`` override; a
catalogue family's ``release`` is a regex over its releases of every site (OpenAI's v5
``resid-post``, ``resid-mid``, ``mlp-out`` and ``attn-out``)."""

from __future__ import annotations

import difflib
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saeravel.errors import UserError
from saeravel.hooks import block_hook_prefix, hook_site
from saeravel.hub import hub_offline, hub_offline_mode
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.formats import KWARGS_WARNING, from_sae_lens, sae_lens_model_kwargs
from saeravel.saes.source import SAESource
from saeravel.saes.util import MAX_LISTED, few, missing_layer, site_extra, site_name

log = logging.getLogger(__name__)


def hook_of_sae_id(sae_id: str, release_hook: str | None = None) -> str | None:
    """The hook an sae_lens id reads, when the id names it (``blocks.6.hook_resid_pre``,
    ``blocks.5.hook_mlp_out``, or that plus a ``_suffix``), else the release-wide
    ``hook_name`` override, else None."""
    return block_hook_prefix(sae_id) or release_hook


def _id_hooks(lookup: Any) -> dict[str, str | None]:
    """Each id of a release (a directory entry) -> the hook it reads, if known."""
    overrides = lookup.config_overrides or {}
    release_hook = overrides.get("hook_name") if isinstance(overrides, Mapping) else None
    return {i: hook_of_sae_id(i, release_hook) for i in lookup.saes_map}


def _directory(directory: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``directory``, or sae_lens' pretrained directory (a YAML file shipped with sae_lens)."""
    if directory is not None:
        return directory
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _releases(release: str, directory: Mapping[str, Any]) -> list[str]:
    """The releases ``release`` (a regex) matches whole; [] for an invalid regex."""
    try:
        release_re = re.compile(release)
    except re.error:
        return []
    return [r for r in directory if release_re.fullmatch(r)]


def release_sites(release: str, directory: Mapping[str, Any] | None = None) -> dict[str, list[int]]:
    """Site -> the layers at which the sae_lens releases ``release`` matches (a name or a
    regex) have an SAE whose hook is known and is that site (:func:`hook_site`); {} when no
    release matches or none of their ids names its hook."""
    directory = _directory(directory)
    found: dict[str, set[int]] = {}
    for rel in _releases(release, directory):
        for h in _id_hooks(directory[rel]).values():
            at = hook_site(h) if h is not None else None
            if at is not None:
                found.setdefault(at[1], set()).add(at[0])
    return {site: sorted(layers) for site, layers in found.items()}


def release_layers(
    release: str, directory: Mapping[str, Any] | None = None, site: str = "resid_post"
) -> list[int]:
    """The layers at which the releases ``release`` matches have an SAE at ``site``."""
    return release_sites(release, directory).get(site, [])


def resolve_sae_lens_id(
    release: str,
    sae_id: str | None,
    layer: int,
    directory: Mapping[str, Any] | None = None,
    site: str = "resid_post",
) -> tuple[str, str]:
    """The one (release, id) pair of sae_lens' pretrained directory matching the regexes.

    ``release`` and ``sae_id`` are matched with :func:`re.fullmatch`. ``sae_id=None`` selects
    the ids whose hook is ``site`` of block ``layer`` (ids that do not name their hook cannot
    be selected this way). ``directory`` defaults to sae_lens' own (a YAML file shipped with
    the package: no network). Zero or several matches raise a :class:`UserError`.
    """
    directory = _directory(directory)
    try:
        release_re = re.compile(release)
        id_re = re.compile(sae_id) if sae_id is not None else None
    except re.error as exc:
        raise UserError(
            f"sae_lens: invalid regex ({exc}) in release={release!r} or sae_id={sae_id!r}"
        ) from exc
    releases = [r for r in directory if release_re.fullmatch(r)]
    if not releases:
        close = difflib.get_close_matches(release, list(directory), n=MAX_LISTED, cutoff=0.5)
        hint = f"; close: {few(close)}" if close else ""
        raise UserError(f"no sae_lens release matches {release!r}{hint}")

    pairs: list[tuple[str, str]] = []
    unnamed: list[str] = []  # releases whose ids do not say which hook they read
    for rel in releases:
        lookup = directory[rel]
        ids = list(lookup.saes_map)
        if id_re is not None:
            pairs += [(rel, i) for i in ids if id_re.fullmatch(i)]
            continue
        hooks = _id_hooks(lookup)
        if all(h is None for h in hooks.values()):
            unnamed.append(rel)
        pairs += [
            (rel, i) for i, h in hooks.items() if h is not None and hook_site(h) == (layer, site)
        ]

    if len(pairs) == 1:
        return pairs[0]
    if pairs:
        listed = few([f"{r} {i}" for r, i in pairs])
        raise UserError(
            f"sae_lens: {len(pairs)} SAEs match release={release!r} sae_id={sae_id!r} at layer "
            f"{layer}; narrow sae.release / sae.sae_id to one of: {listed}"
        )
    where = f"{site} of block {layer}"
    if site == "resid_post":
        where = f"the residual after block {layer}"
    what = f"sae_id={sae_id!r}" if sae_id is not None else where
    some_ids = few([f"{r} {i}" for r in releases for i in directory[r].saes_map])
    hint = (
        f"; the ids of {few(unnamed)} do not name their hook, so set sae.sae_id"
        if unnamed and sae_id is None
        else ""
    )
    raise UserError(
        f"sae_lens: no SAE in release(s) {few(releases)} matches {what}{hint}; ids: {some_ids}"
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
            f"{few(list(directory[release].saes_map))}"
        )
    repo_id = directory[release].repo_id
    log.info("loading sae_lens SAE %s / %s (%s)", release, sae_id, repo_id)
    try:
        with hub_offline_mode(hub_offline()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=KWARGS_WARNING)
            return SaeLensSAE.from_pretrained(release, sae_id, device=device)
    except (OSError, HfHubHTTPError) as exc:
        if _looks_offline(exc):
            from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

            folder = get_repo_id_and_folder_name(release, sae_id)[1]
            files = " ".join(f"{folder}/{f}" for f in ("cfg.json", "sae_weights.safetensors"))
            if directory[release].conversion_func not in (None, "sae_lens"):  # other layouts
                files = f"--include '{folder}/*'"  # (Gemma Scope: params.npz)
            raise UserError(
                f"sae_lens SAE {release} / {sae_id} is not in the local Hugging Face cache and "
                f"the hub cannot be reached; on a machine with a network run `python -m "
                f"saeravel.prefetch` with this job's overrides (or `hf download {repo_id} "
                f"{files}`), then set HF_HUB_OFFLINE=1"
            ) from None
        raise UserError(f"could not load sae_lens SAE {release} / {sae_id}: {exc}") from exc


def release_model(release: str, directory: Mapping[str, Any] | None = None) -> str | None:
    """The model name sae_lens' pretrained directory gives ``release`` (``gpt2-small``: the
    transformer_lens name, which is also saeravel's ``model=`` option), None if unknown."""
    lookup = _directory(directory).get(release)
    model = getattr(lookup, "model", None)
    return str(model) if model else None


def directory_neuronpedia_id(release: str, sae_id: str) -> str | None:
    """The Neuronpedia id sae_lens' pretrained directory records for (release, id), if any."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    ids = getattr(lookup, "neuronpedia_id", None) or {}
    found = ids.get(sae_id)
    return str(found) if found else None


def hook_neuronpedia_id(release: str, hook_name: str) -> str | None:
    """The Neuronpedia id sae_lens' pretrained directory records for the SAE of ``release``
    that reads ``hook_name`` (one id of the release; None if none or several do)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None:
        return None
    ids = [i for i, hook in _id_hooks(lookup).items() if hook == hook_name]
    return directory_neuronpedia_id(release, ids[0]) if len(ids) == 1 else None


class SaeLensSource(SAESource):
    """A pretrained sae_lens SAE chosen in sae_lens' pretrained directory.

    ``release`` and ``sae_id`` are regexes resolved by :func:`resolve_sae_lens_id`; with
    ``sae_id=None`` the id is the one whose hook is ``site`` of block ``layer``. A catalogue
    family (``jbloom``, ``openai_v5_*``) names its release(s) and nothing else: a site or a
    layer they lack is then a one-line error listing theirs. The SAE is loaded once (by
    :meth:`required_model_kwargs`, which needs its metadata) and cached on the object.
    """

    def __init__(
        self,
        family: str,
        layer: int,
        release: str,
        sae_id: str | None = None,
        site: str = "resid_post",
    ) -> None:
        self.family = family
        self.layer = int(layer)
        self.release = release
        self.sae_id = sae_id
        self.site = site_name(site)
        self._resolved: tuple[str, str] | None = None
        self._sae: Any = None
        self.resolve()  # a layer the family lacks, an unknown id: before any model loads

    def resolve(self) -> tuple[str, str]:
        """(release, sae_id) for this layer, without loading anything."""
        if self._resolved is None:
            if self.sae_id is None:
                sites = release_sites(self.release)
                if sites and self.site not in sites:
                    raise UserError(
                        f"family {self.family} has no SAE at site={self.site}; sites: "
                        f"{', '.join(sorted(sites))}"
                    )
                layers = sites.get(self.site, [])
                if layers and self.layer not in layers:
                    raise missing_layer(self.family, self.layer, layers, self.site)
            self._resolved = resolve_sae_lens_id(
                self.release, self.sae_id, self.layer, site=self.site
            )
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
        return sae_lens_model_kwargs(self._sae_lens())

    def load(self, model: LoadedModel) -> SAE:
        """The SAE in the common interface (the sae_lens copy is then released)."""
        release, sae_id = self.resolve()
        identity = SAEIdentity(
            family=self.family,
            release=release,
            sae_id=sae_id,
            extra={"layer": self.layer, **site_extra(self.site)},
            neuronpedia_id=directory_neuronpedia_id(release, sae_id),
        )
        sae = from_sae_lens(self._sae_lens(), identity)
        self._sae = None
        return sae
