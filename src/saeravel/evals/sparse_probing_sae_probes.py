"""``eval=sparse_probing_sae_probes``: SAEBench's wrapper of the sae-probes benchmark ("Are
Sparse Autoencoders Useful? A Case Study in Sparse Probing", Kantamneni et al., 2025): k-sparse
probes on SAE latents over many binary classification datasets, beside a logistic-regression
probe on the full residual.

Per binary dataset (``normal`` setting, the one SAEBench aggregates):

* features: the residual at the hook at the *last* token of each prompt (prompts cut to their
  last ``max_seq_len`` tokens), and its SAE latents;
* split: train = ``min(n - 100, 1024)`` rows, half of each class; test = the remaining rows
  of the first 5000 but one, half of each class (sae-probes' sampling, seeded);
* latent ranking: ``|mean(x | y=1) - mean(x | y=0)|`` on the training rows after each latent
  is divided by its mean absolute nonzero activation;
* for each ``k`` of ``eval.ks``: a logistic regression on the top ``k`` latents (``eval.reg_type``
  l1 or l2; ``eval.binarize``: the latents' nonzero pattern), its ``C`` chosen from
  ``logspace(5, -5, 10)`` by validation ROC AUC (one held-out block of the last
  ``min(20%, 100)`` training rows; 6 stratified folds under 128 rows; leave-two-out up to 12),
  then refit on all training rows; test accuracy, ROC AUC and weighted F1;
* the baseline (``eval.include_llm_baseline``): the same L2 probe on the full residual.

Metrics are means over datasets: ``llm.llm_test_{accuracy,auc,f1}`` and
``sae.sae_top_{k}_test_{accuracy,auc,f1}``; per dataset in ``eval_result_details`` (with
``sae_metrics_by_k``, SAEBench's per-dataset block).

Data (``eval.data_source``, chosen by ``taskdata.data_source``): ``sae_probes`` reads the
datasets the sae-probes package ships (``pip install sae-probes``; its ``data/`` folder, or
``eval.data_dir``), every binary one unless ``eval.dataset_names`` lists some (names as
sae-probes numbers them, e.g. ``5_hist_fig_ismale``; ``[]``, the default, is every one); ``embedded`` (the default on a model with
a world) turns each of the ``eval.attributes`` of the city world into binary datasets, one per
value against the rest (``Continent=Europe``, at most ``max_classes_per_task`` values with
``min_train_entities`` training cities), features at the city token of every template, the
world's train and validation cities as training rows and its test cities as test rows (each
balanced by subsampling the larger class), so no city is in both.

Differences from SAEBench (``sae_bench/evals/sparse_probing_sae_probes``, v0.6.0, which calls
sae-probes 0.4.x):

* SAEBench runs the sae-probes package (its own model loading, activation cache and result
  files, then collates the files); here the same protocol is computed in process on the job's
  model and SAE, nothing is written besides the result. sae-probes loads the model with
  ``from_pretrained_no_processing``; here the model is loaded as for every other eval (the
  processing the SAE needs).
* only the ``normal`` setting (SAEBench raises for the others) and only the ``logreg`` baseline
  (SAEBench's ``baseline_method`` also names sae-probes' pca, knn, xgboost and mlp).
* validation splits with a single class are dropped for every CV scheme (sae-probes drops them
  for the fold schemes only and would fail on the fixed held-out block); a probe left with no
  usable split keeps ``C = 1``, as sae-probes does under 4 rows. A dataset whose classes cannot
  fill the balanced test split is a one-line error (sae-probes fails inside numpy); none of
  sae-probes 0.4.2's 113 binary datasets is such a dataset.
* logistic regressions are scikit-learn's with sae-probes' settings (saga for l1, lbfgs for l2,
  ``max_iter`` 1000, ``random_state`` = seed); with scikit-learn >= 1.8 the L1 penalty is given
  as ``l1_ratio=1`` (the same model; ``penalty`` is deprecated there).
* SAEBench leaves ``sae_test_accuracy`` (all latents) unset; so does this eval. Its top-level
  ``sae_metrics_by_k`` is in ``eval_result_unstructured`` here (the per-dataset one is in each
  detail, as SAEBench's).
* the embedded tasks are saeravel's own.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saeravel.activations import hook_activations
from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.probing import balanced_one_vs_rest
from saeravel.schema import StrEnum
from saeravel.taskdata import EMBEDDED, TaskRequest, classification_tasks, data_source

log = logging.getLogger(__name__)

HUB = "sae_probes"  # eval.data_source value for the sae-probes datasets
MASTER = "probing_datasets_MASTER.csv"
MAX_ROWS = 5000  # sae-probes reads the first 5000 rows of a dataset
MAX_TRAIN = 1024
MIN_TEST = 100
C_GRID = tuple(float(c) for c in np.logspace(5, -5, 10))
METRICS = ("test_accuracy", "test_auc", "test_f1")


class RegType(StrEnum):
    """The penalty of the k-sparse probes."""

    l1 = "l1"
    l2 = "l2"


@dataclass
class SparseProbingSaeProbesEvalConfig(EvalConfig):
    """SAEBench's sae-probes sparse probing (see the module docstring)."""

    name: str = "sparse_probing_sae_probes"
    version: str = "1.0"
    data_source: str = "auto"
    dataset_names: list[str] = field(default_factory=list)
    data_dir: str | None = None
    ks: list[int] = field(default_factory=lambda: [1, 2, 5])
    reg_type: RegType = RegType.l1
    binarize: bool = False
    include_llm_baseline: bool = True
    max_seq_len: int = 1024
    attributes: list[str] = field(default_factory=lambda: ["Continent", "Language"])
    max_classes_per_task: int = 5
    min_train_entities: int = 5
    batch_size: int = 32
    seed: int = 42

    def __post_init__(self) -> None:
        choose("eval.data_source", self.data_source, ("auto", EMBEDDED, HUB))
        choose("eval.reg_type", str(self.reg_type), [r.value for r in RegType])
        self.reg_type = RegType(self.reg_type)
        if not self.ks:
            raise UserError("eval.ks is empty; give at least one number of latents k")
        bad = [k for k in self.ks if k < 1]
        if bad:
            raise UserError(f"eval.ks has k={bad[0]}, but every k must be >= 1")
        if len(set(self.ks)) != len(self.ks):
            raise UserError(f"eval.ks={list(self.ks)} repeats a k")
        for key in ("max_seq_len", "max_classes_per_task", "min_train_entities", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"eval.{key} must be >= 1 (got {getattr(self, key)})")
        if not self.attributes:
            raise UserError("eval.attributes is empty; give at least one city attribute")


