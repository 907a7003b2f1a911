"""Collect the result JSONs under a folder into one table, a CSV and figures.

``python -m saeravel.report <folder> [--out DIR]`` finds every result record under
``<folder>`` (``result.json`` files of a sweep, or the job-hash index
``<results_dir>/<eval>/<hash>.json``), and writes:

* ``ravel.csv``: one row per (job, method, attribute intervened) with disentangle, cause,
  isolation and the no-intervention baseline's disentangle (CSV only: each score's bootstrap
  interval, the none / swap baselines' components, protocol / match / split, kept entries);
* ``ravel_over_seeds.csv``: mean, standard deviation and n of each score over the seeds of
  otherwise identical jobs (:data:`SEED_KEYS` are the keys that count as seeds);
* ``<eval>.csv`` for every other eval: one row per job, one column per metric
  (``group.metric``), the eval's registered headline metrics first;
* ``neuronpedia.csv``: the kept latents of every SAE with a ``neuronpedia_id``, with URLs;
* ``report.md``: the same tables in markdown (the CLI prints it too), and the links;
* figures (PNG, saeravel.figures): ``ravel_vs_layer.png`` (disentangle, cause and isolation
  vs layer, a panel per attribute), ``cause_vs_isolation.png`` (a panel per method line) and
  ``<eval>_vs_l0.png`` (the SAEBench evals' headline metrics vs L0 per SAE family).

Rows are keyed by job hash (saeravel.results.job_hash), so two different jobs are never
merged: the config values that differ between the records (``pandas.json_normalize`` of
their result-relevant configs) become columns, named by their dotted config path, and the
table notes and figure legends name them. A file that is not JSON, or JSON that is not a
saeravel result, is named in a warning and skipped; SAEBench-named copies
(``*_eval_results.json``) are not read. When one job has several records (a rerun with
``force=true``) the newest (``datetime_epoch_millis``) is kept and the report says which file
was dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
    "protocol", "match", "split_by", "mask_kept", "kept_top", "neuronpedia_id",
)  # fmt: skip
PROVENANCE_COLUMNS = ("job_hash", "eval_id", "finished", "file")
HIDDEN_COLUMNS = (*PROVENANCE_COLUMNS, *RAVEL_DETAIL_COLUMNS, "sae_identity")
# Each eval's headline metrics (``group.metric`` columns), first in its table in this order,
# the other metrics alphabetically after, and the metrics the SAEBench-style figure plots vs
# L0: from each eval's registration (``headline_metrics``, ``plotted``; :func:`eval_facts`).
L0_METRIC = "sparsity.l0"  # core's L0: the x axis of the SAEBench-style figures
NEURONPEDIA_URL = "https://www.neuronpedia.org/{neuronpedia_id}/{index}"
GENERIC_KEY_COLUMNS = ("model", "sae", "layer")
NO_SAE = "none"
# Config keys that count as seeds: jobs that differ only in these are repetitions of one
# experiment, averaged in the ``*_over_seeds`` table. Every other difference is a setting.
SEED_KEYS = ("seed", "model.train_seed", "sae.seed", "eval.seed")
# Config paths already shown as key columns (never listed again as a differing setting).
_SHOWN = {"layer", "sae.layer", "model.name", "sae.family", "seed"}
SAEBENCH_SUFFIX = "_eval_results.json"


@dataclass
class Record:
    """One result record and the file it was read from."""

    path: Path
    data: dict[str, Any]
    root: Path | None = None  # the folder searched; ``file`` columns are relative to it

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


def collect(folder: str | Path) -> tuple[list[Record], list[tuple[Path, str]]]:
    """Every result record under ``folder`` and the files skipped (with the reason).

    The same record found twice (same ``eval_id``, e.g. a sweep's ``result.json`` and its copy
    in the job-hash index) counts once.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    paths = (
        [root]
        if root.is_file()
        else sorted(
            p for p in root.rglob("*.json") if p.is_file() and not p.name.endswith(SAEBENCH_SUFFIX)
        )
    )
    records: list[Record] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for path in paths:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            reason = f"unreadable or corrupt JSON ({type(exc).__name__}: {exc})"
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
            continue
        if not is_result(data):
            reason = "not a saeravel result (no eval_type_id/eval_result_metrics/saeravel.*)"
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
            continue
        eval_id = data.get("eval_id")
        if isinstance(eval_id, str) and eval_id in seen:
            log.debug("%s repeats record %s; counted once", path, eval_id)
            continue
        if isinstance(eval_id, str):
            seen.add(eval_id)
        records.append(Record(path, data, root))
    return records, skipped


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
    swap = (rec.data["eval_result_metrics"].get("baselines") or {}).get("swap") or {}
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
    row: dict[str, Any] = {"model": rec.model, "sae": rec.sae, "layer": rec.layer, "seed": rec.seed}
    row.update(_setting_columns(rec, settings, seeds))
    row.update(_flatten(rec.data["eval_result_metrics"]))
    row["sae_identity"] = sae_key(rec)
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
        notes.append(
            f"duplicate (job {key[0]}, method={key[1]}, attribute={key[2]}): kept {new['file']} "
            f"(newer), dropped {dropped['file']}"
        )
    for note in notes:
        log.warning(note)
    return list(best.values()), notes


