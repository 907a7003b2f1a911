"""Scoring on held-out pairs: the patched vectors (:func:`intervened`), greedy generations
(:func:`generations`, all vector sets decoded together), cause / isolation / disentangle under
both matching rules with a bootstrap interval over entities and RAVEL's per-template aggregate
(:func:`scores`), and a fitted featurizer's full report (:func:`score_fitted`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from saeravel.evals.ravel.decode import CachedDecoder, naive_generate
from saeravel.evals.ravel.intervene import Intervention, job_site
from saeravel.evals.ravel.pairs import RavelJob
from saeravel.evals.ravel.prompts import MATCH_RULES, Pair, matches_any, rule_for
from saeravel.evals.ravel.subspace import subspace_recovery
from saeravel.evals.ravel.train import _rates, convergence, first_token_eval, refine_mask
from saeravel.evals.ravel.verdict import encode


def bootstrap_ci(
    ok: list[bool], pairs: list[Pair], n_boot: int, confidence: float, seed: int
) -> dict[str, list[float]]:
    """Percentile intervals of cause, isolation and disentangle (and, with held-out pairs,
    isolation_heldout) from resampling the base entities with replacement (pairs of one
    entity are not independent). The entities resampled are those of the cause and isolation
    pairs, so held-out pairs leave those intervals as they were."""
    import numpy as np

    ents = sorted({q.base.entity for q in pairs if q.kind != "heldout"})
    idx = {e: i for i, e in enumerate(ents)}
    rows = {"cause": 0, "isolation": 2, "heldout": 4}
    counts = np.zeros((6, len(ents)))  # n and hits of cause, isolation, held-out isolation
    for o, q in zip(ok, pairs, strict=True):
        if q.base.entity in idx:
            counts[rows[q.kind], idx[q.base.entity]] += 1
            counts[rows[q.kind] + 1, idx[q.base.entity]] += o
    gen = np.random.default_rng(seed)
    w = gen.multinomial(len(ents), np.full(len(ents), 1 / len(ents)), size=n_boot)
    tot = w @ counts.T  # [n_boot, 6]
    with np.errstate(invalid="ignore", divide="ignore"):
        cause, iso, held = tot[:, 1] / tot[:, 0], tot[:, 3] / tot[:, 2], tot[:, 5] / tot[:, 4]
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    out = {}
    series = [("cause", cause), ("isolation", iso), ("disentangle", (cause + iso) / 2)]
    if counts[4].sum():
        series.append(("isolation_heldout", held))
    for name, x in series:
        x = x[np.isfinite(x)]
        out[name] = [float(np.percentile(x, lo)), float(np.percentile(x, hi))] if len(x) else [
            float("nan"), float("nan")]  # fmt: skip
    return out


def ravel_aggregate(ok: list[bool], pairs: list[Pair], intervened: str) -> dict[str, float]:
    """RAVEL's aggregate: accuracy per template, then the mean over templates per attribute;
    cause = the intervened attribute's mean, isolation = the mean over the other trained
    attributes (with held-out pairs: ``isolation_all`` over every other attribute, RAVEL's own
    definition, and ``disentangle_all``). (Equal to the pooled scores when each attribute has
    one template, as in the saeravel protocol.)"""
    per: dict[tuple[str, str, str], list[bool]] = {}
    for o, q in zip(ok, pairs, strict=True):
        per.setdefault((q.kind, q.base.attribute, q.base.template), []).append(o)
    by_attr: dict[tuple[str, str], list[float]] = {}
    for (kind, attr, _), v in per.items():
        by_attr.setdefault((kind, attr), []).append(sum(v) / len(v))
    mean = {ka: sum(v) / len(v) for ka, v in by_attr.items()}
    cause = [m for (k, a), m in mean.items() if k == "cause" and a == intervened]
    iso = [m for (k, _), m in mean.items() if k == "isolation"]
    c = sum(cause) / len(cause) if cause else float("nan")
    i = sum(iso) / len(iso) if iso else float("nan")
    out = {"cause": c, "isolation": i, "disentangle": (c + i) / 2}
    others = [m for (k, _), m in mean.items() if k != "cause"]
    if any(k == "heldout" for k, _ in mean):
        iso_all = sum(others) / len(others)
        out.update({"isolation_all": iso_all, "disentangle_all": (c + iso_all) / 2})
    return out


@torch.no_grad()
def intervened(
    job: RavelJob, method: Intervention, pairs: list[Pair]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The vectors ``method`` patches into each pair's base (the mask as ``cfg.mask.eval``
    says) and the mask's size and kept entries at that moment."""
    cfg, bank = job.cfg, job.bank
    if method.mask is not None:
        method.mask.hard = cfg.mask.eval == "hard"
    vecs = torch.cat(
        [method(bank([q.base for q in pairs[i : i + 256]]), bank([q.source for q in pairs[i : i + 256]]))
         for i in range(0, len(pairs), 256)]
    )  # fmt: skip
    info: dict[str, Any] = {}
    if method.mask is not None:
        info = {"mask_kept": method.mask.kept(), "mask_size": method.mask.param.numel(),
                "kept_top": method.mask.top(cfg.report_top_latents)}  # fmt: skip
        method.mask.hard = False
    return vecs, info


