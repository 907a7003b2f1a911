"""The verdict between methods: per-pair outcomes kept compactly, and paired differences
with bootstrap intervals.

Every method of one attribute is scored on the same test pairs in the same order, so a
method's outcome on the test split is one string of ``0``/``1`` per pair (:func:`encode`),
aligned with one list of base entities and one string of pair kinds (``c`` cause, ``i``
isolation on a trained attribute, ``h`` isolation on a held-out attribute). From them,
:func:`paired_difference` gives the difference between two methods in cause, isolation and
disentangle with a percentile interval from resampling BASE ENTITIES with replacement (the
same resample for both methods: a paired bootstrap; pairs of one entity are not
independent, as in :func:`bootstrap_ci`). :func:`pooled_difference` pools one comparison over
repeated runs (eval seeds, model seeds), as the report's ``ravel_verdict`` table does.

Differences from the references: RAVEL and SAEBench report each method's score alone; the
comparison between two methods (and its interval) is this project's own, the analysis a
verdict "A isolates better than B" needs.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

KIND_CODES = {"cause": "c", "isolation": "i", "heldout": "h"}


def encode(ok: list[bool]) -> str:
    """Per-pair outcomes as a compact string of ``0``/``1``."""
    return "".join("1" if o else "0" for o in ok)


def decode(s: str) -> np.ndarray:
    """The inverse of :func:`encode` as a float array."""
    return np.frombuffer(s.encode(), dtype=np.uint8).astype(float) - ord("0")


def _rates(tot: np.ndarray) -> dict[str, np.ndarray]:
    """cause / isolation (trained others) / isolation_heldout / disentangle from summed
    [..., 6] counts (n and hits for c, i, h)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        c, i, h = tot[..., 1] / tot[..., 0], tot[..., 3] / tot[..., 2], tot[..., 5] / tot[..., 4]
    return {"cause": c, "isolation": i, "disentangle": (c + i) / 2, "isolation_heldout": h}


def _counts(ok: np.ndarray, kinds: str, entities: list[str], index: dict[str, int]) -> np.ndarray:
    counts = np.zeros((len(index), 6))
    for o, k, e in zip(ok, kinds, entities, strict=True):
        col = "cih".index(k) * 2
        counts[index[e], col] += 1
        counts[index[e], col + 1] += o
    return counts


