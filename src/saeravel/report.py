"""Collect the result JSONs under a folder into tables, CSVs and figures a paper can use.

``python -m saeravel.report <folder> [--out DIR] [--methods das,neurons,sae] [--split-by KEY]``
finds every result record under ``<folder>`` (symlinked folders followed; ``result.json`` files
of a sweep, or the job-hash index ``<results_dir>/<eval>/<hash>.json``), and writes:

* ``ravel.csv``: one row per (job, method, attribute intervened) with disentangle, cause,
  isolation and the no-intervention baseline, every differing setting as its own column, the
  bootstrap intervals, the none / swap / SAE-reconstruction / oracle references, the kept
  entries and provenance; ``ravel_over_seeds.csv``: mean, std and n over the seeds of
  otherwise identical jobs (:data:`SEED_KEYS`); ``ravel_verdict.csv``: SAE vs neurons vs DAS
  as paired differences pooled over those seeds (eval and model seeds) from the stored per-pair
  outcomes, each run's own difference beside the pool; ``<eval>.csv`` for every other eval (one row
  per job, every metric); ``neuronpedia.csv``: kept latents of SAEs with a Neuronpedia id;
* ``report.md`` (printed too): per eval, one table per *part* (a model, or a model and each
  ``--split-by`` value), at most 12 columns. Settings that differ inside a part are summarised
  in one line above its table: a single one gets a column, several become variants ``v1``,
  ``v2``... named in that line (never one column per key). Attributes in the config's order;
* figures per part (saeravel.figures): ``ravel_vs_layer`` (disentangle vs layer per
  attribute: SAE families, neurons, DAS and the other methods in their own colours, with the
  no-intervention, SAE-reconstruction and oracle references), ``ravel_methods`` (the methods
  at one layer as bars with intervals, and the ``verdict`` block's paired differences when the
  result has one), ``cause_vs_isolation`` (a panel per attribute, methods as points),
  ``training_curves`` and SAEBench-style ``<eval>_vs_l0`` (log L0, a marker per
  architecture, the LLM's own score, undefined scores left out and counted). File names get
  ``_<part>`` when there are several parts. Figures and tables of an earlier run of the report
  into the same folder that this run did not write again are removed (only files listed in
  the folder's manifest, :data:`MANIFEST`).

Rows are keyed by job hash (saeravel.results.job_hash): two different jobs are never merged;
a job with several records (``force=true`` reruns) keeps the newest and names the file
dropped. JSON that is not a saeravel result (checkpoints, wandb tables, SAEBench-named copies
``*_eval_results.json``) is ignored quietly; an unreadable file or a broken result is one
warning line; records of several result versions are one warning line; a folder without
any result is a one-line error (exit 2).

Neuronpedia: a link per kept latent and, per mask, one quick-list page of all its recorded
latents. sae_lens' ``get_neuronpedia_quick_list`` builds the same URL but opens a browser and
takes ``modelId`` from the SAE's ``metadata.model_name``; here the URL is only written, and
``modelId`` is the Neuronpedia id's model part (the same for sae_lens' catalogue entries).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from saeravel.errors import UserError

log = logging.getLogger(__name__)

# The shape eval=ravel writes (src/saeravel/evals/ravel/main.py):
#   eval_result_metrics[RAVEL_GROUP][<method>][<attribute>] = {cause, isolation, disentangle, ...}
#   eval_result_metrics[RAVEL_GROUP][BASELINE_METHOD][<attribute>] = the no-intervention scores
RAVEL_EVAL = "ravel"
RAVEL_GROUP = "ravel"
BASELINE_METHOD = "baseline"
SCORES = ("disentangle", "cause", "isolation")  # the headline first
KEY_COLUMNS = ("model", "sae", "layer", "method", "attribute", "seed")
RAVEL_COLUMNS = (*KEY_COLUMNS, *SCORES, "baseline")
# In the CSV, not the markdown: each score's bootstrap interval, the none / swap baselines'
# components, the protocol, matching rule and split, the kept mask entries, the SAE's ids.
RAVEL_DETAIL_COLUMNS = (
    *[f"{s}_{k}" for s in SCORES for k in ("lo", "hi")],
    "baseline_cause", "baseline_isolation", "swap_cause", "swap_isolation",
    "sae_recon", "oracle", "protocol", "match", "split_by", "mask_kept", "kept_top",
    "neuronpedia_id",
)  # fmt: skip
PROVENANCE_COLUMNS = ("job_hash", "eval_id", "finished", "file")
HIDDEN_COLUMNS = (*PROVENANCE_COLUMNS, *RAVEL_DETAIL_COLUMNS, "sae_identity", "part", "variant",
                  "variant_label", "architecture")  # fmt: skip
MAX_COLUMNS = 12  # widest markdown table
MANIFEST = ".saeravel_report.json"  # the files the report wrote into its folder last time
SKIP_DIRS = ("wandb", ".locks", ".git", "__pycache__")  # never hold results
SKIP_DIR_SUFFIXES = (".ckpt",)  # a job's checkpoints
# Each eval's headline metrics (``group.metric`` columns), first in its table in this order,
# the other metrics alphabetically after, and the metrics the SAEBench-style figure plots vs
# L0: from each eval's registration (``headline_metrics``, ``plotted``; :func:`eval_facts`).
L0_METRIC = "sparsity.l0"  # core's L0: the x axis of the SAEBench-style figures
NEURONPEDIA_URL = "https://www.neuronpedia.org/{neuronpedia_id}/{index}"
NEURONPEDIA_QUICK_LIST = "https://www.neuronpedia.org/quick-list/"  # several latents, one page
GENERIC_KEY_COLUMNS = ("model", "sae", "layer")
NO_SAE = "none"
# Config keys that count as seeds: jobs that differ only in these are repetitions of one
# experiment, averaged in the ``*_over_seeds`` table. Every other difference is a setting.
SEED_KEYS = ("seed", "model.train_seed", "sae.seed", "eval.seed")
# Config paths already shown as key columns (never listed again as a differing setting).
# (``sae.site`` follows ``site``: a site that differs is one setting, ``site``.)
_SHOWN = {"layer", "sae.layer", "sae.site", "model.name", "sae.family", "seed"}
SAEBENCH_SUFFIX = "_eval_results.json"


@dataclass
class Record:
    """One result record and the file it was read from."""

    path: Path
    data: dict[str, Any]
    root: Path | None = None  # the folder searched; ``file`` columns are relative to it
    part: str = ""  # the report part (model, and --split-by values) it is shown in

    @property
    def shown_path(self) -> str:
        if self.root is not None and self.path.is_relative_to(self.root) and self.path != self.root:
            return self.path.relative_to(self.root).as_posix()
        return str(self.path)

    @property
    def eval_type(self) -> str:
        """saeravel's eval name (the record's ``eval_type_id`` is SAEBench's id)."""
        return str(self.data["saeravel"].get("eval_name") or self.data["eval_type_id"])

    @property
    def job(self) -> str:
        """The job hash (the eval id for records that have none)."""
        return str(self.data["saeravel"].get("job_hash") or self.data.get("eval_id") or self.path)

    @property
    def config(self) -> dict[str, Any]:
        """The record's result-relevant config, flattened to dotted paths (lists as JSON)."""
        from saeravel.results import result_config

        eval_facts(self.eval_type)  # the evals' facts (their non-result paths) are registered
        cfg = self.data["saeravel"].get("config")
        flat = _flatten_config(result_config(cfg) if isinstance(cfg, Mapping) else {})
        return flat

    @property
    def millis(self) -> int:
        value = self.data.get("datetime_epoch_millis")
        return int(value) if isinstance(value, int | float) else 0

    @property
    def model(self) -> str:
        return str(self.data["saeravel"]["model_name"])

    @property
    def layer(self) -> int:
        return int(self.data["saeravel"]["layer"])

    @property
    def seed(self) -> int | None:
        seed = (self.data["saeravel"].get("config") or {}).get("seed")
        return int(seed) if isinstance(seed, int) else None

    @property
    def version(self) -> Any:
        return self.data["saeravel"].get("schema_version")

    def attributes(self) -> list[str]:
        """The attributes in the record's config order (``eval.attributes``), else in the
        order of its metrics."""
        cfg = (self.data["saeravel"].get("config") or {}).get("eval") or {}
        attrs = cfg.get("attributes") if isinstance(cfg, Mapping) else None
        out = [str(a) for a in attrs] if isinstance(attrs, list) else []
        group = self.data["eval_result_metrics"].get(RAVEL_GROUP)
        for by_attr in group.values() if isinstance(group, Mapping) else ():
            for a in by_attr if isinstance(by_attr, Mapping) else ():
                if str(a) not in out:
                    out.append(str(a))
        return out

    @property
    def sae(self) -> str:
        ident = self.data["saeravel"].get("sae_identity") or {}
        return str(ident.get("family") or NO_SAE)

    def provenance(self) -> dict[str, Any]:
        """Columns saying where a row came from."""
        try:
            when = datetime.fromtimestamp(self.millis / 1000, tz=timezone.utc)
            finished = when.isoformat(timespec="seconds") if self.millis else ""
        except (OverflowError, ValueError, OSError):
            finished = ""
        return {
            "job_hash": self.data["saeravel"].get("job_hash", ""),
            "eval_id": self.data.get("eval_id", ""),
            "finished": finished,
            "file": self.shown_path,
        }


