"""The RAVEL eval's config: the schema's enums and dataclasses (``RavelEvalConfig``, the one
source of the defaults documented in conf/eval/ravel.yaml), :data:`PROTOCOL_DEFAULTS` (the one
source of the defaults that depend on ``eval.protocol``: the schema's default of such a field is
the interpolation ``${ravel_protocol:<key>,...}``, which reads the table for the config's
protocol, so ``eval.protocol=saebench`` moves them all and a value the user sets wins) and
:func:`check`, the value checks that need no model.
The featurizer-dependent check (which methods need an SAE) is in ``methods``; ``main.validate``
runs both."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import II, OmegaConf

from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig
from saeravel.evals.ravel.data import default_attributes
from saeravel.evals.ravel.prompts import MATCH_RULES
from saeravel.schema import StrEnum


class RavelProtocol(StrEnum):
    saeravel = "saeravel"
    ravel = "ravel"
    saebench = "saebench"


class RavelMethod(StrEnum):
    sae = "sae"
    neurons = "neurons"
    das = "das"
    pca = "pca"
    boundless_das = "boundless_das"
    mdas = "mdas"
    sae_probe = "sae_probe"
    fixed = "fixed"
    rlap = "rlap"
    all = "all"


class EntityType(StrEnum):
    """RAVEL's five entity types (``data.ATTRIBUTES_BY_TYPE`` names their attributes)."""

    city = "city"
    nobel_prize_winner = "nobel_prize_winner"
    occupation = "occupation"
    physical_object = "physical_object"
    verb = "verb"


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
    saebench = "saebench"


class DASMode(StrEnum):
    mask = "mask"
    fixed = "fixed"


class OrthogonalMap(StrEnum):
    """How the DAS family's rotation stays orthogonal (torch's ``orthogonal`` parametrization)."""

    cayley = "cayley"
    matrix_exp = "matrix_exp"


class DASObjective(StrEnum):
    """What DAS trains on: cause and isolation pairs (RAVEL's MDAS objective) or cause only."""

    cause_isolation = "cause_isolation"
    cause = "cause"


class PCAMode(StrEnum):
    mask = "mask"
    fixed = "fixed"


@dataclass
class MaskConfig:
    """Learned mask: ``sigmoid(param / T)``, T annealed from ``t_start`` to ``t_end``. The
    schedule's four values depend on the protocol (:data:`PROTOCOL_DEFAULTS`)."""

    schedule: Schedule = II("ravel_protocol:mask.schedule,${..protocol}")
    t_start: float = II("ravel_protocol:mask.t_start,${..protocol}")
    t_end: float = II("ravel_protocol:mask.t_end,${..protocol}")
    anneal_fraction: float = II("ravel_protocol:mask.anneal_fraction,${..protocol}")
    estimator: MaskEstimator = MaskEstimator.soft
    l1: float = 0.0
    eval: MaskEval = MaskEval.hard
    init: float = 0.0
    refine: bool = True
    refine_pairs: int = 256
    refine_passes: int = 1
    # flips verified exactly per pass, the most promising first by a first-order estimate
    # (gradient x flip delta, one backward pass); 0: every candidate (exhaustive, least
    # confident first)
    refine_budget: int = 64


@dataclass
class DASConfig:
    """DAS rotation: ``mode=mask`` (learned mask over rotated dims) or ``mode=fixed`` (first k)."""

    mode: DASMode = DASMode.mask
    k: int = 16
    # The rotation of das, boundless_das and mdas. cayley: the same rotations as matrix_exp
    # (torch's default, so pyvene's) at a fraction of the cost per step (bench_rotation.py).
    orthogonal_map: OrthogonalMap = OrthogonalMap.cayley
    # cause_isolation: trained on cause AND isolation pairs (RAVEL's MDAS objective, which
    # measures DAS best on disentangle); cause: RAVEL's cause-only DAS baseline.
    objective: DASObjective = DASObjective.cause_isolation


@dataclass
class PCAConfig:
    """PCA of the site's activations on the training entities: ``mode=mask`` (learned mask over
    the top ``components``, MIB's DBM+PCA) or ``mode=fixed`` (the first ``k``)."""

    mode: PCAMode = PCAMode.mask
    k: int = 16
    components: int | None = None
    # z-score each dim before PCA: RAVEL's PCA baseline. Off by default because it measures the
    # method worse where dims differ in variance by design: on the planted world, z-scoring
    # equalises the blocks' spectra, eigh mixes components across attributes, and the masked PCA
    # falls from 0.945/0.978 to 0.775/0.853 (aligned, small size). true = RAVEL's recipe.
    standardize: bool = False


