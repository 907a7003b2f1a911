"""``eval=scr``: SAEBench's spurious correlation removal (SHIFT, Marks et al. 2024).

Two binary concepts: ``column1`` (the target, e.g. profession professor/nurse) with values
``a1, a2`` and ``column2`` (the spurious one, e.g. gender male/female) with values ``b1, b2``,
i.e. four cells ``(a, b)``. Every probe is a logistic regression on the activations ``x``
at the SAE's hook (:func:`saeravel.probing.fit_probe`): fit on the train split,
``C`` chosen on the val split, accuracies reported on the test split only.

* biased probe: ``(a1, b1) -> 1`` vs ``(a2, b2) -> 0`` (the two concepts perfectly
  correlated), the two cells in equal numbers;
* concept probes: ``a1`` vs ``a2`` (column1) and ``b1`` vs ``b2`` (column2), trained and
  tested on all four cells in equal numbers, so each is balanced over the other concept.

Latent effects (per concept probe with raw-space weight ``w``, on its training rows):
``effect_i = (mean_{y=1} a_i - mean_{y=0} a_i) * (w . W_dec[i])``, where ``a_i`` is latent
``i`` times the input's layer-norm std (its model-space coefficient of ``W_dec[i]``; equal
to the latent for SAEs that do not normalise their input). Latents are ranked by
``|effect_i|`` (``eval.ranking=absolute``, SAEBench's rule) and the top ``k`` are ablated,
``k = min(N, number of latents with a nonzero effect)`` (``eval.only_nonzero_effects``,
SAEBench's rule): ``x' = x - sum_{i in S} a_i W_dec[i] = x + recon(f with f_S = 0) -
recon(f)``, i.e. the latents are zeroed and the SAE error term is kept.

Scores for every ``N`` in ``n_values`` (``N`` larger than ``d_sae`` is capped at ``d_sae``
and listed in ``eval_result_unstructured.n_values_capped``):

* ``scr_dir1_threshold_N``: ablate the top ``N`` latents of the column2 (spurious) probe and
  evaluate the biased probe on the column1 test set:
  ``(A_abl - A_orig) / (A_clean - A_orig)`` with ``A_orig`` the biased probe on clean test
  activations, ``A_abl`` on ablated ones, ``A_clean`` the column1 probe on clean ones;
  SAEBench's rule (``eval.denominator=saebench``): the score is 0 when
  ``A_clean - A_orig < 0.001`` (also when it is negative);
* ``scr_dir2_threshold_N``: the same with the roles of the concepts swapped;
* ``scr_metric_threshold_N`` (the headline), SAEBench's rule (``eval.direction=saebench``):
  per pair, dir1 when the biased probe is less accurate on the column1 test set than on the
  column2 one (``A_orig(dir1) < A_orig(dir2)``: the bias to remove is towards column2), dir2
  when it is more accurate, and no headline (NaN, left out of the mean over pairs) on a tie.
  ``eval_result_details[*].headline_direction`` records the choice per pair.

Scores are averaged over pairs; a NaN score is left out of the mean (counted in
``eval_result_unstructured.n_pairs_undefined``). ``eval_result_unstructured.rules`` records
the rules the numbers were computed with.

Data: real models use SAEBench's datasets (``LabHC/bias_in_bios`` profession x gender,
``canrager/amazon_reviews_mcauley_1and5`` category x rating) and mean-pool the activations
and the model-space latents over non-special tokens (the ablation is linear, so ablating
the pooled features equals pooling per-token ablations). The embedded model uses the
activation at the city token in every template of its world, ``column1 = Continent`` and
``column2 = Language``: two continents and two languages are chosen so that all four cells
have cities, the biased cells being the larger ones; cities are split into train/val/test
within each cell (entity-disjoint).

Differences from SAEBench (SAEBench ``sae_bench/evals/scr_and_tpp``; default = SAEBench's
rule unless said otherwise):

* ranking: SAEBench ranks latents by ``|effect|``; default the same; ``eval.ranking=signed``
  ranks by the signed effect (latents whose ablation moves the probe's logit away from the
  concept's positive class come last; the rule of this eval's version 1.0).
* how many latents: SAEBench ablates ``min(N, #nonzero effects)`` latents, the largest
  first; default the same; ``eval.only_nonzero_effects=false`` always ablates ``N`` (version 1.0).
  Ties are broken by the lower latent index (SAEBench: ``torch.topk``'s order).
* headline: SAEBench picks dir1 or dir2 per pair from the biased probe's accuracies (above);
  default the same; ``eval.direction=dir1`` always reports dir1 (version 1.0).
* denominator: SAEBench scores 0 when ``A_clean - A_orig < 0.001``; default the same;
  ``eval.denominator=ratio`` reports the ratio for any nonzero denominator (negative ones
  too) and NaN when ``A_clean == A_orig`` (version 1.0).
* masked positions (hf data only; no option, deliberate): SAEBench ablates every position of
  a padded text, so at a masked (BOS/pad/EOS, zeroed) position the latents of the zero
  vector that are in ``S`` are subtracted too and enter the text's mean-pool; saeravel pools
  over the non-special tokens only, so masked positions never change.
* effects use model-space latents ``a`` (SAEBench: the SAE's latents ``f``; the same for
  SAEs that do not normalise their input).
* probes are scikit-learn logistic regressions with ``C`` chosen on a validation split
  (SAEBench trains torch probes with an L1 penalty and early stopping); ``N`` is capped at
  ``d_sae`` instead of failing on narrow SAEs.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saeravel.activations import (
    model_space_latents,
    pooled_text_features,
    require_decoder,
    sae_hook,
)
from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.probing import (
    ProbeConfig,
    ablate,
    accuracy,
    check_probe,
    effective_n_values,
    fit,
    latent_effects,
    latent_order,
    linear_probe_weights,
    n_selected,
    nanmean,
)
from saeravel.saes.base import SAE
from saeravel.taskdata import SPLITS, data_source, dataset_error, entity_features, world_entities

log = logging.getLogger(__name__)

EPS = 1e-12
# SAEBench scores a direction 0 when its denominator A_clean - A_orig is below this.
SAEBENCH_MIN_DENOMINATOR = 0.001


class Ranking(str, Enum):
    """``eval.ranking``: how latents are ordered for ablation."""

    absolute = "absolute"  # |effect| (SAEBench)
    signed = "signed"  # effect, largest first


class Direction(str, Enum):
    """``eval.direction``: which direction ``scr_metric_threshold_N`` reports."""

    saebench = "saebench"  # per pair from the biased probe's accuracies (SAEBench)
    dir1 = "dir1"  # always dir1


class Denominator(str, Enum):
    """``eval.denominator``: the score when ``A_clean - A_orig`` is small or negative."""

    saebench = "saebench"  # 0 when A_clean - A_orig < 0.001 (SAEBench)
    ratio = "ratio"  # the ratio for any nonzero denominator, NaN at 0


def option(value: Any, kind: type[Enum], name: str) -> Enum:
    """``value`` (a member or its name) as a member of ``kind``, or a one-line error."""
    if isinstance(value, kind):
        return value
    text = value.value if isinstance(value, Enum) else str(value)
    choose(name, text, [m.value for m in kind])
    return kind(text)


# LabHC/bias_in_bios: ``profession`` (ClassLabel, alphabetical) and ``gender`` (0 male, 1 female).
BIOS_PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist",
    "dietitian", "dj", "filmmaker", "interior_designer", "journalist", "model", "nurse",
    "painter", "paralegal", "pastor", "personal_trainer", "photographer", "physician", "poet",
    "professor", "psychologist", "rapper", "software_engineer", "surgeon", "teacher",
    "yoga_teacher",
)  # fmt: skip
# canrager/amazon_reviews_mcauley_1and5 categories (SAEBench's integer codes); a row matches
# a category by its name or by its code.
AMAZON_CATEGORIES = (
    "All_Beauty", "Toys_and_Games", "Cell_Phones_and_Accessories", "Industrial_and_Scientific",
    "Gift_Cards", "Musical_Instruments", "Electronics", "Handmade_Products",
    "Arts_Crafts_and_Sewing", "Baby_Products", "Health_and_Household", "Office_Products",
    "Digital_Music", "Grocery_and_Gourmet_Food", "Sports_and_Outdoors", "Home_and_Kitchen",
    "Subscription_Boxes", "Tools_and_Home_Improvement", "Pet_Supplies", "Video_Games",
    "Kindle_Store", "Clothing_Shoes_and_Jewelry", "Patio_Lawn_and_Garden", "Unknown", "Books",
    "Automotive", "CDs_and_Vinyl", "Beauty_and_Personal_Care", "Amazon_Fashion",
    "Magazine_Subscriptions", "Software", "Health_and_Personal_Care", "Appliances",
    "Movies_and_TV",
)  # fmt: skip


@dataclass(frozen=True)
class PairedDatasetSpec:
    """A Hugging Face dataset with two label columns; ``codes*`` map value names to stored codes."""

    path: str
    text: str
    column1: str
    column2: str
    codes1: dict[str, str]
    codes2: dict[str, str]
    test_split: str = "test"


_BIOS = PairedDatasetSpec(
    "LabHC/bias_in_bios",
    "hard_text",
    "profession",
    "gender",
    {name: str(i) for i, name in enumerate(BIOS_PROFESSIONS)},
    {"male": "0", "female": "1"},
)
PAIRED_DATASETS: dict[str, PairedDatasetSpec] = {
    "LabHC/bias_in_bios_class_set1": _BIOS,
    "LabHC/bias_in_bios_class_set2": _BIOS,
    "LabHC/bias_in_bios_class_set3": _BIOS,
    "canrager/amazon_reviews_mcauley_1and5": PairedDatasetSpec(
        "canrager/amazon_reviews_mcauley_1and5",
        "text",
        "category",
        "rating",
        {name: str(i) for i, name in enumerate(AMAZON_CATEGORIES)},
        {"1.0": "1.0", "5.0": "5.0"},
    ),
}


def _bios_pairs() -> list[list[str]]:
    return [
        ["professor", "nurse"],
        ["architect", "journalist"],
        ["surgeon", "psychologist"],
        ["attorney", "teacher"],
    ]


def _amazon_pairs() -> list[list[str]]:
    return [
        ["Books", "CDs_and_Vinyl"],
        ["Software", "Electronics"],
        ["Pet_Supplies", "Office_Products"],
        ["Industrial_and_Scientific", "Toys_and_Games"],
    ]


@dataclass
class ScrEvalConfig(EvalConfig):
    """SAEBench's SCR (see the module docstring)."""

    name: str = "scr"
    version: str = "2.0"
    data_source: str = "auto"
    ranking: Ranking = Ranking.absolute
    only_nonzero_effects: bool = True
    direction: Direction = Direction.saebench
    denominator: Denominator = Denominator.saebench
    embedded_attributes: list[str] = field(default_factory=lambda: ["Continent", "Language"])
    embedded_pairs: list[list[str]] = field(default_factory=list)
    embedded_max_pairs: int = 2
    min_entities_per_cell: int = 3
    entity_split_fractions: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.3])
    dataset_names: list[str] = field(
        default_factory=lambda: [
            "LabHC/bias_in_bios_class_set1",
            "canrager/amazon_reviews_mcauley_1and5",
        ]
    )
    column1_vals_lookup: dict[str, list[list[str]]] = field(
        default_factory=lambda: {
            "LabHC/bias_in_bios_class_set1": _bios_pairs(),
            "canrager/amazon_reviews_mcauley_1and5": _amazon_pairs(),
        }
    )
    column2_vals_lookup: dict[str, list[str]] = field(
        default_factory=lambda: {
            "LabHC/bias_in_bios_class_set1": ["male", "female"],
            "canrager/amazon_reviews_mcauley_1and5": ["1.0", "5.0"],
        }
    )
    train_set_size: int = 4000
    val_set_size: int = 1000
    test_set_size: int = 1000
    context_length: int = 128
    n_values: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    batch_size: int = 32
    seed: int = 42


