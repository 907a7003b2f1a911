"""SAEBench-readable results: RAVEL's flat metric block and a reader that follows SAEBench's
result-file rules.

Beside every ``result.json`` the pipeline writes ``<release>_<sae_id>_eval_results.json``
(saeravel.results.saebench_filename / saebench_record), the name SAEBench's
``find_eval_results_files`` looks for. The facts below are read from SAEBench's own schemas
(``sae_bench/evals/*/eval_output.py``, ``base_eval_output.py``, ``graphing_utils.py``;
v0.6.0), not its code:

* top-level fields: ``eval_type_id`` str, ``eval_config`` object, ``eval_id`` str,
  ``datetime_epoch_millis`` int in [0, 9999999999999], ``eval_result_metrics`` object of
  categories, ``eval_result_details`` list or null, ``sae_bench_commit_hash`` str (ours:
  ``saeravel-<version>``), ``sae_lens_id`` / ``sae_lens_release_id`` / ``sae_lens_version``
  str or null, ``sae_cfg_dict`` object (its readers need ``architecture`` and ``d_sae``);
* every metric category is flat: no object inside a category;
* eval_type_ids and each one's required metrics: :data:`REQUIRED_METRICS` (each eval's
  registration states its own).

NaN: SAEBench writes Python's ``NaN`` literal, which strict JSON parsers reject; saeravel
writes ``null`` for an undefined score (a reader maps it back to NaN), so every file passes
``json.loads`` with NaN constants refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUFFIX = "_eval_results.json"
SCORES = ("cause", "isolation", "disentangle")
# RAVEL's method shown in SAEBench's ``ravel`` category, first present wins (SAEBench's RAVEL
# scores SAE latents; a job without the SAE method shows its own method).
RAVEL_HEADLINE = ("sae", "das", "neurons")

# SAEBench's eval_type_id -> category -> metrics it requires, and the category SAEBench's
# get_eval_results reads (absent: every category, flattened, as for core). Filled by each eval's
# registration (``saeravel.evals.api.register``: ``saebench_required``, ``saebench_headline``).
REQUIRED_METRICS: dict[str, dict[str, tuple[str, ...]]] = {}
HEADLINE_CATEGORY: dict[str, str] = {}


def register_type(
    type_id: str, required: Mapping[str, tuple[str, ...]], headline: str | None
) -> None:
    """Record SAEBench's rules for ``type_id`` (called by the eval registration)."""
    REQUIRED_METRICS[type_id] = dict(required)
    if headline is not None:
        HEADLINE_CATEGORY[type_id] = headline


def _mean(values: list[Any]) -> float | None:
    good = [float(v) for v in values if isinstance(v, int | float) and not math.isnan(v)]
    return sum(good) / len(good) if good else None


def _flat_scores(by_attr: Mapping[str, Any]) -> dict[str, float | None]:
    rows = [s for s in by_attr.values() if isinstance(s, Mapping)]
    return {
        "disentanglement_score": _mean([r.get("disentangle") for r in rows]),
        "cause_score": _mean([r.get("cause") for r in rows]),
        "isolation_score": _mean([r.get("isolation") for r in rows]),
    }


def ravel_metrics(metrics: dict) -> dict:
    """saeravel's RAVEL metrics (``ravel[method][attribute] = {cause, isolation, disentangle,
    ...}``) in SAEBench's shape: ``ravel`` = the headline method's scores averaged over the
    attributes (SAEBench: the mean over its datasets), plus one flat ``ravel_<method>``
    category per method and ``ravel_baseline_<name>`` per baseline."""
    group = metrics.get("ravel") or {}
    methods = {
        m: v for m, v in group.items() if m != "baseline" and isinstance(v, Mapping)
    }  # fmt: skip
    out: dict[str, dict] = {}
    head = next((m for m in RAVEL_HEADLINE if m in methods), next(iter(methods), None))
    if head is not None:
        out["ravel"] = _flat_scores(methods[head])
    for method, by_attr in methods.items():
        out[f"ravel_{method}"] = _flat_scores(by_attr)
    for name, by_attr in (metrics.get("baselines") or {}).items():
        if isinstance(by_attr, Mapping):
            out[f"ravel_baseline_{name}"] = _flat_scores(by_attr)
    return out


