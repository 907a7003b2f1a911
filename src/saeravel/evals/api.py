"""The eval API: what an eval is (its config base, spec and registration), what it receives
(:class:`EvalContext`) and what it returns (:class:`EvalOutput`).

Imported by the pipeline, the config registry and every eval; it imports none of them (only
the modules below the evals: models, SAEs, checkpoints, results, saebench, errors). An eval is
``src/saeravel/evals/<name>.py`` (its typed config dataclass and a ``run`` decorated with
:func:`register`, whose arguments carry what the report, the job hash, the SAEBench copy and
prefetch need to know about it), or a package ``src/saeravel/evals/<name>/`` whose ``main``
module holds that ``run``, plus ``conf/eval/<name>.yaml``; :func:`discover` finds the
modules, so adding an eval touches no shared file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from saeravel import results
from saeravel import saebench as saebench_rules
from saeravel.checkpoint import CheckpointStore
from saeravel.errors import UserError, choose
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
    fact sentences for the embedded model, else the HF dataset), ``hf`` or ``embedded``.
    Its values are checked when the config is built (``__post_init__``, also through
    ``OmegaConf.to_object``); a subclass's ``__post_init__`` calls this one."""

    text_source: str = "auto"
    dataset: str = "Skylion007/openwebtext"
    dataset_config: str | None = None
    data_files: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True
    shuffle_buffer: int = 1
    context_size: int = 128

    def __post_init__(self) -> None:
        choose("eval.text_source", self.text_source, ("auto", "embedded", "hf"))
        if self.shuffle_buffer < 0:
            raise UserError(f"eval.shuffle_buffer must be >= 0 (got {self.shuffle_buffer})")
        if self.context_size < 1:
            raise UserError(f"eval.context_size must be >= 1 (got {self.context_size})")


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


@dataclass(frozen=True)
class JobChoices:
    """What an eval's ``validate`` may know of the job beyond its own config, filled by the
    pipeline before anything loads: the SAE family (``sae.family``; None: unknown), the
    config-group options composed (e.g. ``{"eval/recipe": "paper"}``; empty outside Hydra) and
    the model's config values (``model.name``, ``n_layers``, ``d_model``, ``dtype``; empty:
    unknown), e.g. for a memory budget that cannot hold one row of the model."""

    sae_family: str | None = None
    groups: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def model_of(cfg: Any) -> dict[str, Any]:
        """The model facts of a composed job (:attr:`model`)."""
        if "model" not in cfg:
            return {}
        model = OmegaConf.to_container(cfg.model)  # interpolations left as they are
        return {k: model[k] for k in ("name", "n_layers", "d_model", "dtype") if k in model}


@dataclass
class EvalOutput:
    """What an eval returns: metric groups, per-item details, and summary lines to print;
    ``saebench_type_id`` overrides the registered one for this result (absorption's non-letter
    task)."""

    metrics: dict[str, Any]
    details: Any = None
    unstructured: Any = None
    summary: list[str] = field(default_factory=list)
    saebench_type_id: str | None = None