def _paired_draws(
    ok_a: str, ok_b: str, kinds: str, entities: list[str], n_boot: int, gen: np.random.Generator
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Point difference A - B per rate and ``n_boot`` paired bootstrap draws of it (base
    entities resampled with replacement, the same resample for A and B)."""
    if not (len(ok_a) == len(ok_b) == len(kinds) == len(entities)):
        raise ValueError("paired outcomes must be aligned: one per test pair")
    ents = sorted(set(entities))
    index = {e: j for j, e in enumerate(ents)}
    ca = _counts(decode(ok_a), kinds, entities, index)
    cb = _counts(decode(ok_b), kinds, entities, index)
    point_a, point_b = _rates(ca.sum(0)), _rates(cb.sum(0))
    w = gen.multinomial(len(ents), np.full(len(ents), 1 / len(ents)), size=n_boot)
    boot_a, boot_b = _rates(w @ ca), _rates(w @ cb)
    point = {m: float(point_a[m] - point_b[m]) for m in point_a}
    return point, {m: boot_a[m] - boot_b[m] for m in boot_a}


METRICS = ("cause", "isolation", "disentangle", "isolation_heldout")


def _summarise(diff: float, draws: np.ndarray, confidence: float) -> dict[str, Any] | None:
    d = draws[np.isfinite(draws)]
    if not np.isfinite(diff) or not len(d):
        return None
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    return {
        "diff": diff,
        "ci": [float(np.percentile(d, lo)), float(np.percentile(d, hi))],
        "p_a_better": float((d > 0).mean()),
    }


def paired_difference(
    ok_a: str, ok_b: str, kinds: str, entities: list[str], n_boot: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Difference A - B in each rate, with a paired percentile interval over base entities.
    Returns ``{metric: {"diff": float, "ci": [lo, hi], "p_a_better": float}}`` for cause,
    isolation, disentangle and (when held-out pairs exist) isolation_heldout; ``p_a_better``
    is the bootstrap share of resamples where A's rate exceeds B's."""
    point, draws = _paired_draws(ok_a, ok_b, kinds, entities, n_boot, np.random.default_rng(seed))
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        if (r := _summarise(point[m], draws[m], confidence)) is not None:
            out[m] = r
    return out


def pooled_difference(
    runs: list[dict[str, Any]], a: str, b: str, n_boot: int = 1000, confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """A - B pooled over repeated runs of one experiment (eval seeds, model seeds): each run's
    ``outcomes`` (as stored in ``details.outcomes[attribute]``) holds both methods. The pooled
    difference is the mean of the runs' differences, each run weighted equally; its interval
    resamples base entities within every run independently and averages the runs' draws, so it
    is conditional on these runs (these models). ``per_run`` lists each run's own difference and
    ``runs_a_better`` how many are above 0: with few model seeds, read the spread there too."""
    gen = np.random.default_rng(seed)
    points, draws = [], []
    for out in runs:
        have = out["methods"]
        if a not in have or b not in have:
            raise ValueError(f"a run has no outcomes for {a!r} and {b!r} (it has {sorted(have)})")
        p, d = _paired_draws(have[a], have[b], out["kind"], out["entity"], n_boot, gen)
        points.append(p)
        draws.append(d)
    if not runs:
        raise ValueError("no runs to pool")
    result: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        per_run = [p[m] for p in points]
        if not all(np.isfinite(per_run)):
            continue
        r = _summarise(float(np.mean(per_run)), np.mean([d[m] for d in draws], axis=0), confidence)
        if r is not None:
            r["per_run"] = [float(x) for x in per_run]
            r["runs_a_better"] = int(sum(x > 0 for x in per_run))
            result[m] = r
    return result


def verdict(
    outcomes: dict[str, Any], n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
    methods: list[str] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Paired differences for every pair of methods (in ``outcomes["methods"]`` order, or
    ``methods``) of one attribute: ``{"a - b": paired_difference(...)}``."""
    have = outcomes["methods"]
    names = [m for m in (methods or list(have)) if m in have]
    return {
        f"{a} - {b}": paired_difference(
            have[a], have[b], outcomes["kind"], outcomes["entity"], n_boot, confidence, seed
        )  # fmt: skip
        for a, b in combinations(names, 2)
    }


def verdict_line(name: str, attr: str, d: dict[str, Any], metric: str = "disentangle") -> str:
    """``sae - neurons   Country  disentangle -0.060 [-0.110, -0.010]`` (``*`` when the interval
    excludes 0)."""
    r = d[metric]
    star = " *" if r["ci"][0] > 0 or r["ci"][1] < 0 else ""
    return (f"{name:<22} {attr:<10} {metric} {r['diff']:+.3f} "
            f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]{star}")  # fmt: skip


HEADLINE = (("sae", "neurons"), ("sae", "das"), ("neurons", "das"))


def verdict_summary(verdicts: dict[str, dict[str, Any]], methods: list[str]) -> list[str]:
    """Console lines for the paper's comparisons (SAE vs neurons vs DAS) among the methods
    that ran, per attribute, on disentangle and (when scored) held-out isolation."""
    lines = []
    for a, b in HEADLINE:
        key = f"{a} - {b}"
        for attr, v in verdicts.items():
            if a in methods and b in methods and key in v:
                lines.append("verdict " + verdict_line(key, attr, v[key]))
                if "isolation_heldout" in v[key]:
                    lines.append("verdict " + verdict_line(key, attr, v[key], "isolation_heldout"))
    if lines:
        lines.insert(0, "paired differences over base entities (* = the interval excludes 0):")
    return lines
