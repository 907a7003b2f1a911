"""Hook names: the one place they are built and parsed.

The names are transformer_lens' (``blocks.5.hook_resid_post``, ``blocks.3.attn.hook_k``),
built by its :func:`~transformer_lens.utilities.get_act_name`. That import is deferred to
the first name built: importing transformer_lens takes seconds, and parsing (what the
config checks need before any model loads) does not need it.

Intervention sites (``site=``, :data:`SITES`): the residual after block ``L``
(``resid_post``, what ``layer=L`` alone means), the residual between block ``L``'s attention and
its MLP (``resid_mid``), and what block ``L``'s MLP or attention adds to the residual
(``mlp_out``, ``attn_out``); :func:`site_hook` builds the hook, :func:`hook_site` reads
``(layer, site)`` back (``blocks.L+1.hook_resid_pre`` is the site ``resid_post`` of ``L``).

The ground floor: imports nothing of saeravel.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

# blocks.<block>.[<module>.]hook_<site>, e.g. blocks.6.hook_resid_pre, blocks.3.attn.hook_k
_HOOK_RE = re.compile(r"blocks\.(?P<block>\d+)\.(?:(?P<module>\w+)\.)?hook_(?P<site>\w+)")
RESID_SITES = ("resid_pre", "resid_post")
# What ``site=`` may name: hooks of a block that an SAE reads and an intervention patches.
SITES = ("resid_post", "resid_mid", "mlp_out", "attn_out")
# Sites that are the block's own sub-layers: patching one reruns the rest of block L.
BLOCK_INTERNAL_SITES = ("resid_mid", "mlp_out", "attn_out")
# The block hooks an sae_lens id may name (alone or before a ``_suffix``): the residual ones
# and the sites (a name with a module, ``blocks.3.attn.hook_z``, is taken whole).
_ID_SITES = ("resid_pre", *SITES)


@functools.cache
def act_name(site: str, block: int) -> str:
    """transformer_lens' hook name of ``site`` (``resid_post``, ``k``, ``attn_scores``, ...)
    in block ``block``."""
    from transformer_lens.utilities import get_act_name

    return get_act_name(site, block)


def resid_post(layer: int) -> str:
    """The residual stream after block ``layer`` (what ``layer=`` means everywhere)."""
    return act_name("resid_post", layer)


def resid_pre(block: int) -> str:
    """The residual stream before block ``block`` (= after block ``block - 1``)."""
    return act_name("resid_pre", block)


def site_hook(site: str, layer: int) -> str:
    """The hook of intervention site ``site`` (one of :data:`SITES`) of block ``layer``:
    ``site_hook("mlp_out", 5) == "blocks.5.hook_mlp_out"``."""
    site = str(site)
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid: {', '.join(SITES)}")
    return act_name(site, layer)


def attn_scores(block: int) -> str:
    """The attention scores (pre-softmax) of block ``block``."""
    return act_name("attn_scores", block)


def kv_names(blocks: Iterable[int]) -> list[str]:
    """The attention keys and values of each of ``blocks``: ``[k0, v0, k1, v1, ...]``."""
    return [act_name(kv, b) for b in blocks for kv in ("k", "v")]


def parse(hook_name: str) -> tuple[int, str] | None:
    """``(block, site)`` of a per-block hook name (``blocks.3.attn.hook_k`` -> ``(3, "k")``,
    ``blocks.6.hook_resid_pre`` -> ``(6, "resid_pre")``), None for any other name."""
    m = _HOOK_RE.fullmatch(hook_name)
    return (int(m["block"]), m["site"]) if m else None


def _resid(hook_name: str) -> tuple[int, str] | None:
    """``(block, "resid_pre" | "resid_post")`` of a residual hook name, else None."""
    m = _HOOK_RE.fullmatch(hook_name)
    if m is None or m["module"] is not None or m["site"] not in RESID_SITES:
        return None
    return int(m["block"]), m["site"]


def resid_layer(hook_name: str, n_layers: int) -> int | None:
    """Layer L such that ``hook_name`` reads the residual stream after block L (None if not a
    residual hook of an ``n_layers`` model; -1 for ``blocks.0.hook_resid_pre``, the
    embeddings)."""
    resid = _resid(hook_name)
    if resid is None or resid[0] >= n_layers:
        return None
    block, site = resid
    return block if site == "resid_post" else block - 1


def hook_site(hook_name: str, n_layers: int | None = None) -> tuple[int, str] | None:
    """``(layer, site)`` of a hook that is an intervention site (:data:`SITES`) of an
    ``n_layers`` model (None: any depth): ``blocks.5.hook_mlp_out`` -> ``(5, "mlp_out")``;
    ``blocks.6.hook_resid_pre`` -> ``(5, "resid_post")`` (the same tensor); None for any
    other hook (``blocks.5.attn.hook_z``, ``blocks.0.hook_resid_pre``: the embeddings)."""
    m = _HOOK_RE.fullmatch(hook_name)
    if m is None or m["module"] is not None:
        return None
    block, site = int(m["block"]), m["site"]
    if n_layers is not None and block >= n_layers:
        return None
    if site == "resid_pre":
        return (block - 1, "resid_post") if block > 0 else None
    return (block, site) if site in SITES else None


def stop_layer(hook_name: str) -> int | None:
    """Blocks needed to compute ``hook_name`` (None: run the whole model)."""
    parsed = parse(hook_name)
    return parsed[0] + 1 if parsed else None


def block_hook_prefix(name: str) -> str | None:
    """The block hook a name is (sae_lens ids): a residual hook or a site hook, alone or
    before a ``_suffix`` (``blocks.8.hook_resid_pre_768`` -> ``blocks.8.hook_resid_pre``,
    ``blocks.12.hook_resid_post__trainer_0``, ``blocks.3.hook_mlp_out``), or a module's hook
    whole (``blocks.3.attn.hook_z``); else None. Parses only: no transformer_lens."""
    m = _HOOK_RE.fullmatch(name)
    if m is None:
        return None
    if m["module"] is not None:
        return name
    for site in _ID_SITES:
        if m["site"] == site or m["site"].startswith(site + "_"):
            return name[: m.start("site")] + site
    return None