@dataclass
class BoundlessConfig:
    """Boundless DAS: a learned boundary (fraction of d_model) instead of k or a mask."""

    init: float = 0.5
    boundary_lr_scale: float = 10.0
    # weight of the boundary (a fraction of d_model) in every step's loss: pyvene's recipe (1.0);
    # 0 drops it (the boundary then only grows where that helps the loss)
    penalty: float = 1.0


@dataclass
class MDASConfig:
    """Multi-task DAS: one rotation shared by ``attributes`` (null = every eval.attributes)."""

    attributes: list[str] | None = None


@dataclass
class SAEProbeConfig:
    """SAE latents ranked by a value probe; the top ``counts[i]`` swapped, best on validation."""

    counts: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64])
    # bisect the grid's gaps beside the best count until they close (any count up to the cap)
    refine_counts: bool = True
    steps: int = 300
    lr: float = 0.05
    l1: float = 0.01


@dataclass
class RLAPConfig:
    """RLAP (RAVEL's linear adversarial probe, R-LACE): the rank-``rank`` subspace a linear
    probe of the value cannot read past (null: the attribute's training values - 1)."""

    rank: int | None = None
    steps: int = 300
    lr: float = 0.01  # the adversary classifier's Adam rate (the projection: plain gradient steps)


@dataclass
class FixedConfig:
    """A given basis: ``basis_file`` (torch tensor [k, d_model]) or the decoder directions of
    the SAE ``latents``; neither: the latents ``sae_probe`` picks for the attribute."""

    basis_file: str | None = None
    latents: list[int] | None = None


@dataclass
class SAEBenchProtocolConfig:
    """What only ``eval.protocol=saebench`` reads: SAEBench's ``top_n_entities`` (the entities
    kept after the knowledge filter, most known prompts first) and ``num_pairs_per_attribute``
    (cause base prompts drawn per intervened attribute, before the split)."""

    top_entities: int = 500
    pairs_per_attribute: int = 5000


