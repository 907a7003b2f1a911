"""The eval registry: every module in this package registers itself with :func:`register`.

An eval is ``src/saeravel/evals/<name>.py`` (a typed config dataclass and a ``run``
function) plus ``conf/eval/<name>.yaml``. Modules are discovered, not listed, so adding an
eval touches no shared file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saeravel.errors import choose


@dataclass(frozen=True)
class EvalSpec:
    """A registered eval.

    ``run(cfg, ctx) -> EvalOutput`` does the work; ``needs_sae(cfg)`` says whether the job
    must load an SAE; ``schema`` is the dataclass of its config group. ``saebench_type_id`` is
    SAEBench's ``eval_type_id`` of the eval (default: ``name``); ``saebench(metrics)`` turns
    the eval's ``eval_result_metrics`` into SAEBench's shape for the SAEBench-named copy of the
    result (None: the metrics already have it; a ``"module:function"`` string is imported when
    first used). ``validate(cfg)`` checks the eval's values before anything loads (one-line
    :class:`~saeravel.errors.UserError`).
    """

    name: str
    run: Callable[..., Any]
    schema: type
    needs_sae: Callable[[Any], bool]
    summarize: Callable[[dict], str] | None = None
    saebench: Callable[[dict], dict] | str | None = None
    saebench_type_id: str | None = None
    validate: Callable[[Any], None] | None = None

    def saebench_metrics(self) -> Callable[[dict], dict] | None:
        """The ``saebench`` function (imported if given as ``"module:function"``)."""
        if isinstance(self.saebench, str):
            module, _, attr = self.saebench.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.saebench


_REGISTRY: dict[str, EvalSpec] = {}


def register(
    name: str,
    schema: type,
    needs_sae: Callable[[Any], bool] = lambda cfg: True,
    summarize: Callable[[dict], str] | None = None,
    saebench: Callable[[dict], dict] | str | None = None,
    saebench_type_id: str | None = None,
    validate: Callable[[Any], None] | None = None,
) -> Callable:
    """Decorator registering ``run`` as eval ``name`` (see :class:`EvalSpec`)."""

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = EvalSpec(
            name, fn, schema, needs_sae, summarize, saebench, saebench_type_id or name, validate
        )
        return fn

    return deco


def discover() -> dict[str, EvalSpec]:
    """Import every eval module once and return the registry."""
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return _REGISTRY


def get_eval(name: str) -> EvalSpec:
    """The eval called ``name``, or a one-line error listing the valid ones."""
    reg = discover()
    choose("eval", name, sorted(reg))
    return reg[name]
