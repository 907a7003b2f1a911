"""``eval=ravel``: RAVEL interchange interventions scored by cause, isolation, disentangle.

For each attribute A intervened and each method, a mask (or rotation) is trained on the
training split so that patching the base's entity representation with the source's makes
the model answer A with the source's value (cause pairs) while answering every other
attribute with the base's own value (isolation pairs); it is scored on the held-out split:
cause = accuracy against the source's label on A's prompts, isolation = accuracy against
the base's label on the other attributes' prompts, disentangle = their mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalOutput, register
from saeravel.ravel.data import download_ravel, load_ravel_city
from saeravel.ravel.decode import CachedDecoder, naive_generate
from saeravel.ravel.featurizers import (
    BasisSwap,
    BoundlessDAS,
    LatentSwap,
    MultiTaskDAS,
    PCASwap,
    principal_components,
    rank_latents_by_probe,
    sae_latents,
)
from saeravel.ravel.intervene import (
    DAS,
    FixedIntervention,
    Intervention,
    NeuronMask,
    SAEMask,
    SuffixRunner,
    batches_by_prefix,
    naive_logits,
    resid_at,
    temperature,
)
from saeravel.ravel.prompts import (
    MATCH_RULES,
    PAPER_FEW_SHOT_CITIES,
    Pair,
    Prompt,
    bos_id,
    few_shot_templates,
    label_ids,
    make_pairs,
    matches,
    split_entities,
    tokenize_prompt,
)
from saeravel.results import atomic_torch_save, atomic_write_json
from saeravel.schema import StrEnum
from saeravel.taskdata import data_source
from saeravel.world import CityWorld

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- config


class RavelProtocol(StrEnum):
    saeravel = "saeravel"
    ravel = "ravel"


class RavelMethod(StrEnum):
    sae = "sae"
    neurons = "neurons"
    das = "das"
    pca = "pca"
    boundless_das = "boundless_das"
    mdas = "mdas"
    sae_probe = "sae_probe"
    fixed = "fixed"
    all = "all"


class DataSource(StrEnum):
    auto = "auto"
    embedded = "embedded"
    ravel = "ravel"


class MatchRule(StrEnum):
    first_token = "first_token"
    prefix = "prefix"


class SplitBy(StrEnum):
    entity = "entity"
    pair = "pair"


class Optimizer(StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Schedule(StrEnum):
    linear = "linear"
    log = "log"
    constant = "constant"


class MaskEval(StrEnum):
    hard = "hard"
    soft = "soft"


class MaskEstimator(StrEnum):
    soft = "soft"
    straight_through = "straight_through"


class RavelRecipe(StrEnum):
    saeravel = "saeravel"
    paper = "paper"


class DASMode(StrEnum):
    mask = "mask"
    fixed = "fixed"


class PCAMode(StrEnum):
    mask = "mask"
    fixed = "fixed"


@dataclass
class MaskConfig:
    """Learned mask: ``sigmoid(param / T)``, T annealed from ``t_start`` to ``t_end``."""

    schedule: Schedule = Schedule.linear
    t_start: float = 10.0
    t_end: float = 0.1
    anneal_fraction: float = 0.667
    estimator: MaskEstimator = MaskEstimator.soft
    l1: float = 0.0
    eval: MaskEval = MaskEval.hard
    init: float = 0.0
    refine: bool = True
    refine_pairs: int = 256
    refine_passes: int = 1


@dataclass
class DASConfig:
    """DAS rotation: ``mode=mask`` (learned mask over rotated dims) or ``mode=fixed`` (first k)."""

    mode: DASMode = DASMode.mask
    k: int = 16


@dataclass
class PCAConfig:
    """PCA of the site's activations on the training entities: ``mode=mask`` (learned mask over
    the top ``components``, MIB's DBM+PCA) or ``mode=fixed`` (the first ``k``)."""

    mode: PCAMode = PCAMode.mask
    k: int = 16
    components: int | None = None


@dataclass
class BoundlessConfig:
    """Boundless DAS: a learned boundary (fraction of d_model) instead of k or a mask."""

    init: float = 0.5
    boundary_lr_scale: float = 10.0


@dataclass
class MDASConfig:
    """Multi-task DAS: one rotation shared by ``attributes`` (null = every eval.attributes)."""

    attributes: list[str] | None = None


@dataclass
class SAEProbeConfig:
    """SAE latents ranked by a value probe; the top ``counts[i]`` swapped, best on validation."""

    counts: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64])
    steps: int = 300
    lr: float = 0.05
    l1: float = 0.01


@dataclass
class FixedConfig:
    """A given basis: ``basis_file`` (torch tensor [k, d_model]) or the decoder directions of
    the SAE ``latents``; neither: the latents ``sae_probe`` picks for the attribute."""

    basis_file: str | None = None
    latents: list[int] | None = None