@dataclass
class Table:
    """Rows (dicts) with a column order, and notes about what was merged or dropped."""

    name: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # config paths that differ between jobs
    about: str = ""  # one line printed above the table: which settings differ, what a seed is


@dataclass
class Report:
    """What :func:`build_report` produced."""

    tables: list[Table]
    skipped: list[tuple[Path, str]]
    files: list[Path]
    markdown: str
    # The matplotlib figure behind each PNG written (closed; kept for inspection in tests).
    figures: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading


def is_result(data: Any) -> bool:
    """Whether ``data`` has the saeravel result layout (see saeravel.results)."""
    if not isinstance(data, dict):
        return False
    meta = data.get("saeravel")
    return (
        isinstance(data.get("eval_type_id"), str)
        and isinstance(data.get("eval_result_metrics"), dict)
        and isinstance(meta, dict)
        and isinstance(meta.get("model_name"), str)
        and isinstance(meta.get("layer"), int)
        and isinstance(meta.get("sae_identity"), dict)
    )


def _looks_like_result(data: Any) -> bool:
    """Whether a JSON that fails :func:`is_result` was meant to be one (a broken record worth
    a warning) rather than some other JSON (a checkpoint's, a wandb table: ignored quietly)."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("saeravel"), dict)
        and ("eval_result_metrics" in data or "eval_type_id" in data)
    )


def json_files(root: Path) -> list[Path]:
    """Every ``*.json`` under ``root``, following symlinked folders (each real folder once),
    without checkpoint, wandb and lock folders, SAEBench-named copies and hidden files."""
    if root.is_file():
        return [root]
    out: list[Path] = []
    seen: set[str] = set()
    for here, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a symlink loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(
            d for d in dirs if d not in SKIP_DIRS and not d.endswith(SKIP_DIR_SUFFIXES)
        )
        for name in sorted(names):
            if name.endswith(".json") and not name.endswith(SAEBENCH_SUFFIX):
                if not name.startswith("."):
                    out.append(Path(here) / name)
    return out


def collect(folder: str | Path) -> tuple[list[Record], list[tuple[Path, str]]]:
    """Every result record under ``folder`` and the files skipped (with the reason): an
    unreadable file and a broken result are one warning each; other JSON is ignored quietly.

    The same record found twice (same ``eval_id``, e.g. a sweep's ``result.json`` and its copy
    in the job-hash index) counts once.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    records: list[Record] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for path in json_files(root):
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"unreadable or corrupt JSON ({type(exc).__name__}: {text})"
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
            continue
        if not is_result(data):
            if _looks_like_result(data):
                reason = "an incomplete saeravel result (model_name, layer or metrics missing)"
                log.warning("skipping %s: %s", path, reason)
                skipped.append((path, reason))
            else:
                log.debug("ignoring %s: not a saeravel result", path)
            continue
        eval_id = data.get("eval_id")
        if isinstance(eval_id, str) and eval_id in seen:
            log.debug("%s repeats record %s; counted once", path, eval_id)
            continue
        if isinstance(eval_id, str):
            seen.add(eval_id)
        records.append(Record(path, data, root))
    return records, skipped


def version_note(records: Sequence[Record]) -> str | None:
    """One line when the records are of several result versions (else None)."""
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.version)] = counts.get(str(r.version), 0) + 1
    if len(counts) < 2:
        return None
    what = ", ".join(f"version {v}: {n} record(s)" for v, n in sorted(counts.items()))
    return f"results of several result versions ({what}); a column a version lacks is empty"


# ----------------------------------------------------------------------------- tables


def _num(value: Any) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    )


def has_ravel_metrics(rec: Record) -> bool:
    """Whether the record's metrics have the ravel shape (whatever the eval's name)."""
    return isinstance(rec.data["eval_result_metrics"].get(RAVEL_GROUP), Mapping)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, int | float | str | bool) or obj is None:
        out[prefix] = obj
    return out


