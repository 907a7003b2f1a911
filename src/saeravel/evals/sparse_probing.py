"""``eval=sparse_probing``: SAEBench's k-sparse probing.

For every class of a task, a balanced one-vs-rest logistic regression is trained on

* the full residual (``llm_test_accuracy``) and the full SAE latents (``sae_test_accuracy``);
* the ``k`` residual dimensions (``llm_top_{k}_test_accuracy``, the neuron baseline) or SAE
  latents (``sae_top_{k}_test_accuracy``) with the largest ``|mean_pos - mean_neg|`` on the
  training split.

The inverse regularisation ``C`` of every probe is chosen on a validation split; the test
split is used once, for the reported accuracy. Accuracies are averaged over the classes of a
task, then over tasks.

Tasks: for the embedded model, city attributes (continent, language) read from the
activation at the city token in every template of the world, split by entity with the
world's train/val/test entity split. Otherwise SAEBench's Hugging Face datasets (bias in
bios class sets, Amazon reviews, AG news, Europarl), each text mean-pooled over its
non-special tokens (SAE latents are encoded per token, then pooled).

Differences from SAEBench (``sae_bench/evals/sparse_probing``, v0.6.0):

* full-width probes (``llm_test_accuracy``, ``sae_test_accuracy``): SAEBench trains a torch
  linear probe (AdamW, lr 1e-2, batch 250, up to 100 epochs, early stopping) and keeps the
  epoch with the best *test* accuracy, which it then reports (model selection on the test
  set); ours is a logistic regression with ``C`` chosen on the validation split and the test
  split used once, so ours is the lower, unbiased number.
* top-``k`` probes: SAEBench fits scikit-learn's L2 logistic regression with ``C = 1`` on the
  raw (unscaled) ``k`` inputs, with no validation split; ours standardises the inputs
  (``eval.probe.standardize``) and chooses ``C`` from ``eval.probe.c_grid`` on validation
  (``eval.probe.standardize=false eval.probe.c_grid=[1.0]`` is SAEBench's top-``k`` probe).
* selection of the ``k`` inputs: both rank by ``|mean_pos - mean_neg|`` on the training split.
* splits: SAEBench has train and test sets only; ours adds a validation split
  (``probe_val_set_size``), and on the embedded model splits by entity.
* tasks and classes are binarised one-vs-rest per class as in SAEBench; the embedded model's
  tasks (city attributes at the city token) are saeravel's own.

Why the default full-width probe can score below the top-``k`` ones (measured with
``k_values=[1,5]`` on the shared cached models; full-width test accuracy):

====================================  ===================  ====================
setting                               embedded, SAE         planted, residual
====================================  ===================  ====================
default (standardised, C on val)      0.961                 0.930
unscaled, C on val                    0.992                 0.991
standardised, C = 1                   0.968                 0.977
unscaled, C = 1                       0.995                 0.987
``probe_recipe=saebench``             0.990                 0.781
top-1 (default)                       0.834                 0.991
====================================  ===================  ====================

Standardising is what costs the full-width probe (3 and 6 points): z-scoring divides every
column by its training standard deviation, and on these entity splits many columns are nearly
constant on the training rows (a rarely active latent; a value block of the planted residual
with few training entities), so they get large scaled values on the test rows where they are
active. Choosing ``C`` on the small validation split (10% of the entities) costs a little more
when standardised. The top-``k`` probes keep only the most class-separating columns and do not
suffer. SAEBench's torch probe stays at 0.781 on the planted residual even with its epoch
picked on test (unscaled inputs, a fixed learning rate, early stopping). The default stays standardised because it helps the top-``k`` probes
(planted SAE top-5: 0.783 standardised, 0.752 unscaled); ``eval.probe.standardize=false`` is
the better full-width setting on these models.

``eval.probe_recipe=saebench`` fits SAEBench's probes instead (the two bullets above, on the
same rows; the validation split is unused), to compare with published numbers; ``saeravel``
(default) is the unbiased protocol.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.probing import (
    ProbeConfig,
    balanced_one_vs_rest,
    check_probe,
    fit,
    fit_probe,
    saebench_epoch_probe,
    top_k_by_mean_difference,
)
from saeravel.taskdata import SPLITS, ProbeTask, TaskRequest, classification_tasks, data_source

log = logging.getLogger(__name__)


class ProbeRecipe(StrEnum):
    """How the probes are fit: saeravel's (``C`` chosen on validation, test used once) or
    SAEBench's (for comparing with published numbers; see the module docstring)."""

    saeravel = "saeravel"
    saebench = "saebench"