# ----------------------------------------------------------------------------- the probe


@dataclass
class ProbeScore:
    """A probe's test metrics, its validation AUC and its ``C`` (None: the default)."""

    test_accuracy: float
    test_auc: float
    test_f1: float
    val_auc: float
    C: float | None


def logistic(c: float, reg: str, seed: int) -> Any:
    """scikit-learn's logistic regression as sae-probes builds it (saga for l1, lbfgs for l2,
    1000 iterations); ``l1_ratio=1`` where ``penalty`` is deprecated (scikit-learn >= 1.8)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    if reg == RegType.l2:
        return LogisticRegression(C=c, random_state=seed, max_iter=1000)
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(C=c, solver="saga", random_state=seed, max_iter=1000, **l1)


def cv_splits(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """sae-probes' validation scheme for ``len(y)`` training rows: leave-two-out up to 12 rows,
    6 shuffled stratified folds under 128, else the last ``min(20%, 100)`` rows held out; only
    splits whose validation rows hold both classes."""
    from sklearn.model_selection import LeavePOut, StratifiedKFold

    n = len(y)
    rows = np.zeros((n, 1))
    if n <= 12:
        splits = list(LeavePOut(2).split(rows))
    elif n < 128:
        splits = list(StratifiedKFold(6, shuffle=True, random_state=seed).split(rows, y))
    else:
        cut = n - min(int(0.2 * n), 100)
        splits = [(np.arange(cut), np.arange(cut, n))]
    return [(tr, va) for tr, va in splits if len(np.unique(y[va])) == 2]


def best_reg_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    reg: str,
    seed: int,
) -> ProbeScore:
    """``C`` by mean validation ROC AUC over :func:`cv_splits` (the first of ``C_GRID``, from
    1e5 down, on ties), then a refit on all (shuffled) training rows; test metrics."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    x, y = train
    splits = cv_splits(y, seed) if len(y) > 3 else []
    best_c, val_auc = None, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if splits:
            scores = []
            for c in C_GRID:
                fold = []
                for tr, va in splits:
                    if len(np.unique(y[tr])) < 2:
                        fold.append(0.5)
                        continue
                    model = logistic(c, reg, seed).fit(x[tr], y[tr])
                    fold.append(roc_auc_score(y[va], model.predict_proba(x[va])[:, 1]))
                scores.append(float(np.mean(fold)))
            best = int(np.argmax(scores))
            best_c, val_auc = C_GRID[best], scores[best]
        order = np.random.RandomState(seed).permutation(len(y))
        model = logistic(1.0 if best_c is None else best_c, reg, seed).fit(x[order], y[order])
    if best_c is None:
        val_auc = float(roc_auc_score(y, model.predict_proba(x)[:, 1]))
    xt, yt = test
    pred = model.predict(xt)
    return ProbeScore(
        test_accuracy=float(accuracy_score(yt, pred)),
        test_auc=float(roc_auc_score(yt, model.predict_proba(xt)[:, 1])),
        test_f1=float(f1_score(yt, pred, average="weighted")),
        val_auc=float(val_auc),
        C=best_c,
    )


