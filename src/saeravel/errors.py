"""User-facing errors: one line saying what was wrong and what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
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


def unknown_key(full_key: str, valid: Sequence[str], free_form: bool = False) -> UserError:
    """The one-line error for a config key that does not exist (``eval.epoch``): its closest
    valid names as a "did you mean" and the valid keys at its level (a schema's private fields,
    ``_target_``, not listed). ``free_form``: the level takes any key, added with Hydra's
    ``+`` (all its keys listed)."""
    prefix, _, key = full_key.rpartition(".")
    public = [str(v) for v in valid if free_form or not str(v).startswith("_")]
    close = difflib.get_close_matches(key, public, n=3)
    hint = (
        f" (did you mean {', '.join(f'{prefix}.{c}'.lstrip('.') for c in close)}?)" if close else ""
    )
    listed = ", ".join(public) if public else "none"
    add = f"; add a new key with +{full_key}=..." if free_form else ""
    return UserError(
        f"unknown config key {full_key}{hint}; valid keys of {prefix or 'the top level'}: "
        f"{listed}{add}"
    )


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


def check_code_target(
    obj: Any,
    target: str,
    kwargs: Any = None,
    allow_factory: bool = False,
    *,
    needs: tuple[str, ...] = ("encode", "decode"),
    what: str = "custom SAE",
    opt_in: str = "sae.allow_factory=true",
) -> None:
    """A config's ``_target_`` runs code: before anything is called, the imported ``obj``
    (named ``target``) must be a class that defines every method of ``needs``; a function or
    any other callable (``shutil.copy``, ``builtins.open``), and nested ``_target_`` nodes in
    its keyword arguments ``kwargs`` (Hydra would call them while building it), are accepted
    only with the explicit opt-in ``opt_in``, which runs arbitrary code. A one-line
    :class:`UserError` otherwise; nothing is called here."""
    import inspect

    if allow_factory:
        if not callable(obj):
            raise UserError(f"{what} target {target!r} is a {type(obj).__name__}, not callable")
        return
    if not inspect.isclass(obj):
        raise UserError(
            f"{what} target {target!r} is a {type(obj).__name__}, not a class: a _target_ runs "
            f"code, so it must name a class defining {' and '.join(needs)} (a factory function "
            f"runs only with {opt_in}, which lets the config run arbitrary code)"
        )
    missing = [m for m in needs if not callable(inspect.getattr_static(obj, m, None))]
    if missing:
        raise UserError(
            f"{what} target {target!r} is a class that has no callable "
            f"{', '.join(f'{m}()' for m in missing)}; it needs {' and '.join(f'{m}()' for m in needs)}"
            " (checked on the class, before it is built)"
        )
    nested = _nested_target(kwargs)
    if nested is not None:
        raise UserError(
            f"{what} target {target!r} has a nested _target_ {nested!r} in its arguments, which "
            f"Hydra would call while building it; allowed only with {opt_in} (runs arbitrary code)"
        )


def _nested_target(node: Any) -> str | None:
    if isinstance(node, dict):
        if "_target_" in node:
            return str(node["_target_"])
        values = list(node.values())
    elif isinstance(node, list | tuple):
        values = list(node)
    else:
        return None
    for value in values:
        if (found := _nested_target(value)) is not None:
            return found
    return None
