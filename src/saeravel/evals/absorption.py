"""``eval=absorption``: feature absorption (Chanin et al. 2024, as SAEBench measures it).

A *parent* concept with one-vs-rest classes (first letters of words; or, on the embedded
model, continents) is read from the activation ``x`` at the SAE's own hook. Per class ``c``:

1. Ground-truth probe: a balanced one-vs-rest logistic regression on ``x`` (train split,
   ``C`` chosen on the val split). Its raw-space weight, normalised, is the probe direction
   ``p``; its F1 on the balanced test split must reach ``min_probe_f1`` for ``c`` to count.
2. Main latents (k-sparse probing): latents ranked by ``mean(f | c) - mean(f | not c)`` on
   the train split; for ``k = 1..max_k_value`` a probe on the top ``k`` latents is fit (``C``
   on val) and its validation F1 recorded; ``k`` grows while the F1 gain exceeds
   ``f1_jump_threshold``. The main latents ``M`` are the top ``k`` (``num_split_features = k``).
3. On every probe true positive (a test row of class ``c`` the probe predicts as ``c``),
   with ``P = x . p`` the probe projection, ``s`` the SAE's layer-norm std of ``x`` (1 for
   SAEs without input normalisation), per latent ``i`` the projection
   ``proj_i = s f_i (W_dec[i] . p)`` and the cosine ``cos_i = cos(W_dec[i], p)``:

   * absorbing latents ``A``: latents not in ``M`` with ``proj_i > 0`` and
     ``cos_i >= absorption_fraction_probe_cos_sim_threshold``; the
     ``absorption_fraction_max_absorbing_latents`` largest ``proj_i`` are kept, ``a = sum_A
     proj_i``, and ``m = sum_M proj_i``;
   * ``absorption_fraction`` (SAEBench's rule): 0 if ``m >= P`` (the main latents explain the
     probe) or ``a / P < probe_projection_proportion_threshold`` (too little is absorbed);
     otherwise 1 if ``m <= 0``, else ``min(a, P - m) / (min(a, P - m) + m)``: the absorbed
     share of what the main and absorbing latents carry together;
   * full absorption: ``P > 0``, no main latent fires, and the latent with the largest
     ``proj_i`` has ``cos_i >= full_absorption_probe_cos_sim_threshold`` and
     ``proj_i / P >= probe_projection_proportion_threshold``.

   ``proj_i`` is latent ``i``'s actual contribution to the reconstruction's projection on
   ``p``; SAEBench computes ``f_i cos_i``, the same number for unit-norm decoders without
   input normalisation (every sae_lens SAE it evaluates), and not otherwise.

   Per class: ``mean_absorption_fraction`` and ``full_absorption_rate`` over the true
   positives.

Metrics (group ``mean``, SAEBench's names): mean and standard deviation (ddof 1) over the
classes that pass the probe bar of ``absorption_fraction``, ``full_absorption_rate`` and
``num_split_features``. If fewer than ``min_passing_classes`` classes pass, the scores are
NaN and group ``status`` gives the reason (it always gives the counts).

Data sources:

* ``first_letter`` (real models): every vocabulary token that is a word of letters (an
  optional leading space), split into train/val/test words; the prompt is
  ``max_icl_examples`` spelled training words (``"tartan has the first letter: T"``) and then
  ``"{word} has the first letter:"``; ``x`` is read at the word token.
* ``embedded`` (default with the embedded model): ``parent_attribute`` (Continent) with
  ``child_attribute`` (Country) nested in it; rows are the city token in every template of
  the world, split by the world's entity split. Absorption here means: for a city of
  continent ``c``, the continent's main latent(s) stay silent and a latent aligned with the
  continent probe carries the continent direction instead; ``details`` list, per continent,
  the top absorbing latents of fully absorbed rows with their dominant country and the share
  of their activation mass on that country (``child_purity``; near 1 = a country-specific
  latent that absorbed the continent).

Differences from SAEBench: main latents are ranked by mean activation difference, not by
the weights of an L1-regularised probe, and ``k`` is chosen on validation rather than test
F1; probes are scikit-learn logistic regressions with ``C`` chosen on validation; the
ground-truth probes are one-vs-rest per class rather than one multi-class probe. The
``embedded`` task is not SAEBench's: its results are ``eval_type_id``
``absorption_<parent attribute>`` (``absorption_continent``), never ``absorption_first_letter``,
with SAEBench's absorption metrics; in the SAEBench copy its per-continent details move to
``eval_result_unstructured.details`` (SAEBench's per-letter records need ``first_letter``), and a
failing letter's undefined fields are -1.
"""