def generations(
    job: RavelJob, vector_sets: list[torch.Tensor], pairs: list[Pair]
) -> list[list[list[int]]]:
    """Per vector set, the greedy generations of ``cfg.match_tokens`` per base: all sets
    decoded together through the key/value caches (``job.decoder``, made here when
    ``cfg.fast``), or one full forward per token and set (``eval.fast=false``, the reference)."""
    cfg, ctx = job.cfg, job.ctx
    model, bases = ctx.model.model, [q.base for q in pairs]
    if not cfg.fast:
        site = job_site(ctx)
        return [
            naive_generate(model, bases, cfg.match_tokens, ctx.layer, v, site=site)
            for v in vector_sets
        ]
    decoder = job.decoder or CachedDecoder(model, ctx.layer, cfg.decode_mem_gb, site=job_site(ctx))
    return decoder.generate(bases, cfg.match_tokens, list(vector_sets))


def scores(
    job: RavelJob, gens: list[list[int]], pairs: list[Pair], info: dict[str, Any]
) -> dict[str, Any]:
    """Cause, isolation and disentangle of generations on ``pairs`` under both matching rules
    (token ids), a bootstrap interval over entities and RAVEL's per-template aggregate (under
    ``cfg.match``), per-template accuracy, and the mask's ``info``."""
    cfg = job.cfg
    out: dict[str, Any] = {}
    per_template: dict[str, list[int]] = {}
    chosen: list[bool] = []
    for rule in MATCH_RULES:
        ok = [
            matches_any(g, q.answers(), rule_for(q.base.attribute, rule))
            for g, q in zip(gens, pairs, strict=True)
        ]
        out[rule] = _rates(ok, pairs)
        if rule == cfg.match:
            chosen = ok
            for o, q in zip(ok, pairs, strict=True):
                per_template.setdefault(f"{q.kind}|{q.base.template}", []).append(int(o))
    out.update(out[str(cfg.match)])
    out["ci95" if cfg.confidence == 0.95 else f"ci{cfg.confidence:g}"] = bootstrap_ci(
        chosen, pairs, cfg.bootstrap, cfg.confidence, job.ctx.seed
    )
    out["ravel_aggregate"] = ravel_aggregate(chosen, pairs, pairs[0].intervened if pairs else "")
    out["per_template"] = {t: sum(v) / len(v) for t, v in per_template.items()}
    out["n_cause"] = sum(q.kind == "cause" for q in pairs)
    out["n_isolation"] = sum(q.kind == "isolation" for q in pairs)
    out["n_heldout"] = sum(q.kind == "heldout" for q in pairs)
    out["outcomes"] = encode(chosen)  # per test pair, for paired differences (verdict.py)
    out["n_entities"] = len({q.base.entity for q in pairs})
    out.update(info)
    return out


