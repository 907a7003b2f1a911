"""``eval=ravel``: RAVEL interchange interventions scored by cause, isolation, disentangle.

For each attribute A intervened and each method, a mask (or rotation) is trained on the
training split so that patching the base's entity representation with the source's makes
the model answer A with the source's value (cause pairs) while answering every other
attribute with the base's own value (isolation pairs); it is scored on the held-out split:
cause = accuracy against the source's label on A's prompts, isolation = accuracy against
the base's label on the other attributes' prompts, disentangle = their mean.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from saeravel.cache import inside
from saeravel.checkpoint import CheckpointStore, entry_name
from saeravel.evals.api import EvalOutput, JobChoices, register
from saeravel.evals.ravel.config import (
    RavelEvalConfig,
    check,
    check_decode_budget,
    chosen_methods,
)
from saeravel.evals.ravel.intervene import job_site
from saeravel.evals.ravel.methods import FEATURIZERS, check_sae, needs_sae, references
from saeravel.evals.ravel.pairs import RavelJob
from saeravel.evals.ravel.score import score_many, summary_row
from saeravel.evals.ravel.verdict import KIND_CODES, verdict, verdict_summary
from saeravel.results import atomic_torch_save

log = logging.getLogger(__name__)


def validate(cfg: Any, job: JobChoices | None = None) -> None:
    """Every value check that needs no model (the pipeline calls this before anything loads,
    with what it knows of the job: the SAE family, the recipe file composed, the model's
    config for a decoding budget too small for one row)."""
    job = job or JobChoices()
    check(cfg, job.groups.get("eval/recipe"))
    check_sae(cfg, job.sae_family)
    check_decode_budget(cfg, job.model)


@register(
    "ravel",
    schema=RavelEvalConfig,
    needs_sae=needs_sae,
    saebench="saeravel.saebench:ravel_metrics",
    validate=validate,
    checks=(
        "saeravel.evals.ravel.data:check_entity_type",
        "saeravel.evals.ravel.data:check_data_dir",
    ),
    non_result_paths={
        "save_artifacts": "whether learned masks are also saved beside result.json",
        "checkpoint_every_s": "how often training state is saved for a resume (same result)",
        "checkpoint_every_steps": "how often training state is saved for a resume (same result)",
        "decode_mem_gb": "how many rows a decoding pass holds (the same generations)",
    },
    saebench_required={"ravel": ("disentanglement_score", "cause_score", "isolation_score")},
    saebench_headline="ravel",
    offline_needs="saeravel.evals.ravel.data:eval_offline_needs",
)
def run(cfg: Any, ctx: Any) -> Any:
    """Train and score every method for every attribute intervened. With checkpoints on
    (``eval.checkpoint_every_s`` / ``eval.checkpoint_every_steps``), each finished (method,
    attribute) is kept in ``ctx.checkpoint`` and taken from there when the job runs again."""
    validate(cfg)
    methods = chosen_methods(cfg)
    early = {m: FEATURIZERS[m].early(cfg, ctx) for m in methods}  # before any data is built
    store = getattr(ctx, "checkpoint", None) or CheckpointStore.disabled()
    if cfg.checkpoint_every_s == 0 and cfg.checkpoint_every_steps == 0:
        store = CheckpointStore.disabled()
    torch.manual_seed(ctx.seed)
    job = RavelJob.build(cfg, ctx, store)
    job.shared.update({m: v for m, v in early.items() if v is not None})
    stats = job.stats

    metrics: dict[str, Any] = {"ravel": {}, "baselines": {}}
    details: dict[str, Any] = {"data": stats, "training_curves": {}, "per_template": {}}
    site = job_site(ctx)
    at = f"layer {ctx.layer}" + ("" if site == "resid_post" else f" {site}")
    summary = [
        f"RAVEL ({cfg.protocol} protocol, {stats['split_note']}), {at}, "
        f"match={cfg.match}, recipe={cfg.recipe}; [{cfg.confidence:.0%} bootstrap interval over entities]"
    ]
    truth = getattr(ctx.model, "truth", None)
    if truth is not None:
        details["planted"] = truth.describe()
        if ctx.sae is not None and site == "resid_post":  # the atoms live in the residual
            details["planted"]["atom_recovery"] = truth.atom_recovery(ctx.sae)
    held = stats.get("isolation_heldout", {})
    if held.get("attributes") or held.get("skipped"):
        summary.append(
            f"held-out isolation (never trained on): {', '.join(held.get('attributes', [])) or 'none'}"
            + "".join(f"; skipped {h}: {why}" for h, why in held.get("skipped", {}).items())
        )
    details["outcomes"], details["verdict"] = {}, {}
    for attr in cfg.attributes:
        test = job.pairs[attr]["test"]
        outcomes: dict[str, Any] = {
            "entity": [q.base.entity for q in test],
            "kind": "".join(KIND_CODES[q.kind] for q in test),
            "methods": {},
        }
        details["outcomes"][attr] = outcomes
        refs = references(job, attr)
        scored = score_many(job, [m for _, m in refs], test)
        for (b, _), r in zip(refs, scored, strict=True):
            outcomes["methods"][b] = r.pop("outcomes")
            details["per_template"][f"{b}/{attr}"] = r.pop("per_template")
            metrics["baselines"].setdefault(b, {})[attr] = r
            summary.append(summary_row(b, attr, r))
        for name in methods:
            feat = FEATURIZERS[name]
            if not feat.runs_on(cfg, attr):
                continue
            done = store.load(entry_name("scored", name, attr))
            if done is not None:
                log.info("%s/%s: trained and scored before the interruption", name, attr)
            else:
                done = feat.fit_and_score(job, attr)
            if "skipped" in done:
                log.info("%s/%s: skipped (%s)", name, attr, done["skipped"])
                details.setdefault("skipped", {})[f"{name}/{attr}"] = done["skipped"]
                continue
            feat.remember(job, attr, done)
            r, curve, state = dict(done["score"]), list(done["curve"]), done["state"]
            if "outcomes" in r:
                outcomes["methods"][name] = r.pop("outcomes")
            details["per_template"][f"{name}/{attr}"] = r.pop("per_template")
            details["training_curves"][f"{name}/{attr}"] = curve
            metrics["ravel"].setdefault(name, {})[attr] = r
            summary.append(summary_row(name, attr, r))
            if cfg.save_artifacts:  # the trained state, and the refined mask named apart
                for suffix, st in state.items():
                    atomic_torch_save(inside(ctx.output_dir, f"ravel_{name}_{attr}{suffix}.pt"), st)
        compared = [m for m in (*methods, "oracle") if m in outcomes["methods"]]
        details["verdict"][attr] = verdict(outcomes, cfg.bootstrap, cfg.confidence, ctx.seed,
                                           compared)  # fmt: skip
    summary += verdict_summary(details["verdict"], methods)
    metrics["ravel"]["baseline"] = metrics["baselines"]["none"]
    unstructured = saebench_per_class(cfg, metrics) if cfg.protocol == "saebench" else None
    return EvalOutput(metrics=metrics, details=details, unstructured=unstructured, summary=summary)


def saebench_per_class(cfg: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """SAEBench's ``eval_result_unstructured`` of its RAVEL: per entity type, per attribute
    intervened, the SAE mask's ``cause_score``, ``isolation_score`` and ``disentangle_score``
    (``{"city_results": {"city_Country": {...}}}``; the job's method when it is not ``sae``)."""
    methods = {m: v for m, v in metrics["ravel"].items() if m != "baseline"}
    head = "sae" if "sae" in methods else next(iter(methods), None)
    et = str(cfg.entity_type)
    rows = {
        f"{et}_{attr}": {"cause_score": r["cause"], "isolation_score": r["isolation"],
                         "disentangle_score": r["disentangle"]}
        for attr, r in (methods.get(head) or {}).items()
    }  # fmt: skip
    return {f"{et}_results": rows}