@dataclass
class SparseProbingEvalConfig(EvalConfig):
    """SAEBench's sparse probing (see the module docstring)."""

    name: str = "sparse_probing"
    version: str = "1.0"
    data_source: str = "auto"
    attributes: list[str] = field(default_factory=lambda: ["Continent", "Language"])
    max_classes_per_task: int = 5
    min_train_entities: int = 5
    dataset_names: list[str] = field(
        default_factory=lambda: [
            "LabHC/bias_in_bios_class_set1",
            "LabHC/bias_in_bios_class_set2",
            "LabHC/bias_in_bios_class_set3",
            "canrager/amazon_reviews_mcauley_1and5",
            "canrager/amazon_reviews_mcauley_1and5_sentiment",
            "fancyzhx/ag_news",
            "Helsinki-NLP/europarl",
        ]
    )
    probe_train_set_size: int = 4000
    probe_val_set_size: int = 1000
    probe_test_set_size: int = 1000
    context_length: int = 128
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    # probes z-score their features (the k-sparse probes compare dimensions of unequal scale)
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(standardize=True))
    probe_recipe: ProbeRecipe = ProbeRecipe.saeravel
    batch_size: int = 32
    seed: int = 42

    def __post_init__(self) -> None:
        choose("eval.data_source", self.data_source, ("auto", "embedded", "hf"))
        if not self.k_values:
            raise UserError("eval.k_values is empty; give at least one number of latents k")
        check_k_values(self.k_values, None, None)
        keys = (
            "max_classes_per_task",
            "min_train_entities",
            "probe_train_set_size",
            "probe_val_set_size",
            "probe_test_set_size",
            "context_length",
            "batch_size",
        )
        for key in keys:  # fmt: skip
            if getattr(self, key) < 1:
                raise UserError(f"eval.{key} must be >= 1 (got {getattr(self, key)})")


# ----------------------------------------------------------------------------- probes


@dataclass
class ProbeResult:
    """A probe's test accuracy and the hyperparameter chosen on validation."""

    test_accuracy: float
    val_accuracy: float
    C: float


def probe(
    x: dict[str, np.ndarray],
    y: dict[str, np.ndarray],
    idx: dict[str, np.ndarray],
    columns: np.ndarray | None,
    cfg: Any,
) -> ProbeResult:
    """Train on train, choose ``C`` on val, report test accuracy (``columns`` = feature subset).
    ``eval.probe_recipe=saebench``: SAEBench's probes instead (full width: the torch probe whose
    epoch is chosen on test; top-k: ``C = 1`` on raw inputs); the val split is not used."""

    def part(split: str) -> tuple[np.ndarray, np.ndarray]:
        feats = x[split][idx[split]]
        return (feats if columns is None else feats[:, columns]), y[split]

    if str(getattr(cfg, "probe_recipe", "saeravel")) == ProbeRecipe.saebench.value:
        if columns is None:
            acc = saebench_epoch_probe(part("train"), part("test"), seed=int(cfg.seed))
            return ProbeResult(acc, math.nan, math.nan)
        model, c, _ = fit_probe(part("train"), part("train"), [1.0], standardize=False)
        xt, yt = part("test")
        return ProbeResult(float((model.predict(xt) == yt).mean()), math.nan, c)
    model, c, val_acc = fit(cfg.probe, part("train"), part("val"))
    xt, yt = part("test")
    return ProbeResult(float((model.predict(xt) == yt).mean()), val_acc, c)


