"""``sae=gemma_scope``: Google DeepMind's Gemma Scope SAEs (JumpReLU) on Gemma-2-2B, via
sae_lens.

The release follows the job's ``site``: ``resid_post`` reads ``gemma-scope-2b-pt-res``,
``mlp_out`` reads ``gemma-scope-2b-pt-mlp`` (with ``sae.l0=canonical`` their ``-canonical``
twins). The id is ``layer_<layer>/width_<width>/average_l0_<l0>`` or, canonical,
``layer_<layer>/width_<width>/canonical``. The widths and L0s of a layer are those sae_lens'
pretrained directory lists for it (a width or L0 it lacks is a one-line error naming its
valid values, before anything loads); the weights are read by sae_lens' own Gemma Scope loader
(``params.npz`` in Google's repos).

Differences from sae_lens: none in the maths (sae_lens loads the SAE; saeravel's common
interface computes the same encoder and decoder). Gemma Scope's attention SAEs
(``gemma-scope-2b-pt-att``) read ``blocks.L.attn.hook_z``, the heads' outputs before ``W_O``
(width 2048), which is not a site saeravel intervenes at: ``site=attn_out`` is refused with that
reason, as is ``resid_mid`` (no Gemma Scope SAE reads it). The embedding SAEs (``embedding/``
ids) are not a layer's and are not offered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from saeravel.errors import UserError
from saeravel.saes.sae_lens import SaeLensSource, _directory
from saeravel.saes.util import missing_layer, site_name

# site -> the sae_lens release of every L0 (the canonical L0s: the same name + "-canonical")
RELEASES = {"resid_post": "gemma-scope-2b-pt-res", "mlp_out": "gemma-scope-2b-pt-mlp"}
CANONICAL = "canonical"
_ID_RE = re.compile(r"layer_(?P<layer>\d+)/width_(?P<width>\w+)/(?P<l0>canonical|average_l0_\d+)")
_REFUSED = {
    "attn_out": "Gemma Scope's attention SAEs (gemma-scope-2b-pt-att) read blocks.L.attn.hook_z "
    "(the heads' outputs before W_O), not hook_attn_out",
    "resid_mid": "Gemma Scope has no SAEs on the residual between attention and MLP",
}


def _width_key(width: str) -> float:
    """``16k`` < ``65k`` < ``1m`` (for listing)."""
    m = re.fullmatch(r"(\d+)([km]?)", width)
    if m is None:
        return float("inf")
    return int(m[1]) * {"": 1, "k": 10**3, "m": 10**6}[m[2]]


def catalogue(
    site: str, directory: Mapping[str, Any] | None = None
) -> dict[int, dict[str, list[str]]]:
    """Layer -> width -> its L0s (``canonical`` first, then the numbers ascending) of the
    Gemma Scope SAEs at ``site``, from sae_lens' pretrained directory."""
    directory = _directory(directory)
    base = RELEASES[site]
    found: dict[int, dict[str, set[str]]] = {}
    for release in (base, f"{base}-{CANONICAL}"):
        lookup = directory.get(release)
        for sae_id in lookup.saes_map if lookup is not None else ():
            m = _ID_RE.fullmatch(sae_id)
            if m is None:
                continue  # embedding/... ids
            l0 = m["l0"].removeprefix("average_l0_")
            found.setdefault(int(m["layer"]), {}).setdefault(m["width"], set()).add(l0)
    return {
        layer: {
            w: sorted(l0s, key=lambda v: (v != CANONICAL, int(v) if v.isdigit() else 0))
            for w, l0s in sorted(widths.items(), key=lambda kv: _width_key(kv[0]))
        }
        for layer, widths in sorted(found.items())
    }


def gemma_scope_id(
    site: str, layer: int, width: str, l0: str, directory: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    """The sae_lens (release, id) of the Gemma Scope SAE at ``site`` of block ``layer`` with
    ``width`` latents and average L0 ``l0`` (``canonical`` or a number); a one-line
    :class:`UserError` naming the valid values when the directory has no such SAE."""
    if site not in RELEASES:
        raise UserError(
            f"sae=gemma_scope has no SAEs at site={site}: {_REFUSED[site]}; valid sites: "
            f"{', '.join(RELEASES)}"
        )
    layers = catalogue(site, directory)
    if layer not in layers:
        raise missing_layer("gemma_scope", layer, layers, site)
    widths = layers[layer]
    if width not in widths:
        raise UserError(
            f"sae.width={width} is not a Gemma Scope width at layer {layer} (site={site}); "
            f"valid: {', '.join(widths)}"
        )
    l0s = widths[width]
    if l0 not in l0s:
        raise UserError(
            f"sae.l0={l0} is not a Gemma Scope L0 at layer {layer}, width {width} "
            f"(site={site}); valid: {', '.join(l0s)}"
        )
    if l0 == CANONICAL:
        return f"{RELEASES[site]}-{CANONICAL}", f"layer_{layer}/width_{width}/{CANONICAL}"
    return RELEASES[site], f"layer_{layer}/width_{width}/average_l0_{l0}"


def _plain_l0(l0: Any) -> str:
    """``canonical`` or the number as written in the ids (``68``, also from ``68.0``)."""
    text = str(l0).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and number >= 0 else text


class GemmaScopeSource(SaeLensSource):
    """The Gemma Scope SAE at ``site`` of block ``layer`` with ``width`` latents and average
    L0 ``l0`` (see the module docstring); loaded as any sae_lens SAE."""

    def __init__(
        self,
        family: str,
        layer: int,
        width: str = "16k",
        l0: Any = CANONICAL,
        site: str = "resid_post",
    ) -> None:
        site = site_name(site)
        self.width = str(width).strip()
        self.l0 = _plain_l0(l0)
        release, sae_id = gemma_scope_id(site, int(layer), self.width, self.l0)
        super().__init__(family, layer, re.escape(release), re.escape(sae_id), site=site)