def _flatten_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config as one level of dotted paths (``pandas.json_normalize``); lists become JSON
    text so they can be compared and grouped."""
    import pandas as pd

    if not cfg:
        return {}
    row = pd.json_normalize(dict(cfg), sep=".").iloc[0].to_dict()
    return {
        k: json.dumps(v) if isinstance(v, list | dict) else v
        for k, v in row.items()
        if not (isinstance(v, dict) and not v)
    }


def varying_settings(records: Sequence[Record]) -> list[str]:
    """Config paths whose values differ across ``records``, sorted; seed keys, paths already
    shown as key columns and paths equal to each record's layer (interpolated ``${layer}``)
    excluded."""
    import pandas as pd

    if len(records) < 2:
        return []
    frame = pd.DataFrame([r.config for r in records]).astype(object)
    frame = frame.where(frame.notna(), None).astype(str)
    out = [c for c in frame.columns if frame[c].nunique(dropna=False) > 1]
    layers = [str(r.layer) for r in records]
    is_layer = {c for c in out if frame[c].tolist() == layers}  # e.g. model.site_layer=${layer}
    return sorted(c for c in out if c not in _SHOWN and c not in SEED_KEYS and c not in is_layer)


def varying_seeds(records: Sequence[Record]) -> list[str]:
    """The seed keys whose values differ across ``records``."""
    configs = [r.config for r in records]
    return [k for k in SEED_KEYS if len({json.dumps(c.get(k)) for c in configs}) > 1]


def _setting_columns(rec: Record, settings: Sequence[str], seeds: Sequence[str]) -> dict[str, Any]:
    cfg = rec.config
    out = {k: cfg.get(k) for k in settings}
    out.update({k: cfg.get(k) for k in seeds if k != "seed"})
    return out


def ravel_rows(
    rec: Record, settings: Sequence[str] = (), seeds: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Rows of one ravel record: one per (method, attribute), baseline as a column, and the
    record's value of each differing setting."""
    group = rec.data["eval_result_metrics"].get(RAVEL_GROUP)
    if not isinstance(group, Mapping):
        return []
    base = group.get(BASELINE_METHOD) or {}
    refs = rec.data["eval_result_metrics"].get("baselines") or {}
    swap = refs.get("swap") or {}

    def ref(name: str, attribute: str) -> float:
        by_attr = refs.get(name) if isinstance(refs, Mapping) else None
        sc = by_attr.get(attribute) if isinstance(by_attr, Mapping) else None
        return _num(sc.get("disentangle")) if isinstance(sc, Mapping) else math.nan

    extra = _setting_columns(rec, settings, seeds)
    cfg = rec.config
    setup = {k: cfg.get(f"eval.{k}") for k in ("protocol", "match", "split_by")}
    npid = (rec.data["saeravel"].get("sae_identity") or {}).get("neuronpedia_id")
    rows = []
    for method, by_attr in group.items():
        if method == BASELINE_METHOD or not isinstance(by_attr, Mapping):
            continue
        for attribute, scores in by_attr.items():
            if not isinstance(scores, Mapping):
                continue
            b = base.get(attribute) if isinstance(base, Mapping) else None
            b = b if isinstance(b, Mapping) else {}
            sw = swap.get(attribute) if isinstance(swap, Mapping) else None
            sw = sw if isinstance(sw, Mapping) else {}
            kept = scores.get("kept_top")
            row = {
                "part": rec.part or rec.model,
                "model": rec.model,
                "sae": rec.sae,
                "layer": rec.layer,
                "method": str(method),
                "attribute": str(attribute),
                "seed": rec.seed,
                **{s: _num(scores.get(s)) for s in SCORES},
                "baseline": _num(b.get("disentangle")),
                **extra,
                **_interval(scores),
                "baseline_cause": _num(b.get("cause")),
                "baseline_isolation": _num(b.get("isolation")),
                "swap_cause": _num(sw.get("cause")),
                "swap_isolation": _num(sw.get("isolation")),
                "sae_recon": ref("sae_recon", str(attribute)),
                "oracle": ref("oracle", str(attribute)),
                **setup,
                "mask_kept": scores.get("mask_kept"),
                "kept_top": json.dumps(kept) if isinstance(kept, list) else None,
                "neuronpedia_id": npid,
            }
            row.update(rec.provenance())
            rows.append(row)
    return rows


def _interval(scores: Mapping[str, Any]) -> dict[str, float]:
    """``<score>_lo`` / ``<score>_hi`` from the result's bootstrap interval (the first
    ``ci*`` field holding per-score ``[lo, hi]`` pairs, e.g. ``ci95``); NaN without one."""
    ci = next((v for k, v in scores.items() if k.startswith("ci") and isinstance(v, Mapping)), {})
    out = {}
    for s in SCORES:
        pair = ci.get(s)
        ok = isinstance(pair, list | tuple) and len(pair) == 2
        out[f"{s}_lo"] = _num(pair[0]) if ok else math.nan
        out[f"{s}_hi"] = _num(pair[1]) if ok else math.nan
    return out


def sae_key(rec: Record) -> str:
    """The record's SAE identity as JSON text (sorted keys): records of one SAE share it."""
    return json.dumps(rec.data["saeravel"].get("sae_identity") or {}, sort_keys=True)