def probe_task(task: ProbeTask, cfg: Any, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """``{metric: {class: ProbeResult}}`` for one task."""
    out: dict[str, dict[str, Any]] = {}
    for cls in task.classes:
        idx, y = {}, {}
        for split in SPLITS:
            idx[split], y[split] = balanced_one_vs_rest(task.labels[split], cls, rng)
        for prefix, feats in (("llm", task.resid), ("sae", task.latents)):
            out.setdefault(f"{prefix}_test_accuracy", {})[cls] = probe(feats, y, idx, None, cfg)
            train_x = feats["train"][idx["train"]]
            for k in cfg.k_values:
                cols = top_k_by_mean_difference(train_x, y["train"], k)
                key = f"{prefix}_top_{k}_test_accuracy"
                out.setdefault(key, {})[cls] = probe(feats, y, idx, cols, cfg)
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def check_k_values(k_values: Sequence[int], d_sae: int | None, d_model: int | None) -> None:
    """Every k must be >= 1 and fit both the SAE and the residual (None: not known yet, before
    the model loads)."""
    for k in k_values:
        if k < 1:
            raise UserError(f"eval.k_values has k={k}, but every k must be >= 1")
        if d_sae is None or d_model is None:
            continue
        if k > d_sae or k > d_model:
            raise UserError(
                f"eval.k_values has k={k}, but k must be between 1 and d_sae={d_sae} "
                f"(and d_model={d_model} for the residual baseline)"
            )


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    llm, sae = metrics.get("llm", {}), metrics.get("sae", {})
    tops = ", ".join(
        f"top-{k.split('_')[2]} {v:.3f}"
        for k, v in sae.items()
        if k.startswith("sae_top_") and k.split("_")[2] in ("1", "5")
    )
    return (
        f"sparse_probing: residual {llm.get('llm_test_accuracy', math.nan):.3f}, "
        f"SAE {sae.get('sae_test_accuracy', math.nan):.3f}; SAE {tops}"
    )


@register(
    "sparse_probing",
    schema=SparseProbingEvalConfig,
    summarize=summarize,
    headline_metrics=(
        "llm.llm_test_accuracy",
        "sae.sae_test_accuracy",
        "sae.sae_top_1_test_accuracy",
        "sae.sae_top_5_test_accuracy",
    ),
    plotted=(
        ("sae.sae_top_1_test_accuracy", "top-1 latent probe accuracy"),
        ("sae.sae_test_accuracy", "all-latent probe accuracy"),
    ),
    non_result_paths={"batch_size": "prompts per forward pass when collecting activations"},
    saebench_required={"llm": ("llm_test_accuracy",), "sae": ()},
    saebench_headline="sae",
)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run the sparse-probing eval on the job's model, SAE and layer."""
    if ctx.sae is None:
        raise UserError("eval=sparse_probing needs an SAE; choose one with sae=... (not sae=none)")
    lm = ctx.model
    source = data_source(cfg.data_source, lm)
    check_k_values(cfg.k_values, ctx.sae.d_sae, ctx.model.d_model)
    check_probe(cfg.probe)
    request = TaskRequest(
        attributes=cfg.attributes,
        dataset_names=cfg.dataset_names,
        max_classes=cfg.max_classes_per_task,
        min_train_entities=cfg.min_train_entities,
        sizes=(cfg.probe_train_set_size, cfg.probe_val_set_size, cfg.probe_test_set_size),
        context_length=cfg.context_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    tasks = classification_tasks(source, lm, ctx.sae, ctx.hook_name, request)
    if not tasks:
        raise UserError("no probing task has enough data; lower eval.min_train_entities")
    rng = np.random.default_rng(cfg.seed)
    per_task: dict[str, dict[str, dict[str, ProbeResult]]] = {}
    for task in tqdm(tasks, desc="sparse probing", leave=False):
        per_task[task.name] = probe_task(task, cfg, rng)
    keys = list(next(iter(per_task.values())))
    task_means = {
        t: {key: _mean([r.test_accuracy for r in res[key].values()]) for key in keys}
        for t, res in per_task.items()
    }
    metrics = {
        prefix: {
            key: _mean([m[key] for m in task_means.values()])
            for key in keys
            if key.startswith(prefix)
        }
        for prefix in ("llm", "sae")
    }
    details = [{"dataset_name": t, **m} for t, m in task_means.items()]
    unstructured = {
        "data_source": source,
        "classes": {task.name: task.classes for task in tasks},
        "n_rows": {task.name: {s: len(task.labels[s]) for s in SPLITS} for task in tasks},
        "per_class": {
            t: {key: {c: vars(r) for c, r in by_class.items()} for key, by_class in res.items()}
            for t, res in per_task.items()
        },
    }
    return EvalOutput(metrics, details, unstructured, summary=[summarize(metrics)])