def _differ_note(settings: Sequence[str], seeds: Sequence[str]) -> str:
    what = ", ".join(settings) if settings else "none besides model, sae, layer and method"
    return (
        f"settings that differ between these jobs: {what}; seeds (averaged in the over-seeds "
        f"table): {', '.join(seeds) or 'one seed only'} (seed keys: {', '.join(SEED_KEYS)})"
    )


def build_tables(records: Iterable[Record]) -> list[Table]:
    """The ravel table (records with a ``ravel`` metric group), its over-seeds table, and one
    flat table per other eval. Rows are keyed by job hash; differing settings are columns."""
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
            rows.sort(
                key=lambda r: (
                    r["model"], r["attribute"], r["method"], r["sae"], r["layer"],
                    *[str(r.get(c)) for c in extra_cols], r["seed"] or 0,
                )
            )  # fmt: skip
            columns = [*RAVEL_COLUMNS, *extra_cols, *RAVEL_DETAIL_COLUMNS, *PROVENANCE_COLUMNS]
            tables.append(Table(name, columns, rows, notes, list(settings), note))
            tables.append(seed_spread(rows, settings))
            continue
        recs, notes = _newest_per_job(recs)
        rows = [row for r in recs for row in generic_rows(r, settings, seeds)]
        rows.sort(
            key=lambda r: (r["model"], r["sae"], r["layer"], *[str(r.get(c)) for c in extra_cols])
        )
        keys = [*GENERIC_KEY_COLUMNS, "seed", *extra_cols]
        present = {c for r in rows for c in r} - set(keys) - set(HIDDEN_COLUMNS)
        columns = [*keys, *headline_first(name, present), "sae_identity", *PROVENANCE_COLUMNS]
        tables.append(Table(name, columns, rows, notes, list(settings), note))
    return tables


# ----------------------------------------------------------------------------- output


def seed_spread(rows: list[dict[str, Any]], settings: Sequence[str] = ()) -> Table:
    """Mean, standard deviation (n - 1) and n of each score over the seeds of otherwise
    identical jobs: rows grouped by model, SAE, layer, method, attribute and every differing
    setting (``pandas.DataFrame.groupby``); only :data:`SEED_KEYS` vary inside a group."""
    import pandas as pd

    keys = [c for c in KEY_COLUMNS if c != "seed"] + list(settings)
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


