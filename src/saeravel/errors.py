"""User-facing errors: one line saying what was wrong and what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """Bad input or missing resource. ``run.py`` prints the message alone and exits 2."""


def choose(kind: str, value: object, valid: Iterable[object]) -> None:
    """Raise a :class:`UserError` if ``value`` is not in ``valid``, with a "did you mean"."""
    valid = list(valid)
    if value in valid:
        return
    names = [str(v) for v in valid]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(names)}")


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a :class:`saeravel.errors.UserError` raised by the
    target's constructor (a source's cheap checks: device, ranges, names) propagates as
    itself, so the entrypoint prints its one line instead of Hydra's multi-line wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise
