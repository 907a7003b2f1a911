"""The eval API: what an eval is (its config base, spec and registration), what it receives
(:class:`EvalContext`) and what it returns (:class:`EvalOutput`).

Imported by the pipeline, the config registry and every eval; it imports none of them (only
the modules below the evals: models, SAEs, checkpoints, errors). An eval is
``src/saeravel/evals/<name>.py`` (its typed config dataclass and a ``run`` decorated with
:func:`register`) plus ``conf/eval/<name>.yaml``; :func:`discover` finds the modules, so
adding an eval touches no shared file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from saeravel.checkpoint import CheckpointStore
from saeravel.errors import choose
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE

# Modules of the evals package that are not evals.
_NOT_EVALS = {"api"}


@dataclass
class EvalConfig:
    """Common fields of every eval."""

    name: str = MISSING
    version: str = MISSING


@dataclass
class TextSourceConfig(EvalConfig):
    """Where evals that read plain text get it: ``text_source`` auto (the embedded world's
    fact sentences for the embedded model, else the HF dataset), ``hf`` or ``embedded``."""

    text_source: str = "auto"
    dataset: str = "Skylion007/openwebtext"
    dataset_config: str | None = None
    data_files: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True
    shuffle_buffer: int = 1
    context_size: int = 128


def no_log(metrics: dict[str, float], step: int | None = None) -> None:
    """The default :attr:`EvalContext.log_metrics`: drop the values."""


@dataclass
class EvalContext:
    """Everything an eval's ``run`` receives besides its own config."""

    model: LoadedModel
    sae: SAE | None
    layer: int
    hook_name: str
    device: str
    seed: int
    cache_dir: Path
    output_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    # This job's checkpoints (<results_dir>/<eval>/<hash>.ckpt/); a no-op store by default.
    checkpoint: CheckpointStore = field(default_factory=CheckpointStore.disabled)
    # Live values during the job, ``log_metrics({"das/Country/loss": 2.1}, step)``: the job's
    # experiment logger (saeravel.logger, logger=wandb) or a no-op.
    log_metrics: Callable[[dict[str, float], int | None], None] = no_log


@dataclass
class EvalOutput:
    """What an eval returns: metric groups, per-item details, and summary lines to print."""

    metrics: dict[str, Any]
    details: Any = None
    unstructured: Any = None
    summary: list[str] = field(default_factory=list)


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
    package = importlib.import_module("saeravel.evals")
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_") and mod.name not in _NOT_EVALS:
            importlib.import_module(f"saeravel.evals.{mod.name}")
    return _REGISTRY


def get_eval(name: str) -> EvalSpec:
    """The eval called ``name``, or a one-line error listing the valid ones."""
    reg = discover()
    choose("eval", name, sorted(reg))
    return reg[name]
