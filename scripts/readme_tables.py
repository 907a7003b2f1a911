"""Print the README's RAVEL tables from result files, so the README's numbers are what the
code computes (``scripts/readme_numbers.sh`` runs the jobs, then this; paste its output).

    python scripts/readme_tables.py DIR [DIR ...]

Every ``eval=ravel`` record under the folders is read with :mod:`saeravel.report` (the
report's own reader: newest record per job, seeds as the report defines them). Records are
grouped as the report groups them: by model, SAE, layer and every differing setting; inside a
group only the seed keys vary. For each group it prints:

* per attribute, one row per method: disentangle on held-out entities for every run (a
  column per (model seed, eval seed)), then the mean +- std over runs, then the mean held-out
  isolation and ``disentangle_all`` (cause averaged with isolation on every other attribute);
* the paper's comparisons (SAE vs neurons vs DAS): each run's paired difference in
  disentangle and held-out isolation with its 95% interval, then the report's pooled
  difference (:func:`saeravel.report.verdict_table`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from saeravel import report
from saeravel.evals.ravel.verdict import HEADLINE

METHOD_ORDER = ("none", "sae", "neurons", "das", "mdas", "boundless_das", "pca", "rlap",
                "sae_probe", "fixed", "oracle")  # fmt: skip


def _run_label(rec: report.Record) -> str:
    cfg = rec.config
    return f"m{cfg.get('model.train_seed', '-')}/e{cfg.get('seed', '-')}"


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}"


def _score(rec: report.Record, method: str, attr: str) -> dict[str, Any] | None:
    m = rec.data["eval_result_metrics"]
    got = (m.get("ravel", {}).get(method) or m.get("baselines", {}).get(method) or {}).get(attr)
    return got if isinstance(got, dict) else None


def score_table(recs: list[report.Record], attr: str) -> list[str]:
    """Rows = methods, columns = runs, then mean +- std, held-out isolation, disentangle_all."""
    runs = [_run_label(r) for r in recs]
    head = ["method", *runs, "mean +- std", "held-out iso", "disentangle_all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHOD_ORDER:
        scores = [_score(r, method, attr) for r in recs]
        if not any(scores):
            continue
        dis = [s["disentangle"] if s else float("nan") for s in scores]
        held = [s.get("isolation_heldout", float("nan")) if s else float("nan") for s in scores]
        dall = [s.get("disentangle_all", float("nan")) if s else float("nan") for s in scores]
        cells = [f"{d:.3f}" if d == d else "-" for d in dis]
        lines.append(f"| {method} | " + " | ".join([*cells, _ms(dis), _ms(held), _ms(dall)]) + " |")
    return lines


def _ci(d: dict[str, Any]) -> str:
    return f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def verdict_table(recs: list[report.Record], pooled: list[dict[str, Any]]) -> list[str]:
    """Each run's paired difference, then the pooled one, per comparison / attribute / metric."""
    runs = [_run_label(r) for r in recs]
    head = ["comparison", "attribute", "metric", *runs, "pooled (runs favouring the first)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {(p["comparison"], p["attribute"], p["metric"]): p for p in pooled}
    for (comparison, attr, metric), p in by_key.items():
        cells = []
        for r in recs:
            v = ((r.data.get("eval_result_details") or {}).get("verdict") or {}).get(attr, {})
            d = v.get(comparison, {}).get(metric)
            cells.append(_ci(d) if d else "-")
        pooled_cell = f"{p['diff_ci']} ({p['runs_a_better']})"
        lines.append(
            f"| {comparison} | {attr} | {metric} | " + " | ".join([*cells, pooled_cell]) + " |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args(argv)
    recs: list[report.Record] = []
    for folder in args.folders:
        found, _ = report.collect(folder)
        recs += [r for r in found if report.has_ravel_metrics(r)]
    if not recs:
        print("no eval=ravel results under " + ", ".join(map(str, args.folders)), file=sys.stderr)
        return 1
    settings = report.varying_settings(recs)
    pooled = report.verdict_table(recs, settings)
    groups: dict[tuple, list[report.Record]] = {}
    for r in recs:
        cfg = r.config
        key = (r.model, r.sae, r.layer, *[str(cfg.get(k)) for k in settings])
        groups.setdefault(key, []).append(r)
    for key, group in groups.items():
        group.sort(key=lambda r: (str(r.config.get("model.train_seed")), str(r.config.get("seed"))))
        model, sae, layer, *vals = key
        extra = ", ".join(f"{k}={v}" for k, v in zip(settings, vals, strict=True))
        print(f"\n### {model}, SAE {sae}, layer {layer}" + (f" ({extra})" if extra else ""))
        print(
            f"{len(group)} runs (m = model.train_seed, e = seed); disentangle on held-out entities"
        )
        for attr in group[0].attributes():
            print(f"\n{attr}:\n")
            print("\n".join(score_table(group, attr)))
        mine = [p for p in pooled.rows if (p["model"], p["sae"], p["layer"]) == (model, sae, layer)
                and all(str(p.get(k)) == v for k, v in zip(settings, vals, strict=True))]  # fmt: skip
        mine = [p for p in mine if tuple(p["comparison"].split(" - ")) in HEADLINE]
        if mine:
            print("\nPaired differences (bootstrap over base entities, 95%):\n")
            print("\n".join(verdict_table(group, mine)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