# ----------------------------------------------------------------------------- rules


def ranking_scores(effects: np.ndarray, ranking: Ranking | str) -> np.ndarray:
    """The scores latents are ranked by: ``|effects|`` (absolute) or ``effects`` (signed)."""
    rank = option(ranking, Ranking, "eval.ranking")
    return np.abs(effects) if rank is Ranking.absolute else effects


# ----------------------------------------------------------------------------- data


@dataclass
class CellData:
    """Rows of one data source, per split: activations, model-space latents, both labels."""

    x: dict[str, np.ndarray]
    a: dict[str, np.ndarray]
    v1: dict[str, np.ndarray]
    v2: dict[str, np.ndarray]


def _norm(value: Any) -> str:
    """Numbers compare by value (``5``, ``5.0`` and ``"5.0"`` are equal), the rest as text."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def check_pairs(name: str, pairs: Sequence[Sequence[str]], col2: Sequence[str]) -> None:
    """Class pairs of a dataset: two known values each."""
    spec = PAIRED_DATASETS[name]
    if len(col2) != 2:
        raise UserError(f"eval.column2_vals_lookup[{name}] must have 2 values, got {list(col2)}")
    for v in col2:
        choose(f"{spec.column2} value", v, spec.codes2)
    if not pairs:
        raise UserError(f"eval.column1_vals_lookup[{name}] has no class pair")
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise UserError(f"eval.column1_vals_lookup[{name}] has {list(pair)}; need 2 values")
        for v in pair:
            choose(f"{spec.column1} value", v, spec.codes1)


def _collect(
    rows: Any, spec: PairedDatasetSpec, keys: dict[tuple[str, str], tuple[str, str]], n: int
) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {cell: [] for cell in set(keys.values())}
    full = 0
    for row in rows:
        cell = keys.get((_norm(row[spec.column1]), _norm(row[spec.column2])))
        if cell is None or len(out[cell]) >= n:
            continue
        out[cell].append(row[spec.text])
        full += len(out[cell]) == n
        if full == len(out):
            break
    return out


def load_paired_texts(
    name: str, cells: Sequence[tuple[str, str]], n_train: int, n_val: int, n_test: int, seed: int
) -> dict[str, dict[tuple[str, str], list[str]]]:
    """``{split: {(value1, value2): texts}}``: up to ``n_*`` texts per cell; val is carved
    from the training split, disjoint from train."""
    import datasets

    choose("SCR dataset", name, PAIRED_DATASETS)
    spec = PAIRED_DATASETS[name]
    try:
        cols = [spec.text, spec.column1, spec.column2]
        train_rows = datasets.load_dataset(spec.path, split="train").select_columns(cols)
        test_rows = datasets.load_dataset(spec.path, split=spec.test_split).select_columns(cols)
    except (OSError, ValueError, ConnectionError) as exc:
        raise dataset_error(
            f"dataset {spec.path!r} (for {name!r})",
            exc,
            "if it is not in the local Hugging Face datasets cache and the hub cannot be "
            "reached: on a machine with a network run eval=scr once to cache it, then set "
            "HF_DATASETS_OFFLINE=1; or use eval.data_source=embedded with model=tiny-city-lm",
        ) from exc
    keys = {}
    for v1, v2 in cells:
        for k1 in {_norm(v1), _norm(spec.codes1[v1])}:
            for k2 in {_norm(v2), _norm(spec.codes2[v2])}:
                keys[(k1, k2)] = (v1, v2)
    trainval = _collect(train_rows.shuffle(seed=seed), spec, keys, n_train + n_val)
    test = _collect(test_rows.shuffle(seed=seed), spec, keys, n_test)
    for cell, texts in {**trainval, **test}.items():
        if not texts:
            raise UserError(f"dataset {spec.path!r} has no row with {spec.column1}, "
                            f"{spec.column2} = {cell}")  # fmt: skip
    return {
        "train": {c: t[:n_train] for c, t in trainval.items()},
        "val": {c: t[n_train:] for c, t in trainval.items()},
        "test": test,
    }


def hf_cell_data(
    model: Any, sae: SAE, hook: str, texts: dict[str, dict[tuple[str, str], list[str]]], cfg: Any
) -> CellData:
    """Mean-pooled activations and model-space latents of every text."""
    data = CellData({}, {}, {}, {})
    for split in SPLITS:
        cells = list(texts[split])
        flat = [t for c in cells for t in texts[split][c]]
        data.x[split], data.a[split] = pooled_text_features(
            model, sae, hook, flat, cfg.context_length, cfg.batch_size, model_space=True
        )
        data.v1[split] = np.array([c[0] for c in cells for _ in texts[split][c]])
        data.v2[split] = np.array([c[1] for c in cells for _ in texts[split][c]])
    return data


def choose_embedded_pairs(
    world: Any, attr1: str, attr2: str, min_cell: int, max_pairs: int
) -> list[tuple[str, str, str, str]]:
    """Up to ``max_pairs`` ``(a1, a2, b1, b2)`` whose four cells all have ``min_cell`` cities,
    the largest smallest cell first; ``(a1, b1)`` and ``(a2, b2)`` are the biased cells, the
    orientation whose smaller biased cell is larger."""
    counts = Counter((e[attr1], e[attr2]) for e in world_entities(world).values())
    vals1 = sorted({k[0] for k in counts})
    vals2 = sorted({k[1] for k in counts})
    candidates = []
    for a1, a2 in itertools.combinations(vals1, 2):
        for b1, b2 in itertools.combinations(vals2, 2):
            cells = [counts[(a1, b1)], counts[(a2, b2)], counts[(a1, b2)], counts[(a2, b1)]]
            if min(cells) < min_cell:
                continue
            if min(cells[2:]) > min(cells[:2]):
                b1, b2 = b2, b1
                cells = cells[2:] + cells[:2]
            candidates.append(((-min(cells), -min(cells[:2])), (a1, a2, b1, b2)))
    candidates.sort()
    return [pair for _, pair in candidates[:max_pairs]]


def split_cells(
    world: Any,
    attr1: str,
    attr2: str,
    cells: Sequence[tuple[str, str]],
    fractions: Sequence[float],
    seed: int,
) -> dict[str, str]:
    """Entity -> split, stratified within each cell (>= 1 city per split)."""
    ents = world_entities(world)
    out = {}
    for cell in sorted(set(cells)):
        names = sorted(e for e, a in ents.items() if (a[attr1], a[attr2]) == cell)
        random.Random(f"{seed}-{cell}").shuffle(names)
        n = len(names)
        n_val = max(1, round(fractions[1] * n))
        n_test = max(1, round(fractions[2] * n))
        n_train = n - n_val - n_test
        for i, e in enumerate(names):
            out[e] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


def embedded_cell_data(
    lm: Any, sae: SAE, hook: str, pairs: Sequence[tuple[str, str, str, str]], cfg: Any
) -> CellData:
    """City-token activations of every city in the cells of ``pairs``, in every template."""
    attr1, attr2 = cfg.embedded_attributes
    cells = [c for p in pairs for c in _cells(p)]
    split = split_cells(lm.world, attr1, attr2, cells, cfg.entity_split_fractions, cfg.seed)
    cities = sorted(split)
    resid, lat, row_entity = entity_features(lm.model, sae, hook, lm.world, cities, cfg.batch_size)
    a = model_space_latents(sae, resid, lat)
    row_split = np.array([split[e] for e in row_entity])
    v1 = np.array([lm.world.entities[e][attr1] for e in row_entity])
    v2 = np.array([lm.world.entities[e][attr2] for e in row_entity])
    return CellData(
        {s: resid[row_split == s] for s in SPLITS},
        {s: a[row_split == s] for s in SPLITS},
        {s: v1[row_split == s] for s in SPLITS},
        {s: v2[row_split == s] for s in SPLITS},
    )


def embedded_pairs(world: Any, cfg: Any) -> list[tuple[str, str, str, str]]:
    """The configured ``embedded_pairs`` (checked) or the automatically chosen ones."""
    if len(cfg.embedded_attributes) != 2 or len(set(cfg.embedded_attributes)) != 2:
        raise UserError(
            f"eval.embedded_attributes must be 2 different attributes, got {cfg.embedded_attributes}"
        )
    attr1, attr2 = cfg.embedded_attributes
    ents = world_entities(world)
    for attr in (attr1, attr2):
        choose("attribute", attr, sorted(next(iter(ents.values()))))
    if cfg.min_entities_per_cell < 3:
        raise UserError("eval.min_entities_per_cell must be >= 3 (one city per split)")
    fr = list(cfg.entity_split_fractions)
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise UserError(
            f"eval.entity_split_fractions must be 3 positive numbers summing to 1: {fr}"
        )
    if not cfg.embedded_pairs:
        pairs = choose_embedded_pairs(
            world, attr1, attr2, cfg.min_entities_per_cell, cfg.embedded_max_pairs
        )
        if not pairs:
            raise UserError(
                f"no two {attr1} values and two {attr2} values have >= "
                f"{cfg.min_entities_per_cell} cities in all four combinations; lower "
                "eval.min_entities_per_cell or use a larger world (model.n_cities)"
            )
        return pairs
    counts = Counter((e[attr1], e[attr2]) for e in ents.values())
    out = []
    for p in cfg.embedded_pairs:
        if len(p) != 4 or p[0] == p[1] or p[2] == p[3]:
            raise UserError(f"eval.embedded_pairs entry {list(p)} must be [{attr1} a1, a2, "
                            f"{attr2} b1, b2] with a1 != a2 and b1 != b2")  # fmt: skip
        for v in p[:2]:
            choose(f"{attr1} value", v, sorted({a[attr1] for a in ents.values()}))
        for v in p[2:]:
            choose(f"{attr2} value", v, sorted({a[attr2] for a in ents.values()}))
        for cell in itertools.product(p[:2], p[2:]):
            if counts[cell] < cfg.min_entities_per_cell:
                raise UserError(
                    f"eval.embedded_pairs {list(p)}: cell {cell} has {counts[cell]} cities, "
                    f"fewer than eval.min_entities_per_cell={cfg.min_entities_per_cell}"
                )
        out.append((p[0], p[1], p[2], p[3]))
    return out


# ----------------------------------------------------------------------------- SCR proper


def _cells(pair: Sequence[str]) -> list[tuple[str, str]]:
    """The four (value1, value2) cells of ``(a1, a2, b1, b2)``."""
    return [(pair[i], pair[j]) for i in (0, 1) for j in (2, 3)]


def _balanced(
    v1: np.ndarray, v2: np.ndarray, cells: Sequence[tuple[str, str]], rng: np.random.Generator
) -> np.ndarray:
    """Row indices: every cell subsampled to the size of the smallest."""
    rows = [np.flatnonzero((v1 == c1) & (v2 == c2)) for c1, c2 in cells]
    m = min(len(r) for r in rows)
    if m == 0:
        empty = cells[[len(r) for r in rows].index(0)]
        raise UserError(f"no rows for cell {empty} in a split; too little data for this pair")
    return np.sort(np.concatenate([rng.choice(r, m, replace=False) for r in rows]))


def scr_score(
    a_abl: float, a_orig: float, a_clean: float, denominator: Denominator | str = "saebench"
) -> float:
    """``(A_abl - A_orig) / (A_clean - A_orig)``. ``saebench``: 0 when ``A_clean - A_orig <
    0.001``; ``ratio``: the ratio for any nonzero denominator, NaN when it is 0."""
    denom = a_clean - a_orig
    if option(denominator, Denominator, "eval.denominator") is Denominator.saebench:
        return 0.0 if denom < SAEBENCH_MIN_DENOMINATOR else (a_abl - a_orig) / denom
    return (a_abl - a_orig) / denom if abs(denom) > EPS else math.nan


def headline_direction(
    orig_dir1: float, orig_dir2: float, direction: Direction | str = "saebench"
) -> int | None:
    """The direction ``scr_metric`` reports for one pair. ``saebench``: 1 when the biased
    probe is less accurate on the column1 test set than on the column2 one, 2 when more,
    None (no headline) on a tie; ``dir1``: always 1."""
    if option(direction, Direction, "eval.direction") is Direction.dir1:
        return 1
    if orig_dir1 < orig_dir2:
        return 1
    if orig_dir1 > orig_dir2:
        return 2
    return None


def scr_pair(
    data: CellData,
    pair: tuple[str, str, str, str],
    w_dec: np.ndarray,
    n_eff: Sequence[tuple[int, int]],
    cfg: Any,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Probes, latent rankings, accuracies and scores of one concept pair."""
    a1, a2, b1, b2 = pair
    biased_cells = [(a1, b1), (a2, b2)]
    all_cells = [(a1, b1), (a1, b2), (a2, b1), (a2, b2)]
    idx_b = {s: _balanced(data.v1[s], data.v2[s], biased_cells, rng) for s in SPLITS}
    idx_4 = {s: _balanced(data.v1[s], data.v2[s], all_cells, rng) for s in SPLITS}

    def labels(idx: dict[str, np.ndarray], which: int) -> dict[str, np.ndarray]:
        vals, pos = (data.v1, a1) if which == 1 else (data.v2, b1)
        return {s: (vals[s][idx[s]] == pos).astype(int) for s in SPLITS}

    def train(idx: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[Any, float]:
        model, c, _ = fit(
            cfg.probe,
            (data.x["train"][idx["train"]], y["train"]),
            (data.x["val"][idx["val"]], y["val"]),
        )
        return model, c

    y_biased = labels(idx_b, 1)
    y1, y2 = labels(idx_4, 1), labels(idx_4, 2)
    biased, c_biased = train(idx_b, y_biased)
    probe1, c1 = train(idx_4, y1)
    probe2, c2 = train(idx_4, y2)
    a_train = data.a["train"][idx_4["train"]]
    scores = {
        d: ranking_scores(
            latent_effects(a_train, y["train"], linear_probe_weights(p)[0], w_dec), cfg.ranking
        )
        for d, (p, y) in ((1, (probe1, y1)), (2, (probe2, y2)))
    }
    order = {d: latent_order(scores[d]) for d in (1, 2)}
    n_nonzero = {d: int(np.count_nonzero(scores[d])) for d in (1, 2)}
    xt, at = data.x["test"][idx_4["test"]], data.a["test"][idx_4["test"]]
    yt = {1: y1["test"], 2: y2["test"]}
    clean = {1: accuracy(probe1, xt, yt[1]), 2: accuracy(probe2, xt, yt[2])}
    orig = {d: accuracy(biased, xt, yt[d]) for d in (1, 2)}
    head = headline_direction(orig[1], orig[2], cfg.direction)

    def chosen(d: int, n: int) -> np.ndarray:  # latents of the concept probe ablated in dir d
        probe_dir = 2 if d == 1 else 1  # dir1 ablates the column2 (spurious) probe's latents
        return order[probe_dir][: n_selected(scores[probe_dir], n, cfg.only_nonzero_effects)]

    out: dict[str, Any] = {
        "pair": list(pair),
        "n_rows": {
            "biased": {s: len(idx_b[s]) for s in SPLITS},
            "balanced": {s: len(idx_4[s]) for s in SPLITS},
        },
        "C": {"biased": c_biased, "column1": c1, "column2": c2},
        "biased_probe_accuracy_on_biased_test": accuracy(
            biased, data.x["test"][idx_b["test"]], y_biased["test"]
        ),
        "clean_accuracy": {"dir1": clean[1], "dir2": clean[2]},
        "original_accuracy": {"dir1": orig[1], "dir2": orig[2]},
        "headline_direction": head,
        "ablated_accuracy": {"dir1": {}, "dir2": {}},
        "n_latents_ablated": {"dir1": {}, "dir2": {}},
        "n_nonzero_effects": {"column2_probe": n_nonzero[2], "column1_probe": n_nonzero[1]},
        "top_latents": {
            "column2_probe": chosen(1, 10).tolist(),
            "column1_probe": chosen(2, 10).tolist(),
        },
        "scores": {},
    }
    for n, n_abl in n_eff:
        for d in (1, 2):
            latents = chosen(d, n_abl)
            acc = accuracy(biased, ablate(xt, at, w_dec, latents), yt[d])
            out["ablated_accuracy"][f"dir{d}"][str(n)] = acc
            out["n_latents_ablated"][f"dir{d}"][str(n)] = len(latents)
            score = scr_score(acc, orig[d], clean[d], cfg.denominator)
            out["scores"][f"scr_dir{d}_threshold_{n}"] = score
        out["scores"][f"scr_metric_threshold_{n}"] = (
            math.nan if head is None else out["scores"][f"scr_dir{head}_threshold_{n}"]
        )
    return out


def rules(cfg: Any) -> dict[str, Any]:
    """The rules the scores were computed with (and whether they are all SAEBench's)."""
    used = {
        "ranking": option(cfg.ranking, Ranking, "eval.ranking").value,
        "only_nonzero_effects": bool(cfg.only_nonzero_effects),
        "direction": option(cfg.direction, Direction, "eval.direction").value,
        "denominator": option(cfg.denominator, Denominator, "eval.denominator").value,
    }
    saebench = {"ranking": "absolute", "only_nonzero_effects": True, "direction": "saebench",
                "denominator": "saebench"}  # fmt: skip
    return {**used, "saebench": used == saebench, "masked_positions_ablated": False}


def metric_keys(n_values: Sequence[int]) -> list[str]:
    """SAEBench's key order: per N, dir1, metric, dir2."""
    return [f"scr_{kind}_threshold_{n}" for n in n_values for kind in ("dir1", "metric", "dir2")]


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    m = metrics.get("scr_metrics", {})
    shown = [
        f"N={k.rsplit('_', 1)[1]} {v:.3f}"
        for k, v in m.items()
        if k.startswith("scr_metric_threshold_") and k.rsplit("_", 1)[1] in ("2", "10", "50")
    ]
    return "scr: scr_metric " + (", ".join(shown) or "n/a")


@register("scr", schema=ScrEvalConfig, summarize=summarize)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run SCR on the job's model, SAE and layer."""
    w_dec = require_decoder(ctx.sae, "scr")
    assert ctx.sae is not None
    source = data_source(cfg.data_source, ctx.model)
    n_eff, capped = effective_n_values(cfg.n_values, ctx.sae.d_sae)
    check_probe(cfg.probe)
    used_rules = rules(cfg)
    hook = sae_hook(ctx.sae, ctx.hook_name)
    rng = np.random.default_rng(cfg.seed)
    details: list[dict[str, Any]] = []
    plan: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    if source == "embedded":
        name = "embedded:" + "x".join(cfg.embedded_attributes)
        plan.append((name, embedded_pairs(ctx.model.world, cfg)))
        data = embedded_cell_data(ctx.model, ctx.sae, hook, plan[0][1], cfg)
        for pair in tqdm(plan[0][1], desc="SCR pairs", leave=False):
            details.append({"dataset_name": name, **scr_pair(data, pair, w_dec, n_eff, cfg, rng)})
    else:
        for key in ("train_set_size", "val_set_size", "test_set_size"):
            if getattr(cfg, key) < 4:
                raise UserError(f"eval.{key} must be >= 4 (texts are split over four cells)")
        for name in cfg.dataset_names:
            choose("SCR dataset", name, PAIRED_DATASETS)
            if name not in cfg.column1_vals_lookup or name not in cfg.column2_vals_lookup:
                raise UserError(
                    f"dataset {name!r} needs entries in eval.column1_vals_lookup and "
                    "eval.column2_vals_lookup"
                )
            col1, col2 = cfg.column1_vals_lookup[name], list(cfg.column2_vals_lookup[name])
            check_pairs(name, col1, col2)
            plan.append((name, [(p[0], p[1], col2[0], col2[1]) for p in col1]))
        for name, pairs in tqdm(plan, desc="SCR datasets", leave=False):
            texts = load_paired_texts(
                name, sorted({c for p in pairs for c in _cells(p)}), cfg.train_set_size // 4,
                cfg.val_set_size // 4, cfg.test_set_size // 4, cfg.seed,
            )  # fmt: skip
            for pair in tqdm(pairs, desc=f"SCR pairs ({name})", leave=False):
                # Features per pair (its four cells only) bound the memory: rows x d_sae.
                sub = {s: {c: texts[s][c] for c in _cells(pair)} for s in SPLITS}
                data = hf_cell_data(ctx.model.model, ctx.sae, hook, sub, cfg)
                details.append(
                    {"dataset_name": name, **scr_pair(data, pair, w_dec, n_eff, cfg, rng)}
                )
    keys = metric_keys(cfg.n_values)
    metrics = {"scr_metrics": {k: nanmean([d["scores"][k] for d in details]) for k in keys}}
    undefined = {
        k: sum(math.isnan(d["scores"][k]) for d in details)
        for k in keys
        if any(math.isnan(d["scores"][k]) for d in details)
    }
    unstructured = {
        "data_source": source,
        "hook_name": hook,
        "rules": used_rules,
        "pairs": {name: [list(p) for p in pairs] for name, pairs in plan},
        "n_values_capped": capped,
        "n_pairs": len(details),
        "n_pairs_undefined": undefined,
    }
    summary = [summarize(metrics)]
    if capped:
        summary.append(f"scr: n_values {sorted(map(int, capped))} capped at d_sae={ctx.sae.d_sae}")
    return EvalOutput(metrics, details, unstructured, summary=summary)
