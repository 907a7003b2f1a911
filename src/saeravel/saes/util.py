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


def missing_layer(family: str, layer: int, available: Iterable[int]) -> UserError:
    """The one-line error for a layer a family has no SAE for (``available``: its layers)."""
    layers = ", ".join(str(L) for L in sorted(available))
    return UserError(f"family {family} has no SAE for layer {layer}; layers: {layers}")


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