@dataclass
class RavelEvalConfig(EvalConfig):
    """RAVEL interchange interventions (see docs/ARCHITECTURE.md, evals.ravel)."""

    name: str = "ravel"
    version: str = "2.0"
    recipe: RavelRecipe = RavelRecipe.saeravel  # conf/eval/recipe/ sets it with its values
    recipe_label: str = (
        "saeravel's default: the paper's annealing, then 10 epochs at the final temperature"
    )
    protocol: RavelProtocol = RavelProtocol.saeravel
    method: RavelMethod = RavelMethod.all
    attributes: list[str] = field(default_factory=lambda: ["Country", "Continent"])
    data_source: DataSource = DataSource.auto
    data_dir: str | None = None
    match: MatchRule = MatchRule.first_token
    match_tokens: int = 3
    split_by: SplitBy = SplitBy.entity
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.1, 0.3])
    max_entities: int | None = 200
    max_pairs_per_split: int = 500
    drop_same_label_pairs: bool = True
    add_error: bool = False
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: Optimizer = Optimizer.adam
    mask: MaskConfig = field(default_factory=MaskConfig)
    das: DASConfig = field(default_factory=DASConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    boundless: BoundlessConfig = field(default_factory=BoundlessConfig)
    mdas: MDASConfig = field(default_factory=MDASConfig)
    sae_probe: SAEProbeConfig = field(default_factory=SAEProbeConfig)
    fixed: FixedConfig = field(default_factory=FixedConfig)
    bootstrap: int = 1000
    confidence: float = 0.95
    report_top_latents: int = 32
    fast: bool = True
    save_artifacts: bool = True
    checkpoint_every_s: float = 60.0
    checkpoint_every_steps: int = 0


# ----------------------------------------------------------------------------- eval

METHODS = ("sae", "neurons", "das", "pca", "boundless_das", "mdas", "sae_probe", "fixed")
TRAINED = ("sae", "neurons", "das", "pca", "boundless_das", "mdas")  # the rest fit no parameters
SAE_METHODS = ("sae", "sae_probe")  # need an SAE (and ``fixed`` without a basis file)
PROTOCOLS = ("saeravel", "ravel")
FILTER_FORMAT = 2  # knowledge-filter cache entries: {"format", "key", "n", "known"}


def _methods(cfg: Any) -> list[str]:
    return list(METHODS) if cfg.method == "all" else [cfg.method]


def _mdas_attributes(cfg: Any) -> list[str]:
    return list(cfg.mdas.attributes) if cfg.mdas.attributes is not None else list(cfg.attributes)


def needs_sae(cfg: Any) -> bool:
    """Whether the chosen methods use the SAE (``fixed`` only without a basis file)."""
    methods = _methods(cfg)
    fixed_sae = "fixed" in methods and not cfg.fixed.basis_file
    return fixed_sae or any(m in methods for m in SAE_METHODS)


def _sae_family(cfg: Any) -> str | None:
    """The job's ``sae.family`` when ``cfg`` is the eval node of a composed job config (or the
    ``sae`` choice under Hydra), else None (unknown: the check is left to the run)."""
    try:
        root = cfg._get_root()
    except AttributeError:
        root = None
    if root is not None and root is not cfg and "sae" in root:
        return root.sae.get("family")
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("sae")
    return None


def _validate_methods(cfg: Any) -> None:
    """The new featurizers' values; SAE-less jobs asking for SAE methods; the basis file."""
    methods = _methods(cfg)
    choose("eval.pca.mode", cfg.pca.mode, ("mask", "fixed"))
    if cfg.pca.components is not None and cfg.pca.components < 1:
        raise UserError(f"eval.pca.components={cfg.pca.components} must be >= 1 or null (all)")
    if cfg.pca.mode == "fixed" and (
        cfg.pca.k < 1 or (cfg.pca.components is not None and cfg.pca.k > cfg.pca.components)
    ):
        raise UserError(
            f"eval.pca.k={cfg.pca.k} must be >= 1 and <= eval.pca.components={cfg.pca.components}"
        )
    if not 0 < cfg.boundless.init <= 1 or not cfg.boundless.boundary_lr_scale > 0:
        raise UserError(
            f"eval.boundless.init={cfg.boundless.init} must be in (0, 1] and "
            f"eval.boundless.boundary_lr_scale={cfg.boundless.boundary_lr_scale} > 0"
        )
    if "mdas" in methods:
        attrs = _mdas_attributes(cfg)
        if len(attrs) < 2 or len(set(attrs)) != len(attrs):
            raise UserError(
                f"eval.mdas.attributes={attrs} needs at least two distinct attributes (one "
                "rotation shared across them); for one attribute use eval.method=das"
            )
        if not set(attrs) <= set(cfg.attributes):
            raise UserError(
                f"eval.mdas.attributes={attrs} must be among eval.attributes={list(cfg.attributes)}"
            )
    counts = list(cfg.sae_probe.counts)
    if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
        raise UserError(f"eval.sae_probe.counts={counts} must be a non-empty list of integers >= 1")
    if cfg.sae_probe.steps < 1 or not cfg.sae_probe.lr > 0 or cfg.sae_probe.l1 < 0:
        raise UserError(
            f"eval.sae_probe.steps={cfg.sae_probe.steps} must be >= 1, lr={cfg.sae_probe.lr} > 0 "
            f"and l1={cfg.sae_probe.l1} >= 0"
        )
    fx = cfg.fixed
    if fx.basis_file and fx.latents is not None:
        raise UserError(
            "eval.fixed.basis_file and eval.fixed.latents are two bases; give one (or neither: "
            "the latents sae_probe picks)"
        )
    if fx.latents is not None and (
        not list(fx.latents) or any(not isinstance(j, int) or j < 0 for j in fx.latents)
    ):
        raise UserError(f"eval.fixed.latents={list(fx.latents)} must be SAE latent indices >= 0")
    if "fixed" in methods and fx.basis_file and not Path(fx.basis_file).is_file():
        raise UserError(
            f"eval.fixed.basis_file={fx.basis_file} does not exist (a torch tensor [k, d_model])"
        )
    if _sae_family(cfg) == "none":
        need = [m for m in methods if m in SAE_METHODS]
        if "fixed" in methods and not fx.basis_file:
            need.append("fixed (SAE decoder directions: no eval.fixed.basis_file)")
        if need:
            raise UserError(
                f"eval.method={cfg.method} runs {', '.join(need)}, which need an SAE; choose "
                "sae=<family>, or a method without one (neurons, das, pca, boundless_das, mdas, "
                "fixed with eval.fixed.basis_file)"
            )


def validate(cfg: Any) -> None:
    """One-line errors for names that do not exist and values out of range (no model needed:
    the pipeline calls this before anything loads)."""
    choose("eval.protocol", cfg.protocol, PROTOCOLS)
    choose("eval.method", cfg.method, (*METHODS, "all"))
    choose("eval.split_by", cfg.split_by, ("entity", "pair"))
    choose("eval.match", cfg.match, MATCH_RULES)
    choose("eval.mask.eval", cfg.mask.eval, ("hard", "soft"))
    choose("eval.mask.schedule", cfg.mask.schedule, ("linear", "log", "constant"))
    choose("eval.mask.estimator", cfg.mask.estimator, ("soft", "straight_through"))
    choose("eval.das.mode", cfg.das.mode, ("mask", "fixed"))
    choose("eval.data_source", cfg.data_source, ("auto", "embedded", "ravel"))
    choose("eval.optimizer", cfg.optimizer, ("adam", "adamw", "sgd"))
    if len(cfg.attributes) < 2:
        raise UserError(
            "eval.attributes needs at least two attributes (one intervened, one isolated)"
        )
    if len(set(cfg.attributes)) != len(cfg.attributes):
        raise UserError(f"eval.attributes={list(cfg.attributes)} repeats an attribute")
    positive = {
        "eval.epochs": cfg.epochs, "eval.batch_size": cfg.batch_size,
        "eval.match_tokens": cfg.match_tokens, "eval.max_pairs_per_split": cfg.max_pairs_per_split,
        "eval.bootstrap": cfg.bootstrap, "eval.mask.refine_pairs": cfg.mask.refine_pairs,
    }  # fmt: skip
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name}={value} must be an integer >= 1")
    if cfg.max_entities is not None and cfg.max_entities < 2:
        raise UserError(f"eval.max_entities={cfg.max_entities} must be >= 2 or null (all)")
    for name, value in {"eval.lr": cfg.lr, "eval.mask.t_start": cfg.mask.t_start,
                        "eval.mask.t_end": cfg.mask.t_end}.items():  # fmt: skip
        if not value > 0 or not math.isfinite(value):
            raise UserError(f"{name}={value} must be a finite number > 0")
    if not 0 < cfg.mask.anneal_fraction <= 1:
        raise UserError(f"eval.mask.anneal_fraction={cfg.mask.anneal_fraction} must be in (0, 1]")
    if cfg.mask.l1 < 0 or cfg.mask.refine_passes < 0:
        raise UserError(
            f"eval.mask.l1={cfg.mask.l1} and eval.mask.refine_passes={cfg.mask.refine_passes} "
            "must be >= 0"
        )
    fr = list(cfg.split_fractions)
    if (
        len(fr) != 3
        or any(f < 0 for f in fr)
        or abs(sum(fr) - 1) > 1e-6
        or fr[0] == 0
        or fr[2] == 0
    ):
        raise UserError(
            f"eval.split_fractions={fr} must be three fractions (train, val, test) >= 0 summing "
            "to 1, with train and test > 0"
        )
    if cfg.das.mode == "fixed" and cfg.das.k < 1:
        raise UserError(f"eval.das.k={cfg.das.k} must be >= 1")
    if cfg.checkpoint_every_s < 0 or cfg.checkpoint_every_steps < 0:
        raise UserError(
            f"eval.checkpoint_every_s={cfg.checkpoint_every_s} and eval.checkpoint_every_steps="
            f"{cfg.checkpoint_every_steps} must be >= 0 (0 turns each off)"
        )
    if not 0 < cfg.confidence < 1:
        raise UserError(f"eval.confidence={cfg.confidence} must be in (0, 1)")
    _validate_methods(cfg)
    chosen = _recipe_choice()
    if chosen is not None and chosen != cfg.recipe:
        raise UserError(
            f"eval.recipe={cfg.recipe} only relabels the result; choose a recipe's settings with "
            f"eval/recipe={cfg.recipe} (valid: saeravel, paper)"
        )


def _recipe_choice() -> str | None:
    """The recipe file Hydra composed (``eval/recipe=...``), when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("eval/recipe")


def load_world(cfg: Any, ctx: Any) -> CityWorld:
    """The embedded world, or RAVEL's city files (``data_dir``, else downloaded)."""
    if data_source(cfg.data_source, ctx.model, other="ravel") == "embedded":
        if cfg.data_dir is not None:
            raise UserError(
                f"eval.data_dir={cfg.data_dir} is not read: model {ctx.model.name} brings its own "
                "world; set eval.data_source=ravel to evaluate on RAVEL's files instead"
            )
        return ctx.model.world
    folder = cfg.data_dir or download_ravel(ctx.cache_dir)
    return load_ravel_city(folder)


# ----------------------------------------------------------------------------- generation


