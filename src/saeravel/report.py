"""Collect the result JSONs under a folder into one table, a CSV and figures.

``python -m saeravel.report <folder> [--out DIR]`` finds every result record under
``<folder>`` (``result.json`` files of a sweep, or the job-hash index
``<results_dir>/<eval>/<hash>.json``), and writes:

* ``ravel.csv``: one row per (job, method, attribute intervened) with cause, isolation,
  disentangle and the no-intervention baseline's disentangle;
* ``ravel_over_seeds.csv``: mean, standard deviation and n of each score over the seeds of
  otherwise identical jobs (:data:`SEED_KEYS` are the keys that count as seeds);
* ``<eval>.csv`` for every other eval: one row per job, one column per metric
  (``group.metric``);
* ``report.md``: the same tables in markdown (the CLI prints it too);
* figures (PNG): ``disentangle_<attribute>.png`` (disentangle vs layer, one line per
  method and setting, SAE lines labelled by family, the baseline dashed) and
  ``cause_vs_isolation.png``.

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
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The shape eval=ravel writes (src/saeravel/evals/ravel.py):
#   eval_result_metrics[RAVEL_GROUP][<method>][<attribute>] = {cause, isolation, disentangle, ...}
#   eval_result_metrics[RAVEL_GROUP][BASELINE_METHOD][<attribute>] = the no-intervention scores
RAVEL_EVAL = "ravel"
RAVEL_GROUP = "ravel"
BASELINE_METHOD = "baseline"
SCORES = ("cause", "isolation", "disentangle")
KEY_COLUMNS = ("model", "sae", "layer", "method", "attribute", "seed")
RAVEL_COLUMNS = (*KEY_COLUMNS, *SCORES, "baseline")
PROVENANCE_COLUMNS = ("job_hash", "eval_id", "finished", "file")
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
    """Config paths whose values differ across ``records`` (seed keys and paths already shown
    as key columns excluded), sorted."""
    import pandas as pd

    if len(records) < 2:
        return []
    frame = pd.DataFrame([r.config for r in records]).astype(object)
    frame = frame.where(frame.notna(), None).astype(str)
    out = [c for c in frame.columns if frame[c].nunique(dropna=False) > 1]
    return sorted(c for c in out if c not in _SHOWN and c not in SEED_KEYS)


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
    extra = _setting_columns(rec, settings, seeds)
    rows = []
    for method, by_attr in group.items():
        if method == BASELINE_METHOD or not isinstance(by_attr, Mapping):
            continue
        for attribute, scores in by_attr.items():
            if not isinstance(scores, Mapping):
                continue
            b = base.get(attribute) if isinstance(base, Mapping) else None
            row = {
                "model": rec.model,
                "sae": rec.sae,
                "layer": rec.layer,
                "method": str(method),
                "attribute": str(attribute),
                "seed": rec.seed,
                **{s: _num(scores.get(s)) for s in SCORES},
                "baseline": _num(b.get("disentangle")) if isinstance(b, Mapping) else math.nan,
                **extra,
            }
            row.update(rec.provenance())
            rows.append(row)
    return rows


def generic_rows(
    rec: Record, settings: Sequence[str] = (), seeds: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per record: every scalar metric as a ``group.metric`` column."""
    row: dict[str, Any] = {"model": rec.model, "sae": rec.sae, "layer": rec.layer, "seed": rec.seed}
    row.update(_setting_columns(rec, settings, seeds))
    row.update(_flatten(rec.data["eval_result_metrics"]))
    row.update(rec.provenance())
    return [row]


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
            columns = [*RAVEL_COLUMNS, *extra_cols, *PROVENANCE_COLUMNS]
            tables.append(Table(name, columns, rows, notes, list(settings), note))
            tables.append(seed_spread(rows, settings))
            continue
        recs, notes = _newest_per_job(recs)
        rows = [row for r in recs for row in generic_rows(r, settings, seeds)]
        rows.sort(
            key=lambda r: (r["model"], r["sae"], r["layer"], *[str(r.get(c)) for c in extra_cols])
        )
        keys = [*GENERIC_KEY_COLUMNS, "seed", *extra_cols]
        metric_cols = sorted({c for r in rows for c in r} - set(keys) - set(PROVENANCE_COLUMNS))
        columns = [*keys, *metric_cols, *PROVENANCE_COLUMNS]
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
    """A markdown table of ``table`` (without the provenance columns by default)."""
    cols = list(columns or [c for c in table.columns if c not in PROVENANCE_COLUMNS])
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


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