def mean_act_normalized(x: np.ndarray) -> np.ndarray:
    """Each column divided by its mean absolute nonzero value (sae-probes' ranking scale)."""
    sums = np.abs(x).sum(0)
    counts = (x != 0).sum(0)
    return x / (sums / (counts + 1e-6) + 1e-6)


def latent_order(x_train: np.ndarray, y_train: np.ndarray) -> np.ndarray:
    """Latents by ``|mean(x | y=1) - mean(x | y=0)|`` of the mean-normalised training rows,
    largest first (ties: lower index)."""
    xn = mean_act_normalized(x_train)
    diff = np.abs(xn[y_train == 1].mean(0) - xn[y_train == 0].mean(0))
    return np.argsort(-diff, kind="stable")


@dataclass
class BinaryDataset:
    """One binary task: residual and SAE features and 0/1 labels of its train and test rows."""

    name: str
    resid: dict[str, np.ndarray]
    latents: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def probe_dataset(data: BinaryDataset, cfg: Any) -> dict[str, Any]:
    """``{"llm": ProbeScore | None, "sae": {k: ProbeScore}, "latents": {k: indices}}``."""
    y_train, y_test = data.labels["train"], data.labels["test"]
    order = latent_order(data.latents["train"], y_train)
    sae, chosen = {}, {}
    for k in cfg.ks:
        cols = order[:k]
        xtr, xte = data.latents["train"][:, cols], data.latents["test"][:, cols]
        if cfg.binarize:
            xtr, xte = (xtr != 0).astype(np.float64), (xte != 0).astype(np.float64)
        sae[k] = best_reg_probe((xtr, y_train), (xte, y_test), str(cfg.reg_type), cfg.seed)
        chosen[k] = [int(c) for c in cols]
    llm = None
    if cfg.include_llm_baseline:
        llm = best_reg_probe(
            (data.resid["train"], y_train), (data.resid["test"], y_test), RegType.l2, cfg.seed
        )
    return {"llm": llm, "sae": sae, "latents": chosen}


# ----------------------------------------------------------------------------- embedded data


def embedded_datasets(cfg: Any, ctx: EvalContext) -> list[BinaryDataset]:
    """One binary dataset per value of each attribute (against the other values): the world's
    train and validation cities are the training rows, its test cities the test rows, each
    balanced by subsampling the larger class."""
    request = TaskRequest(
        attributes=cfg.attributes, dataset_names=(), max_classes=cfg.max_classes_per_task,
        min_train_entities=cfg.min_train_entities, sizes=(1, 1, 1), context_length=1,
        batch_size=cfg.batch_size, seed=cfg.seed, eval_name=cfg.name,
    )  # fmt: skip
    tasks = classification_tasks(EMBEDDED, ctx.model, ctx.sae, ctx.hook_name, request)
    rng = np.random.default_rng(cfg.seed)
    out = []
    for task in tasks:
        merged = {
            "train": {
                "resid": np.concatenate([task.resid["train"], task.resid["val"]]),
                "latents": np.concatenate([task.latents["train"], task.latents["val"]]),
                "labels": np.concatenate([task.labels["train"], task.labels["val"]]),
            },
            "test": {k: getattr(task, k)["test"] for k in ("resid", "latents", "labels")},
        }
        for cls in task.classes:
            resid, lat, labels = {}, {}, {}
            for split, rows in merged.items():
                idx, y = balanced_one_vs_rest(rows["labels"], cls, rng)
                resid[split], lat[split], labels[split] = (
                    rows["resid"][idx],
                    rows["latents"][idx],
                    y,
                )
            if min(len(labels["train"]), len(labels["test"])) < 2:
                log.warning("%s=%s has too few rows for a binary task; skipped", task.name, cls)
                continue
            out.append(BinaryDataset(f"{task.name}={cls}", resid, lat, labels))
    return out