@torch.no_grad()
def score_many(
    job: RavelJob, methods: list[Intervention], pairs: list[Pair]
) -> list[dict[str, Any]]:
    """:func:`scores` of each method on ``pairs``; the methods' interventions are decoded
    together (stacked along the batch)."""
    sets = [intervened(job, m, pairs) for m in methods]
    gens = generations(job, [v for v, _ in sets], pairs)
    return [scores(job, g, pairs, info) for g, (_, info) in zip(gens, sets, strict=True)]


@torch.no_grad()
def score(job: RavelJob, method: Intervention, pairs: list[Pair]) -> dict[str, Any]:
    """:func:`scores` of one method on ``pairs``."""
    return score_many(job, [method], pairs)[0]


def summary_row(name: str, attr: str, r: dict[str, Any]) -> str:
    ci = next((v for k, v in r.items() if k.startswith("ci")), None)
    band = f" [{ci['disentangle'][0]:.3f}, {ci['disentangle'][1]:.3f}]" if ci else ""
    line = (f"{name:<10} {attr:<10} cause {r['cause']:.3f}  isolation {r['isolation']:.3f}  "
            f"disentangle {r['disentangle']:.3f}{band}")  # fmt: skip
    if "isolation_heldout" in r:
        line += (f"  | held-out isolation {r['isolation_heldout']:.3f}"
                 f", disentangle_all {r['disentangle_all']:.3f}")  # fmt: skip
    if "refined" in r:
        line += f"  (refined mask: {r['refined']['disentangle']:.3f})"
    train = r.get("training", {})
    if train.get("flattened") is False:
        line += "  loss RISING" if train.get("rising") else "  loss NOT flat"
    return line


def score_fitted(
    job: RavelJob,
    method: Intervention,
    attr: str,
    curve: list[float],
    desc: str,
    live: Callable[[list[Pair]], list[int]] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Score a fitted method on test, the train split's first-token scores, convergence, and
    the refined mask's scores beside the trained one (masks whose entries are free bits; both
    decoded in one pass; ``live``: see :func:`refine_mask`). The states returned are the
    artifacts' (suffix -> state): ``""`` the trained method whose score is reported and, when
    refined, ``"_refined"`` the mask the search reached, named apart."""
    cfg, pairs = job.cfg, job.pairs[attr]
    test = pairs["test"]
    sets = [intervened(job, method, test)]  # the trained mask's, before any refinement
    train_ce, train_ok = first_token_eval(job, method, pairs["train"])
    state = method.own_state()
    truth = getattr(job.ctx.model, "truth", None)  # a planted world: where the method swaps
    if job_site(job.ctx) != "resid_post":  # the planted blocks live in the residual stream
        truth = None
    subspace = subspace_recovery(method, truth, attr, cfg.mask.eval == "hard") if truth else None
    info = None
    if cfg.mask.refine and method.mask is not None and getattr(method.mask, "refinable", True):
        info = refine_mask(job, method, pairs["train"], desc, live)
        sets.append(intervened(job, method, test))
    gens = generations(job, [v for v, _ in sets], test)  # decoded together
    r = scores(job, gens[0], test, sets[0][1])
    r["train"] = {**_rates(train_ok, pairs["train"]), "ce_first_token": train_ce,
                  "rule": "first_token"}  # fmt: skip
    r["training"] = convergence(curve)
    r["recipe"] = {"name": str(cfg.recipe), "label": cfg.recipe_label}
    if subspace is not None:
        r["subspace"] = subspace
    states = {"": state}
    if info is not None:
        states["_refined"] = method.own_state()
        refined = scores(job, gens[1], test, sets[1][1])
        keep = ("cause", "isolation", "disentangle", "isolation_heldout", "disentangle_all",
                "mask_kept", "first_token", "prefix")  # fmt: skip
        r["refined"] = {**{k: refined[k] for k in keep if k in refined}, **info}
    return r, states
