"""``eval=tpp``: SAEBench's targeted probe perturbation.

For every class ``i`` of a task, a balanced one-vs-rest logistic regression probe ``P_i`` is
trained on the activations ``x`` at the SAE's hook (train split; ``C`` chosen on the val
split; :func:`saeravel.probing.fit_probe`). Its latents are ranked by
``effect_j = max(mean_{y=1} a_j - mean_{y=0} a_j, 0) * (w_i . W_dec[j])`` on its training
rows (``a`` = latents times the input's layer-norm std, ``w_i`` the probe's raw-space
weight; see :mod:`saeravel.probing`): only latents more active on the class count
(``eval.clamp_mean_diff``, SAEBench's rule), largest signed effect first. For each ``N`` in
``n_values`` (capped at ``d_sae``, listed in ``eval_result_unstructured.n_values_capped``)
the top ``k = min(N, number of latents with a nonzero effect)`` latents of class ``i``
(``eval.only_nonzero_effects``, SAEBench's rule; ``eval_result_details[*].n_latents_ablated``
records ``k``) are zero-ablated keeping the SAE error, ``x' = x - a[:, S_i] @ W_dec[S_i]``,
and every probe is re-scored on its own balanced test set:

* ``intended_i = acc(P_i, x) - acc(P_i, x')`` (the targeted probe's accuracy drop);
* ``unintended_i = mean_{j != i} (acc(P_j, x) - acc(P_j, x'))``.

Metrics (group ``tpp_metrics``, SAEBench's names), averaged over the classes of a task, then
over tasks: ``tpp_threshold_N_intended_diff_only``, ``tpp_threshold_N_unintended_diff_only``
and ``tpp_threshold_N_total_metric = intended - unintended`` (higher is better: ablating a
class's latents hurts its own probe and no other). ``eval_result_unstructured.rules``
records the rules the numbers were computed with.

Data: the embedded model uses the city-token activation in every template, classes the
most frequent values of ``attribute`` (default ``Continent``) with the world's entity split
(:func:`saeravel.taskdata.classification_tasks`, the seam shared with sparse_probing); real models use SAEBench's datasets
(bias in bios class set 1, Amazon reviews categories), mean-pooled over non-special tokens.

Differences from SAEBench (SAEBench ``sae_bench/evals/scr_and_tpp``; default = SAEBench's
rule unless said otherwise):

* clamp: SAEBench sets negative mean differences to 0 before multiplying by ``w . W_dec``;
  default the same; ``eval.clamp_mean_diff=false`` keeps them (latents less active on the
  class whose decoder points against the probe then rank high too; the rule of this eval's
  version 1.0).
* how many latents: SAEBench ablates ``k = min(N, #nonzero effects)`` latents, the ``k``
  largest effects (which can include zero-effect latents ranked above negative ones);
  default the same; ``eval.only_nonzero_effects=false`` always ablates the top ``N``
  (version 1.0). Ties are broken by the lower latent index (SAEBench: ``torch.topk``'s order).
* masked positions (hf data only; no option, deliberate): SAEBench ablates every position of
  a padded text, so masked (BOS/pad/EOS, zeroed) positions change by the ablated latents of
  the zero vector and enter the mean-pool; saeravel pools over non-special tokens only.
* effects use model-space latents ``a`` (SAEBench: the SAE's latents ``f``; the same for
  SAEs that do not normalise their input).
* scikit-learn probes with a validation-selected ``C`` (SAEBench: torch probes with an L1
  penalty and early stopping); ``N`` capped at ``d_sae``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saeravel.activations import require_decoder, sae_hook
from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.probing import (
    ProbeConfig,
    ablate,
    accuracy,
    balanced_one_vs_rest,
    check_n_values,
    check_probe,
    effective_n_values,
    fit,
    latent_effects,
    latent_order,
    linear_probe_weights,
    n_selected,
    nanmean,
)
from saeravel.taskdata import (
    HF_TASKS,
    SPLITS,
    ProbeTask,
    TaskRequest,
    classification_tasks,
    data_source,
)

log = logging.getLogger(__name__)

TPP_DATASETS = ("LabHC/bias_in_bios_class_set1", "canrager/amazon_reviews_mcauley_1and5")


@dataclass
class TppEvalConfig(EvalConfig):
    """SAEBench's TPP (see the module docstring)."""

    name: str = "tpp"
    version: str = "2.0"
    data_source: str = "auto"
    clamp_mean_diff: bool = True
    only_nonzero_effects: bool = True
    attribute: str = "Continent"
    max_classes: int = 5
    min_train_entities: int = 5
    dataset_names: list[str] = field(default_factory=lambda: list(TPP_DATASETS))
    train_set_size: int = 4000
    val_set_size: int = 1000
    test_set_size: int = 1000
    context_length: int = 128
    n_values: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    batch_size: int = 32
    seed: int = 42

    def __post_init__(self) -> None:
        choose("eval.data_source", self.data_source, ("auto", "embedded", "hf"))
        check_n_values(self.n_values)
        if self.max_classes < 2:
            raise UserError("eval.max_classes must be >= 2 (TPP compares a class with the others)")
        keys = (
            "min_train_entities",
            "train_set_size",
            "val_set_size",
            "test_set_size",
            "context_length",
            "batch_size",
        )
        for key in keys:  # fmt: skip
            if getattr(self, key) < 1:
                raise UserError(f"eval.{key} must be >= 1 (got {getattr(self, key)})")