# ----------------------------------------------------------------------------- sae-probes data


def installed_data_dir() -> Path | None:
    """The ``data/`` folder of the installed sae-probes package (found without importing it:
    its import reads every dataset), or None."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if folder.is_dir() else None


def data_dir(cfg: Any) -> Path:
    """``eval.data_dir``, else the installed package's data folder; a one-line error naming
    both ways when neither holds sae-probes' master table."""
    folder = Path(cfg.data_dir).expanduser() if cfg.data_dir else installed_data_dir()
    if folder is None or not any(
        (folder / f"{MASTER}{ext}").is_file() for ext in ("", ".zst", ".gz")
    ):
        where = f"eval.data_dir={cfg.data_dir} has no {MASTER}[.zst]" if cfg.data_dir else (
            "the sae-probes package is not installed")  # fmt: skip
        raise UserError(
            f"eval={cfg.name} with eval.data_source={HUB} reads the sae-probes datasets, but "
            f"{where}: pip install sae-probes (its data/ folder is used), or set eval.data_dir "
            "to that folder; or use eval.data_source=embedded with model=tiny-city-lm"
        )
    return folder


def read_csv(path_without_ext: Path) -> Any:
    """The CSV at ``<path>.zst``, ``<path>.gz`` or ``<path>`` (sae-probes ships zstd files;
    pandas reads them with the zstandard package)."""
    import pandas as pd

    for ext, compression in ((".zst", "zstd"), (".gz", "gzip"), ("", None)):
        path = Path(f"{path_without_ext}{ext}")
        if not path.is_file():
            continue
        try:
            return pd.read_csv(path, compression=compression)
        except ImportError as exc:
            raise UserError(
                f"reading {path.name} needs the zstandard package (pip install zstandard; "
                "sae-probes depends on it)"
            ) from exc
    raise UserError(
        f"{path_without_ext}[.zst|.gz] does not exist (a broken sae-probes data folder?)"
    )


def binary_datasets(folder: Path) -> dict[str, str]:
    """sae-probes' numbered binary dataset names (``5_hist_fig_ismale``) -> their file (relative
    to ``folder``, without the compression suffix), from its master table."""
    master = read_csv(folder / MASTER)
    rows = master[master["Data type"] == "Binary Classification"]
    return {str(save).split("/")[-1].split(".")[0]: str(save) for save in rows["Dataset save name"]}


def check_dataset_names(cfg: Any, available: dict[str, str]) -> list[str]:
    """``eval.dataset_names`` (empty: every binary dataset), each a known one."""
    names = list(cfg.dataset_names) or list(available)
    for name in names:
        choose("sae-probes dataset", name, list(available))
    return names