def generic_rows(
    rec: Record, settings: Sequence[str] = (), seeds: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per record: every scalar metric as a ``group.metric`` column."""
    from saeravel.results import sae_architecture

    row: dict[str, Any] = {"model": rec.model, "sae": rec.sae, "layer": rec.layer, "seed": rec.seed}
    row.update(_setting_columns(rec, settings, seeds))
    row.update(_flatten(rec.data["eval_result_metrics"]))
    row["sae_identity"] = sae_key(rec)
    row["part"] = rec.part or rec.model
    row["architecture"] = sae_architecture(rec.data.get("sae_cfg_dict"))
    row.update(rec.provenance())
    return [row]


def eval_facts(eval_name: str) -> Any:
    """The registration of eval ``eval_name`` (its ``headline_metrics`` and ``plotted``), or
    None for an eval this saeravel does not have (a foreign record). The report is an entry
    point: it reads the eval registry like run.py (importing the evals when first asked)."""
    from saeravel.evals.api import discover

    return discover().get(eval_name)


def headline_first(eval_name: str, columns: Iterable[str]) -> list[str]:
    """``columns`` with the eval's headline metrics first (in their order), the rest after,
    sorted."""
    cols = set(columns)
    spec = eval_facts(eval_name)
    head = [c for c in (spec.headline_metrics if spec else ()) if c in cols]
    return head + sorted(cols - set(head))


def _newest_per_job(recs: list[Record]) -> tuple[list[Record], list[str]]:
    """One record per job hash (the newest); notes name the files of the records dropped."""
    best: dict[str, Record] = {}
    notes: list[str] = []
    for rec in recs:
        old = best.get(rec.job)
        if old is None:
            best[rec.job] = rec
            continue
        new, dropped = (rec, old) if rec.millis >= old.millis else (old, rec)
        best[rec.job] = new
        notes.append(
            f"duplicate (job {rec.job}): kept {new.shown_path} (newer), dropped {dropped.shown_path}"
        )
    for note in notes:
        log.warning(note)
    return list(best.values()), notes


def _merge_reruns(
    rows: list[dict[str, Any]], millis: dict[str, int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of several records of one job (reruns): the newest row per (job, method,
    attribute); notes name the files of the rows dropped. Rows of two jobs never merge."""
    best: dict[tuple, dict[str, Any]] = {}
    notes: list[str] = []
    for row in rows:
        key = (row["job_hash"], row["method"], row["attribute"])
        old = best.get(key)
        if old is None:
            best[key] = row
            continue
        new, dropped = (row, old) if millis[row["file"]] >= millis[old["file"]] else (old, row)
        best[key] = new
        note = f"duplicate (job {key[0]}): kept {new['file']} (newer), dropped {dropped['file']}"
        if note not in notes:
            notes.append(note)
    for note in notes:
        log.warning(note)
    return list(best.values()), notes


def _differ_note(settings: Sequence[str], seeds: Sequence[str]) -> str:
    if not settings:
        what = "none besides model, sae, layer and method"
    elif len(settings) <= 4:
        what = ", ".join(settings)
    else:  # two models differ in every model.* key: the per-part lines say what matters
        what = f"{len(settings)} config keys (each a column of the CSV; summarised per table)"
    return (
        f"settings that differ between these jobs: {what}; seeds (averaged in the over-seeds "
        f"table): {', '.join(seeds) or 'one seed only'} (seed keys: {', '.join(SEED_KEYS)})"
    )


def attribute_order(records: Iterable[Record]) -> list[str]:
    """The attributes of ``records`` in their configs' order (``eval.attributes``: Country
    before Continent in the default config), first appearance first."""
    out: list[str] = []
    for rec in records:
        for a in rec.attributes():
            if a not in out:
                out.append(a)
    return out


def build_tables(records: Iterable[Record]) -> list[Table]:
    """The ravel table (records with a ``ravel`` metric group), its over-seeds table, and one
    flat table per other eval. Rows are keyed by job hash; differing settings are columns.
    Ravel rows are ordered by part, attribute (config order), method (SAE, neurons, DAS, ...
    as in the figures), SAE and layer."""
    from saeravel import figures

    by_eval: dict[str, list[Record]] = {}
    for rec in records:
        by_eval.setdefault(RAVEL_EVAL if has_ravel_metrics(rec) else rec.eval_type, []).append(rec)
    tables = []
    for name in sorted(by_eval, key=lambda n: (n != RAVEL_EVAL, n)):
        recs = by_eval[name]
        settings, seeds = varying_settings(recs), varying_seeds(recs)
        extra_cols = [*settings, *[k for k in seeds if k != "seed"]]
        note = _differ_note(settings, seeds)
        millis = {r.shown_path: r.millis for r in recs}
        if name == RAVEL_EVAL:
            rows = [row for r in recs for row in ravel_rows(r, settings, seeds)]
            rows, notes = _merge_reruns(rows, millis)
            rank = {a: i for i, a in enumerate(attribute_order(recs))}
            mrank = {m: i for i, m in enumerate(("sae", *figures.METHOD_STYLES))}
            rows.sort(
                key=lambda r: (
                    r["part"], rank.get(r["attribute"], len(rank)),
                    mrank.get(r["method"], len(mrank)), r["method"], r["sae"],
                    r["layer"],
                    *[str(r.get(c)) for c in extra_cols], r["seed"] or 0,
                )
            )  # fmt: skip
            columns = [*RAVEL_COLUMNS, *extra_cols, *RAVEL_DETAIL_COLUMNS, *PROVENANCE_COLUMNS]
            tables.append(Table(name, columns, rows, notes, list(settings), note))
            tables.append(seed_spread(rows, settings))
            if (pooled := verdict_table(recs, settings)).rows:
                tables.append(pooled)
            continue
        recs, notes = _newest_per_job(recs)
        rows = [row for r in recs for row in generic_rows(r, settings, seeds)]
        rows.sort(
            key=lambda r: (r["part"], r["sae"], r["layer"], *[str(r.get(c)) for c in extra_cols])
        )
        keys = [*GENERIC_KEY_COLUMNS, "seed", *extra_cols]
        present = {c for r in rows for c in r} - set(keys) - set(HIDDEN_COLUMNS)
        columns = [*keys, *headline_first(name, present), "sae_identity", *PROVENANCE_COLUMNS]
        tables.append(Table(name, columns, rows, notes, list(settings), note))
    return tables


VERDICT_TABLE = "ravel_verdict"
VERDICT_METRICS = ("disentangle", "isolation_heldout")


def verdict_table(records: Sequence[Record], settings: Sequence[str] = ()) -> Table:
    """The paper's comparisons (SAE vs neurons vs DAS) pooled over the seeds of otherwise
    identical jobs: per part, SAE, layer, differing setting, attribute and comparison, the mean
    paired difference over runs with an interval that resamples base entities within each run
    (:func:`~saeravel.evals.ravel.verdict.pooled_difference`), each run's own difference, and
    how many runs favour the first method. Jobs without stored per-pair outcomes are left
    out (named in the notes)."""
    from saeravel.evals.ravel.verdict import HEADLINE, pooled_difference

    keys = ["part", "model", "sae", "layer", *settings]
    cols = [*keys, "attribute", "comparison", "metric", "n_runs", "diff", "ci_lo", "ci_hi",
            "runs_a_better", "per_run", "diff_ci"]  # fmt: skip
    note = (
        "paired differences pooled over the seeds of otherwise identical jobs: mean of the runs' "
        "differences; 95% interval resampling base entities within each run (conditional on these "
        "runs); runs_a_better = runs whose own difference favours the first method"
    )
    groups: dict[tuple, list[Record]] = {}
    notes: list[str] = []
    for rec in _newest_per_job(list(records))[0]:
        details = rec.data.get("eval_result_details")
        outcomes = details.get("outcomes") if isinstance(details, Mapping) else None
        if not isinstance(outcomes, Mapping) or not outcomes:
            notes.append(f"{rec.shown_path}: no per-pair outcomes (an older result); not pooled")
            continue
        cfg = rec.config
        key = (rec.part or rec.model, rec.model, rec.sae, rec.layer,
               *[json.dumps(cfg.get(k), sort_keys=True) for k in settings])  # fmt: skip
        groups.setdefault(key, []).append(rec)
    rows = []
    for key, recs in groups.items():
        attrs = [a for a in recs[0].attributes()
                 if all(a in r.data["eval_result_details"]["outcomes"] for r in recs)]  # fmt: skip
        for attr in attrs:
            runs = [r.data["eval_result_details"]["outcomes"][attr] for r in recs]
            for a, b in HEADLINE:
                if not all(a in o["methods"] and b in o["methods"] for o in runs):
                    continue
                pooled = pooled_difference(runs, a, b)
                for metric in VERDICT_METRICS:
                    if metric not in pooled:
                        continue
                    r = pooled[metric]
                    row = dict(zip(keys[:4], key[:4], strict=True))
                    row.update({k: recs[0].config.get(k) for k in settings})
                    row.update(
                        attribute=attr, comparison=f"{a} - {b}", metric=metric,
                        n_runs=len(runs), diff=r["diff"], ci_lo=r["ci"][0], ci_hi=r["ci"][1],
                        runs_a_better=f"{r['runs_a_better']}/{len(runs)}",
                        per_run=" ".join(f"{x:+.3f}" for x in r["per_run"]),
                        diff_ci=f"{r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]",
                    )  # fmt: skip
                    rows.append(row)
    return Table(VERDICT_TABLE, cols, rows, notes, list(settings), note)


# ----------------------------------------------------------------------------- output


def seed_spread(rows: list[dict[str, Any]], settings: Sequence[str] = ()) -> Table:
    """Mean, standard deviation (n - 1) and n of each score over the seeds of otherwise
    identical jobs: rows grouped by model, SAE, layer, method, attribute and every differing
    setting (``pandas.DataFrame.groupby``); only :data:`SEED_KEYS` vary inside a group."""
    import pandas as pd

    keys = ["part"] + [c for c in KEY_COLUMNS if c != "seed"] + list(settings)
    scores = [*SCORES, "baseline"]
    cols = [*keys, "n_seeds"] + [f"{s}_{k}" for s in scores for k in ("mean", "std")]
    note = (
        f"mean and std over the seeds of otherwise identical jobs (seed keys: "
        f"{', '.join(SEED_KEYS)}); every other setting that differs is a column"
    )
    if not rows:
        return Table("ravel_over_seeds", cols, [], [], list(settings), note)
    frame = pd.DataFrame(rows)
    for k in keys:
        frame[k] = frame[k].map(lambda v: "" if v is None else v)
    grouped = frame.groupby(keys, sort=False, dropna=False)
    out = []
    for key, sub in grouped:
        row: dict[str, Any] = dict(
            zip(keys, key if isinstance(key, tuple) else (key,), strict=True)
        )
        row["n_seeds"] = int(len(sub))
        for score in scores:
            vals = sub[score].astype(float)
            row[f"{score}_mean"] = float(vals.mean()) if vals.notna().any() else math.nan
            std = vals.std(ddof=1) if vals.notna().sum() > 1 else math.nan
            row[f"{score}_std"] = float(std)
        out.append(row)
    return Table("ravel_over_seeds", cols, out, [], list(settings), note)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return "" if value is None else str(value)


def to_markdown(table: Table, columns: Sequence[str] | None = None, rows: Any = None) -> str:
    """A markdown table of ``table`` (``rows``: a subset; default columns: all but the
    provenance and CSV-only detail columns)."""
    cols = list(columns or [c for c in table.columns if c not in HIDDEN_COLUMNS])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table.rows if rows is None else rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def write_csv(table: Table, path: str | Path) -> Path:
    """Write ``table`` as CSV (full precision, NaN as ``nan``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=table.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table.rows)
    return path


# ----------------------------------------------------------------------------- parts, variants


def part_label(rec: Record, split_by: Sequence[str]) -> str:
    """The part a record is shown in: its model, then ``key=value`` of each ``split_by`` key."""
    cfg = rec.config
    extra = [f"{k}={_fmt(cfg.get(k))}" for k in split_by]
    return ", ".join([rec.model, *extra])


@dataclass
class Variants:
    """Settings that differ inside one part: ``keys``, and per variant id (``v1``...) the
    values; ``column`` is what the tables show (the key itself when only one differs)."""

    keys: list[str]
    values: dict[str, tuple] = field(default_factory=dict)

    @property
    def column(self) -> str | None:
        if not self.keys:
            return None
        return self.keys[0] if len(self.keys) == 1 else "variant"

    def caption(self) -> str:
        """One line naming what differs (and what each variant is)."""
        if not self.keys:
            return ""
        if len(self.keys) == 1:
            return f"differs: {self.keys[0]}"
        each = "; ".join(
            f"{vid}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in zip(self.keys, vals, strict=True))
            for vid, vals in self.values.items()
        )
        return f"variants (settings that differ: {', '.join(self.keys)}): {each}"


def assign_variants(rows: list[dict[str, Any]], settings: Sequence[str]) -> Variants:
    """Give each row of one part its ``variant`` (the value when one setting differs inside
    the part, else ``v1``, ``v2``... in sorted order of the values)."""
    keys = [
        k for k in settings
        if len({json.dumps(r.get(k), default=str) for r in rows}) > 1
        and any(_num(r.get(k)) != _num(r.get("layer")) for r in rows)  # e.g. model.site_layer
    ]  # fmt: skip
    out = Variants(keys)
    if not keys:
        for r in rows:
            r["variant"] = r["variant_label"] = ""
        return out
    combos = sorted(
        {tuple(r.get(k) for k in keys) for r in rows}, key=lambda t: json.dumps(t, default=str)
    )
    ids = {c: f"v{i + 1}" for i, c in enumerate(combos)}
    out.values = {ids[c]: c for c in combos}
    ref_keys = [k for k in keys if not k.startswith("sae.")]
    ref_combos = sorted({tuple(r.get(k) for k in ref_keys) for r in rows}, key=json.dumps)
    ref_ids = {c: f"r{i + 1}" for i, c in enumerate(ref_combos)}
    for r in rows:
        combo = tuple(r.get(k) for k in keys)
        r["variant"] = _fmt(combo[0]) if len(keys) == 1 else ids[combo]
        label = f"{keys[0]}={_fmt(combo[0])}" if len(keys) == 1 else ids[combo]
        if not str(r.get("method") or "sae").startswith("sae"):  # a method without the SAE
            ref = tuple(r.get(k) for k in ref_keys)
            label = (", ".join(f"{k}={_fmt(v)}" for k, v in zip(ref_keys, ref, strict=True))
                     if len(ref_keys) <= 2 else ref_ids[ref])  # fmt: skip
        r["variant_label"] = label
    if len(ref_keys) > 2:
        out.values.update({i: c for c, i in ref_ids.items()})
    return out


def parts_of(table: Table) -> dict[str, tuple[list[dict[str, Any]], Variants]]:
    """The rows of each part of ``table`` (in order) with their variants assigned."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for r in table.rows:
        parts.setdefault(str(r.get("part") or r.get("model")), []).append(r)
    return {p: (rows, assign_variants(rows, table.settings)) for p, rows in parts.items()}


def _markdown_columns(table: Table, var: Variants, rows: list[dict[str, Any]]) -> list[str]:
    """At most :data:`MAX_COLUMNS` columns: keys, the variant, then scores / headline metrics."""
    var_col = ["variant"] if var.column else []
    seeds = len({r.get("seed") for r in rows}) > 1
    if table.name == RAVEL_EVAL:
        cols = ["sae", "layer", "method", "attribute", *var_col, *(["seed"] if seeds else []),
                *SCORES, "baseline"]  # fmt: skip
    elif table.name == VERDICT_TABLE:
        cols = ["sae", "layer", "attribute", *var_col, "comparison", "metric", "n_runs",
                "diff_ci", "runs_a_better", "per_run"]  # fmt: skip
    elif table.name == "ravel_over_seeds":
        cols = ["sae", "layer", "method", "attribute", *var_col, "n_seeds", "disentangle_mean",
                "disentangle_std", "cause_mean", "isolation_mean", "baseline_mean"]  # fmt: skip
    else:
        keys = ["sae", "layer", *var_col, *(["seed"] if seeds else [])]
        present = {c for r in rows for c, v in r.items() if v is not None}
        metrics = [c for c in table.columns if c in present and c not in HIDDEN_COLUMNS
                   and c not in keys and c not in ("model", "seed") and c not in table.settings
                   and c not in SEED_KEYS]  # fmt: skip
        cols = keys + metrics[: MAX_COLUMNS - len(keys)]
    return cols[:MAX_COLUMNS]


def table_markdown(table: Table) -> list[str]:
    """Markdown lines of ``table``: one sub-table per part, with its settings line."""
    out: list[str] = []
    parts = parts_of(table)
    for part, (rows, var) in parts.items():
        cols = _markdown_columns(table, var, rows)
        header = [f"### {table.name}: {part} ({len(rows)} rows)", ""]
        if var.column and var.column != "variant":  # one setting: name the column after it
            shown = [var.column if c == "variant" else c for c in cols]
            rows_shown = [{**r, var.column: r["variant"]} for r in rows]
            cols = shown
        else:
            rows_shown = rows
        line = var.caption()
        hidden = [c for c in table.columns if c not in cols and c not in HIDDEN_COLUMNS]
        if table.name not in (RAVEL_EVAL, "ravel_over_seeds", VERDICT_TABLE) and hidden:
            line += ("; " if line else "") + f"{len(hidden)} more columns in {table.name}.csv"
        out += header + ([line, ""] if line else []) + [to_markdown(table, cols, rows_shown), ""]
    return out


# ----------------------------------------------------------------------------- figures


def line_label(row: Mapping[str, Any], families: int = 1) -> str:
    """Legend label of a row: ``SAE <family>`` for the SAE mask, the method's name otherwise
    (an SAE-based method gets its family when the part has several), then ``[variant]``."""
    method = str(row["method"])
    if method == "sae":
        label = f"SAE {row['sae']}"
    elif method.startswith("sae") and families > 1:
        label = f"{method} ({row['sae']})"
    else:
        label = method
    return label + (f" [{row['variant_label']}]" if row.get("variant_label") else "")


def bar_layer(rows: Sequence[Mapping[str, Any]]) -> int:
    """The layer of the methods bar chart: where the most method lines were measured (ties:
    the highest mean disentangle)."""
    by: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault(int(r["layer"]), []).append(r)

    def key(layer: int) -> tuple:
        sel = by[layer]
        vals = [v for v in (_num(r.get("disentangle")) for r in sel) if not math.isnan(v)]
        lines = {(r["method"], r["sae"], r.get("variant")) for r in sel}
        return (len(lines), sum(vals) / len(vals) if vals else -1.0, -layer)

    return max(by, key=key)


def _verdict(records: Sequence[Record], layer: int) -> tuple[Mapping[str, Any] | None, str]:
    """The paired differences the methods figure draws at ``layer`` and a note saying whose:
    pooled over the runs (:func:`~saeravel.evals.ravel.verdict.pooled_difference`) when
    several records there differ only in seeds and keep per-pair outcomes, else the newest
    record's ``verdict`` block; the paper's comparisons (SAE, neurons, DAS) when they ran,
    every pair otherwise (all pairs are in the result and ``ravel_verdict.csv``)."""
    from saeravel.evals.ravel.verdict import HEADLINE, pooled_difference

    at = [r for r in _newest_per_job([r for r in records if r.layer == layer])[0]]
    pooled = [
        r
        for r in at
        if isinstance((r.data.get("eval_result_details") or {}).get("outcomes"), Mapping)
    ]
    if len(pooled) > 1 and not varying_settings(pooled):
        out: dict[str, dict[str, Any]] = {}
        for attr in pooled[0].attributes():
            runs = [r.data["eval_result_details"]["outcomes"].get(attr) for r in pooled]
            if not all(isinstance(o, Mapping) for o in runs):
                continue
            for a, b in HEADLINE:
                if all(a in o["methods"] and b in o["methods"] for o in runs):
                    out.setdefault(attr, {})[f"{a} - {b}"] = pooled_difference(runs, a, b)
        if out:
            return out, f"pooled over {len(pooled)} runs"
    for rec in sorted(at, key=lambda r: -r.millis):
        details = rec.data.get("eval_result_details")
        v = details.get("verdict") if isinstance(details, Mapping) else None
        if isinstance(v, Mapping) and v:
            head = {attr: {k: d for k, d in by.items() if tuple(k.split(" - ")) in HEADLINE}
                    for attr, by in v.items() if isinstance(by, Mapping)}  # fmt: skip
            return (head if any(head.values()) else v), "one run"
    return None, ""


def _curves(
    records: Sequence[Record], layer: int, label_of: Any, variant_of: Mapping[str, str]
) -> list[tuple[str, str, str, list[float]]]:
    out = []
    for rec in records:
        details = rec.data.get("eval_result_details")
        curves = details.get("training_curves") if isinstance(details, Mapping) else None
        if rec.layer != layer or not isinstance(curves, Mapping):
            continue
        for key, curve in curves.items():
            method, _, attr = str(key).rpartition("/")
            vals = _finite_list(curve)
            if not method or not vals:
                continue
            row = {"method": method, "sae": rec.sae,
                   "variant_label": variant_of.get((rec.shown_path, method), "")}  # fmt: skip
            out.append((label_of(row), method, attr, vals))
    return out


def _finite_list(values: Any) -> list[float]:
    if not isinstance(values, list):
        return []
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def ravel_figures(table: Table, records: Sequence[Record], out_dir: str | Path) -> dict[Path, Any]:
    """Per part: ``ravel_vs_layer``, ``ravel_methods``, ``cause_vs_isolation`` and (when the
    records have them) ``training_curves`` (see saeravel.figures)."""
    from saeravel import figures

    out = Path(out_dir)
    parts = parts_of(table)
    attrs_all = attribute_order(records)
    written: dict[Path, Any] = {}
    for part, (rows, var) in parts.items():
        suffix = "" if len(parts) == 1 else f"_{figures.slug(part)}"
        attrs = [a for a in attrs_all if any(r["attribute"] == a for r in rows)]
        families = len({r["sae"] for r in rows if str(r["method"]).startswith("sae")})

        def label_of(r: Mapping[str, Any], families: int = families) -> str:
            return line_label(r, families)

        setup = figures_setup(rows)
        caption = "; ".join(x for x in (setup, var.caption()) if x)
        bars = "bars: std over seeds (n>1), else the 95% bootstrap interval"
        path, fig = figures.ravel_layer_figure(
            rows, label_of, attrs, out / f"ravel_vs_layer{suffix}.png",
            f"{part}: disentangle vs layer", f"{caption}; {bars}",
        )  # fmt: skip
        written[path] = fig
        layer = bar_layer(rows)
        mine = [r for r in records if (r.part or r.model) == part and has_ravel_metrics(r)]
        at = [r for r in rows if int(r["layer"]) == layer]
        verdict, whose = _verdict(mine, layer)
        path, fig = figures.methods_bar_figure(
            at, label_of, attrs, out / f"ravel_methods{suffix}.png",
            f"{part}: methods at layer {layer}", verdict,
            f"{caption}; {bars}" + (f"; paired differences: {whose}" if whose else ""),
        )  # fmt: skip
        written[path] = fig
        path, fig = figures.cause_isolation_figure(
            at, label_of, attrs, out / f"cause_vs_isolation{suffix}.png",
            f"{part}: cause vs isolation", caption,
        )  # fmt: skip
        written[path] = fig
        variant_of = {(str(r["file"]), str(r["method"])): str(r.get("variant_label") or "")
                      for r in rows}  # fmt: skip
        curves = _curves(mine, layer, label_of, variant_of)
        if curves:
            path, fig = figures.training_curves_figure(
                curves, attrs, out / f"training_curves{suffix}.png",
                f"{part}: training loss per epoch, layer {layer}", caption,
            )  # fmt: skip
            written[path] = fig
    return written


def figures_setup(rows: Sequence[Mapping[str, Any]]) -> str:
    """``protocol=..., match=..., split=...`` of the rows (``mixed`` when they differ)."""

    def common(key: str) -> str:
        values = sorted({str(r.get(key)) for r in rows if r.get(key) not in (None, "")})
        return values[0] if len(values) == 1 else ("mixed" if values else "?")

    return f"protocol={common('protocol')}, match={common('match')}, split={common('split_by')}"


def attach_l0(table: Table, core: Table | None) -> str:
    """Give every row of ``table`` an ``l0`` value: its own :data:`L0_METRIC` if it has one,
    else the mean L0 of the core rows of the same model, layer and SAE identity. Returns
    where the L0 came from (one line for the report)."""
    lookup: dict[tuple, list[float]] = {}
    for r in core.rows if core is not None else []:
        v = _num(r.get(L0_METRIC))
        if not math.isnan(v):
            lookup.setdefault((r["model"], r["layer"], r.get("sae_identity")), []).append(v)
    own = joined = 0
    for r in table.rows:
        v = _num(r.get(L0_METRIC))
        if math.isnan(v):
            vals = lookup.get((r["model"], r["layer"], r.get("sae_identity")), [])
            v = sum(vals) / len(vals) if vals else math.nan
            joined += not math.isnan(v)
        else:
            own += 1
        r["l0"] = v
    missing = len(table.rows) - own - joined
    hint = " (run eval=core for those SAEs)" if missing else ""
    return (
        f"L0: {own} rows from their own record, {joined} from eval=core's record of the same "
        f"model, layer and SAE, {missing} without{hint}"
    )


def defined(row: Mapping[str, Any], column: str) -> float:
    """``row[column]`` or NaN where the score is undefined: a CE-loss score whose zero-ablation
    CE is not above the clean CE (the score's denominator), a KL score whose zero-ablation
    KL is not positive."""
    value = _num(row.get(column))
    if column.endswith("ce_loss_score"):
        group = column.rsplit(".", 1)[0] + "." if "." in column else ""
        abl, clean = (
            _num(row.get(f"{group}ce_loss_with_ablation")),
            _num(row.get(f"{group}ce_loss_without_sae")),
        )
        if not math.isnan(abl) and not math.isnan(clean) and abl <= clean:
            return math.nan
    if column.endswith("kl_div_score"):
        group = column.rsplit(".", 1)[0] + "." if "." in column else ""
        abl = _num(row.get(f"{group}kl_div_with_ablation"))
        if not math.isnan(abl) and abl <= 0:
            return math.nan
    return value


def llm_baseline(rows: Sequence[Mapping[str, Any]], column: str) -> float | None:
    """The LLM's own score beside an SAE score (``sae.sae_X`` -> ``llm.llm_X``), mean over
    ``rows``; None when the eval records none."""
    group, _, name = column.rpartition(".")
    if group != "sae" or not name.startswith("sae_"):
        return None
    vals = [_num(r.get(f"llm.llm_{name[4:]}")) for r in rows]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def l0_figures(tables: Sequence[Table], out_dir: str | Path) -> tuple[dict[Path, Any], list[str]]:
    """SAEBench-style figures: per eval with ``plotted`` metrics (its registration) and per part, each
    metric vs L0 (see saeravel.figures.metric_vs_l0_figure). Returns the files and one note
    per eval (where L0 came from, undefined scores left out)."""
    from saeravel import figures

    core = next((t for t in tables if t.name == "core"), None)
    written: dict[Path, Any] = {}
    notes: list[str] = []
    for table in tables:
        spec = eval_facts(table.name)
        if spec is None or not spec.plotted or not table.rows:
            continue
        note = attach_l0(table, core)
        metrics = [(c, lab) for c, lab in spec.plotted if c in table.columns]
        rows = [r for r in table.rows if not math.isnan(r["l0"])]
        if not metrics or not rows:
            notes.append(f"{table.name}: no figure ({note}; metrics found: {len(metrics)})")
            continue
        blanked = 0
        plotted = []
        for r in rows:
            row = dict(r)
            for c, _ in metrics:
                v = defined(r, c)
                blanked += math.isnan(v) and not math.isnan(_num(r.get(c)))
                row[c] = v
            plotted.append(row)
        parts = parts_of(Table(table.name, table.columns, plotted, [], table.settings))
        for part, (mine, var) in parts.items():
            layers = len({r["layer"] for r in mine}) > 1

            def color_of(r: Mapping[str, Any], layers: bool = layers) -> str:
                lab = str(r["sae"]) + (f", layer {r['layer']}" if layers else "")
                return lab + (f" [{r['variant_label']}]" if r.get("variant_label") else "")

            def point_of(r: Mapping[str, Any]) -> str:
                return json.dumps([r.get("sae_identity"), r.get("layer"), r.get("variant")])

            base = {c: llm_baseline(mine, c) for c, _ in metrics}
            suffix = "" if len(parts) == 1 else f"_{figures.slug(part)}"
            path, fig = figures.metric_vs_l0_figure(
                mine, metrics, color_of, point_of, Path(out_dir) / f"{table.name}_vs_l0{suffix}.png",
                f"{part}: {table.name} vs L0 (one point per SAE)",
                {c: v for c, v in base.items() if v is not None}, var.caption(),
            )  # fmt: skip
            written[path] = fig
        extra = f"; {blanked} undefined score(s) left out of the figure" if blanked else ""
        notes.append(f"{table.name}: {note}{extra}")
    return written, notes


def neuronpedia_url(neuronpedia_id: str, index: int) -> str:
    """The Neuronpedia page of one latent: ``neuronpedia_id`` is sae_lens' ``<model>/<sae>``
    (e.g. ``gpt2-small/8-res-jb``)."""
    return NEURONPEDIA_URL.format(neuronpedia_id=neuronpedia_id.strip("/"), index=int(index))


def neuronpedia_quick_list_url(neuronpedia_id: str, indices: Iterable[int], name: str) -> str:
    """One Neuronpedia page listing the latents ``indices`` of the SAE ``neuronpedia_id``
    (``<model>/<sae>``), titled ``name``: ``quick-list/?name=...&features=[{"modelId": model,
    "layer": sae, "index": "i"}, ...]`` (the JSON URL-encoded)."""
    from urllib.parse import quote, urlencode

    model, _, sae = neuronpedia_id.strip("/").partition("/")
    features = [{"modelId": model, "layer": sae, "index": str(int(i))} for i in indices]
    query = urlencode({"name": name, "features": json.dumps(features)}, quote_via=quote)
    return f"{NEURONPEDIA_QUICK_LIST}?{query}"


def _latent_method(rec: Record, method: str, scores: Mapping[str, Any]) -> bool:
    """Whether a method's kept entries index SAE latents: an ``sae*`` method whose mask is as
    wide as the SAE's dictionary (when the record states ``d_sae``)."""
    if not method.startswith("sae"):
        return False
    d_sae = (rec.data.get("sae_cfg_dict") or {}).get("d_sae")
    size = scores.get("mask_size")
    return not (isinstance(d_sae, int) and d_sae > 0 and isinstance(size, int) and size != d_sae)


def neuronpedia_table(records: Iterable[Record]) -> Table:
    """One row per kept SAE latent (``kept_top``, most confident first) of every ravel record
    whose SAE has a ``neuronpedia_id``, with its Neuronpedia URL. SAEs without an id get no
    rows."""
    cols = ["model", "sae", "layer", "seed", "neuronpedia_id", "method", "attribute",
            "rank", "latent", "mask_kept", "url", "job_hash"]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for rec in records:
        npid = (rec.data["saeravel"].get("sae_identity") or {}).get("neuronpedia_id")
        group = rec.data["eval_result_metrics"].get(RAVEL_GROUP)
        if not npid or not isinstance(group, Mapping):
            continue
        for method, by_attr in group.items():
            if method == BASELINE_METHOD or not isinstance(by_attr, Mapping):
                continue
            for attribute, scores in by_attr.items():
                kept = scores.get("kept_top") if isinstance(scores, Mapping) else None
                if not isinstance(kept, list) or not _latent_method(rec, str(method), scores):
                    continue
                for rank, idx in enumerate(kept):
                    rows.append({
                        "model": rec.model, "sae": rec.sae, "layer": rec.layer, "seed": rec.seed,
                        "neuronpedia_id": str(npid), "method": str(method),
                        "attribute": str(attribute), "rank": rank, "latent": int(idx),
                        "mask_kept": scores.get("mask_kept"),
                        "url": neuronpedia_url(str(npid), int(idx)),
                        "job_hash": rec.data["saeravel"].get("job_hash", ""),
                    })  # fmt: skip
    rows.sort(key=lambda r: (r["model"], r["neuronpedia_id"], r["layer"], r["method"],
                             r["attribute"], r["seed"] or 0, r["job_hash"], r["rank"]))  # fmt: skip
    about = "kept SAE latents (most confident mask entries first) on neuronpedia.org"
    return Table("neuronpedia", cols, rows, [], [], about)


def neuronpedia_markdown(table: Table, per_line: int = 16) -> list[str]:
    """The links of :func:`neuronpedia_table` as one markdown list item per (job, method,
    attribute), the first ``per_line`` latents linked (all are in ``neuronpedia.csv``), then one
    Neuronpedia quick-list page of all the mask's recorded latents."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in table.rows:
        key = (r["model"], r["neuronpedia_id"], r["layer"], r["seed"], r["method"],
               r["attribute"], r["job_hash"])  # fmt: skip
        groups.setdefault(key, []).append(r)
    lines = []
    for (model, npid, layer, seed, method, attr, _), rows in groups.items():
        links = ", ".join(f"[{r['latent']}]({r['url']})" for r in rows[:per_line])
        more = f" (+{len(rows) - per_line} in neuronpedia.csv)" if len(rows) > per_line else ""
        kept = rows[0]["mask_kept"]
        title = f"{model} layer {layer} seed {seed} {method} {attr}"
        page = neuronpedia_quick_list_url(str(npid), [r["latent"] for r in rows], title)
        lines.append(
            f"- {model} layer {layer} `{npid}` seed {seed}, {method} / {attr} "
            f"({kept} kept, the top {len(rows)} recorded by eval.report_top_latents): {links}{more}"
            f"; [all {len(rows)} on one page]({page})"
        )
    return lines


def _filter_methods(tables: list[Table], methods: Sequence[str]) -> None:
    """Keep only the RAVEL rows of ``methods``; an unknown method is a one-line error naming
    the ones present."""
    ravel = [t for t in tables if t.name in (RAVEL_EVAL, "ravel_over_seeds")]
    present = sorted({str(r["method"]) for t in ravel for r in t.rows})
    unknown = [m for m in methods if m not in present]
    if unknown:
        raise UserError(
            f"--methods: no RAVEL results of {', '.join(unknown)} here; "
            f"methods in these results: {', '.join(present) or 'none'}"
        )
    for t in ravel:
        t.rows = [r for r in t.rows if str(r["method"]) in methods]
    for t in tables:
        if t.name == VERDICT_TABLE:
            t.rows = [r for r in t.rows if all(m in methods for m in r["comparison"].split(" - "))]


def _remove_stale(out: Path, written: Sequence[Path]) -> list[str]:
    """Remove the files an earlier run of the report wrote into ``out`` (its manifest) that
    this run did not write again; record this run's files. Returns the names removed."""
    manifest = out / MANIFEST
    names = sorted({p.name for p in written if p.parent.resolve() == out.resolve()})
    removed = []
    try:
        old = json.loads(manifest.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        old = []
    for name in old if isinstance(old, list) else []:
        stale = out / str(name)
        if str(name) not in names and "/" not in str(name) and stale.is_file():
            stale.unlink()
            removed.append(str(name))
    from saeravel.results import atomic_write_json

    atomic_write_json(manifest, {"files": names})
    return removed


def build_report(
    folder: str | Path,
    out_dir: str | Path | None = None,
    methods: Sequence[str] = (),
    split_by: Sequence[str] = (),
) -> Report:
    """Collect ``folder``'s results; write CSVs, ``report.md`` and figures to ``out_dir``
    (default ``<folder>/report``); return the tables and the markdown text. ``methods``: the
    RAVEL methods shown (default all); ``split_by``: config keys whose values split the
    tables and figures further than by model. No result under ``folder`` is a
    :class:`~saeravel.errors.UserError`."""
    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder / "report"
    records, skipped = collect(folder)
    if not records:
        raise UserError(
            f"no saeravel results under {folder} ({len(skipped)} unreadable or broken JSON "
            "files); point the report at a run folder (outputs/) or a results index"
        )
    for rec in records:
        rec.part = part_label(rec, split_by)
    versions = version_note(records)
    if versions:
        log.warning(versions)
    tables = build_tables(records)
    if methods:
        _filter_methods(tables, methods)
    files: list[Path] = []
    parts = [f"# saeravel report: {folder}", "", f"{len(records)} result records."]
    if versions:
        parts += ["", f"Note: {versions}."]
    figs, l0_notes = l0_figures(tables, out)
    for table in tables:
        files.append(write_csv(table, out / f"{table.name}.csv"))
        parts += ["", f"## {table.name} ({len(table.rows)} rows)", ""]
        if table.about:
            parts += [table.about, ""]
        parts += table_markdown(table)
        if table.notes:
            parts += [*[f"- {n}" for n in table.notes]]
        if table.name == RAVEL_EVAL and table.rows:
            ravel_recs = [r for r in records if has_ravel_metrics(r)]
            figs.update(ravel_figures(table, ravel_recs, out))
    links = neuronpedia_table(r for r in records if has_ravel_metrics(r))
    if links.rows:
        files.append(write_csv(links, out / "neuronpedia.csv"))
        parts += ["", "## Neuronpedia: kept SAE latents", "", links.about, ""]
        parts += neuronpedia_markdown(links)
        tables.append(links)
    files += list(figs)
    if figs:
        parts += ["", "## figures", "", *[f"- {p.name}" for p in figs]]
    if l0_notes:
        parts += ["", "## figures vs L0", "", *[f"- {n}" for n in l0_notes]]
    if skipped:
        parts += ["", "## skipped files", ""] + [f"- {p}: {why}" for p, why in skipped]
    out.mkdir(parents=True, exist_ok=True)
    files.append(out / "report.md")
    removed = _remove_stale(out, files)
    if removed:
        parts += [
            "",
            f"Removed {len(removed)} file(s) of an earlier report run: {', '.join(removed)}",
        ]
    markdown = "\n".join(parts) + "\n"
    (out / "report.md").write_text(markdown)
    named = {p.name: f for p, f in figs.items()}
    return Report(tables=tables, skipped=skipped, files=files, markdown=markdown, figures=named)


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m saeravel.report <folder> [--out DIR] [--methods A,B] [--split-by K]``;
    a bad input is one line and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m saeravel.report",
        description="Collect saeravel result JSONs under a folder into CSV, markdown and figures.",
    )
    parser.add_argument("folder", help="folder searched recursively for result JSON files")
    parser.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    parser.add_argument(
        "--methods", type=_list, default=[],
        help="RAVEL methods to show, comma-separated (e.g. sae,neurons,das); default: all",
    )  # fmt: skip
    parser.add_argument(
        "--split-by", action="append", default=[], metavar="KEY",
        help="config key (dotted, e.g. eval.protocol) whose values get their own tables and "
        "figures, besides the model; repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        report = build_report(args.folder, args.out, args.methods, args.split_by)
    except (FileNotFoundError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.markdown)
    for path in report.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