@dataclass(frozen=True)
class EvalSpec:
    """A registered eval.

    ``run(cfg, ctx) -> EvalOutput`` does the work; ``needs_sae(cfg)`` says whether the job
    must load an SAE; ``schema`` is the dataclass of its config group. ``saebench_type_id`` is
    SAEBench's ``eval_type_id`` of the eval (default: ``name``); ``saebench(metrics)`` turns
    the eval's ``eval_result_metrics`` into SAEBench's shape for the SAEBench-named copy of the
    result (None: the metrics already have it; a ``"module:function"`` string is imported when
    first used).

    What the layers around the eval need to know about it, so that a new eval touches only its
    module, its YAML and its tests: ``headline_metrics`` (the report's first columns of its
    table, ``group.metric``), ``plotted`` (``(column, label)`` the report draws against L0),
    ``non_result_paths`` (paths under ``eval`` that do not change its result, each with the
    reason: left out of the job hash), ``saebench_required`` (SAEBench's required metric
    categories and names for ``saebench_type_id``, checked by the reader) and
    ``saebench_headline`` (the category SAEBench's ``get_eval_results`` reads; None: every
    category, flattened), ``offline_needs(cfg, ctx)`` (prefetch: the eval's own data as
    ``offline.Need``/``Skip`` answers, or None: hub datasets are not prefetched).
    :func:`register` hands the job-hash and SAEBench facts to ``results`` and ``saebench``
    (below the evals, which never import the registry).

    Before anything loads (:func:`check_job`), the schema checks its own values
    (``__post_init__``, run by ``OmegaConf.to_object``); ``validate(cfg, job)`` (``job`` a :class:`JobChoices`) and each of
    ``checks`` (functions or ``"module:function"`` strings) check what the values alone cannot
    say: the job's other groups, files, folders, environment variables (one-line
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
    checks: tuple[Callable[[Any], None] | str, ...] = ()
    headline_metrics: tuple[str, ...] = ()
    plotted: tuple[tuple[str, str], ...] = ()
    non_result_paths: Mapping[str, str] = field(default_factory=dict)
    saebench_required: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    saebench_headline: str | None = None
    offline_needs: Callable[[Any, Any], list] | str | None = None

    def saebench_metrics(self) -> Callable[[dict], dict] | None:
        """The ``saebench`` function (imported if given as ``"module:function"``)."""
        return _function(self.saebench)

    def offline_needs_of(self, cfg: Any, ctx: Any) -> list | None:
        """Prefetch's answer for the eval's own data (``offline_needs``), or None."""
        fn = _function(self.offline_needs)
        return None if fn is None else fn(cfg, ctx)


def _function(fn: Callable | str | None) -> Any:
    """``fn``, or the function a ``"module:function"`` string names."""
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        return getattr(importlib.import_module(module), attr)
    return fn


_REGISTRY: dict[str, EvalSpec] = {}


def register(
    name: str,
    schema: type,
    needs_sae: Callable[[Any], bool] = lambda cfg: True,
    summarize: Callable[[dict], str] | None = None,
    saebench: Callable[[dict], dict] | str | None = None,
    saebench_type_id: str | None = None,
    validate: Callable[[Any], None] | None = None,
    checks: tuple[Callable[[Any], None] | str, ...] = (),
    headline_metrics: tuple[str, ...] = (),
    plotted: tuple[tuple[str, str], ...] = (),
    non_result_paths: Mapping[str, str] | None = None,
    saebench_required: Mapping[str, tuple[str, ...]] | None = None,
    saebench_headline: str | None = None,
    offline_needs: Callable[[Any, Any], list] | str | None = None,
) -> Callable:
    """Decorator registering ``run`` as eval ``name`` (see :class:`EvalSpec`)."""
    type_id = saebench_type_id or name
    non_result = dict(non_result_paths or {})
    required = {cat: tuple(names) for cat, names in (saebench_required or {}).items()}

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = EvalSpec(
            name, fn, schema, needs_sae, summarize, saebench, type_id, validate, tuple(checks),
            tuple(headline_metrics), tuple(plotted), non_result, required, saebench_headline,
            offline_needs,
        )  # fmt: skip
        results.NON_RESULT_EVAL_PATHS[name] = non_result
        saebench_rules.register_type(type_id, required, saebench_headline)
        return fn

    return deco


def discover() -> dict[str, EvalSpec]:
    """Import every eval module once and return the registry."""
    package = importlib.import_module("saeravel.evals")
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_") and mod.name not in _NOT_EVALS:
            # a package (``evals/<name>/``) registers its eval in its ``main`` module
            importlib.import_module(f"saeravel.evals.{mod.name}{'.main' if mod.ispkg else ''}")
    return _REGISTRY


def get_eval(name: str) -> EvalSpec:
    """The eval called ``name``, or a one-line error listing the valid ones."""
    reg = discover()
    choose("eval", name, sorted(reg))
    return reg[name]


def check_job(cfg: Any, job: JobChoices | None = None) -> EvalSpec:
    """Every check of a composed job's eval that needs nothing from the model, in this order:
    the eval's name, its schema's own checks (``OmegaConf.to_object`` runs each dataclass's
    ``__post_init__``, sub-configs first), ``spec.validate`` and ``spec.checks`` (files, keys,
    the job's other groups), and an SAE for an eval that needs one (not ``sae=none``). Called
    by the pipeline before any SAE source or model is built, and by ``run.py``'s check before
    Hydra runs (each value of a sweep). ``job``: what the job composed beyond the eval (default:
    the SAE family from ``cfg.sae``, no group choices). Returns the eval's spec; raises a
    one-line :class:`~saeravel.errors.UserError`."""
    spec = get_eval(cfg.eval.name)
    OmegaConf.to_object(cfg.eval)
    if job is None:
        job = JobChoices(cfg.sae.get("family") if "sae" in cfg else None,
                         model=JobChoices.model_of(cfg))  # fmt: skip
    if spec.validate is not None:
        spec.validate(cfg.eval, job)
    for check in spec.checks:
        _function(check)(cfg.eval)
    if spec.needs_sae(cfg.eval) and "sae" in cfg and cfg.sae.get("family") == "none":
        raise UserError(f"eval={spec.name} needs an SAE; choose one with sae=... (not sae=none)")
    return spec