def balanced_split(
    y: np.ndarray, n_train: int, n_test: int, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """sae-probes' split of ``y`` (0/1): ``ceil(n/2)`` positives and the rest negatives for
    train, then for test from the rows left, drawn with ``RandomState(seed)``; each shuffled."""
    rng = np.random.RandomState(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos_train, n_pos_test = math.ceil(n_train / 2), math.ceil(n_test / 2)
    need_pos, need_neg = n_pos_train + n_pos_test, n_train + n_test - n_pos_train - n_pos_test
    if len(pos) < need_pos or len(neg) < need_neg:
        raise UserError(
            f"sae-probes dataset {name} has {len(pos)} positive and {len(neg)} negative rows; "
            f"its balanced split needs {need_pos} and {need_neg}"
        )
    train_pos = rng.choice(pos, n_pos_train, replace=False)
    train_neg = rng.choice(neg, n_train - n_pos_train, replace=False)
    test_pos = rng.choice(np.setdiff1d(pos, train_pos), n_pos_test, replace=False)
    test_neg = rng.choice(np.setdiff1d(neg, train_neg), n_test - n_pos_test, replace=False)
    train = rng.permutation(np.concatenate([train_pos, train_neg]))
    test = rng.permutation(np.concatenate([test_pos, test_neg]))
    return train, test


@torch.no_grad()
def last_token_features(
    lm: Any, sae: Any, hook_name: str, texts: list[str], max_seq_len: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Residual and SAE latents at the last token of each text (tokenised by the model's
    tokenizer with its special tokens, cut from the left to ``max_seq_len`` tokens)."""
    tok = lm.tokenizer
    sides = (tok.truncation_side, tok.padding_side)
    tok.truncation_side, tok.padding_side = "left", "right"
    resid, lat = [], []
    device = lm.model.cfg.device
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc="sae-probes texts", leave=False):
            enc = tok(texts[i : i + batch_size], padding=True, truncation=True,
                      max_length=max_seq_len, return_tensors="pt")  # fmt: skip
            ids = enc["input_ids"].to(device)
            last = enc["attention_mask"].sum(1).to(device) - 1
            x = hook_activations(lm.model, hook_name, ids)[
                torch.arange(len(ids), device=device), last
            ]
            resid.append(x.float().cpu())
            lat.append(sae.encode(x).float().cpu())
    finally:
        tok.truncation_side, tok.padding_side = sides
    return torch.cat(resid).numpy(), torch.cat(lat).numpy()


def hub_datasets(cfg: Any, ctx: EvalContext) -> list[BinaryDataset]:
    """The sae-probes datasets of ``cfg`` with sae-probes' split (see the module docstring)."""
    from sklearn.preprocessing import LabelEncoder

    if ctx.model.tokenizer is None:
        raise UserError(f"model {ctx.model.name} has no tokenizer; the sae-probes prompts need one")
    folder = data_dir(cfg)
    available = binary_datasets(folder)
    out = []
    for name in tqdm(check_dataset_names(cfg, available), desc="sae-probes datasets", leave=False):
        df = read_csv(folder / available[name])
        size = len(df)
        df = df.iloc[:MAX_ROWS]
        y = LabelEncoder().fit_transform(df["target"].to_numpy())
        if len(np.unique(y)) != 2:
            raise UserError(
                f"sae-probes dataset {name} is not binary ({len(np.unique(y))} classes)"
            )
        n_train = min(size - MIN_TEST, MAX_TRAIN)
        n_test = len(df) - n_train - 1
        if n_train < 2 or n_test < 2:
            raise UserError(f"sae-probes dataset {name} has only {size} rows")
        train, test = balanced_split(y, n_train, n_test, cfg.seed, name)
        resid, lat = last_token_features(
            ctx.model, ctx.sae, ctx.hook_name, df["prompt"].astype(str).tolist(),
            cfg.max_seq_len, cfg.batch_size,
        )  # fmt: skip
        out.append(
            BinaryDataset(
                name,
                {"train": resid[train], "test": resid[test]},
                {"train": lat[train], "test": lat[test]},
                {"train": y[train], "test": y[test]},
            )
        )
    return out


# ----------------------------------------------------------------------------- the eval


def _mean(values: list[float]) -> float | None:
    good = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(good)) if good else None


def aggregate(per_dataset: dict[str, dict[str, Any]], cfg: Any) -> tuple[dict, list, dict]:
    """(metrics, details, metrics by k): means over datasets and one record per dataset."""
    details = []
    for name, res in per_dataset.items():
        row: dict[str, Any] = {"dataset_name": name}
        if res["llm"] is not None:
            row.update({f"llm_{m}": getattr(res["llm"], m) for m in METRICS})
        for k, score in res["sae"].items():
            row.update({f"sae_top_{k}_{m}": getattr(score, m) for m in METRICS})
        row["sae_metrics_by_k"] = {
            str(k): {m: getattr(score, m) for m in METRICS} for k, score in res["sae"].items()
        }
        details.append(row)
    llm = {f"llm_{m}": _mean([d.get(f"llm_{m}") for d in details]) for m in METRICS}
    sae = {
        f"sae_top_{k}_{m}": _mean([d[f"sae_top_{k}_{m}"] for d in details])
        for k in cfg.ks
        for m in METRICS
    }
    by_k = {str(k): {m: sae[f"sae_top_{k}_{m}"] for m in METRICS} for k in cfg.ks}
    return {"llm": llm, "sae": sae}, details, by_k


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    llm, sae = metrics.get("llm", {}), metrics.get("sae", {})

    def fmt(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    tops = ", ".join(
        f"top-{key.split('_')[2]} {fmt(v)}"
        for key, v in sae.items()
        if key.endswith("_test_accuracy")
    )
    return f"sparse_probing_sae_probes: residual {fmt(llm.get('llm_test_accuracy'))}; SAE {tops}"


def check_data(cfg: Any) -> None:
    """Before anything loads: with ``eval.data_source=sae_probes`` the data folder and the
    dataset names (``auto`` is checked when the model is known)."""
    if cfg.data_source == HUB:
        check_dataset_names(cfg, binary_datasets(data_dir(cfg)))


def offline_needs(cfg: Any, ctx: Any) -> list:
    """Nothing to download here: the embedded tasks are built from the world; the sae-probes
    datasets come with the sae-probes package (pip), which prefetch does not install."""
    from saeravel.offline import Skip

    what = f"eval={cfg.name} data"
    own_world = bool(getattr(ctx.model, "own_world", False))
    if cfg.data_source == EMBEDDED or (cfg.data_source == "auto" and own_world):
        return [Skip(what, "embedded tasks built from the city world, nothing to fetch")]
    try:
        folder = data_dir(cfg)
    except UserError:
        return [Skip(what, "the sae-probes datasets ship with the sae-probes package: "
                           "pip install sae-probes (or set eval.data_dir)")]  # fmt: skip
    return [Skip(what, f"the sae-probes datasets are here ({folder})")]


@register(
    "sparse_probing_sae_probes",
    schema=SparseProbingSaeProbesEvalConfig,
    summarize=summarize,
    headline_metrics=(
        "llm.llm_test_accuracy",
        "sae.sae_top_1_test_accuracy",
        "sae.sae_top_1_test_auc",
        "sae.sae_top_5_test_accuracy",
    ),
    plotted=(
        ("sae.sae_top_1_test_accuracy", "top-1 latent probe accuracy (sae-probes)"),
        ("sae.sae_top_1_test_auc", "top-1 latent probe AUC (sae-probes)"),
    ),
    non_result_paths={"batch_size": "prompts per forward pass when collecting activations"},
    saebench_required={"llm": (), "sae": ()},
    saebench_headline="sae",
    checks=(check_data,),
    offline_needs=offline_needs,
)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run the sae-probes sparse probing on the job's model, SAE and layer."""
    if ctx.sae is None:
        raise UserError(f"eval={cfg.name} needs an SAE; choose one with sae=... (not sae=none)")
    source = data_source(cfg.data_source, ctx.model, other=HUB)
    if max(cfg.ks) > ctx.sae.d_sae:
        raise UserError(
            f"eval.ks has k={max(cfg.ks)}, but the SAE has only d_sae={ctx.sae.d_sae} latents"
        )
    datasets = embedded_datasets(cfg, ctx) if source == EMBEDDED else hub_datasets(cfg, ctx)
    if not datasets:
        raise UserError("no binary dataset has enough rows; lower eval.min_train_entities")
    per_dataset = {
        d.name: probe_dataset(d, cfg)
        for d in tqdm(datasets, desc="sae-probes probing", leave=False)
    }
    metrics, details, by_k = aggregate(per_dataset, cfg)
    unstructured = {
        "data_source": source,
        "sae_metrics_by_k": by_k,
        "n_rows": {d.name: {s: len(d.labels[s]) for s in ("train", "test")} for d in datasets},
        "per_dataset": {
            name: {
                "llm": None if res["llm"] is None else vars(res["llm"]),
                "sae": {str(k): vars(s) for k, s in res["sae"].items()},
                "latents": {str(k): v for k, v in res["latents"].items()},
            }
            for name, res in per_dataset.items()
        },
    }
    return EvalOutput(metrics, details, unstructured, summary=[summarize(metrics)])