from __future__ import annotations

import logging
import math
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from saeravel.activations import (
    hook_activations,
    model_space_latents,
    require_decoder,
    sae_hook,
)
from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.probing import (
    ProbeConfig,
    balanced_one_vs_rest,
    check_probe,
    fit,
    linear_probe_weights,
    top_k_by_mean_difference,
)
from saeravel.saebench import absorption_type_id
from saeravel.taskdata import SPLITS, data_source, entity_features, entity_splits

log = logging.getLogger(__name__)

WORD_RE = re.compile(r" ?[A-Za-z]+")
# SAEBench's names of the ``mean`` category (its required metrics, stated in the registration)
MEAN_KEYS = (
    "mean_absorption_fraction_score",
    "mean_full_absorption_score",
    "mean_num_split_features",
    "std_dev_absorption_fraction_score",
    "std_dev_full_absorption_score",
    "std_dev_num_split_features",
)


@dataclass
class AbsorptionEvalConfig(EvalConfig):
    """Feature absorption (see the module docstring)."""

    name: str = "absorption"
    version: str = "1.0"
    data_source: str = "auto"
    prompt_template: str = "{word} has the first letter:"
    answer_template: str = " {letter}"
    example_separator: str = "\n"
    max_icl_examples: int = 10
    letters: str = "abcdefghijklmnopqrstuvwxyz"
    min_word_length: int = 2
    max_words: int | None = None
    word_split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    parent_attribute: str = "Continent"
    child_attribute: str = "Country"
    min_train_entities: int = 5
    min_probe_f1: float = 0.6
    min_true_positives: int = 1
    min_passing_classes: int = 3
    max_k_value: int = 10
    f1_jump_threshold: float = 0.03
    full_absorption_probe_cos_sim_threshold: float = 0.025
    absorption_fraction_probe_cos_sim_threshold: float = 0.1
    probe_projection_proportion_threshold: float = 0.4
    absorption_fraction_max_absorbing_latents: int = 3
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    batch_size: int = 32
    seed: int = 42

    def __post_init__(self) -> None:
        check_values(self)


@dataclass
class AbsorptionData:
    """Per split: activations, latents (dense, or a sparse CSR matrix for vocabulary-sized
    data), layer-norm std, class and subgroup of every row."""

    x: dict[str, np.ndarray]
    f: dict[str, Any]
    scale: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]  # child value (embedded) or the word itself
    classes: list[str]
    class_key: str


# ----------------------------------------------------------------------------- the maths


def f1_score(pred: np.ndarray, y: np.ndarray) -> float:
    """Binary F1 of 0/1 predictions (0 when there are no positives)."""
    tp = float(((pred == 1) & (y == 1)).sum())
    denom = float((pred == 1).sum() + (y == 1).sum())
    return 2 * tp / denom if denom else 0.0


