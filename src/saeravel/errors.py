"""User-facing errors: one line saying what was wrong and what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
