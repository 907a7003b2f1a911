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
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.saes.base import SAE

log = logging.getLogger(__name__)

DATA_SOURCES = ("auto", "embedded", "hf")
SPLITS = ("train", "val", "test")


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
    c_grid: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0])
    standardize: bool = True
    max_iter: int = 1000
    batch_size: int = 32
    seed: int = 42


# ----------------------------------------------------------------------------- data


@dataclass
class ProbeTask:
    """Features of one task: per split, residual features, SAE features and class labels."""

    name: str
    classes: list[str]
    resid: dict[str, np.ndarray]
    latents: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


@dataclass(frozen=True)
class HFTaskSpec:
    """How to read one of SAEBench's probing datasets."""

    path: str
    text: str
    label: str
    classes: tuple[str, ...]
    balance: str | None = None  # a second column balanced within each class
    test_split: str = "test"


HF_TASKS: dict[str, HFTaskSpec] = {
    "LabHC/bias_in_bios_class_set1": HFTaskSpec(
        "LabHC/bias_in_bios", "hard_text", "profession", ("0", "1", "2", "6", "9"), "gender"
    ),
    "LabHC/bias_in_bios_class_set2": HFTaskSpec(
        "LabHC/bias_in_bios", "hard_text", "profession", ("11", "13", "14", "18", "19"), "gender"
    ),
    "LabHC/bias_in_bios_class_set3": HFTaskSpec(
        "LabHC/bias_in_bios", "hard_text", "profession", ("20", "21", "22", "25", "26"), "gender"
    ),
    "canrager/amazon_reviews_mcauley_1and5": HFTaskSpec(
        "canrager/amazon_reviews_mcauley_1and5",
        "text",
        "category",
        ("1", "2", "3", "5", "6"),
        "rating",
    ),
    "canrager/amazon_reviews_mcauley_1and5_sentiment": HFTaskSpec(
        "canrager/amazon_reviews_mcauley_1and5", "text", "rating", ("1.0", "5.0")
    ),
    "fancyzhx/ag_news": HFTaskSpec("fancyzhx/ag_news", "text", "label", ("0", "1", "2", "3")),
}
# Europarl: one configuration per language pair; the text of ``lang`` is read from it.
EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
HF_TASK_NAMES = (*HF_TASKS, "Helsinki-NLP/europarl")


def _hf_error(name: str, exc: BaseException, eval_name: str = "sparse_probing") -> UserError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UserError(
        f"probing dataset {name!r} could not be loaded ({type(exc).__name__}: {first}); if it "
        "is not in the local Hugging Face datasets cache and the hub cannot be reached: on a machine "
        f"with a network run eval={eval_name} once to cache it, then set HF_DATASETS_OFFLINE=1; "
        "or use the embedded tasks (eval.data_source=embedded with model=tiny-city-lm)"
    )


def _take_per_class(
    rows: Any, spec: HFTaskSpec, n_per_class: int, skip: dict[str, set[int]] | None = None
) -> dict[str, list[tuple[int, str]]]:
    """Up to ``n_per_class`` (row index, text) per class, balanced over ``spec.balance``."""
    wanted = set(spec.classes)
    per_group = n_per_class // 2 if spec.balance else n_per_class
    counts: dict[tuple[str, str], int] = {}
    out: dict[str, list[tuple[int, str]]] = {c: [] for c in spec.classes}
    for i, row in enumerate(rows):
        label = str(row[spec.label])
        if label not in wanted or (skip and i in skip.get(label, set())):
            continue
        group = (label, str(row[spec.balance]) if spec.balance else "")
        if counts.get(group, 0) >= per_group:
            continue
        counts[group] = counts.get(group, 0) + 1
        out[label].append((i, row[spec.text]))
        if all(
            len(v) >= 2 * per_group if spec.balance else len(v) >= per_group for v in out.values()
        ):
            break
    return out