def _dense(m: Any, rows: Any = None, cols: Any = None) -> np.ndarray:
    """Rows/columns of a dense or sparse matrix, as a dense array."""
    if rows is not None:
        m = m[rows]
    if cols is not None:
        m = m[:, cols]
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def _rank_latents(f: Any, y: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` latents with the largest ``mean(f | y=1) - mean(f | y=0)``."""
    if not sp.issparse(f):
        return top_k_by_mean_difference(f, y, k, signed=True)
    diff = np.asarray(f[y == 1].mean(0)).ravel() - np.asarray(f[y == 0].mean(0)).ravel()
    return np.argsort(-diff, kind="stable")[:k]


def select_main_latents(
    f: dict[str, np.ndarray], y: dict[str, np.ndarray], cfg: Any
) -> tuple[np.ndarray, list[float]]:
    """Main latents by k-sparse probing (module docstring, step 2); ``f``/``y`` hold the
    train and val rows. Returns the latents and the validation F1 for k = 1..max_k_value."""
    ranked = _rank_latents(f["train"], y["train"], cfg.max_k_value)
    f1s: list[float] = []
    k_main = 1
    for k in range(1, len(ranked) + 1):
        train, val = _dense(f["train"], cols=ranked[:k]), _dense(f["val"], cols=ranked[:k])
        model, _, _ = fit(cfg.probe, (train, y["train"]), (val, y["val"]))
        f1s.append(f1_score(model.predict(val), y["val"]))
        if k > 1:
            if f1s[-1] - f1s[-2] > cfg.f1_jump_threshold:
                k_main = k
            else:
                break
    return ranked[:k_main], f1s


def absorption_scores(
    x: np.ndarray,
    f: np.ndarray,
    scale: np.ndarray,
    w_dec: np.ndarray,
    direction: np.ndarray,
    main: Sequence[int],
    fraction_cos_threshold: float,
    full_cos_threshold: float,
    proportion_threshold: float,
    max_absorbing: int,
) -> dict[str, np.ndarray]:
    """Per row: ``fraction`` (absorption fraction), ``full`` (full absorption), ``top``
    (the latent with the largest projection when full absorption occurs, else -1) and ``P``
    (rules in the module docstring)."""
    p = direction / np.linalg.norm(direction)
    dec_p = w_dec @ p
    cos = dec_p / np.maximum(np.linalg.norm(w_dec, axis=1), 1e-12)
    big_p = x @ p
    proj = f * scale.reshape(-1, 1) * dec_p
    main = np.asarray(main, dtype=int)
    main_fires = (f[:, main] > 0).any(1) if len(main) else np.zeros(len(x), bool)
    m = proj[:, main].sum(1) if len(main) else np.zeros(len(x))
    ok = (cos >= fraction_cos_threshold)[None, :] & (proj > 0)
    ok[:, main] = False
    cand = np.where(ok, proj, 0.0)
    a = (-np.sort(-cand, axis=1)[:, :max_absorbing]).sum(1)
    positive = big_p > 0
    safe = np.where(positive, big_p, 1.0)
    gate = positive & (m < big_p) & (a / safe >= proportion_threshold)
    absorbed = np.minimum(a, big_p - m)
    partial = absorbed / np.where(absorbed + m > 0, absorbed + m, 1.0)
    fraction = np.where(gate, np.where(m <= 0, 1.0, partial), 0.0)
    top = proj.argmax(1)
    top_proj = proj[np.arange(len(x)), top]
    full = (
        positive
        & ~main_fires
        & (cos[top] >= full_cos_threshold)
        & (top_proj / safe >= proportion_threshold)
    )
    return {
        "fraction": np.clip(fraction, 0.0, 1.0),
        "full": full,
        "top": np.where(full, top, -1),
        "P": big_p,
    }


def class_result(
    data: AbsorptionData, cls: str, w_dec: np.ndarray, cfg: Any, rng: np.random.Generator
) -> dict[str, Any]:
    """Probe, main latents and absorption of one class (a per-class detail record)."""
    idx, y = {}, {}
    for split in SPLITS:
        idx[split], y[split] = balanced_one_vs_rest(data.labels[split], cls, rng)
    out: dict[str, Any] = {data.class_key: cls}
    if min(int(y[s].sum()) for s in SPLITS) == 0:
        counts = {s: int(y[s].sum()) for s in SPLITS}
        return {**out, "passed": False, "reason": f"no rows in some split {counts}"}
    probe, c, _ = fit(
        cfg.probe,
        (data.x["train"][idx["train"]], y["train"]),
        (data.x["val"][idx["val"]], y["val"]),
    )
    probe_f1 = f1_score(probe.predict(data.x["test"][idx["test"]]), y["test"])
    direction, _ = linear_probe_weights(probe)
    main, f1s = select_main_latents(
        {s: data.f[s][idx[s]] for s in ("train", "val")}, {s: y[s] for s in ("train", "val")}, cfg
    )
    pos = np.flatnonzero(data.labels["test"] == cls)
    tp = pos[probe.predict(data.x["test"][pos]) == 1]
    out.update(
        probe_f1=probe_f1,
        probe_C=c,
        main_latents=main.tolist(),
        k_sparse_val_f1=f1s,
        num_split_features=len(main),
        num_probe_true_positives=len(tp),
    )
    if probe_f1 < cfg.min_probe_f1:
        return {**out, "passed": False, "reason": f"probe F1 {probe_f1:.3f} < min_probe_f1"}
    if len(tp) < max(1, cfg.min_true_positives):
        return {**out, "passed": False, "reason": f"{len(tp)} probe true positives < min"}
    res = absorption_scores(
        data.x["test"][tp], _dense(data.f["test"], rows=tp), data.scale["test"][tp], w_dec,
        direction, main,
        cfg.absorption_fraction_probe_cos_sim_threshold,
        cfg.full_absorption_probe_cos_sim_threshold, cfg.probe_projection_proportion_threshold,
        cfg.absorption_fraction_max_absorbing_latents,
    )  # fmt: skip
    full = res["full"]
    out.update(
        passed=True,
        reason=None,
        mean_absorption_fraction=float(res["fraction"].mean()),
        full_absorption_rate=float(full.mean()),
        num_full_absorption=int(full.sum()),
        absorbed_groups=dict(Counter(data.groups["test"][tp][full].tolist()).most_common()),
        top_absorbing_latents=dict(Counter(res["top"][full].tolist()).most_common(10)),
    )
    return out


def aggregate(results: Sequence[dict[str, Any]], cfg: Any) -> dict[str, dict[str, Any]]:
    """The ``mean`` and ``status`` metric groups."""
    passing = [r for r in results if r["passed"]]
    ok = len(passing) >= cfg.min_passing_classes and len(passing) > 0
    status: dict[str, Any] = {
        "valid": ok,
        "n_classes_passing": len(passing),
        "n_classes_required": cfg.min_passing_classes,
        "n_classes_total": len(results),
        "reason": None,
    }
    if not ok:
        status["reason"] = (
            f"only {len(passing)} of {len(results)} classes pass the probe bar "
            f"(F1 >= {cfg.min_probe_f1} and >= {cfg.min_true_positives} true positives); "
            f"{cfg.min_passing_classes} required"
        )
        return {"mean": dict.fromkeys(MEAN_KEYS, math.nan), "status": status}

    def stats(key: str) -> tuple[float, float]:
        v = np.array([r[key] for r in passing], dtype=float)
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan

    fa, full, split = (
        stats(k) for k in ("mean_absorption_fraction", "full_absorption_rate", "num_split_features")
    )
    mean = dict(zip(MEAN_KEYS, (fa[0], full[0], split[0], fa[1], full[1], split[1]), strict=True))
    return {"mean": mean, "status": status}


# ----------------------------------------------------------------------------- data


def _std(sae: Any, x: np.ndarray) -> np.ndarray:
    return model_space_latents(sae, x, np.ones((len(x), 1), dtype=np.float32))[:, 0]


def embedded_data(lm: Any, sae: Any, hook: str, cfg: Any) -> AbsorptionData:
    """City-token rows of every template; classes = parent values with enough cities."""
    world = lm.world
    attrs = sorted(next(iter(world.entities.values())))
    choose("attribute", cfg.parent_attribute, attrs)
    choose("attribute", cfg.child_attribute, attrs)
    split_of = entity_splits(world)
    entities = sorted(split_of)
    counts: dict[str, Counter] = defaultdict(Counter)
    for e in entities:
        counts[world.entities[e][cfg.parent_attribute]][split_of[e]] += 1
    classes = sorted(
        v
        for v, c in counts.items()
        if c["train"] >= cfg.min_train_entities and c["val"] >= 1 and c["test"] >= 1
    )
    resid, lat, row_entity = entity_features(lm.model, sae, hook, world, entities, cfg.batch_size)
    scale = _std(sae, resid)
    row_split = np.array([split_of[e] for e in row_entity])
    parent = np.array([world.entities[e][cfg.parent_attribute] for e in row_entity])
    child = np.array([world.entities[e][cfg.child_attribute] for e in row_entity])
    by = {s: row_split == s for s in SPLITS}
    return AbsorptionData(
        x={s: resid[m] for s, m in by.items()},
        f={s: lat[m] for s, m in by.items()},
        scale={s: scale[m] for s, m in by.items()},
        labels={s: parent[m] for s, m in by.items()},
        groups={s: child[m] for s, m in by.items()},
        classes=classes,
        class_key=cfg.parent_attribute.lower(),
    )


def alphabetic_tokens(tokenizer: Any, min_length: int) -> list[tuple[int, str]]:
    """(token id, text) of every non-special vocabulary token that is a word of letters."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if i in special:
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        if WORD_RE.fullmatch(text) and len(text.strip()) >= min_length:
            out.append((i, text))
    return out


def _split_words(words: list[tuple[int, str]], fractions: Sequence[float], seed: int) -> dict:
    order = list(words)
    random.Random(seed).shuffle(order)
    n_tr = int(fractions[0] * len(order))
    n_va = int(fractions[1] * len(order))
    return {"train": order[:n_tr], "val": order[n_tr : n_tr + n_va], "test": order[n_tr + n_va :]}


def spelling_prompt(
    tokenizer: Any, word_id: int, examples: Sequence[str], cfg: Any, bos: int | None
) -> tuple[list[int], int]:
    """Token ids of the in-context spelling prompt and the position of the word token."""
    if "{word}" not in cfg.prompt_template:
        raise UserError(f"eval.prompt_template must contain {{word}}: {cfg.prompt_template!r}")
    before, after = cfg.prompt_template.split("{word}", 1)
    shots = [
        cfg.prompt_template.format(word=w) + cfg.answer_template.format(letter=w.strip()[0].upper())
        for w in examples
    ]
    prefix = cfg.example_separator.join(shots) + (cfg.example_separator if shots else "")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    head = ([bos] if bos is not None else []) + ids(prefix + before)
    return head + [word_id] + ids(after), len(head)


@torch.no_grad()
def first_letter_data(lm: Any, sae: Any, hook: str, cfg: Any) -> AbsorptionData:
    """Activations at the word token of the spelling prompt of every alphabetic token."""
    tok, model = lm.tokenizer, lm.model
    if tok is None or not hasattr(tok, "get_vocab"):
        raise UserError(f"eval=absorption needs the tokenizer of {lm.name}; it has none")
    fr = list(cfg.word_split_fractions)
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise UserError(f"eval.word_split_fractions must be 3 positive numbers summing to 1: {fr}")
    words = alphabetic_tokens(tok, cfg.min_word_length)
    words = [w for w in words if w[1].strip()[0].lower() in cfg.letters]
    if cfg.max_words is not None:
        words = random.Random(cfg.seed).sample(words, min(cfg.max_words, len(words)))
    if len(words) < 10:
        raise UserError(
            f"{lm.name}'s vocabulary has {len(words)} alphabetic tokens of >= "
            f"{cfg.min_word_length} letters; the first-letter task needs more"
        )
    split = _split_words(words, fr, cfg.seed)
    rng = random.Random(cfg.seed + 1)
    train_texts = [w for _, w in split["train"]]
    bos = tok.bos_token_id if getattr(model.cfg, "default_prepend_bos", True) else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (bos or 0)
    x, f, labels, groups = {}, {}, {}, {}
    for s in SPLITS:
        prompts = []
        for wid, text in split[s]:
            pool = [w for w in train_texts if w != text]
            shots = rng.sample(pool, min(cfg.max_icl_examples, len(pool)))
            prompts.append(spelling_prompt(tok, wid, shots, cfg, bos))
        longest = max(len(p) for p, _ in prompts)
        if longest > model.cfg.n_ctx:
            raise UserError(
                f"spelling prompts reach {longest} tokens, more than {lm.name}'s n_ctx="
                f"{model.cfg.n_ctx}; lower eval.max_icl_examples"
            )
        xs, fs = [], []
        for i in tqdm(range(0, len(prompts), cfg.batch_size), desc=f"spelling ({s})", leave=False):
            chunk = prompts[i : i + cfg.batch_size]
            width = max(len(p) for p, _ in chunk)
            toks = torch.full((len(chunk), width), pad, dtype=torch.long)
            for r, (p, _) in enumerate(chunk):
                toks[r, : len(p)] = torch.tensor(p)
            toks = toks.to(model.cfg.device)
            pos = torch.tensor([q for _, q in chunk], device=toks.device)
            xb = hook_activations(model, hook, toks)[
                torch.arange(len(chunk), device=toks.device), pos
            ]
            xs.append(xb.float().cpu().numpy())
            # Sparse storage: words x d_sae would not fit densely for wide SAEs.
            fs.append(sp.csr_matrix(sae.encode(xb).float().cpu().numpy()))
        x[s] = np.concatenate(xs)
        f[s] = sp.vstack(fs, format="csr")
        labels[s] = np.array([w.strip()[0].lower() for _, w in split[s]])
        groups[s] = np.array([w for _, w in split[s]])
    scale = {s: _std(sae, x[s]) for s in SPLITS}
    return AbsorptionData(x, f, scale, labels, groups, sorted(set(cfg.letters)), "first_letter")


# ----------------------------------------------------------------------------- run


def _child_purity(data: AbsorptionData, latent: int) -> tuple[str | None, float]:
    """The child value (group) with most of ``latent``'s activation mass, and that share."""
    mass: Counter = Counter()
    for s in SPLITS:
        for g, v in zip(data.groups[s], data.f[s][:, latent], strict=True):
            if v > 0:
                mass[g] += float(v)
    total = sum(mass.values())
    if not total:
        return None, math.nan
    g, v = mass.most_common(1)[0]
    return str(g), v / total


def check_cfg(cfg: Any, d_sae: int) -> None:
    """Thresholds and sizes that would make the eval meaningless."""
    if not 1 <= cfg.max_k_value <= d_sae:
        raise UserError(f"eval.max_k_value={cfg.max_k_value} must be between 1 and d_sae={d_sae}")
    check_values(cfg)


def check_values(cfg: Any) -> None:
    """The checks that need no SAE (run when the config is built, before anything loads)."""
    choose("eval.data_source", cfg.data_source, ("auto", "embedded", "first_letter"))
    if cfg.max_k_value < 1:
        raise UserError(f"eval.max_k_value={cfg.max_k_value} must be >= 1")
    if "{word}" not in cfg.prompt_template:
        raise UserError(f"eval.prompt_template must contain {{word}}: {cfg.prompt_template!r}")
    fr = list(cfg.word_split_fractions)
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise UserError(f"eval.word_split_fractions must be 3 positive numbers summing to 1: {fr}")
    for key in ("batch_size", "min_train_entities"):
        if getattr(cfg, key) < 1:
            raise UserError(f"eval.{key} must be >= 1 (got {getattr(cfg, key)})")
    if cfg.max_icl_examples < 0:
        raise UserError(f"eval.max_icl_examples must be >= 0 (got {cfg.max_icl_examples})")
    check_probe(cfg.probe)
    if not cfg.letters or not set(cfg.letters) <= set(string.ascii_lowercase):
        raise UserError(f"eval.letters must be lower-case letters a-z, got {cfg.letters!r}")
    if cfg.absorption_fraction_max_absorbing_latents < 1:
        raise UserError("eval.absorption_fraction_max_absorbing_latents must be >= 1")
    if cfg.min_passing_classes < 1:
        raise UserError("eval.min_passing_classes must be >= 1")
    for key in (
        "full_absorption_probe_cos_sim_threshold",
        "absorption_fraction_probe_cos_sim_threshold",
        "probe_projection_proportion_threshold",
    ):
        if not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"eval.{key}={getattr(cfg, key)} must be between 0 and 1")


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    m, st = metrics.get("mean", {}), metrics.get("status", {})
    if not st.get("valid", True):
        return f"absorption: not scored: {st.get('reason')}"
    return (
        f"absorption: fraction {m.get('mean_absorption_fraction_score', math.nan):.3f}, "
        f"full {m.get('mean_full_absorption_score', math.nan):.3f}, "
        f"split latents {m.get('mean_num_split_features', math.nan):.2f} "
        f"({st.get('n_classes_passing')} classes)"
    )


@register(
    "absorption",
    schema=AbsorptionEvalConfig,
    summarize=summarize,
    saebench_type_id="absorption_first_letter",
    headline_metrics=(
        "mean.mean_absorption_fraction_score",
        "mean.mean_full_absorption_score",
        "mean.mean_num_split_features",
    ),
    plotted=(
        ("mean.mean_absorption_fraction_score", "mean absorption fraction"),
        ("mean.mean_full_absorption_score", "mean full absorption"),
    ),
    non_result_paths={"batch_size": "prompts per forward pass when collecting activations"},
    saebench_required={"mean": MEAN_KEYS},
    saebench_headline="mean",
)  # noqa: E501
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run the absorption eval on the job's model, SAE and layer."""
    w_dec = require_decoder(ctx.sae, "absorption")
    assert ctx.sae is not None
    lm = ctx.model
    source = data_source(cfg.data_source, lm, other="first_letter")
    check_cfg(cfg, ctx.sae.d_sae)
    hook = sae_hook(ctx.sae, ctx.hook_name)
    if source == "embedded":
        data = embedded_data(lm, ctx.sae, hook, cfg)
    else:
        data = first_letter_data(lm, ctx.sae, hook, cfg)
    rng = np.random.default_rng(cfg.seed)
    results = [
        class_result(data, cls, w_dec, cfg, rng)
        for cls in tqdm(data.classes, desc="absorption classes", leave=False)
    ]
    if source == "embedded":
        for r in results:
            r["absorbing_latents"] = [
                dict(zip(("latent", "n_rows", "dominant_child", "child_purity"),
                         (lat, n, *_child_purity(data, lat)), strict=True))
                for lat, n in r.get("top_absorbing_latents", {}).items()
            ]  # fmt: skip
    metrics = aggregate(results, cfg)
    unstructured = {
        "data_source": source,
        "hook_name": hook,
        "classes": data.classes,
        "n_rows": {s: len(data.labels[s]) for s in SPLITS},
    }
    return EvalOutput(
        metrics,
        results,
        unstructured,
        summary=[summarize(metrics)],
        saebench_type_id=absorption_type_id(data.class_key),
    )
