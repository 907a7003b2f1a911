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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saeravel.activations import (
    require_decoder,
    sae_hook,
)
from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.probing import (
    ProbeConfig,
    ablate,
    accuracy,
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
from saeravel.schema import StrEnum
from saeravel.taskdata import (
    PAIRED_DATASETS,
    SPLITS,
    CellData,
    PairRequest,
    choose_embedded_pairs,
    data_source,
    paired_cells,
    world_entities,
)

log = logging.getLogger(__name__)

EPS = 1e-12
# SAEBench scores a direction 0 when its denominator A_clean - A_orig is below this.
SAEBENCH_MIN_DENOMINATOR = 0.001


class Ranking(StrEnum):
    """``eval.ranking``: how latents are ordered for ablation."""

    absolute = "absolute"  # |effect| (SAEBench)
    signed = "signed"  # effect, largest first


class Direction(StrEnum):
    """``eval.direction``: which direction ``scr_metric_threshold_N`` reports."""

    saebench = "saebench"  # per pair from the biased probe's accuracies (SAEBench)
    dir1 = "dir1"  # always dir1


class Denominator(StrEnum):
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

    def __post_init__(self) -> None:
        choose("eval.data_source", self.data_source, ("auto", "embedded", "hf"))
        check_n_values(self.n_values)
        if self.min_entities_per_cell < 3:
            raise UserError("eval.min_entities_per_cell must be >= 3 (one city per split)")
        fr = list(self.entity_split_fractions)
        if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
            raise UserError(
                f"eval.entity_split_fractions must be 3 positive numbers summing to 1: {fr}"
            )
        attrs = list(self.embedded_attributes)
        if len(attrs) != 2 or len(set(attrs)) != 2:
            raise UserError(f"eval.embedded_attributes must be 2 different attributes, got {attrs}")
        for key in ("embedded_max_pairs", "context_length", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"eval.{key} must be >= 1 (got {getattr(self, key)})")


# ----------------------------------------------------------------------------- rules


def ranking_scores(effects: np.ndarray, ranking: Ranking | str) -> np.ndarray:
    """The scores latents are ranked by: ``|effects|`` (absolute) or ``effects`` (signed)."""
    rank = option(ranking, Ranking, "eval.ranking")
    return np.abs(effects) if rank is Ranking.absolute else effects


# ----------------------------------------------------------------------------- data


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


@register(
    "scr",
    schema=ScrEvalConfig,
    summarize=summarize,
    headline_metrics=tuple(
        f"scr_metrics.scr_metric_threshold_{n}" for n in (2, 5, 10, 20, 50, 100, 500)
    ),
    plotted=tuple(
        (f"scr_metrics.scr_metric_threshold_{n}", f"SCR, top {n} latents") for n in (2, 10, 50)
    ),
    non_result_paths={"batch_size": "prompts per forward pass when collecting activations"},
    saebench_required={"scr_metrics": ()},
    saebench_headline="scr_metrics",
)
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
        plan.append(
            ("embedded:" + "x".join(cfg.embedded_attributes), embedded_pairs(ctx.model.world, cfg))
        )
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
    request = PairRequest(
        attributes=tuple(cfg.embedded_attributes),
        split_fractions=cfg.entity_split_fractions,
        sizes=(cfg.train_set_size, cfg.val_set_size, cfg.test_set_size),
        context_length=cfg.context_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    rows = paired_cells(source, ctx.model, ctx.sae, hook, plan, request)
    for name, pair, data in tqdm(
        rows, desc="SCR pairs", total=sum(len(p) for _, p in plan), leave=False
    ):
        details.append({"dataset_name": name, **scr_pair(data, pair, w_dec, n_eff, cfg, rng)})
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