def load_hf_task_texts(
    name: str, n_train: int, n_val: int, n_test: int, seed: int, eval_name: str = "sparse_probing"
) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: texts}}`` of one SAEBench probing dataset (val is carved from the
    training split, disjoint from train); ``eval_name`` only words the offline error."""
    import datasets

    choose("probing dataset", name, HF_TASK_NAMES)
    per = {s: max(1, n // 2) for s, n in zip(SPLITS, (n_train, n_val, n_test), strict=True)}
    try:
        if name == "Helsinki-NLP/europarl":
            return _load_europarl(per, seed)
        spec = HF_TASKS[name]
        train_rows = datasets.load_dataset(spec.path, split="train").shuffle(seed=seed)
        test_rows = datasets.load_dataset(spec.path, split=spec.test_split).shuffle(seed=seed)
    except (OSError, ValueError, ConnectionError) as exc:
        raise _hf_error(name, exc, eval_name) from exc
    train = _take_per_class(train_rows, spec, per["train"])
    used = {c: {i for i, _ in v} for c, v in train.items()}
    val = _take_per_class(train_rows, spec, per["val"], skip=used)
    test = _take_per_class(test_rows, spec, per["test"])
    return {
        split: {c: [t for _, t in rows] for c, rows in data.items()}
        for split, data in zip(SPLITS, (train, val, test), strict=True)
    }


def _load_europarl(per: dict[str, int], seed: int) -> dict[str, dict[str, list[str]]]:
    import datasets

    out: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    total = sum(per.values())
    for lang, pair in EUROPARL_PAIRS.items():
        rows = datasets.load_dataset("Helsinki-NLP/europarl", pair, split="train", streaming=True)
        texts = []
        for row in rows:
            texts.append(row["translation"][lang])
            if len(texts) >= total:
                break
        random.Random(seed).shuffle(texts)
        start = 0
        for split in SPLITS:
            out[split][lang] = texts[start : start + per[split]]
            start += per[split]
    return out


# ----------------------------------------------------------------------------- features


def _special_ids(tokenizer: Any) -> list[int]:
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")
    return sorted({i for a in attrs if (i := getattr(tokenizer, a, None)) is not None})


def _stop_layer(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    return int(parts[1]) + 1 if len(parts) > 2 and parts[0] == "blocks" else None


@torch.no_grad()
def entity_features(
    model: Any,
    sae: SAE,
    hook_name: str,
    world: Any,
    entities: Sequence[str],
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Residual and SAE latents at the city token of every template of the world; returns
    (resid [n, d], latents [n, d_sae], entity of each row)."""
    from saeravel.tiny_lm import encode_batch

    prompts = [(e, t) for e in entities for temps in world.templates.values() for t in temps]
    resid, lat = [], []
    device = model.cfg.device
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        toks, _ = encode_batch(model.tokenizer, [t % e for e, t in chunk], str(device))
        pos = torch.tensor([1 + t.split().index("%s") for _, t in chunk], device=toks.device)
        _, cache = model.run_with_cache(
            toks, names_filter=[hook_name], stop_at_layer=_stop_layer(hook_name)
        )
        x = cache[hook_name][torch.arange(len(chunk), device=toks.device), pos]
        resid.append(x.float().cpu())
        lat.append(sae.encode(x).float().cpu())
    return torch.cat(resid).numpy(), torch.cat(lat).numpy(), [e for e, _ in prompts]


