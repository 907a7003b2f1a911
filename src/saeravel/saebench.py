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

NaN: SAEBench writes Python's ``NaN`` literal, which strict JSON parsers reject; saeravel's
``result.json`` writes ``null`` for an undefined score (a reader maps it back to NaN), so every
file passes ``json.loads`` with NaN constants refused.

The SAEBench copy (:func:`saeravel.results.saebench_record`, built by the conversion functions
below) differs from ``result.json`` where SAEBench's JSON schemas
(``sae_bench/evals/*/eval_output_schema_*.json``) or readers need it to:

* **-1 for undefined values** (:data:`UNDEFINED`): SAEBench's core writes -1 for every NaN
  (``core/main.py``: ``replace_nans_with_negative_one``; e.g. ``consistent_activation_heuristic``
  of a dead latent) and its schemas type these fields as plain numbers. The copy writes -1 for an
  undefined value in all of core, and in the metrics and per-item fields SAEBench requires for
  the other evals; scr, tpp and sparse probing keep ``null`` where their schema allows it.
  A required SAEBench metric that the job did not compute (e.g. core's KL with
  ``n_eval_reconstruction_batches=0``) is -1 too. ``result.json`` keeps ``null``.
* **details are a list**: ``eval_result_details`` is ``[]`` when saeravel's details are absent
  or not a list of SAEBench's per-item records (RAVEL's per-template block, the non-letter
  absorption task); saeravel's own details then sit in ``eval_result_unstructured.details``.
* **eval_config** (:func:`saebench_eval_config`): SAEBench parses it into its own config class,
  whose defaults fill every field it does not find (a TPP file would read ``perform_scr:
  True``). The copy's ``eval_config`` therefore holds SAEBench's field names with the values
  this job used where saeravel has one (``model_name``, ``random_seed`` from ``seed``,
  ``perform_scr``, ``context_length`` / ``context_size``, RAVEL's ``num_epochs`` /
  ``learning_rate``, core's ``compute_*`` switches, ...), saeravel's own fields beside them,
  and saeravel's eval config verbatim under :data:`OURS_KEY` (SAEBench's schemas allow extra
  keys; its pydantic classes ignore them, so that key is where a reader finds what ran).
* **extra metric categories** (RAVEL's ``ravel_<method>``, absorption's ``status``) are
  allowed by the schemas (no ``additionalProperties: false``) but dropped by SAEBench's
  pydantic classes; RAVEL's whole nested block is also in
  ``eval_result_unstructured.saeravel_metrics``, which they keep.
* **eval_type_id**: absorption on a task other than first letters (the embedded and planted
  worlds' continent task) is ``absorption_<parent attribute>`` (e.g. ``absorption_continent``),
  never ``absorption_first_letter``; its metrics have SAEBench's absorption shape.

RAVEL's copy and SAEBench's RAVEL (``sae_bench/evals/ravel``, v0.6.0): the ``ravel``
category holds one method's scores (:data:`RAVEL_HEADLINE`: the SAE method when the job ran
it) averaged over the attributes, as SAEBench averages over the attributes of its entity
class. Under ``eval.protocol=saebench`` they follow SAEBench's recipe (its differences are
listed in ``saeravel.evals.ravel``), the copy's ``eval_config`` carries SAEBench's dataset
fields with this job's values (:func:`ravel_eval_config`) and its unstructured block SAEBench's
per-attribute scores. Under saeravel's own protocols the numbers are not SAEBench's: SAEBench trains a binary mask over the SAE's latents
(MDBM: a sigmoid relaxation annealed from temperature 1 to 1e-4, Adam on cause and isolation
pairs mixed in one loader, ``train_test_split`` of the *pairs*) and scores a held-out pair as
correct when the greedy continuation of ``n_generated_tokens`` tokens starts with the expected
label; it files a pair under isolation when the base's and the source's predictions agree and
under cause otherwise, and draws its isolation pairs from the other attributes, as many as the
cause pairs. saeravel's methods, splits (by entity), matching rules and pair filters are
documented in ``saeravel.evals.ravel`` and its recipes; ``eval.recipe=paper`` follows the
RAVEL paper, not SAEBench. SAEBench's RAVEL config fields in the copy (``model_name``,
``num_epochs``, ``learning_rate``, ``random_seed``, ``n_generated_tokens``, ``llm_batch_size``)
carry this job's values; its dataset fields (``entity_attribute_selection``,
``top_n_entities``, ...) are written under protocol saebench only, so elsewhere SAEBench's
reader fills in its defaults, which describe SAEBench's data, not this job's.

Layout (:func:`saeravel.results.saebench_path`): SAEBench's ``get_eval_results``
(``sae_bench_utils/graphing_utils.py``) picks the eval from the first of ``tpp``, ``scr``,
``absorption``, ``autointerp``, ``sparse_probing``, ``unlearning``, ``core`` found anywhere in
the file's path and keys the SAE by the file name without ``_eval_results.json``; its L0 plots
join an eval with core by that key. So the copy lies in a folder named after the eval
(``<job folder>/saebench/<eval>/``, ``<results_dir>/<eval>/<job hash>/``) and its name is
the SAE's alone, the same in every eval (:data:`EVAL_PATH_ORDER`). A results folder whose path
names another eval (``.../scr_runs/...``) defeats that rule.
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


# The substrings SAEBench's get_eval_results looks for in a result's path, in its order (the
# first found names the eval; graphing_utils.py); a copy's path must name its own eval first.
EVAL_PATH_ORDER = ("tpp", "scr", "absorption", "autointerp", "sparse_probing", "unlearning", "core")
# SAEBench's value for an undefined number (core/main.py: replace_nans_with_negative_one).
UNDEFINED = -1
# Per-item records SAEBench's schema requires in eval_result_details: (string keys, number keys).
DETAIL_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "core": (("index",), ("feature_density", "consistent_activation_heuristic", "encoder_bias",
                          "encoder_norm", "encoder_decoder_cosine_sim", "max_decoder_cosine_sim",
                          "max_encoder_cosine_sim")),
    "absorption_first_letter": (("first_letter",), (
        "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
        "num_probe_true_positives", "num_split_features")),
    "sparse_probing": (("dataset_name",), ("llm_test_accuracy",)),
    "scr": (("dataset_name",), ()),
    "tpp": (("dataset_name",), ()),
}  # fmt: skip
# Where the copy keeps saeravel's own eval config, verbatim.
OURS_KEY = "saeravel_eval_config"
# SAEBench's eval_config field -> saeravel's field holding the same setting.
CONFIG_SYNONYMS = {
    "random_seed": "seed",
    "context_length": "context_size",
    "context_size": "context_length",
    "llm_context_size": "context_size",
    "dataset_name": "dataset",
    "num_epochs": "epochs",
    "learning_rate": "lr",
    "exclude_special_tokens_from_reconstruction": "exclude_special_tokens",
}


def base_type_id(type_id: str) -> str:
    """SAEBench's eval_type_id whose schema ``type_id`` follows (``absorption_<attribute>``,
    saeravel's non-letter absorption task, has absorption's)."""
    if type_id.startswith("absorption_") and type_id not in REQUIRED_METRICS:
        return "absorption_first_letter"
    return type_id


def absorption_type_id(class_key: str) -> str:
    """The eval_type_id of an absorption task: SAEBench's ``absorption_first_letter`` for
    first letters, ``absorption_<parent attribute>`` for any other task."""
    key = class_key.lower()
    return "absorption_first_letter" if key == "first_letter" else f"absorption_{key}"


def _undefined(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _minus_one(obj: Any) -> Any:
    """``obj`` with every undefined number (None, NaN, infinity) as -1, recursively."""
    if isinstance(obj, Mapping):
        return {k: _minus_one(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_minus_one(v) for v in obj]
    return UNDEFINED if _undefined(obj) else obj


def saebench_metrics(type_id: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` (already in SAEBench's shape) with SAEBench's convention for undefined
    values: every metric SAEBench requires present, -1 where undefined or not computed; all
    of core's undefined values are -1 (other optional metrics keep null, which the schemas of
    scr, tpp and sparse probing allow)."""
    base = base_type_id(type_id)
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in metrics.items()}
    if base == "core":
        out = _minus_one(out)
    for cat, names in REQUIRED_METRICS.get(base, {}).items():
        group = out.setdefault(cat, {})
        for name in names:
            if _undefined(group.get(name)):
                group[name] = UNDEFINED
    return out


def saebench_details(type_id: str, details: Any) -> tuple[list, Any]:
    """``(eval_result_details, moved)``: SAEBench's list of per-item records (``[]`` when
    there are none), and saeravel's details when they are not such a list (None otherwise).
    Required number fields of a record that are undefined or absent are -1."""
    base = base_type_id(type_id)
    if details is None:
        return [], None
    if not isinstance(details, list) or base != type_id:
        return [], details
    strings, numbers = DETAIL_KEYS.get(base, ((), ()))
    if not all(isinstance(row, Mapping) and all(k in row for k in strings) for row in details):
        return [], details
    rows = []
    for row in details:
        row = _minus_one(row) if base == "core" else dict(row)
        for key in numbers:
            if _undefined(row.get(key)):
                row[key] = UNDEFINED
        rows.append(row)
    return rows, None


def saebench_eval_config(
    type_id: str, ours: Mapping[str, Any], model_name: str | None, seed: int | None = None
) -> dict[str, Any]:
    """The copy's ``eval_config``: saeravel's fields, SAEBench's names for the settings
    saeravel has under another name (:data:`CONFIG_SYNONYMS`), ``model_name``, ``random_seed``
    (the eval's ``seed``, else the job's ``seed``), ``perform_scr`` (scr / tpp), core's
    ``compute_*`` switches, and saeravel's config verbatim under :data:`OURS_KEY`."""
    out = dict(ours)
    for theirs, mine in CONFIG_SYNONYMS.items():
        if theirs not in out and mine in ours:
            out[theirs] = ours[mine]
    if model_name:
        out["model_name"] = model_name
    if "random_seed" not in out and seed is not None:
        out["random_seed"] = seed
    base = base_type_id(type_id)
    if base in ("scr", "tpp"):
        out["perform_scr"] = base == "scr"
    if base == "ravel":
        out.update(ravel_eval_config(ours))
    if base == "core":
        downstream = bool(ours.get("n_eval_reconstruction_batches", 1))
        variance = bool(ours.get("n_eval_sparsity_variance_batches", 1))
        out.update(compute_kl=downstream, compute_ce_loss=downstream, compute_l2_norms=variance,
                   compute_sparsity_metrics=variance, compute_variance_metrics=variance,
                   compute_featurewise_density_statistics=variance)  # fmt: skip
    out[OURS_KEY] = dict(ours)
    return out


def ravel_eval_config(ours: Mapping[str, Any]) -> dict[str, Any]:
    """SAEBench's RAVEL config fields with this job's values: ``n_generated_tokens`` and
    ``llm_batch_size`` always; under ``eval.protocol=saebench`` also its dataset fields
    (``entity_attribute_selection``: the entity type and its attributes, ``top_n_entities``,
    ``num_pairs_per_attribute``, ``train_test_split``: the training fraction) and
    ``train_mdas: false``. Under saeravel's own protocols the dataset fields are not written
    (SAEBench's reader fills in its defaults, which describe its data, not this job's)."""
    out: dict[str, Any] = {}
    if isinstance(ours.get("match_tokens"), int):
        out["n_generated_tokens"] = ours["match_tokens"]
    if isinstance(ours.get("batch_size"), int):
        out["llm_batch_size"] = ours["batch_size"]
    if ours.get("protocol") != "saebench":
        return out
    sb = ours.get("saebench") if isinstance(ours.get("saebench"), Mapping) else {}
    attrs, fr = ours.get("attributes"), list(ours.get("split_fractions") or [])
    if attrs and ours.get("entity_type"):
        out["entity_attribute_selection"] = {str(ours["entity_type"]): list(attrs)}
    for theirs, mine in (("top_n_entities", "top_entities"),
                         ("num_pairs_per_attribute", "pairs_per_attribute")):  # fmt: skip
        if isinstance(sb.get(mine), int):
            out[theirs] = sb[mine]
    if len(fr) == 3:
        out["train_test_split"] = float(fr[0])
    out["train_mdas"] = False
    return out


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
    type_id = base_type_id(rec["eval_type_id"])
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
        eval_type_id=rec["eval_type_id"],
    )
    return head