def _mean(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else math.nan


def ravel_figures(table: Table, out_dir: str | Path) -> list[Path]:
    """Disentangle vs layer per attribute (per model if several), and cause vs isolation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = table.settings
    models = sorted({r["model"] for r in table.rows})
    written: list[Path] = []
    for model in models:
        rows = [r for r in table.rows if r["model"] == model]
        suffix = "" if len(models) == 1 else f"_{_slug(model)}"
        for attribute in sorted({r["attribute"] for r in rows}):
            sub = [r for r in rows if r["attribute"] == attribute]
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            # One line per method and setting; jobs differing only in seeds are averaged.
            for label in sorted({line_label(r, st) for r in sub}):
                pts = _by_layer([r for r in sub if line_label(r, st) == label], "disentangle")
                ax.plot(list(pts), list(pts.values()), marker="o", label=label)
            base = _by_layer(sub, "baseline")
            if any(not math.isnan(v) for v in base.values()):
                ax.plot(list(base), list(base.values()), "k--", label="baseline (no intervention)")
            ax.set(xlabel="layer", ylabel="disentangle", ylim=(0, 1.02))
            ax.set_title(f"{model}: {attribute} intervened")
            ax.set_xticks(sorted({r["layer"] for r in sub}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title=_legend_title(st), title_fontsize=7)
            fig.tight_layout()
            path = out / f"disentangle_{_slug(attribute)}{suffix}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
        fig, ax = plt.subplots(figsize=(5.4, 5.0))
        markers = "osD^v<>"
        attrs = sorted({r["attribute"] for r in rows})
        for i, label in enumerate(sorted({line_label(r, st) for r in rows})):
            for j, attribute in enumerate(attrs):
                pts = [
                    r for r in rows if line_label(r, st) == label and r["attribute"] == attribute
                ]
                if pts:
                    ax.scatter(
                        [r["isolation"] for r in pts],
                        [r["cause"] for r in pts],
                        color=f"C{i % 10}",
                        marker=markers[j % len(markers)],
                        label=f"{label} / {attribute}",
                        alpha=0.8,
                    )
                    for r in pts:
                        ax.annotate(
                            str(r["layer"]), (r["isolation"], r["cause"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points",
                        )  # fmt: skip
        ax.set(xlabel="isolation", ylabel="cause", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.set_title(f"{model}: cause vs isolation (points labelled by layer)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=_legend_title(st), title_fontsize=7)
        fig.tight_layout()
        path = out / f"cause_vs_isolation{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _by_layer(rows: list[dict[str, Any]], column: str) -> dict[int, float]:
    layers = sorted({r["layer"] for r in rows})
    return {layer: _mean([r[column] for r in rows if r["layer"] == layer]) for layer in layers}


def build_report(folder: str | Path, out_dir: str | Path | None = None) -> Report:
    """Collect ``folder``'s results; write CSVs, ``report.md`` and figures to ``out_dir``
    (default ``<folder>/report``); return the tables and the markdown text."""
    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder / "report"
    records, skipped = collect(folder)
    tables = build_tables(records)
    files: list[Path] = []
    parts = [f"# saeravel report: {folder}", "", f"{len(records)} result records."]
    for table in tables:
        files.append(write_csv(table, out / f"{table.name}.csv"))
        parts += ["", f"## {table.name} ({len(table.rows)} rows)", ""]
        if table.about:
            parts += [table.about, ""]
        parts += [to_markdown(table)]
        if table.notes:
            parts += ["", *[f"- {n}" for n in table.notes]]
        if table.name == RAVEL_EVAL and table.rows:
            files += ravel_figures(table, out)
    if skipped:
        parts += ["", "## skipped files", ""] + [f"- {p}: {why}" for p, why in skipped]
    markdown = "\n".join(parts) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    files.append(out / "report.md")
    return Report(tables=tables, skipped=skipped, files=files, markdown=markdown)


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