def embedded_tasks(
    model: Any,
    sae: SAE,
    hook_name: str,
    world: Any,
    attributes: Sequence[str],
    max_classes: int,
    min_train_entities: int,
    batch_size: int = 64,
) -> list[ProbeTask]:
    """One task per attribute: the most frequent values with at least ``min_train_entities``
    training entities and at least one validation and one test entity."""
    split_of = {e: s for e, s in world.entity_split.items() if s in SPLITS}
    entities = sorted(split_of)
    resid, lat, row_entity = entity_features(model, sae, hook_name, world, entities, batch_size)
    row_split = np.array([split_of[e] for e in row_entity])
    tasks = []
    for attr in attributes:
        choose("attribute", attr, sorted(next(iter(world.entities.values()))))
        counts: dict[str, dict[str, int]] = {}
        for e in entities:
            value = world.entities[e][attr]
            counts.setdefault(value, dict.fromkeys(SPLITS, 0))[split_of[e]] += 1
        eligible = [
            v
            for v, c in counts.items()
            if c["train"] >= min_train_entities and c["val"] >= 1 and c["test"] >= 1
        ]
        eligible.sort(key=lambda v: (-counts[v]["train"], v))
        classes = eligible[:max_classes]
        if len(classes) < 1:
            log.warning("attribute %s has no class with enough entities; skipped", attr)
            continue
        labels = np.array([world.entities[e][attr] for e in row_entity])
        tasks.append(
            ProbeTask(
                name=attr,
                classes=classes,
                resid={s: resid[row_split == s] for s in SPLITS},
                latents={s: lat[row_split == s] for s in SPLITS},
                labels={s: labels[row_split == s] for s in SPLITS},
            )
        )
    return tasks