def to_markdown(table: Table, columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``table`` (without the provenance and CSV-only detail columns by
    default)."""
    cols = list(columns or [c for c in table.columns if c not in HIDDEN_COLUMNS])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table.rows:
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


def line_label(row: Mapping[str, Any], settings: Sequence[str] = ()) -> str:
    """Legend label of a row: SAE masks by family, other methods by name, then the row's value
    of every differing setting (SAE settings only on SAE lines); seeds are averaged."""
    label = f"sae: {row['sae']}" if row["method"] == "sae" else str(row["method"])
    shown = [k for k in settings if row["method"] == "sae" or not k.startswith("sae.")]
    if shown:
        label += " (" + ", ".join(f"{k}={_fmt(row.get(k))}" for k in shown) + ")"
    return label


def _legend_title(settings: Sequence[str]) -> str:
    return "differs: " + ", ".join(settings) if settings else "mean over seeds"


def ravel_figures(table: Table, out_dir: str | Path) -> dict[Path, Any]:
    """Per model: ``ravel_vs_layer.png`` (disentangle, cause and isolation vs layer, one
    panel per attribute, shared y) and ``cause_vs_isolation.png`` (one panel per method
    line); see saeravel.figures for the conventions."""
    from saeravel import figures

    out = Path(out_dir)
    st = table.settings
    models = sorted({r["model"] for r in table.rows})
    written: dict[Path, Any] = {}
    for model in models:
        rows = [r for r in table.rows if r["model"] == model]
        suffix = "" if len(models) == 1 else f"_{figures.slug(model)}"
        setup = figures.ravel_title(rows)
        bars = "error bars: std over seeds (n>1), else the 95% bootstrap interval"
        path, fig = figures.ravel_layer_figure(
            rows, lambda r: line_label(r, st), out / f"ravel_vs_layer{suffix}.png",
            f"{model}: RAVEL scores vs layer ({setup})\n{bars}; mean over seeds",
            _legend_title(st) if st else "",
        )  # fmt: skip
        written[path] = fig
        path, fig = figures.cause_isolation_figure(
            rows, lambda r: line_label(r, st), out / f"cause_vs_isolation{suffix}.png",
            f"{model}: cause vs isolation ({setup}); mean over seeds",
        )  # fmt: skip
        written[path] = fig
    return written


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


def l0_figures(tables: Sequence[Table], out_dir: str | Path) -> tuple[dict[Path, Any], list[str]]:
    """SAEBench-style figures: per eval with ``plotted`` metrics, the headline metric(s)
    vs L0, one line per SAE family and layer (and differing non-SAE setting), one point per
    SAE (seeds averaged). Returns the files and one note per eval."""
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
        st = table.settings
        other = [k for k in st if not k.startswith("sae.")]
        layers = len({r["layer"] for r in rows}) > 1

        def line_of(r: Mapping[str, Any], other: list[str] = other, layers: bool = layers) -> str:
            lab = str(r["sae"]) + (f" (layer {r['layer']})" if layers else "")
            if other:
                lab += " [" + ", ".join(f"{k}={_fmt(r.get(k))}" for k in other) + "]"
            return lab

        def point_of(r: Mapping[str, Any], st: list[str] = st) -> str:
            return json.dumps([r.get("sae_identity"), *[str(r.get(k)) for k in st]])

        models = sorted({r["model"] for r in rows})
        for model in models:
            mine = [r for r in rows if r["model"] == model]
            suffix = "" if len(models) == 1 else f"_{figures.slug(model)}"
            path, fig = figures.metric_vs_l0_figure(
                mine, metrics, line_of, point_of, Path(out_dir) / f"{table.name}_vs_l0{suffix}.png",
                f"{model}: {table.name} vs L0 (one point per SAE, mean over seeds, bars: std)",
            )  # fmt: skip
            written[path] = fig
        notes.append(f"{table.name}: {note}")
    return written, notes


def neuronpedia_url(neuronpedia_id: str, index: int) -> str:
    """The Neuronpedia page of one latent: ``neuronpedia_id`` is sae_lens' ``<model>/<sae>``
    (e.g. ``gpt2-small/8-res-jb``)."""
    return NEURONPEDIA_URL.format(neuronpedia_id=neuronpedia_id.strip("/"), index=int(index))


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
    attribute), the first ``per_line`` latents linked (all are in ``neuronpedia.csv``)."""
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
        lines.append(
            f"- {model} layer {layer} `{npid}` seed {seed}, {method} / {attr} "
            f"({kept} kept, the top {len(rows)} recorded by eval.report_top_latents): {links}{more}"
        )
    return lines


def build_report(folder: str | Path, out_dir: str | Path | None = None) -> Report:
    """Collect ``folder``'s results; write CSVs, ``report.md`` and figures to ``out_dir``
    (default ``<folder>/report``); return the tables and the markdown text."""
    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder / "report"
    records, skipped = collect(folder)
    tables = build_tables(records)
    files: list[Path] = []
    parts = [f"# saeravel report: {folder}", "", f"{len(records)} result records."]
    figs, l0_notes = l0_figures(tables, out)
    for table in tables:
        files.append(write_csv(table, out / f"{table.name}.csv"))
        parts += ["", f"## {table.name} ({len(table.rows)} rows)", ""]
        if table.about:
            parts += [table.about, ""]
        parts += [to_markdown(table)]
        if table.notes:
            parts += ["", *[f"- {n}" for n in table.notes]]
        if table.name == RAVEL_EVAL and table.rows:
            figs.update(ravel_figures(table, out))
    links = neuronpedia_table(r for r in records if has_ravel_metrics(r))
    if links.rows:
        files.append(write_csv(links, out / "neuronpedia.csv"))
        parts += ["", "## Neuronpedia: kept SAE latents", "", links.about, ""]
        parts += neuronpedia_markdown(links)
        tables.append(links)
    files += list(figs)
    if l0_notes:
        parts += ["", "## figures vs L0", "", *[f"- {n}" for n in l0_notes]]
    if skipped:
        parts += ["", "## skipped files", ""] + [f"- {p}: {why}" for p, why in skipped]
    markdown = "\n".join(parts) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    files.append(out / "report.md")
    named = {p.name: f for p, f in figs.items()}
    return Report(tables=tables, skipped=skipped, files=files, markdown=markdown, figures=named)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m saeravel.report <folder> [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m saeravel.report",
        description="Collect saeravel result JSONs under a folder into CSV, markdown and figures.",
    )
    parser.add_argument("folder", help="folder searched recursively for result JSON files")
    parser.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = build_report(args.folder, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.markdown)
    for path in report.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