# ----------------------------------------------------------------------------- reader


class NotSAEBenchReadable(ValueError):
    """A result file that breaks one of SAEBench's rules (the message names which)."""


def _refuse_constant(name: str) -> None:
    raise NotSAEBenchReadable(f"non-standard JSON constant {name} (strict JSON has no NaN)")


def find_results(folder: str | os.PathLike) -> list[Path]:
    """Every SAEBench result file under ``folder`` (names containing ``eval_results.json``,
    as SAEBench's ``find_eval_results_files``)."""
    return sorted(
        Path(root) / f
        for root, _, files in os.walk(folder)
        for f in files
        if "eval_results.json" in f
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Load one SAEBench result file, checking SAEBench's rules (raises
    :class:`NotSAEBenchReadable`); returns what SAEBench's ``get_eval_results`` extracts: the
    headline category's metrics (null -> NaN) plus ``eval_config``, ``sae_class``
    (``architecture``) and ``d_sae``, and ``eval_type_id``."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise NotSAEBenchReadable(f"{path.name} does not end in {SUFFIX}")
    rec = json.loads(path.read_text(), parse_constant=_refuse_constant)
    types: dict[str, Any] = {
        "eval_type_id": str,
        "eval_config": dict,
        "eval_id": str,
        "datetime_epoch_millis": int,
        "eval_result_metrics": dict,
        "sae_bench_commit_hash": str,
        "sae_cfg_dict": dict,
    }
    for key, kind in types.items():
        if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
            raise NotSAEBenchReadable(f"{key} must be a {kind.__name__}, got {rec.get(key)!r:.60}")
    for key in ("sae_lens_id", "sae_lens_release_id", "sae_lens_version"):
        if key not in rec or not isinstance(rec[key], str | None):
            raise NotSAEBenchReadable(f"{key} must be a string or null")
    if not 0 <= rec["datetime_epoch_millis"] <= 9999999999999:
        raise NotSAEBenchReadable("datetime_epoch_millis out of range")
    if not isinstance(rec.get("eval_result_details"), list | None):
        raise NotSAEBenchReadable("eval_result_details must be a list or null")
    cfg = rec["sae_cfg_dict"]
    if not isinstance(cfg.get("architecture"), str) or not isinstance(cfg.get("d_sae"), int):
        raise NotSAEBenchReadable("sae_cfg_dict needs architecture (str) and d_sae (int)")
    type_id = rec["eval_type_id"]
    if not REQUIRED_METRICS:
        raise RuntimeError("no eval is registered: call saeravel.evals.api.discover() first")
    if type_id not in REQUIRED_METRICS:
        raise NotSAEBenchReadable(f"eval_type_id {type_id!r} is not one of SAEBench's")
    metrics = rec["eval_result_metrics"]
    for cat, values in metrics.items():
        if not isinstance(values, dict):
            raise NotSAEBenchReadable(f"metric category {cat} is not an object")
        for name, value in values.items():
            if isinstance(value, dict | list):
                raise NotSAEBenchReadable(f"{cat}.{name}: categories must be flat")
    for cat, names in REQUIRED_METRICS[type_id].items():
        if cat not in metrics:
            raise NotSAEBenchReadable(f"{type_id} needs metric category {cat}")
        for name in names:
            value = metrics[cat].get(name, "missing")
            if not (_is_num(value) or value is None):
                raise NotSAEBenchReadable(f"{cat}.{name} must be a number (or null), got {value!r}")
    if type_id not in HEADLINE_CATEGORY:
        head = {k: v for values in metrics.values() for k, v in values.items()}
    else:
        head = dict(metrics[HEADLINE_CATEGORY[type_id]])
    head = {k: math.nan if v is None else v for k, v in head.items()}
    head.update(
        eval_config=rec["eval_config"],
        sae_class=cfg["architecture"],
        d_sae=cfg["d_sae"],
        eval_type_id=type_id,
    )
    return head