def generate(
    model: Any, prompts: list[Prompt], n_tokens: int, layer: int | None = None,
    vectors: torch.Tensor | None = None, batch_size: int = 64, fast: bool = True,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuation (token ids) of ``n_tokens`` per prompt, optionally with ``vectors``
    patched in after block ``layer`` at each prompt's entity token: through key/value caches
    (:class:`CachedDecoder`), or with ``fast=False`` by one full forward per token (the
    reference :func:`naive_generate`)."""
    if not fast:
        return naive_generate(model, prompts, n_tokens, layer, vectors, batch_size)
    split = model.cfg.n_layers - 1 if layer is None else layer
    return CachedDecoder(model, split, batch_size).generate(prompts, n_tokens, [vectors])[0]


def label_for(world: CityWorld, p: Prompt) -> str:
    return world.entities[p.entity][p.attribute]


def prompt_label_ids(model: Any, world: CityWorld, p: Prompt) -> list[int]:
    return label_ids(model.tokenizer, p.template.replace("%s", p.entity), label_for(world, p))


def known_filter(cfg: Any, ctx: Any, world: CityWorld, prompts: list[Prompt]) -> list[bool]:
    """Whether the model answers each prompt correctly (greedy, ``cfg.match`` on token ids),
    cached per model identity, data, templates and rule. A cache entry that does not parse, or
    whose key or length does not fit, is logged in one line and rebuilt."""
    model = ctx.model
    key_src = json.dumps(
        {
            "model": model.name,
            "mk": model.info.get("cache_folder_key") or model.processing,
            "dtype": str(model.model.cfg.dtype),
            "prompts": [[p.template, p.entity] for p in prompts],
            "labels": [label_for(world, p) for p in prompts],
            "match": str(cfg.match),
            "n": cfg.match_tokens,
        },
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = Path(ctx.cache_dir) / "ravel_filter" / f"{model.name}-{key}.json"
    if path.exists():
        try:
            entry = json.loads(path.read_text())
            known = entry["known"]
            if (
                entry.get("format") != FILTER_FORMAT
                or entry.get("key") != key
                or not isinstance(known, list)
                or len(known) != len(prompts)
                or not all(isinstance(k, bool) for k in known)
            ):
                raise ValueError("does not fit this job's prompts")
            return known
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("knowledge-filter cache %s is corrupt (%s); rebuilding it", path, exc)
    log.info(
        "knowledge filter: %d prompts, %d generated tokens each", len(prompts), cfg.match_tokens
    )
    gens = generate(model.model, prompts, cfg.match_tokens, fast=cfg.fast)
    known = [
        matches(g, prompt_label_ids(model.model, world, p), cfg.match)
        for g, p in zip(gens, prompts, strict=True)
    ]
    atomic_write_json(path, {"format": FILTER_FORMAT, "key": key, "n": len(known), "known": known})
    return known


# ----------------------------------------------------------------------------- data assembly


def build_pairs(
    cfg: Any, ctx: Any, world: CityWorld
) -> tuple[dict[str, dict[str, list[Pair]]], dict[str, Any]]:
    """Pairs per attribute intervened and split (train/test), plus data statistics."""
    model = ctx.model.model
    attrs = list(cfg.attributes)
    missing = [a for a in attrs if a not in world.templates]
    if missing:
        raise UserError(
            f"eval.attributes has {missing} not in the data; valid: {', '.join(sorted(world.templates))}"
        )
    rng = random.Random(ctx.seed)
    bos = bos_id(model)
    shots = set(world.few_shot_cities)
    if (
        cfg.protocol == "saeravel"
        and not world.few_shot_cities
        and not getattr(world, "few_shot_prompts", None)
    ):
        shots |= set(PAPER_FEW_SHOT_CITIES)  # the paper's prompt: its shots leave the pool
    entities = sorted(e for e in world.entities if e not in shots)
    if cfg.max_entities and len(entities) > cfg.max_entities:
        entities = sorted(rng.sample(entities, cfg.max_entities))
    if cfg.protocol == "saeravel":
        templates = {a: [t] for a, t in few_shot_templates(world, attrs).items()}
    else:
        templates = {a: list(world.templates[a]) for a in attrs}
    prompts = [
        tokenize_prompt(model.tokenizer, t, e, a, bos)
        for e in entities
        for a in attrs
        for t in templates[a]
    ]
    known = known_filter(cfg, ctx, world, prompts)
    kept = [p for p, k in zip(prompts, known, strict=True) if k]
    if cfg.protocol == "saeravel":  # cities the model answers for every attribute
        n_known: dict[str, int] = {}
        for p in kept:
            n_known[p.entity] = n_known.get(p.entity, 0) + 1
        good = {e for e, n in n_known.items() if n == len(attrs)}
        kept = [p for p in kept if p.entity in good]
    if not kept:
        raise UserError(
            f"model {ctx.model.name} answers none of the {len(prompts)} RAVEL prompts correctly "
            f"(match={cfg.match}); nothing to evaluate"
        )
    known_keys = {(p.template, p.entity) for p in kept}
    kept_entities = sorted({p.entity for p in kept})
    by_entity: dict[str, list[Prompt]] = {}
    for p in kept:
        by_entity.setdefault(p.entity, []).append(p)
    # Sources: any known prompt of the entity (ravel protocol: other contexts too).
    if cfg.split_by == "entity":
        split = split_entities(kept_entities, world, list(cfg.split_fractions), ctx.seed)
        ent_in = {s: [e for e in kept_entities if split[e] == s] for s in ("train", "test")}
        val_entities = [e for e in kept_entities if split[e] == "val"]
    else:
        ent_in = {"train": kept_entities, "test": kept_entities}
        val_entities = []

    def template_ok(p: Prompt, s: str) -> bool:
        if cfg.protocol != "ravel" or not world.template_split:
            return True
        want = "train" if s == "train" else "test"
        return world.template_split.get(p.template, want) == want

    pairs: dict[str, dict[str, list[Pair]]] = {}

    def split_pairs(a: str, s: str, ents: set[str], rng: random.Random) -> list[Pair]:
        bases = [p for p in kept if p.entity in ents and template_ok(p, s)]
        cause_b = [p for p in bases if p.attribute == a]
        iso_b = [p for p in bases if p.attribute != a]
        srcs = {e: [q for q in by_entity[e] if template_ok(q, s)] for e in ents}
        if cfg.protocol == "saeravel":  # source shares the base's template
            ps = []
            for kind_bases in (cause_b, iso_b):
                for tmpl_attr in {p.attribute for p in kind_bases}:
                    same = {
                        e: [q for q in qs if q.attribute == tmpl_attr] for e, qs in srcs.items()
                    }
                    ps += make_pairs(
                        [p for p in kind_bases if p.attribute == tmpl_attr], same, world, a,
                        model.tokenizer, cfg.max_pairs_per_split // max(1, len({p.attribute for p in kind_bases})),
                        rng, cfg.drop_same_label_pairs, sorted(ents), cfg.match, known_keys,
                    )  # fmt: skip
        else:
            ps = make_pairs(cause_b, srcs, world, a, model.tokenizer, cfg.max_pairs_per_split, rng,
                            cfg.drop_same_label_pairs, sorted(ents), cfg.match, known_keys)  # fmt: skip
            ps += make_pairs(iso_b, srcs, world, a, model.tokenizer, cfg.max_pairs_per_split, rng,
                             cfg.drop_same_label_pairs, sorted(ents), cfg.match, known_keys)  # fmt: skip
        return ps

    for a in attrs:
        pairs[a] = {s: split_pairs(a, s, set(ent_in[s]), rng) for s in ("train", "test")}
    if cfg.split_by == "pair":  # the paper's leaky split: one pool, split by pair
        for a in attrs:
            pool = pairs[a]["train"]
            rng.shuffle(pool)
            n_tr = int(
                len(pool)
                * cfg.split_fractions[0]
                / (cfg.split_fractions[0] + cfg.split_fractions[2])
            )
            pairs[a] = {"train": pool[:n_tr], "test": pool[n_tr:]}
    # Validation pairs (selection among fitted variants, e.g. sae_probe's count) from the
    # validation entities, drawn from their own RNG so train and test are as without them.
    val_rng = random.Random(f"{ctx.seed}-val")
    for a in attrs:
        ps = []
        if cfg.split_by == "entity" and len(val_entities) >= 2:
            ps = split_pairs(a, "val", set(val_entities), val_rng)
        pairs[a]["val"] = ps
    stats = {
        "n_prompts": len(prompts),
        "n_known_prompts": len(kept),
        "n_entities_known": len(kept_entities),
        "entities_per_split": {s: len(v) for s, v in ent_in.items()},
        "pairs": {a: {s: {k: sum(p.kind == k for p in v) for k in ("cause", "isolation")} for s, v in d.items()}
                  for a, d in pairs.items()},  # fmt: skip
        "split_by": cfg.split_by,
        "split_note": "entity split: no test entity trains the mask" if cfg.split_by == "entity"
        else "LEAKY pair split (the paper's): test entities also appear in training pairs",
    }  # fmt: skip
    for a in attrs:
        for s in ("train", "test"):
            for k in ("cause", "isolation"):
                if stats["pairs"][a][s][k] == 0:
                    raise UserError(
                        f"no {s} {k} pairs for attribute {a}: too few known entities ({len(kept_entities)})"
                    )
    return pairs, stats


# ----------------------------------------------------------------------------- train & score


@dataclass
class FitData:
    """What a featurizer may be fit on before training: the residual vectors of every
    training-split prompt (base or source, any attribute) and, per attribute, their values."""

    vectors: torch.Tensor
    prompts: list[Prompt]
    pca: tuple[torch.Tensor, torch.Tensor] | None = None  # (components, variance), fit once

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pca is None:
            self.pca = principal_components(self.vectors.float().cpu())
        return self.pca


def make_method(name: str, cfg: Any, ctx: Any, fit: FitData | None = None) -> Intervention:
    """A fresh (untrained) intervention of the trained methods (``TRAINED``)."""
    d = ctx.model.d_model
    ste = cfg.mask.estimator == "straight_through"
    if name == "neurons":
        return NeuronMask(d, cfg.mask.init, ste)
    if name == "das":
        return DAS(d, cfg.das.mode, cfg.das.k, cfg.mask.init, ste)
    if name == "pca":
        if fit is None:
            raise ValueError("pca needs the training activations (FitData)")
        comps, _ = fit.components()
        n = min(cfg.pca.components or d, d)
        if cfg.pca.mode == "fixed" and cfg.pca.k > n:
            raise UserError(f"eval.pca.k={cfg.pca.k} exceeds the {n} principal components")
        return PCASwap(comps[:n], cfg.pca.mode, cfg.pca.k, cfg.mask.init, ste)
    if name == "boundless_das":
        return BoundlessDAS(d, cfg.boundless.init, cfg.boundless.boundary_lr_scale)
    if name == "mdas":
        return MultiTaskDAS(d, _mdas_attributes(cfg), cfg.mask.init, ste)
    if ctx.sae is None:
        raise UserError(
            "eval.method=sae needs an SAE; choose sae=<family> (sae=none has no latents)"
        )
    return SAEMask(ctx.sae, cfg.mask.init, cfg.add_error, ste)


class VectorBank:
    """Residual vectors after ``layer`` at each prompt's entity token, computed once."""

    def __init__(self, model: Any, layer: int, prompts: list[Prompt], batch_size: int) -> None:
        uniq = list({id(p): p for p in prompts}.values())
        self.vec = {
            id(p): r[p.entity_pos]
            for p, r in zip(uniq, resid_at(model, uniq, layer, batch_size), strict=True)
        }

    def __call__(self, prompts: list[Prompt]) -> torch.Tensor:
        return torch.stack([self.vec[id(p)] for p in prompts])


def _logits(
    runner: SuffixRunner | None, ctx: Any, bases: list[Prompt], v: torch.Tensor,
    n_last: list[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    if runner is not None:
        return runner.logits(bases, v, n_last)
    return naive_logits(ctx.model.model, bases, v, ctx.layer, n_last)


class TeacherForced:
    """For a rule that reads several label tokens (``prefix``), training sees them all (RAVEL's
    loss): each pair's base prompt extended by its label's tokens but the last, whose logits at
    the last ``len(label)`` positions predict the label token by token. Extended prompts are
    made once per (base, label) and share the base's prefix (so the runner's prefix cache)."""

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens
        self.ext: dict[tuple[int, tuple[int, ...]], Prompt] = {}

    def labels(self, q: Pair) -> list[int]:
        return list(q.target_tokens[: self.n_tokens]) or [q.target_token]

    def prompt(self, q: Pair) -> Prompt:
        lab = tuple(self.labels(q)[:-1])
        key = (id(q.base), lab)
        if key not in self.ext:
            b = q.base
            self.ext[key] = Prompt(b.template, b.entity, b.attribute, list(b.tokens) + list(lab),
                                   b.entity_start, b.entity_pos)  # fmt: skip
        return self.ext[key]


def train_method(
    method: Intervention, pairs: list[Pair], bank: VectorBank, runner: SuffixRunner | None, cfg: Any, ctx: Any,
    desc: str, ckpt_name: str | None = None,
) -> list[float]:  # fmt: skip
    """Train the method's parameters (the model stays frozen); returns per-epoch mean losses.

    With ``ckpt_name``, the training state (parameters, optimizer, step, the batch-order RNG
    at the start of the epoch, torch's RNG) goes to ``ctx.checkpoint`` every
    ``cfg.checkpoint_every_s`` seconds / ``cfg.checkpoint_every_steps`` steps, and a saved state
    is continued from: the result equals that of an uninterrupted run."""
    from saeravel.checkpoint import rng_state, set_rng_state

    params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        return []
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[
        str(cfg.optimizer)
    ]
    groups = method.param_groups(cfg.lr) if hasattr(method, "param_groups") else params
    opt = opt_cls(groups, lr=cfg.lr)
    rng = random.Random(ctx.seed)
    steps_per_epoch = len(
        batches_by_prefix(pairs, lambda q: q.base.prefix, cfg.batch_size, random.Random(0))
    )
    total = cfg.epochs * steps_per_epoch
    step, curve = 0, []
    store, timer = None, None
    if ckpt_name is not None:
        store = ctx.checkpoint
        timer = store.timer(cfg.checkpoint_every_s, cfg.checkpoint_every_steps)
    own = method.own_state()
    first_epoch, skip, resumed_loss = 0, 0, 0.0
    saved = store.load(ckpt_name) if store is not None else None
    if saved is not None and not (
        isinstance(saved, dict)
        and (saved.get("total"), saved.get("n_pairs")) == (total, len(pairs))
        and {k: tuple(v.shape) for k, v in saved.get("method", {}).items()}
        == {k: tuple(v.shape) for k, v in own.items()}
    ):
        log.warning("%s: checkpoint %s is of another training run; starting over", desc, ckpt_name)
        saved = None
    if saved is not None:
        method.load_state_dict(saved["method"], strict=False)  # all but the frozen SAE (checked)
        opt.load_state_dict(saved["optimizer"])
        rng.setstate(saved["epoch_rng"])
        set_rng_state(saved["torch_rng"])
        step, curve = saved["step"], list(saved["curve"])
        first_epoch, skip, resumed_loss = saved["epoch"], saved["batch"], saved["epoch_loss"]
        log.info("%s: resuming from checkpoint at step %d of %d", desc, step, total)
    else:
        log.info("%s: training %d steps (%d pairs, batch %d, lr %g, T %s %g -> %g over %.0f%%, %s mask)",
                 desc, total, len(pairs), cfg.batch_size, cfg.lr, cfg.mask.schedule, cfg.mask.t_start,
                 cfg.mask.t_end, 100 * cfg.mask.anneal_fraction, cfg.mask.estimator)  # fmt: skip
    forced = None
    if cfg.match == "prefix" and cfg.match_tokens > 1:
        forced = TeacherForced(cfg.match_tokens)
        if runner is not None:
            runner.prepare([forced.prompt(q) for q in pairs])
    method.train()
    bar = tqdm(total=total, initial=step, desc=desc, leave=False)
    for epoch in range(first_epoch, cfg.epochs):
        epoch_rng = rng.getstate()  # this epoch's batch order is drawn from here
        epoch_loss = resumed_loss if epoch == first_epoch else 0.0
        batches = batches_by_prefix(pairs, lambda q: q.base.prefix, cfg.batch_size, rng)
        for i, batch in enumerate(batches):
            if epoch == first_epoch and i < skip:
                continue  # done before the checkpoint
            t = temperature(step, total, cfg.mask.t_start, cfg.mask.t_end,
                            str(cfg.mask.schedule), cfg.mask.anneal_fraction)  # fmt: skip
            if hasattr(method, "set_temperature"):  # several masks (mdas)
                method.set_temperature(t)
            elif method.mask is not None:
                method.mask.temperature = t
            b = bank([q.base for q in batch])
            s = bank([q.source for q in batch])
            if hasattr(method, "route"):  # per-pair masks (mdas): each pair's attribute's
                method.route(batch)
            v = method(b, s)
            if forced is None:
                logits = _logits(runner, ctx, [q.base for q in batch], v)
                target = torch.tensor([q.target_token for q in batch], device=logits.device)
            else:
                labs = [forced.labels(q) for q in batch]
                ext = [forced.prompt(q) for q in batch]
                logits = _logits(runner, ctx, ext, v, [len(x) for x in labs])
                target = torch.tensor([t for x in labs for t in x], device=logits.device)
            loss = F.cross_entropy(logits.float(), target)
            if cfg.mask.l1 > 0:
                loss = loss + cfg.mask.l1 * method.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.item() * len(batch)
            step += 1
            ctx.log_metrics({f"{desc}/loss": loss.item(), f"{desc}/temperature": t}, step)
            bar.update()
            if timer is not None and timer.due(step):
                store.save(ckpt_name, {
                    "total": total, "n_pairs": len(pairs), "step": step, "epoch": epoch, "batch": i + 1,
                    "epoch_loss": epoch_loss, "curve": curve, "epoch_rng": epoch_rng, "torch_rng": rng_state(),
                    "method": method.own_state(),
                    "optimizer": opt.state_dict(),
                })  # fmt: skip
        curve.append(epoch_loss / max(1, len(pairs)))
    bar.close()
    method.eval()
    return curve


def convergence(curve: list[float], tol: float = 0.01) -> dict[str, Any]:
    """Did the training loss flatten? The relative change of the mean loss over the last epoch
    (last epoch vs the one before); flattened when it is below ``tol``."""
    if len(curve) < 2:
        return {"final_loss": curve[-1] if curve else None, "last_epoch_change": None,
                "flattened": None, "epochs": len(curve)}  # fmt: skip
    change = (curve[-1] - curve[-2]) / max(abs(curve[-2]), 1e-12)
    return {"final_loss": curve[-1], "last_epoch_change": change,
            "flattened": abs(change) < tol, "epochs": len(curve)}  # fmt: skip


@torch.no_grad()
def first_token_eval(
    method: Intervention, pairs: list[Pair], bank: VectorBank, runner: SuffixRunner | None, ctx: Any,
    hard: bool = True, batch_size: int = 64,
) -> tuple[float, list[bool]]:  # fmt: skip
    """Mean cross-entropy on the target's first token and, per pair, whether the patched model's
    next token is the target's first token; the mask binarised when ``hard``."""
    if method.mask is not None:
        method.mask.hard = hard
    ok: dict[int, bool] = {}
    ce = 0.0
    for batch in batches_by_prefix(pairs, lambda q: q.base.prefix, batch_size, random.Random(0)):
        v = method(bank([q.base for q in batch]), bank([q.source for q in batch]))
        logits = _logits(runner, ctx, [q.base for q in batch], v).float()
        target = torch.tensor([q.target_token for q in batch], device=logits.device)
        ce += F.cross_entropy(logits, target, reduction="sum").item()
        for q, hit in zip(batch, (logits.argmax(-1) == target).tolist(), strict=True):
            ok[id(q)] = bool(hit)
    if method.mask is not None:
        method.mask.hard = False
    return ce / max(1, len(pairs)), [ok[id(q)] for q in pairs]


def _rates(ok: list[bool], pairs: list[Pair]) -> dict[str, float]:
    cause = [o for o, q in zip(ok, pairs, strict=True) if q.kind == "cause"]
    iso = [o for o, q in zip(ok, pairs, strict=True) if q.kind == "isolation"]
    c = sum(cause) / len(cause) if cause else float("nan")
    i = sum(iso) / len(iso) if iso else float("nan")
    return {"cause": c, "isolation": i, "disentangle": (c + i) / 2}


@torch.no_grad()
def refine_mask(
    method: Intervention, pairs: list[Pair], bank: VectorBank, runner: SuffixRunner | None, cfg: Any,
    ctx: Any, desc: str,
) -> dict[str, Any]:  # fmt: skip
    """Greedy local search over the binarised mask's bits: flip one entry at a time (least
    confident first) and keep the flip when the hard-mask cross-entropy on (a fixed subset of)
    the training pairs falls. Tells "the method cannot" from "the optimiser did not": the
    refined mask is scored beside the trained one, never instead of it. Leaves ``method``
    with the refined mask."""
    mask = method.mask
    rng = random.Random(ctx.seed)
    subset = (
        pairs if len(pairs) <= cfg.mask.refine_pairs else rng.sample(pairs, cfg.mask.refine_pairs)
    )
    start, _ = first_token_eval(method, subset, bank, runner, ctx)
    best = start
    candidates = list(range(mask.param.numel()))
    if isinstance(method, SAEMask):  # a latent inactive in every base and source cannot matter
        vecs = torch.cat([bank([q.base for q in subset]), bank([q.source for q in subset])])
        acts = method.sae.encode_normalized(method.sae.normalize(vecs)[0])
        candidates = torch.nonzero((acts != 0).any(0)).flatten().tolist()
    order = sorted(candidates, key=lambda j: abs(float(mask.param[j])))
    flips, evals = 0, 0
    for _ in range(cfg.mask.refine_passes):
        changed = False
        for j in tqdm(order, desc=f"{desc} refine", leave=False):
            old = float(mask.param[j])
            mask.param[j] = -old if old != 0 else 1.0
            ce, _ = first_token_eval(method, subset, bank, runner, ctx)
            evals += 1
            if ce < best - 1e-6:
                best, changed, flips = ce, True, flips + 1
            else:
                mask.param[j] = old
        if not changed:
            break
    log.info("%s: refinement flipped %d of %d candidate entries; train CE %.4f -> %.4f",
             desc, flips, len(order), start, best)  # fmt: skip
    return {"train_ce_hard_before": start, "train_ce_hard_after": best, "flips": flips,
            "candidates": len(order), "evaluations": evals, "pairs": len(subset)}  # fmt: skip


def bootstrap_ci(
    ok: list[bool], pairs: list[Pair], n_boot: int, confidence: float, seed: int
) -> dict[str, list[float]]:
    """Percentile intervals of cause, isolation and disentangle from resampling the base
    entities with replacement (pairs of one entity are not independent)."""
    import numpy as np

    ents = sorted({q.base.entity for q in pairs})
    idx = {e: i for i, e in enumerate(ents)}
    counts = np.zeros((4, len(ents)))  # cause n, cause hits, isolation n, isolation hits
    for o, q in zip(ok, pairs, strict=True):
        row = 0 if q.kind == "cause" else 2
        counts[row, idx[q.base.entity]] += 1
        counts[row + 1, idx[q.base.entity]] += o
    gen = np.random.default_rng(seed)
    w = gen.multinomial(len(ents), np.full(len(ents), 1 / len(ents)), size=n_boot)
    tot = w @ counts.T  # [n_boot, 4]
    with np.errstate(invalid="ignore", divide="ignore"):
        cause, iso = tot[:, 1] / tot[:, 0], tot[:, 3] / tot[:, 2]
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    out = {}
    for name, x in (("cause", cause), ("isolation", iso), ("disentangle", (cause + iso) / 2)):
        x = x[np.isfinite(x)]
        out[name] = [float(np.percentile(x, lo)), float(np.percentile(x, hi))] if len(x) else [
            float("nan"), float("nan")]  # fmt: skip
    return out


def ravel_aggregate(ok: list[bool], pairs: list[Pair], intervened: str) -> dict[str, float]:
    """RAVEL's aggregate: accuracy per template, then the mean over templates per attribute;
    cause = the intervened attribute's mean, isolation = the mean over the other attributes.
    (Equal to the pooled scores when each attribute has one template, as in the saeravel
    protocol.)"""
    per: dict[tuple[str, str, str], list[bool]] = {}
    for o, q in zip(ok, pairs, strict=True):
        per.setdefault((q.kind, q.base.attribute, q.base.template), []).append(o)
    by_attr: dict[tuple[str, str], list[float]] = {}
    for (kind, attr, _), v in per.items():
        by_attr.setdefault((kind, attr), []).append(sum(v) / len(v))
    cause = [sum(v) / len(v) for (k, a), v in by_attr.items() if k == "cause" and a == intervened]
    iso = [sum(v) / len(v) for (k, _), v in by_attr.items() if k == "isolation"]
    c = sum(cause) / len(cause) if cause else float("nan")
    i = sum(iso) / len(iso) if iso else float("nan")
    return {"cause": c, "isolation": i, "disentangle": (c + i) / 2}


@torch.no_grad()
def intervened(
    method: Intervention, pairs: list[Pair], bank: VectorBank, cfg: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The vectors ``method`` patches into each pair's base (the mask as ``cfg.mask.eval``
    says) and the mask's size and kept entries at that moment."""
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
    vector_sets: list[torch.Tensor], pairs: list[Pair], cfg: Any, ctx: Any,
    decoder: CachedDecoder | None = None,
) -> list[list[list[int]]]:  # fmt: skip
    """Per vector set, the greedy generations of ``cfg.match_tokens`` per base: all sets
    decoded together through the key/value caches (``decoder``, made here when ``cfg.fast``),
    or one full forward per token and set (``eval.fast=false``, the reference)."""
    model, bases = ctx.model.model, [q.base for q in pairs]
    if not cfg.fast:
        return [naive_generate(model, bases, cfg.match_tokens, ctx.layer, v) for v in vector_sets]
    decoder = decoder or CachedDecoder(model, ctx.layer)
    return decoder.generate(bases, cfg.match_tokens, list(vector_sets))


def scores(
    gens: list[list[int]], pairs: list[Pair], cfg: Any, ctx: Any, info: dict[str, Any]
) -> dict[str, Any]:
    """Cause, isolation and disentangle of generations on ``pairs`` under both matching rules
    (token ids), a bootstrap interval over entities and RAVEL's per-template aggregate (under
    ``cfg.match``), per-template accuracy, and the mask's ``info``."""
    out: dict[str, Any] = {}
    per_template: dict[str, list[int]] = {}
    chosen: list[bool] = []
    for rule in MATCH_RULES:
        ok = [matches(g, q.target_tokens, rule) for g, q in zip(gens, pairs, strict=True)]
        out[rule] = _rates(ok, pairs)
        if rule == cfg.match:
            chosen = ok
            for o, q in zip(ok, pairs, strict=True):
                per_template.setdefault(f"{q.kind}|{q.base.template}", []).append(int(o))
    out.update(out[str(cfg.match)])
    out["ci95" if cfg.confidence == 0.95 else f"ci{cfg.confidence:g}"] = bootstrap_ci(
        chosen, pairs, cfg.bootstrap, cfg.confidence, ctx.seed
    )
    out["ravel_aggregate"] = ravel_aggregate(chosen, pairs, pairs[0].intervened if pairs else "")
    out["per_template"] = {t: sum(v) / len(v) for t, v in per_template.items()}
    out["n_cause"] = sum(q.kind == "cause" for q in pairs)
    out["n_isolation"] = sum(q.kind == "isolation" for q in pairs)
    out["n_entities"] = len({q.base.entity for q in pairs})
    out.update(info)
    return out


@torch.no_grad()
def score_many(
    methods: list[Intervention], pairs: list[Pair], bank: VectorBank, cfg: Any, ctx: Any,
    decoder: CachedDecoder | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`scores` of each method on ``pairs``; the methods' interventions are decoded
    together (stacked along the batch)."""
    sets = [intervened(m, pairs, bank, cfg) for m in methods]
    gens = generations([v for v, _ in sets], pairs, cfg, ctx, decoder)
    return [scores(g, pairs, cfg, ctx, info) for g, (_, info) in zip(gens, sets, strict=True)]


@torch.no_grad()
def score(
    method: Intervention, pairs: list[Pair], bank: VectorBank, cfg: Any, ctx: Any, world: CityWorld,
    decoder: CachedDecoder | None = None,
) -> dict[str, Any]:  # fmt: skip
    """:func:`scores` of one method on ``pairs``."""
    return score_many([method], pairs, bank, cfg, ctx, decoder)[0]


def _summary_row(name: str, attr: str, r: dict[str, Any]) -> str:
    ci = next((v for k, v in r.items() if k.startswith("ci")), None)
    band = f" [{ci['disentangle'][0]:.3f}, {ci['disentangle'][1]:.3f}]" if ci else ""
    line = (f"{name:<10} {attr:<10} cause {r['cause']:.3f}  isolation {r['isolation']:.3f}  "
            f"disentangle {r['disentangle']:.3f}{band}")  # fmt: skip
    if "refined" in r:
        line += f"  (refined mask: {r['refined']['disentangle']:.3f})"
    if r.get("training", {}).get("flattened") is False:
        line += "  loss NOT flat"
    return line


def _score_fitted(
    method: Intervention, attr: str, pairs: dict[str, list[Pair]], bank: VectorBank,
    runner: SuffixRunner | None, cfg: Any, ctx: Any, world: CityWorld, curve: list[float], desc: str,
    decoder: CachedDecoder | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:  # fmt: skip
    """Score a fitted method on test, the train split's first-token scores, convergence, and
    the refined mask's scores beside the trained one (masks whose entries are free bits; both
    decoded in one pass)."""
    test = pairs["test"]
    sets = [intervened(method, test, bank, cfg)]  # the trained mask's, before any refinement
    train_ce, train_ok = first_token_eval(method, pairs["train"], bank, runner, ctx)
    state = method.own_state()
    info = None
    if cfg.mask.refine and method.mask is not None and getattr(method.mask, "refinable", True):
        info = refine_mask(method, pairs["train"], bank, runner, cfg, ctx, desc)
        sets.append(intervened(method, test, bank, cfg))
    gens = generations([v for v, _ in sets], test, cfg, ctx, decoder)  # decoded together
    r = scores(gens[0], test, cfg, ctx, sets[0][1])
    r["train"] = {**_rates(train_ok, pairs["train"]), "ce_first_token": train_ce,
                  "rule": "first_token"}  # fmt: skip
    r["training"] = convergence(curve)
    r["recipe"] = {"name": str(cfg.recipe), "label": cfg.recipe_label}
    if info is not None:
        refined = scores(gens[1], test, cfg, ctx, sets[1][1])
        keep = ("cause", "isolation", "disentangle", "mask_kept", "first_token", "prefix")
        r["refined"] = {**{k: refined[k] for k in keep}, **info}
    return r, state


def train_and_score(
    name: str, attr: str, pairs: dict[str, list[Pair]], bank: VectorBank, runner: SuffixRunner | None,
    cfg: Any, ctx: Any, world: CityWorld, store: Any, fit: FitData | None = None,
    decoder: CachedDecoder | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One (method, attribute): train, score on test, train-split score, convergence, and the
    refined mask's scores beside the trained one."""
    from saeravel.checkpoint import entry_name

    torch.manual_seed(ctx.seed)
    method = make_method(name, cfg, ctx, fit).to(ctx.device)
    train_name = entry_name("train", name, attr) if store.enabled else None
    desc = f"{name}/{attr}"
    curve = train_method(method, pairs["train"], bank, runner, cfg, ctx, desc, train_name)
    r, state = _score_fitted(
        method, attr, pairs, bank, runner, cfg, ctx, world, curve, desc, decoder
    )
    if isinstance(method, PCASwap):
        _, var = fit.components()
        n = method.components.shape[0]
        r["pca"] = {"mode": str(cfg.pca.mode), "components": n,
                    "explained_variance": float(var[:n].sum() / var.sum().clamp_min(1e-12))}  # fmt: skip
    if isinstance(method, BoundlessDAS):
        r["boundary"] = float(method.mask.param.detach().clamp(1e-3, 1.0))
    done = {"score": r, "curve": curve, "state": state}
    store.save(entry_name("scored", name, attr), done)
    if train_name is not None:
        store.remove(train_name)
    return done


def fit_mdas(
    pairs: dict[str, dict[str, list[Pair]]], bank: VectorBank, runner: SuffixRunner | None,
    cfg: Any, ctx: Any, store: Any,
) -> dict[str, Any]:  # fmt: skip
    """Train the one multi-task DAS of ``eval.mdas.attributes`` on all their training pairs
    together (checkpointed as ``train-mdas-joint``, kept as ``fitted-mdas-joint``)."""
    from saeravel.checkpoint import entry_name

    fitted = entry_name("fitted", "mdas", "joint")
    saved = store.load(fitted)
    if saved is not None:
        log.info("mdas: trained before the interruption")
        return saved
    torch.manual_seed(ctx.seed)
    method = make_method("mdas", cfg, ctx).to(ctx.device)
    joint = [q for a in _mdas_attributes(cfg) for q in pairs[a]["train"]]
    train_name = entry_name("train", "mdas", "joint") if store.enabled else None
    curve = train_method(method, joint, bank, runner, cfg, ctx, "mdas/joint", train_name)
    done = {"state": method.own_state(), "curve": curve}
    store.save(fitted, done)
    if train_name is not None:
        store.remove(train_name)
    return done


def score_mdas(
    attr: str, fitted: dict[str, Any], pairs: dict[str, list[Pair]], bank: VectorBank,
    runner: SuffixRunner | None, cfg: Any, ctx: Any, world: CityWorld, store: Any,
    decoder: CachedDecoder | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The jointly trained MDAS scored on ``attr`` with ``attr``'s mask."""
    from saeravel.checkpoint import entry_name

    method = make_method("mdas", cfg, ctx).to(ctx.device)
    method.load_state_dict(fitted["state"], strict=False)
    method.active = attr
    curve = list(fitted["curve"])
    r, state = _score_fitted(
        method, attr, pairs, bank, runner, cfg, ctx, world, curve, f"mdas/{attr}", decoder
    )
    r["mdas"] = {"attributes": _mdas_attributes(cfg), "trained_on": "joint"}
    done = {"score": r, "curve": curve, "state": state}
    store.save(entry_name("scored", "mdas", attr), done)
    return done


def probe_selection(
    attr: str, pairs: dict[str, list[Pair]], bank: VectorBank, runner: SuffixRunner | None,
    cfg: Any, ctx: Any, world: CityWorld, fit: FitData,
) -> dict[str, Any]:  # fmt: skip
    """``sae_probe``'s selection: SAE latents of every training prompt ranked by a value probe
    (:func:`~saeravel.ravel.featurizers.rank_latents_by_probe`), then for each count in
    ``eval.sae_probe.counts`` (capped at the ranked latents) the top latents swapped on the
    validation pairs (the training pairs when there are none), first-token rule; the best
    disentangle wins (ties: fewer latents). The test split's first-token curve is reported
    beside, never used."""
    sae = ctx.sae
    lat = sae_latents(sae, fit.vectors.to(ctx.device)).float().cpu()
    labels = [world.entities[p.entity][attr] for p in fit.prompts]
    p = cfg.sae_probe
    ranked, info = rank_latents_by_probe(lat, labels, p.steps, p.lr, p.l1, ctx.seed)
    counts = sorted({min(c, len(ranked)) for c in p.counts})
    split = "val" if pairs.get("val") else "train"
    rows = []
    for n in counts:
        m = LatentSwap(sae, ranked[:n], cfg.add_error)
        ce, ok = first_token_eval(m, pairs[split], bank, runner, ctx)
        _, ok_test = first_token_eval(m, pairs["test"], bank, runner, ctx)
        rows.append({"count": n, "ce_first_token": ce, **_rates(ok, pairs[split]),
                     "test": _rates(ok_test, pairs["test"])})  # fmt: skip
    best = max(rows, key=lambda r: (r["disentangle"], -r["count"]))
    log.info("sae_probe/%s: best count %d of %s on %s (disentangle %.3f)", attr, best["count"],
             counts, split, best["disentangle"])  # fmt: skip
    return {"latents": ranked[: best["count"]], "best_count": best["count"], "split": split,
            "rule": "first_token", "curve": rows, "ranked_top": ranked[: cfg.report_top_latents],
            **info}  # fmt: skip


def score_sae_probe(
    attr: str, pairs: dict[str, list[Pair]], bank: VectorBank, runner: SuffixRunner | None,
    cfg: Any, ctx: Any, world: CityWorld, store: Any, fit: FitData,
    decoder: CachedDecoder | None = None,
) -> dict[str, Any]:  # fmt: skip
    from saeravel.checkpoint import entry_name

    sel = probe_selection(attr, pairs, bank, runner, cfg, ctx, world, fit)
    method = LatentSwap(ctx.sae, sel["latents"], cfg.add_error)
    r, state = _score_fitted(
        method, attr, pairs, bank, runner, cfg, ctx, world, [], f"sae_probe/{attr}", decoder
    )
    r["selection"] = sel
    r["mask_kept"], r["mask_size"] = len(sel["latents"]), ctx.sae.d_sae
    r["kept_top"] = sel["latents"][: cfg.report_top_latents]
    done = {"score": r, "curve": [], "state": state}
    store.save(entry_name("scored", "sae_probe", attr), done)
    return done


def fixed_basis(
    attr: str, given: torch.Tensor | None, probe_latents: dict[str, list[int]],
    pairs: dict[str, list[Pair]], bank: VectorBank, runner: SuffixRunner | None, cfg: Any,
    ctx: Any, world: CityWorld, fit: FitData,
) -> tuple[torch.Tensor | None, dict[str, Any]]:  # fmt: skip
    """``fixed``'s basis for ``attr``: the basis file; else the SAE decoder directions of
    ``eval.fixed.latents``; else of the latents ``sae_probe`` picked for ``attr`` (its
    selection is run when ``sae_probe`` itself is not); with no SAE either: none (skipped)."""
    if given is not None:
        return given, {"from": "basis_file", "path": cfg.fixed.basis_file}
    if ctx.sae is None:
        return None, {"skipped": "no eval.fixed.basis_file and no SAE to take directions from"}
    if cfg.fixed.latents is not None:
        latents, origin = list(cfg.fixed.latents), "latents"
    else:
        latents = probe_latents.get(attr)
        if latents is None:
            latents = probe_selection(attr, pairs, bank, runner, cfg, ctx, world, fit)["latents"]
        origin = "sae_probe"
    if not latents:
        return None, {"skipped": "sae_probe selected no latents"}
    return decoder_directions(ctx.sae, latents), {"from": origin, "latents": latents}


def load_basis(path: str, d_model: int) -> torch.Tensor:
    """``eval.fixed.basis_file``: a torch tensor [k, d_model] (one-line error otherwise)."""
    try:
        basis = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any unreadable file is the user's to fix)
        raise UserError(f"eval.fixed.basis_file={path} is not a torch tensor file ({exc})") from exc
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or basis.shape[1] != d_model:
        shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise UserError(
            f"eval.fixed.basis_file={path} holds {shape}; it must be a tensor [k, d_model] "
            f"with d_model={d_model}"
        )
    if not 1 <= basis.shape[0] <= d_model or not torch.isfinite(basis).all():
        raise UserError(
            f"eval.fixed.basis_file={path}: k={basis.shape[0]} rows must be in 1..{d_model}, finite"
        )
    return basis.float()


def decoder_directions(sae: Any, latents: list[int]) -> torch.Tensor:
    """The SAE's decoder directions of ``latents`` [k, d_in]: ``decode(e_j) - decode(0)`` in
    the SAE's (normalised) space; under per-input normalisation that is the direction up to
    each input's scale, so the span the swap uses is the same."""
    bad = [j for j in latents if not 0 <= j < sae.d_sae]
    if bad:
        raise UserError(f"eval.fixed.latents has {bad} outside the SAE's 0..{sae.d_sae - 1}")
    dev = next((t.device for t in sae.parameters()), torch.device("cpu"))
    eye = torch.zeros(len(latents) + 1, sae.d_sae, device=dev)
    eye[torch.arange(1, len(latents) + 1), torch.tensor(latents, dtype=torch.long)] = 1.0
    with torch.no_grad():
        dec = sae.decode_normalized(eye)
    return (dec[1:] - dec[:1]).float().cpu()


def score_fixed(
    attr: str, basis: torch.Tensor, source: dict[str, Any], pairs: dict[str, list[Pair]],
    bank: VectorBank, runner: SuffixRunner | None, cfg: Any, ctx: Any, world: CityWorld, store: Any,
    decoder: CachedDecoder | None = None,
) -> dict[str, Any]:  # fmt: skip
    from saeravel.checkpoint import entry_name

    method = BasisSwap(basis).to(ctx.device)
    r, state = _score_fitted(
        method, attr, pairs, bank, runner, cfg, ctx, world, [], f"fixed/{attr}", decoder
    )
    r["basis"] = {**source, "k": int(basis.shape[0]), "rank": method.rank()}
    done = {"score": r, "curve": [], "state": state}
    store.save(entry_name("scored", "fixed", attr), done)
    return done


@register(
    "ravel",
    schema=RavelEvalConfig,
    needs_sae=needs_sae,
    saebench="saeravel.saebench:ravel_metrics",
    validate=validate,
)  # noqa: E501
def run(cfg: Any, ctx: Any) -> Any:
    """Train and score every method for every attribute intervened. With checkpoints on
    (``eval.checkpoint_every_s`` / ``eval.checkpoint_every_steps``), each finished (method,
    attribute) is kept in ``ctx.checkpoint`` and taken from there when the job runs again."""
    from saeravel.checkpoint import CheckpointStore, entry_name

    validate(cfg)
    given = None
    if "fixed" in _methods(cfg) and cfg.fixed.basis_file:  # its shape needs d_model: first thing
        given = load_basis(cfg.fixed.basis_file, ctx.model.d_model)
    store = getattr(ctx, "checkpoint", None) or CheckpointStore.disabled()
    if cfg.checkpoint_every_s == 0 and cfg.checkpoint_every_steps == 0:
        store = CheckpointStore.disabled()
    torch.manual_seed(ctx.seed)
    world = load_world(cfg, ctx)
    pairs, stats = build_pairs(cfg, ctx, world)
    model = ctx.model.model
    stats["prompt_bos"] = bos_id(model) is not None
    if ctx.sae is not None and "prepend_bos" in (ctx.sae.cfg_dict or {}):
        stats["sae_prepend_bos"] = ctx.sae.cfg_dict["prepend_bos"]
    log.info("pairs: %s", {a: {s: len(v) for s, v in d.items()} for a, d in pairs.items()})
    all_prompts = [q.base for d in pairs.values() for ps in d.values() for q in ps]
    all_prompts += [q.source for d in pairs.values() for ps in d.values() for q in ps]
    bank = VectorBank(model, ctx.layer, all_prompts, 64)
    runner, decoder = None, None
    if cfg.fast:
        runner = SuffixRunner(model, ctx.layer)
        runner.prepare([q.base for d in pairs.values() for ps in d.values() for q in ps])
        decoder = CachedDecoder(model, ctx.layer)

    metrics: dict[str, Any] = {"ravel": {}, "baselines": {}}
    details: dict[str, Any] = {"data": stats, "training_curves": {}, "per_template": {}}
    summary = [
        f"RAVEL ({cfg.protocol} protocol, {stats['split_note']}), layer {ctx.layer}, "
        f"match={cfg.match}, recipe={cfg.recipe}; [{cfg.confidence:.0%} bootstrap interval over entities]"
    ]
    truth = getattr(ctx.model, "truth", None)
    baselines = ["none", "swap"] + (["sae_recon", "sae_swap"] if ctx.sae is not None else [])
    if truth is not None:
        baselines.append("oracle")
        details["planted"] = truth.describe()
        if ctx.sae is not None:
            details["planted"]["atom_recovery"] = truth.atom_recovery(ctx.sae)
    methods = _methods(cfg)
    if ctx.sae is None and "sae_probe" in methods:
        raise UserError("eval.method=sae_probe needs an SAE; choose sae=<family>")
    train_prompts = list(
        {id(p): p for d in pairs.values() for q in d["train"] for p in (q.base, q.source)}.values()
    )
    fit = FitData(bank(train_prompts), train_prompts)  # pca and sae_probe fit on these only
    mdas_fit: dict[str, Any] | None = None
    probe_latents: dict[str, list[int]] = {}
    for attr in cfg.attributes:
        test = pairs[attr]["test"]
        refs = [FixedIntervention(b, ctx.sae, truth.projector(attr) if b == "oracle" else None)
                for b in baselines]  # fmt: skip
        for b, r in zip(baselines, score_many(refs, test, bank, cfg, ctx, decoder), strict=True):
            details["per_template"][f"{b}/{attr}"] = r.pop("per_template")
            metrics["baselines"].setdefault(b, {})[attr] = r
            summary.append(_summary_row(b, attr, r))
        for name in methods:
            if name == "mdas" and attr not in _mdas_attributes(cfg):
                continue
            done = store.load(entry_name("scored", name, attr))
            if done is not None:
                log.info("%s/%s: trained and scored before the interruption", name, attr)
            elif name == "mdas":
                mdas_fit = mdas_fit or fit_mdas(pairs, bank, runner, cfg, ctx, store)
                done = score_mdas(attr, mdas_fit, pairs[attr], bank, runner, cfg, ctx, world, store,
                                  decoder)  # fmt: skip
            elif name == "sae_probe":
                done = score_sae_probe(attr, pairs[attr], bank, runner, cfg, ctx, world, store, fit,
                                       decoder)  # fmt: skip
            elif name == "fixed":
                basis, source = fixed_basis(attr, given, probe_latents, pairs[attr], bank, runner,
                                            cfg, ctx, world, fit)  # fmt: skip
                if basis is None:
                    log.info("fixed/%s: skipped (%s)", attr, source["skipped"])
                    details.setdefault("skipped", {})[f"fixed/{attr}"] = source["skipped"]
                    continue
                done = score_fixed(attr, basis, source, pairs[attr], bank, runner, cfg, ctx, world,
                                   store, decoder)  # fmt: skip
            else:
                done = train_and_score(
                    name, attr, pairs[attr], bank, runner, cfg, ctx, world, store, fit, decoder
                )
            if name == "sae_probe":
                probe_latents[attr] = list(done["score"]["selection"]["latents"])
            r, curve, state = dict(done["score"]), list(done["curve"]), done["state"]
            details["per_template"][f"{name}/{attr}"] = r.pop("per_template")
            details["training_curves"][f"{name}/{attr}"] = curve
            metrics["ravel"].setdefault(name, {})[attr] = r
            summary.append(_summary_row(name, attr, r))
            if cfg.save_artifacts:
                atomic_torch_save(ctx.output_dir / f"ravel_{name}_{attr}.pt", state)
    metrics["ravel"]["baseline"] = metrics["baselines"]["none"]
    return EvalOutput(metrics=metrics, details=details, summary=summary)