@torch.no_grad()
def pooled_text_features(
    model: Any,
    sae: SAE,
    hook_name: str,
    texts: Sequence[str],
    context_length: int,
    batch_size: int,
    model_space: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over non-special tokens of the residual and of the per-token SAE latents.

    ``model_space=True`` multiplies each token's latents by its layer-norm std before pooling
    (a no-op for SAEs without input normalisation), so that ``latents @ W_dec`` is the pooled
    model-space contribution of the latents."""
    tok = model.tokenizer
    special = _special_ids(tok)
    resid, lat = [], []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            list(texts[i : i + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=context_length,
            return_tensors="pt",
        )
        toks = enc["input_ids"].to(model.cfg.device)
        mask = torch.ones_like(toks, dtype=torch.bool)
        for s in special:
            mask &= toks != s
        _, cache = model.run_with_cache(
            toks, names_filter=[hook_name], stop_at_layer=_stop_layer(hook_name)
        )
        x = cache[hook_name]
        w = mask[..., None].float()
        n = w.sum(1).clamp_min(1.0)
        resid.append(((x.float() * w).sum(1) / n).cpu())
        f = sae.encode(x).float()
        if model_space:
            f = f * sae.normalize(x)[1][1].float()
        lat.append(((f * w).sum(1) / n).cpu())
    return torch.cat(resid).numpy(), torch.cat(lat).numpy()


def hf_task(model: Any, sae: SAE, hook_name: str, name: str, cfg: Any) -> ProbeTask:
    """Features of one SAEBench probing dataset."""
    data = load_hf_task_texts(
        name, cfg.probe_train_set_size, cfg.probe_val_set_size, cfg.probe_test_set_size, cfg.seed
    )
    classes = [c for c in data["train"] if all(data[s].get(c) for s in SPLITS)]
    resid, lat, labels = {}, {}, {}
    for split in SPLITS:
        texts = [t for c in classes for t in data[split][c]]
        labels[split] = np.array([c for c in classes for _ in data[split][c]])
        resid[split], lat[split] = pooled_text_features(
            model, sae, hook_name, texts, cfg.context_length, cfg.batch_size
        )
    return ProbeTask(name, classes, resid, lat, labels)


# ----------------------------------------------------------------------------- probes


def balanced_one_vs_rest(
    labels: np.ndarray, cls: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices and 0/1 targets: every row of ``cls`` (or a random subset) and as many
    rows drawn uniformly from the other classes."""
    pos = np.flatnonzero(labels == cls)
    neg = np.flatnonzero(labels != cls)
    n = min(len(pos), len(neg))
    pos = rng.choice(pos, n, replace=False) if len(pos) > n else pos
    neg = rng.choice(neg, n, replace=False)
    idx = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    order = rng.permutation(len(idx))
    return idx[order], y[order]


def top_k_by_mean_difference(
    x: np.ndarray, y: np.ndarray, k: int, signed: bool = False
) -> np.ndarray:
    """Indices of the ``k`` columns with the largest ``|mean(x | y=1) - mean(x | y=0)|``
    (``signed=True``: the largest ``mean(x | y=1) - mean(x | y=0)``, i.e. the columns most
    positively associated with class 1; ties broken by lower index)."""
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    if not signed:
        diff = np.abs(diff)
    return np.argsort(-diff, kind="stable")[:k]


@dataclass
class ProbeResult:
    """A probe's test accuracy and the hyperparameter chosen on validation."""

    test_accuracy: float
    val_accuracy: float
    C: float


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    c_grid: Sequence[float],
    *,
    standardize: bool = True,
    max_iter: int = 1000,
) -> tuple[Any, float, float]:
    """Logistic regression fit on ``train`` for every ``C``; returns the model with the best
    validation accuracy (first on ties), its ``C`` and that accuracy. Sees no test data."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best: tuple[Any, float, float] | None = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=max_iter)
        model = make_pipeline(StandardScaler(), clf) if standardize else clf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(*train)
        acc = float((model.predict(val[0]) == val[1]).mean())
        if best is None or acc > best[2]:
            best = (model, float(c), acc)
    assert best is not None
    return best


def linear_probe_weights(model: Any) -> tuple[np.ndarray, float]:
    """``(w, b)`` of a binary probe from :func:`fit_probe` in the space of its raw input:
    ``decision_function(x) == x @ w + b`` (a standardising scaler is folded in)."""
    clf = model[-1] if hasattr(model, "steps") else model
    w = np.asarray(clf.coef_[0], dtype=np.float64)
    b = float(clf.intercept_[0])
    if hasattr(model, "steps"):
        scaler = model[0]
        w = w / scaler.scale_
        b = b - float(np.dot(w, scaler.mean_))
    return w, b


def probe(
    x: dict[str, np.ndarray],
    y: dict[str, np.ndarray],
    idx: dict[str, np.ndarray],
    columns: np.ndarray | None,
    cfg: Any,
) -> ProbeResult:
    """Train on train, choose ``C`` on val, report test accuracy (``columns`` = feature subset)."""

    def part(split: str) -> tuple[np.ndarray, np.ndarray]:
        feats = x[split][idx[split]]
        return (feats if columns is None else feats[:, columns]), y[split]

    model, c, val_acc = fit_probe(
        part("train"), part("val"), cfg.c_grid, standardize=cfg.standardize, max_iter=cfg.max_iter
    )
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


def check_k_values(k_values: Sequence[int], d_sae: int, d_model: int) -> None:
    """Every k must be >= 1 and fit both the SAE and the residual."""
    for k in k_values:
        if k < 1 or k > d_sae or k > d_model:
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


@register("sparse_probing", schema=SparseProbingEvalConfig, summarize=summarize)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run the sparse-probing eval on the job's model, SAE and layer."""
    if ctx.sae is None:
        raise UserError("eval=sparse_probing needs an SAE; choose one with sae=... (not sae=none)")
    choose("eval.data_source", cfg.data_source, DATA_SOURCES)
    check_k_values(cfg.k_values, ctx.sae.d_sae, ctx.model.d_model)
    if not cfg.c_grid:
        raise UserError("eval.c_grid is empty; give at least one inverse regularisation C")
    lm = ctx.model
    source = cfg.data_source
    if source == "auto":
        source = "embedded" if lm.world is not None else "hf"
    if source == "embedded":
        if lm.world is None:
            raise UserError(
                f"eval.data_source=embedded needs the embedded model (model=tiny-city-lm); "
                f"{lm.name} has no city world: use eval.data_source=hf"
            )
        tasks = embedded_tasks(
            lm.model, ctx.sae, ctx.hook_name, lm.world, cfg.attributes,
            cfg.max_classes_per_task, cfg.min_train_entities, cfg.batch_size,
        )  # fmt: skip
    else:
        for name in cfg.dataset_names:
            choose("probing dataset", name, HF_TASK_NAMES)
        tasks = [
            hf_task(lm.model, ctx.sae, ctx.hook_name, name, cfg)
            for name in tqdm(cfg.dataset_names, desc="probing datasets", leave=False)
        ]
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
