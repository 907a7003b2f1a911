"""Collect the result JSONs under a folder into one table, a CSV and figures.

``python -m saeravel.report <folder> [--out DIR]`` finds every result record under
``<folder>`` (``result.json`` files of a sweep, or the job-hash index
``<results_dir>/<eval>/<hash>.json``), and writes:

* ``ravel.csv``: one row per (model, SAE family, layer, method, attribute intervened) with
  cause, isolation, disentangle and the no-intervention baseline's disentangle;
* ``<eval>.csv`` for every other eval: one row per job, one column per metric
  (``group.metric``);
* ``report.md``: the same tables in markdown (the CLI prints it too);
* figures (PNG): ``disentangle_<attribute>.png`` (disentangle vs layer, one line per
  method, SAE lines labelled by family, the baseline dashed) and ``cause_vs_isolation.png``.

A file that is not JSON, or JSON that is not a saeravel result, is named in a warning and
skipped. When one key appears in several records the newest (``datetime_epoch_millis``)
is kept and the report says which file was dropped.
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
        return str(self.data["eval_type_id"])

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
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*.json") if p.is_file())
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


def ravel_rows(rec: Record) -> list[dict[str, Any]]:
    """Rows of one ravel record: one per (method, attribute), baseline as a column."""
    group = rec.data["eval_result_metrics"].get(RAVEL_GROUP)
    if not isinstance(group, Mapping):
        return []
    base = group.get(BASELINE_METHOD) or {}
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
            }
            row.update(rec.provenance())
            rows.append(row)
    return rows


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, int | float | str | bool) or obj is None:
        out[prefix] = obj
    return out


def generic_rows(rec: Record) -> list[dict[str, Any]]:
    """One row per record: every scalar metric as a ``group.metric`` column."""
    row: dict[str, Any] = {"model": rec.model, "sae": rec.sae, "layer": rec.layer}
    row.update(_flatten(rec.data["eval_result_metrics"]))
    row.update(rec.provenance())
    return [row]


def _dedupe(
    rows: list[dict[str, Any]], key_columns: Sequence[str], millis: dict[str, int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Keep the newest row per key; notes name the files of the rows dropped."""
    best: dict[tuple, dict[str, Any]] = {}
    notes: list[str] = []
    for row in rows:
        key = tuple(row[c] for c in key_columns)
        old = best.get(key)
        if old is None:
            best[key] = row
            continue
        new, dropped = (row, old) if millis[row["file"]] >= millis[old["file"]] else (old, row)
        best[key] = new
        what = ", ".join(f"{c}={v}" for c, v in zip(key_columns, key, strict=True))
        notes.append(f"duplicate ({what}): kept {new['file']} (newer), dropped {dropped['file']}")
    for note in notes:
        log.warning(note)
    return list(best.values()), notes


def build_tables(records: Iterable[Record]) -> list[Table]:
    """The ravel table (records with a ``ravel`` metric group) and one flat table per other eval."""
    by_eval: dict[str, list[Record]] = {}
    for rec in records:
        by_eval.setdefault(RAVEL_EVAL if has_ravel_metrics(rec) else rec.eval_type, []).append(rec)
    tables = []
    for name in sorted(by_eval, key=lambda n: (n != RAVEL_EVAL, n)):
        recs = by_eval[name]
        millis = {r.shown_path: r.millis for r in recs}
        if name == RAVEL_EVAL:
            rows = [row for r in recs for row in ravel_rows(r)]
            rows, notes = _dedupe(rows, KEY_COLUMNS, millis)
            rows.sort(
                key=lambda r: (
                    r["model"],
                    r["attribute"],
                    r["method"],
                    r["sae"],
                    r["layer"],
                    r["seed"] or 0,
                )
            )
            columns = [*RAVEL_COLUMNS, *PROVENANCE_COLUMNS]
            tables.append(Table(name, columns, rows, notes))
            tables.append(seed_spread(rows))
            continue
        else:
            rows = [row for r in recs for row in generic_rows(r)]
            rows, notes = _dedupe(rows, GENERIC_KEY_COLUMNS, millis)
            rows.sort(key=lambda r: (r["model"], r["sae"], r["layer"]))
            metric_cols = sorted(
                {c for r in rows for c in r} - set(GENERIC_KEY_COLUMNS) - set(PROVENANCE_COLUMNS)
            )
            columns = [*GENERIC_KEY_COLUMNS, *metric_cols, *PROVENANCE_COLUMNS]
        tables.append(Table(name, columns, rows, notes))
    return tables


# ----------------------------------------------------------------------------- output


def seed_spread(rows: list[dict[str, Any]]) -> Table:
    """Mean and standard deviation of each score over seeds (scores move between seeds)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    keys = [c for c in KEY_COLUMNS if c != "seed"]
    for r in rows:
        groups.setdefault(tuple(r[c] for c in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["n_seeds"] = len(rs)
        for score in (*SCORES, "baseline"):
            vals = [r[score] for r in rs if not math.isnan(r[score])]
            mean = sum(vals) / len(vals) if vals else math.nan
            var = (
                sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else math.nan
            )
            row[f"{score}_mean"] = mean
            row[f"{score}_std"] = math.sqrt(var) if not math.isnan(var) else math.nan
        out.append(row)
    cols = [*keys, "n_seeds"] + [f"{s}_{k}" for s in (*SCORES, "baseline") for k in ("mean", "std")]
    return Table("ravel_over_seeds", cols, out)


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


def line_label(row: Mapping[str, Any]) -> str:
    """Legend label of a row: SAE masks by family, other methods by name."""
    return f"sae: {row['sae']}" if row["method"] == "sae" else str(row["method"])


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
    models = sorted({r["model"] for r in table.rows})
    written: list[Path] = []
    for model in models:
        rows = [r for r in table.rows if r["model"] == model]
        suffix = "" if len(models) == 1 else f"_{_slug(model)}"
        for attribute in sorted({r["attribute"] for r in rows}):
            sub = [r for r in rows if r["attribute"] == attribute]
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            # Methods that use no SAE may come from several jobs (one per SAE): averaged.
            for label in sorted({line_label(r) for r in sub}):
                pts = _by_layer([r for r in sub if line_label(r) == label], "disentangle")
                ax.plot(list(pts), list(pts.values()), marker="o", label=label)
            base = _by_layer(sub, "baseline")
            if any(not math.isnan(v) for v in base.values()):
                ax.plot(list(base), list(base.values()), "k--", label="baseline (no intervention)")
            ax.set(xlabel="layer", ylabel="disentangle", ylim=(0, 1.02))
            ax.set_title(f"{model}: {attribute} intervened")
            ax.set_xticks(sorted({r["layer"] for r in sub}))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"disentangle_{_slug(attribute)}{suffix}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
        fig, ax = plt.subplots(figsize=(5.4, 5.0))
        markers = "osD^v<>"
        attrs = sorted({r["attribute"] for r in rows})
        for i, label in enumerate(sorted({line_label(r) for r in rows})):
            for j, attribute in enumerate(attrs):
                pts = [r for r in rows if line_label(r) == label and r["attribute"] == attribute]
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
        ax.legend(fontsize=7)
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
        parts += ["", f"## {table.name} ({len(table.rows)} rows)", "", to_markdown(table)]
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
