"""Print the README's RAVEL tables from the result files of a sweep, so the README's numbers
are what the code computes (rerun `scripts/readme_numbers.sh`, then this, and paste).

    python scripts/readme_tables.py DIR [DIR ...]

Every ``result.json`` of ``eval=ravel`` under the folders is read; jobs are grouped by
everything in their resolved config except the seed keys (``seed``, ``model.train_seed``), so
one table row is mean +- std over the seeds of otherwise identical jobs. A group whose jobs
differ in anything else is a separate table (its differing settings printed above it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

SEED_KEYS = ("seed", "model.train_seed")
REFERENCES = ("none", "swap", "sae_recon", "oracle")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(d) if isinstance(d, list) else d}


def load(folders: list[Path]) -> list[dict[str, Any]]:
    recs = []
    for folder in folders:
        for path in sorted(folder.rglob("result.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                print(f"skipping {path}: not JSON", file=sys.stderr)
                continue
            if rec.get("eval_type_id") == "ravel":
                recs.append(rec)
    return recs


def _group_key(rec: dict[str, Any]) -> tuple:
    cfg = _flat(rec["saeravel"]["config"])
    drop = ("paths.", "hydra", "device", "force", "log_level")
    return tuple(sorted((k, str(v)) for k, v in cfg.items()
                        if k not in SEED_KEYS and not k.startswith(drop) and "cache_dir" not in k))  # fmt: skip


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}"


def table(recs: list[dict[str, Any]]) -> str:
    """One markdown table: rows = methods and references, columns = attributes."""
    attrs = list(recs[0]["eval_config"]["attributes"])
    seeds = sorted({(r["saeravel"]["config"].get("seed"),
                     r["saeravel"]["config"]["model"].get("train_seed")) for r in recs})  # fmt: skip
    rows: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for rec in recs:
        m = rec["eval_result_metrics"]
        for name, per_attr in list(m["baselines"].items()) + list(m["ravel"].items()):
            if name == "baseline" or (name in m["baselines"] and name not in REFERENCES):
                continue
            for a in attrs:
                r = per_attr.get(a)
                if r is None:
                    continue
                for key in ("cause", "isolation", "disentangle"):
                    rows[name][a][key].append(r[key])
                if "refined" in r:
                    rows[name][a]["refined"].append(r["refined"]["disentangle"])
                if "training" in r and r["training"].get("flattened") is not None:
                    rows[name][a]["flat"].append(float(r["training"]["flattened"]))
    head = (
        "| method | "
        + " | ".join(f"{a}: disentangle (cause / isolation) | {a}: refined mask" for a in attrs)
        + " |"
    )
    lines = [f"{len(recs)} jobs, (seed, model.train_seed) = {seeds}", "", head,
             "|---|" + "---|---|" * len(attrs)]  # fmt: skip
    order = [n for n in REFERENCES if n in rows] + [n for n in rows if n not in REFERENCES]
    for name in order:
        cells = []
        for a in attrs:
            v = rows[name][a]
            c = statistics.mean(v["cause"]) if v["cause"] else float("nan")
            i = statistics.mean(v["isolation"]) if v["isolation"] else float("nan")
            flat = ""
            if v["flat"]:
                flat = f"; loss flat in {sum(v['flat']):.0f}/{len(v['flat'])}"
            cells.append(f"{_ms(v['disentangle'])} ({c:.2f} / {i:.2f}{flat})")
            cells.append(_ms(v["refined"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args(argv)
    recs = load(args.folders)
    if not recs:
        print(
            "no eval=ravel result.json under " + ", ".join(map(str, args.folders)), file=sys.stderr
        )
        return 1
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for rec in recs:
        groups[_group_key(rec)].append(rec)
    keys = list(groups)
    varying = {k for k, _ in keys[0]} if len(keys) > 1 else set()
    if len(keys) > 1:
        common = set.intersection(*[set(k) for k in keys])
        varying = {k for k, _ in set().union(*keys) - common}
    for key in keys:
        settings = {k: v for k, v in key if k in varying}
        model = groups[key][0]["saeravel"]["model_name"]
        print(f"\n### {model}, layer {groups[key][0]['saeravel']['layer']}"
              + (f" ({', '.join(f'{k}={v}' for k, v in sorted(settings.items()))})" if settings else ""))  # fmt: skip
        print(table(groups[key]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