# One task of TPP: a ProbeTask whose ``latents`` are model-space latents (times the input's
# layer-norm std), as the effects and ablations need.
TppTask = ProbeTask


def tpp_task(
    task: TppTask,
    w_dec: np.ndarray,
    n_eff: Sequence[tuple[int, int]],
    cfg: Any,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Probe accuracies before and after each class's ablations, and the TPP differences."""
    probes, idx_test, y_test, order, clean, effects = {}, {}, {}, {}, {}, {}
    for cls in task.classes:
        idx, y = {}, {}
        for split in SPLITS:
            idx[split], y[split] = balanced_one_vs_rest(task.labels[split], cls, rng)
        if min(len(y[s]) for s in SPLITS) == 0:
            raise UserError(f"class {cls!r} of task {task.name} has no rows in some split")
        model, _, _ = fit(
            cfg.probe,
            (task.resid["train"][idx["train"]], y["train"]),
            (task.resid["val"][idx["val"]], y["val"]),
        )
        w, _ = linear_probe_weights(model)
        effects[cls] = latent_effects(
            task.latents["train"][idx["train"]], y["train"], w, w_dec, clamp=cfg.clamp_mean_diff
        )
        order[cls] = latent_order(effects[cls])
        probes[cls], idx_test[cls], y_test[cls] = model, idx["test"], y["test"]
        clean[cls] = accuracy(model, task.resid["test"][idx["test"]], y["test"])

    def chosen(cls: str, n: int) -> np.ndarray:
        return order[cls][: n_selected(effects[cls], n, cfg.only_nonzero_effects)]

    xt, at = task.resid["test"], task.latents["test"]
    ablated: dict[str, dict[str, dict[str, float]]] = {}
    n_ablated: dict[str, dict[str, int]] = {}
    per_n: dict[str, dict[str, float]] = {}
    for n, n_abl in n_eff:
        intended, unintended = [], []
        for i in task.classes:
            latents = chosen(i, n_abl)
            n_ablated.setdefault(str(n), {})[i] = len(latents)
            x_abl = ablate(xt, at, w_dec, latents)
            acc = {j: accuracy(probes[j], x_abl[idx_test[j]], y_test[j]) for j in task.classes}
            ablated.setdefault(str(n), {})[i] = acc
            intended.append(clean[i] - acc[i])
            others = [clean[j] - acc[j] for j in task.classes if j != i]
            unintended.append(float(np.mean(others)) if others else math.nan)
        per_n[str(n)] = {"intended": nanmean(intended), "unintended": nanmean(unintended)}
    return {
        "dataset_name": task.name,
        "classes": task.classes,
        "clean_accuracy": clean,
        "ablated_accuracy": ablated,
        "n_latents_ablated": n_ablated,
        "n_nonzero_effects": {c: int(np.count_nonzero(effects[c])) for c in task.classes},
        "top_latents": {c: chosen(c, 10).tolist() for c in task.classes},
        **{
            key: value
            for n, d in per_n.items()
            for key, value in (
                (f"tpp_threshold_{n}_total_metric", d["intended"] - d["unintended"]),
                (f"tpp_threshold_{n}_intended_diff_only", d["intended"]),
                (f"tpp_threshold_{n}_unintended_diff_only", d["unintended"]),
            )
        },
    }


def rules(cfg: Any) -> dict[str, Any]:
    """The rules the numbers were computed with (and whether they are all SAEBench's)."""
    used = {
        "clamp_mean_diff": bool(cfg.clamp_mean_diff),
        "only_nonzero_effects": bool(cfg.only_nonzero_effects),
    }
    return {**used, "saebench": all(used.values()), "masked_positions_ablated": False}


def metric_keys(n_values: Sequence[int]) -> list[str]:
    """SAEBench's key order: per N, total, intended, unintended."""
    return [
        f"tpp_threshold_{n}_{kind}"
        for n in n_values
        for kind in ("total_metric", "intended_diff_only", "unintended_diff_only")
    ]


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    m = metrics.get("tpp_metrics", {})
    shown = [
        f"N={n} {m[f'tpp_threshold_{n}_total_metric']:.3f}"
        for n in ("2", "10", "50")
        if f"tpp_threshold_{n}_total_metric" in m
    ]
    return "tpp: total metric " + (", ".join(shown) or "n/a")


@register(
    "tpp",
    schema=TppEvalConfig,
    summarize=summarize,
    headline_metrics=tuple(
        f"tpp_metrics.tpp_threshold_{n}_total_metric" for n in (2, 5, 10, 20, 50, 100, 500)
    ),
    plotted=tuple(
        (f"tpp_metrics.tpp_threshold_{n}_total_metric", f"TPP, top {n} latents")
        for n in (2, 10, 50)
    ),
    non_result_paths={"batch_size": "prompts per forward pass when collecting activations"},
    saebench_required={"tpp_metrics": ()},
    saebench_headline="tpp_metrics",
)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run TPP on the job's model, SAE and layer."""
    w_dec = require_decoder(ctx.sae, "tpp")
    assert ctx.sae is not None
    source = data_source(cfg.data_source, ctx.model)
    n_eff, capped = effective_n_values(cfg.n_values, ctx.sae.d_sae)
    check_probe(cfg.probe)
    if cfg.max_classes < 2:
        raise UserError("eval.max_classes must be >= 2 (TPP compares a class with the others)")
    hook = sae_hook(ctx.sae, ctx.hook_name)
    if source != "embedded":
        for name in cfg.dataset_names:
            choose("TPP dataset", name, sorted(HF_TASKS))
    sizes = (cfg.train_set_size, cfg.val_set_size, cfg.test_set_size)
    request = TaskRequest(
        [cfg.attribute], cfg.dataset_names, cfg.max_classes, cfg.min_train_entities, sizes,
        cfg.context_length, cfg.batch_size, cfg.seed, hub_max_classes=cfg.max_classes,
        model_space=True, eval_name="tpp",
    )  # fmt: skip
    tasks = classification_tasks(source, ctx.model, ctx.sae, hook, request)
    if source == "embedded":
        if not tasks or len(tasks[0].classes) < 2:
            raise UserError(
                f"eval=tpp needs >= 2 {cfg.attribute} values with >= {cfg.min_train_entities} "
                "training cities (and a val and a test city); lower eval.min_train_entities"
            )
        tasks = [dataclasses.replace(tasks[0], name=f"embedded:{cfg.attribute}")]
    for t in tasks:
        if len(t.classes) < 2:
            raise UserError(f"dataset {t.name!r} has fewer than 2 classes with data in every split")
    rng = np.random.default_rng(cfg.seed)
    details = [
        tpp_task(t, w_dec, n_eff, cfg, rng) for t in tqdm(tasks, desc="TPP tasks", leave=False)
    ]
    keys = metric_keys(cfg.n_values)
    metrics = {"tpp_metrics": {k: nanmean([d[k] for d in details]) for k in keys}}
    unstructured = {
        "data_source": source,
        "hook_name": hook,
        "rules": rules(cfg),
        "classes": {t.name: t.classes for t in tasks},
        "n_rows": {t.name: {s: len(t.labels[s]) for s in SPLITS} for t in tasks},
        "n_values_capped": capped,
    }
    summary = [summarize(metrics)]
    if capped:
        summary.append(f"tpp: n_values {sorted(map(int, capped))} capped at d_sae={ctx.sae.d_sae}")
    return EvalOutput(metrics, details, unstructured, summary=summary)
