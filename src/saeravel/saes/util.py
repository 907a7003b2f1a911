"""Small helpers shared by the SAE sources: one-line error text and plain config values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from saeravel.errors import UserError

MAX_LISTED = 8


def few(items: list[str]) -> str:
    """Comma-separated, at most ``MAX_LISTED`` items, then how many more."""
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def plain(value: Any) -> Any:
    """``value`` as plain Python containers (Hydra passes DictConfig for nested fields)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def layer_map(mapping: Mapping[Any, Any] | None) -> dict[int, str]:
    return {int(k): str(v) for k, v in (plain(mapping) or {}).items()}


def missing_layer(
    family: str, layer: int, available: Iterable[int], site: str = "resid_post"
) -> UserError:
    """The one-line error for a layer a family has no SAE for (``available``: its layers at
    ``site``; the site is named when it is not the residual stream's)."""
    layers = ", ".join(str(L) for L in sorted(available))
    at = "" if site == "resid_post" else f" at site={site}"
    return UserError(f"family {family} has no SAE for layer {layer}{at}; layers: {layers}")


def site_name(site: Any) -> str:
    """The plain name of a ``site`` (the config's ``Site`` enum or its string), checked against
    :data:`saeravel.hooks.SITES`."""
    from saeravel.hooks import SITES

    name = str(getattr(site, "value", site))
    if name not in SITES:
        raise UserError(f"unknown site {name!r}; valid: {', '.join(SITES)}")
    return name


def site_extra(site: str) -> dict[str, str]:
    """``{"site": site}`` for an SAE identity's ``extra``; {} at ``resid_post`` (identities from
    before sites existed are unchanged)."""
    return {} if site == "resid_post" else {"site": site}


def residual_only(family: str, site: Any) -> str:
    """``site`` when it is ``resid_post``, else the one-line error of a family whose SAEs read
    the residual stream only."""
    name = site_name(site)
    if name != "resid_post":
        raise UserError(
            f"family {family} has SAEs on the residual stream only: site={name} is not "
            "available; valid: resid_post"
        )
    return name


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` of an exception, cut to ``limit`` characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of a config value (unknown objects become strings)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