@dataclass
class RavelEvalConfig(EvalConfig):
    """RAVEL interchange interventions (see docs/ARCHITECTURE.md, evals.ravel). A field whose
    default is ``${ravel_protocol:...}`` takes its protocol's value (:data:`PROTOCOL_DEFAULTS`;
    resolved by OmegaConf in a composed config, by :func:`fill_protocol_defaults` in an instance
    built in Python)."""

    name: str = "ravel"
    version: str = "2.0"
    # conf/eval/recipe/ sets it with its values; the default recipe file sets nothing, so the
    # protocol's own recipe applies (saeravel, or saebench under eval.protocol=saebench)
    recipe: RavelRecipe = II("ravel_protocol:recipe,${.protocol}")
    recipe_label: str = II("ravel_protocol:recipe_label,${.protocol}")
    protocol: RavelProtocol = RavelProtocol.saeravel
    method: RavelMethod = II("ravel_protocol:method,${.protocol}")
    # RAVEL's entity type read when the data is RAVEL's (not a model's own world)
    entity_type: EntityType = EntityType.city
    # null: the data's first two attributes (city: Country, Continent; data.ATTRIBUTES_BY_TYPE);
    # protocol saebench: SAEBench's selection of the entity type (SAEBENCH_ATTRIBUTES)
    attributes: list[str] | None = II("ravel_protocol:attributes,${.protocol},${.entity_type}")
    # Attributes scored for isolation only, never trained on ("held-out isolation"): null = every
    # attribute of the data not in eval.attributes, [] = none. One the model does not know (no
    # known prompt among the test entities) is skipped and named in the result.
    isolation_attributes: list[str] | None = II("ravel_protocol:isolation_attributes,${.protocol}")
    data_source: DataSource = DataSource.auto
    data_dir: str | None = None
    match: MatchRule = II("ravel_protocol:match,${.protocol}")
    match_tokens: int = II("ravel_protocol:match_tokens,${.protocol}")
    split_by: SplitBy = SplitBy.entity
    split_fractions: list[float] = II("ravel_protocol:split_fractions,${.protocol}")
    max_entities: int | None = II("ravel_protocol:max_entities,${.protocol}")
    max_pairs_per_split: int = 500
    drop_same_label_pairs: bool = True
    add_error: bool = False
    epochs: int = II("ravel_protocol:epochs,${.protocol}")
    batch_size: int = II("ravel_protocol:batch_size,${.protocol}")
    lr: float = 1e-3
    optimizer: Optimizer = Optimizer.adam
    mask: MaskConfig = field(default_factory=MaskConfig)
    das: DASConfig = field(default_factory=DASConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    boundless: BoundlessConfig = field(default_factory=BoundlessConfig)
    mdas: MDASConfig = field(default_factory=MDASConfig)
    sae_probe: SAEProbeConfig = field(default_factory=SAEProbeConfig)
    fixed: FixedConfig = field(default_factory=FixedConfig)
    rlap: RLAPConfig = field(default_factory=RLAPConfig)
    saebench: SAEBenchProtocolConfig = field(default_factory=SAEBenchProtocolConfig)
    bootstrap: int = 1000
    confidence: float = 0.95
    report_top_latents: int = 32
    fast: bool = True
    # GB one decoding pass may hold (keys/values of every row over the prompt and generated
    # tokens, logits, the clean forward of its bases: decode.CachedDecoder.pass_bytes); the
    # rows per pass follow from it. The generations do not depend on it.
    decode_mem_gb: float = 1.0
    save_artifacts: bool = True
    checkpoint_every_s: float = 60.0
    checkpoint_every_steps: int = 0

    def __post_init__(self) -> None:
        fill_protocol_defaults(self)


# The defaults that depend on eval.protocol (the schema's ``${ravel_protocol:...}`` fields), one
# row per protocol:
# the one source of these values. saeravel and ravel share saeravel's recipe and data settings;
# saebench is SAEBench 0.6.0's RAVEL (sae_bench/evals/ravel; the package docstring lists every
# difference): its SAE-latent mask (MDBM) alone, 2 epochs of Adam with the temperature falling
# geometrically from 1 to 1e-4 over every step, batch 8 (its gemma-2-2b batch, 32 // 4), 6
# generated tokens matched by prefix, a 70/30 train/test split and no held-out isolation.
_SAERAVEL_DEFAULTS: dict[str, Any] = {
    "recipe": "saeravel",
    "recipe_label": "saeravel's default: the paper's annealing, then 10 epochs at the final "
    "temperature",
    "method": "all",
    "isolation_attributes": None,
    "match": "first_token",
    "match_tokens": 3,
    "split_fractions": [0.6, 0.1, 0.3],
    "max_entities": 200,
    "epochs": 30,
    "batch_size": 16,
    "mask.schedule": "linear",
    "mask.t_start": 10.0,
    "mask.t_end": 0.1,
    "mask.anneal_fraction": 0.667,
}
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "saeravel": _SAERAVEL_DEFAULTS,
    "ravel": _SAERAVEL_DEFAULTS,
    "saebench": {
        "recipe": "saebench",
        "recipe_label": "SAEBench 0.6.0's RAVEL: Adam lr 1e-3, batch 8, 2 epochs, T 1 -> 1e-4 "
        "geometric over every step",
        "method": "sae",
        "isolation_attributes": [],
        "match": "prefix",
        "match_tokens": 6,
        "split_fractions": [0.7, 0.0, 0.3],
        "max_entities": None,
        "epochs": 2,
        "batch_size": 8,
        "mask.schedule": "log",
        "mask.t_start": 1.0,
        "mask.t_end": 1e-4,
        "mask.anneal_fraction": 1.0,
    },
}
# SAEBench's entity types and attributes (its entity_attribute_selection): the default
# eval.attributes under eval.protocol=saebench, and the only ones it defines.
SAEBENCH_ATTRIBUTES: dict[str, list[str]] = {
    "city": ["Country", "Continent", "Language"],
    "nobel_prize_winner": ["Country of Birth", "Field", "Gender"],
}


def protocol_default(key: str, protocol: Any, entity_type: Any = None) -> Any:
    """The default of ``key`` (dotted) under ``protocol``; ``attributes``: SAEBench's of
    ``entity_type`` under protocol saebench (None for an entity type it lacks, which
    :func:`check` names), else None (the data's first two, resolved when the data is read).
    The resolver ``ravel_protocol`` of the schema's defaults."""
    protocol = str(protocol)
    if key == "attributes":
        chosen = SAEBENCH_ATTRIBUTES.get(str(entity_type)) if protocol == "saebench" else None
        return list(chosen) if chosen is not None else None
    value = PROTOCOL_DEFAULTS.get(protocol, _SAERAVEL_DEFAULTS)[key]
    return list(value) if isinstance(value, list) else value


if not OmegaConf.has_resolver("ravel_protocol"):
    OmegaConf.register_new_resolver("ravel_protocol", protocol_default)


def _unresolved(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${ravel_protocol:")


def fill_protocol_defaults(cfg: Any) -> None:
    """In a ``RavelEvalConfig`` built in Python, set every field still holding its
    ``${ravel_protocol:...}`` default to the protocol's value, in place (a composed config
    resolves them itself)."""
    for dotted in (*PROTOCOL_DEFAULTS["saeravel"], "attributes"):
        *parents, key = dotted.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        if _unresolved(getattr(node, key)):
            setattr(node, key, protocol_default(dotted, cfg.protocol, cfg.entity_type))


PROTOCOLS = tuple(p.value for p in RavelProtocol)


def method_names() -> list[str]:
    """Every featurizer's name, in ``RavelMethod`` order (without ``all``)."""
    return [m.value for m in RavelMethod if m is not RavelMethod.all]


def chosen_methods(cfg: Any) -> list[str]:
    """The methods a job runs: ``eval.method``, or every one for ``all``."""
    return method_names() if cfg.method == "all" else [str(cfg.method)]


def _check_saebench(cfg: Any) -> None:
    """``eval.protocol=saebench``: an entity type and attributes SAEBench's RAVEL defines
    (:data:`SAEBENCH_ATTRIBUTES`), and its own counts."""
    et = str(cfg.entity_type)
    if et not in SAEBENCH_ATTRIBUTES:
        raise UserError(
            f"eval.protocol=saebench has no entity type {et} (SAEBench's RAVEL defines "
            f"{' and '.join(SAEBENCH_ATTRIBUTES)}); valid eval.entity_type: "
            f"{', '.join(SAEBENCH_ATTRIBUTES)}"
        )
    valid = SAEBENCH_ATTRIBUTES[et]
    bad = [a for a in cfg.attributes or [] if a not in valid]
    if bad:
        raise UserError(
            f"eval.attributes has {bad}, which SAEBench's RAVEL does not define for {et} "
            f"(eval.protocol=saebench); valid: {', '.join(valid)}"
        )
    sb = cfg.saebench
    for name, value in {"eval.saebench.top_entities": sb.top_entities,
                        "eval.saebench.pairs_per_attribute": sb.pairs_per_attribute}.items():  # fmt: skip
        if not isinstance(value, int) or value < 2:
            raise UserError(f"{name}={value} must be an integer >= 2")


def mdas_attributes(cfg: Any) -> list[str]:
    """The attributes multi-task DAS shares its rotation across (default: eval.attributes)."""
    if cfg.mdas.attributes is not None:
        return list(cfg.mdas.attributes)
    return list(cfg.attributes or [])


def _check_methods(cfg: Any) -> None:
    """The featurizers' own values and the basis file."""
    methods = chosen_methods(cfg)
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
    if RavelMethod.mdas in methods:
        attrs = mdas_attributes(cfg)
        # eval.attributes: null -> the entity type's first two (a model's own world may differ:
        # name eval.attributes to combine it with eval.mdas.attributes)
        trained = (
            list(cfg.attributes) if cfg.attributes is not None
            else default_attributes(str(cfg.entity_type))
        )  # fmt: skip
        if cfg.attributes is None and cfg.mdas.attributes is None:
            pass  # both follow the data's default attributes (two of them)
        elif len(attrs) < 2 or len(set(attrs)) != len(attrs):
            raise UserError(
                f"eval.mdas.attributes={attrs} needs at least two distinct attributes (one "
                "rotation shared across them); for one attribute use eval.method=das"
            )
        elif not set(attrs) <= set(trained):
            raise UserError(f"eval.mdas.attributes={attrs} must be among eval.attributes={trained}")
    counts = list(cfg.sae_probe.counts)
    if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
        raise UserError(f"eval.sae_probe.counts={counts} must be a non-empty list of integers >= 1")
    if cfg.sae_probe.steps < 1 or not cfg.sae_probe.lr > 0 or cfg.sae_probe.l1 < 0:
        raise UserError(
            f"eval.sae_probe.steps={cfg.sae_probe.steps} must be >= 1, lr={cfg.sae_probe.lr} > 0 "
            f"and l1={cfg.sae_probe.l1} >= 0"
        )
    rl = cfg.rlap
    if (rl.rank is not None and rl.rank < 1) or rl.steps < 1 or not rl.lr > 0:
        raise UserError(
            f"eval.rlap.rank={rl.rank} must be >= 1 or null, steps={rl.steps} >= 1 and "
            f"lr={rl.lr} > 0"
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
    if RavelMethod.fixed in methods and fx.basis_file and not Path(fx.basis_file).is_file():
        raise UserError(
            f"eval.fixed.basis_file={fx.basis_file} does not exist (a torch tensor [k, d_model])"
        )


# bytes per element of each model.dtype; auto: the smallest (a lower bound)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


def min_row_bytes(model: dict[str, Any], n_tokens: int) -> int | None:
    """A lower bound on what one row of a decoding pass holds, from the model's config alone
    (``model.n_layers``, ``d_model``, ``dtype``; None when one is unknown): the keys and values
    of every block at the residual width over the entity token and the ``n_tokens`` generated
    (a real row also holds the prompt's tokens, the logits and more:
    ``decode.CachedDecoder.pass_bytes``)."""
    n_layers, d_model = model.get("n_layers"), model.get("d_model")
    elem = _DTYPE_BYTES.get(str(model.get("dtype", "float32")))
    if not isinstance(n_layers, int) or not isinstance(d_model, int) or elem is None:
        return None
    return 2 * n_layers * d_model * elem * (1 + n_tokens)


def check_decode_budget(cfg: Any, model: dict[str, Any]) -> None:
    """``eval.decode_mem_gb`` below :func:`min_row_bytes` of the job's model: a one-line error
    before anything loads (a budget above it but short of a real row of the data fails at the
    first decoding pass, the knowledge filter's)."""
    need = min_row_bytes(model, int(cfg.match_tokens))
    if need is not None and cfg.decode_mem_gb * 1e9 < need:
        raise UserError(
            f"eval.decode_mem_gb={cfg.decode_mem_gb:g} is too small for one decoding row of "
            f"model {model.get('name', '?')}: at least {need / 1e9:.4g} GB (keys and values of "
            f"{model['n_layers']} blocks x {model['d_model']} over {1 + cfg.match_tokens} tokens)"
        )


def check(cfg: Any, recipe_file: str | None = None) -> None:
    """One-line errors for names that do not exist and values out of range (no model needed:
    the pipeline calls this before anything loads). ``recipe_file``: the ``eval/recipe`` file
    the job composed (None: unknown, not checked)."""
    choose("eval.protocol", cfg.protocol, PROTOCOLS)
    if cfg.protocol == "saebench":
        _check_saebench(cfg)
    choose("eval.method", cfg.method, (*method_names(), "all"))
    choose("eval.split_by", cfg.split_by, ("entity", "pair"))
    choose("eval.match", cfg.match, MATCH_RULES)
    choose("eval.mask.eval", cfg.mask.eval, ("hard", "soft"))
    choose("eval.mask.schedule", cfg.mask.schedule, ("linear", "log", "constant"))
    choose("eval.mask.estimator", cfg.mask.estimator, ("soft", "straight_through"))
    choose("eval.das.mode", cfg.das.mode, ("mask", "fixed"))
    choose("eval.data_source", cfg.data_source, ("auto", "embedded", "ravel"))
    choose("eval.entity_type", cfg.entity_type, [t.value for t in EntityType])
    choose("eval.optimizer", cfg.optimizer, ("adam", "adamw", "sgd"))
    trained = list(cfg.attributes) if cfg.attributes is not None else None
    if trained is not None and len(trained) < 2:
        raise UserError(
            "eval.attributes needs at least two attributes (one intervened, one isolated), "
            "or null (the data's first two)"
        )
    if trained is not None and len(set(trained)) != len(trained):
        raise UserError(f"eval.attributes={trained} repeats an attribute")
    held = cfg.isolation_attributes
    if held is not None:
        both = sorted(set(held) & set(trained or []))
        if both:
            raise UserError(
                f"eval.isolation_attributes={list(held)} repeats {both} of eval.attributes; "
                "valid: attributes the methods are not trained on (null = all of them)"
            )
        if len(set(held)) != len(held):
            raise UserError(f"eval.isolation_attributes={list(held)} repeats an attribute")
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
    budget = cfg.mask.refine_budget
    if not isinstance(budget, int) or budget < 0:
        raise UserError(
            f"eval.mask.refine_budget={budget} must be an integer >= 0 (0 = verify every "
            "candidate flip)"
        )
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
    mem = cfg.decode_mem_gb
    if (
        isinstance(mem, bool)
        or not isinstance(mem, int | float)
        or not (math.isfinite(mem) and mem > 0)
    ):
        raise UserError(f"eval.decode_mem_gb={mem} must be a finite number of GB > 0")
    _check_methods(cfg)
    # the default recipe file (saeravel.yaml) sets nothing: the protocol's own recipe applies
    own = PROTOCOL_DEFAULTS.get(str(cfg.protocol), _SAERAVEL_DEFAULTS)["recipe"]
    want = own if recipe_file == "saeravel" else recipe_file
    if recipe_file is not None and want != cfg.recipe:
        raise UserError(
            f"eval.recipe={cfg.recipe} only relabels the result; choose a recipe's settings with "
            f"eval/recipe=<name> (valid: saeravel, paper) or SAEBench's with eval.protocol=saebench"
        )
