"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The schemas are stored at the ConfigStore's root (``schema_<group>_<kind>``), in no config
group: ``--help``, TAB completion and Hydra's errors list every group and its options, so a
schema inside a group (``sae/schema_trained`` or a ``schema/sae`` group) would be listed as if
it were an option. Each YAML option in ``conf/<group>/`` extends its schema from its defaults
list (``- /schema_sae_trained@_here_``: the absolute path, merged at the option's own
package), so a misspelt key or Enum value in a YAML file or on the command line fails when
the config is composed, not an hour into a job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from saeravel.results import Reuse
from saeravel.schema import StrEnum

# ----------------------------------------------------------------------------- models


class DType(StrEnum):
    """Model dtypes (``saeravel.models.DTYPES``): a typo fails when the config is composed.
    ``auto``: bfloat16 on a CUDA device, float32 elsewhere (``saeravel.models.dtype_name``)."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class FromPretrainedKwargs:
    """``HookedTransformer.from_pretrained`` options settable without Hydra's ``+``
    (``model.from_pretrained_kwargs.center_writing_weights=false``). None = transformer_lens'
    default, or what the SAE was trained with (``saeravel.models.merge_processing``)."""

    fold_ln: bool | None = None
    center_writing_weights: bool | None = None
    center_unembed: bool | None = None
    fold_value_biases: bool | None = None
    refactor_factored_attn_matrices: bool | None = None
    default_prepend_bos: bool | None = None


@dataclass
class ModelConfig:
    """Common fields of every model option."""

    _target_: str = MISSING
    name: str = MISSING
    n_layers: int = MISSING
    d_model: int = MISSING
    default_layer: int = MISSING
    dtype: DType = DType.float32
    device: str = II("device")
    batch_size: int = 16


@dataclass
class TransformerLensModelConfig(ModelConfig):
    """A pretrained model loaded through transformer_lens (needs the hub or a local HF cache)."""

    _target_: str = "saeravel.models.TransformerLensModel"
    hf_name: str = MISSING
    from_pretrained_kwargs: FromPretrainedKwargs = field(default_factory=FromPretrainedKwargs)


@dataclass
class EmbeddedModelConfig(ModelConfig):
    """The small city-facts transformer the project trains itself (offline default)."""

    _target_: str = "saeravel.tiny_lm.EmbeddedModel"
    n_cities: int = 400
    n_countries: int | None = 48
    independent_attributes: bool = True
    attributes: list[str] = field(default_factory=lambda: ["Country", "Continent", "Language"])
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 96
    local_layers: int = 2
    train_steps: int = 1500
    train_batch: int = 32
    facts_per_sequence: int = 6
    lr: float = 3e-3
    world_seed: int = 0
    train_seed: int = 0
    min_fact_accuracy: float = 0.95
    stop_at_accuracy: float = 0.98
    readout_mlps: bool = False
    freeze_unembed: bool = True
    cache_dir: str = II("paths.cache_dir")


class PlantedBasis(StrEnum):
    """The orthogonal Q of the planted world (saeravel.planted): ``aligned`` (Q = I),
    ``rotated`` (random Q over the planted subspace), ``mixed`` (45-degree 2x2 rotations
    pairing dims of different attributes)."""

    aligned = "aligned"
    rotated = "rotated"
    mixed = "mixed"


class PlantedCodes(StrEnum):
    """The planted world's value codes in each attribute's block (saeravel.planted):
    ``onehot`` (a value is one dim) or ``dense`` (random orthonormal: every value uses every
    dim of its block)."""

    onehot = "onehot"
    dense = "dense"


@dataclass
class PlantedModelConfig(ModelConfig):
    """The planted ground-truth world: an analytic transformer whose entity representation at
    the RAVEL site is fixed by construction (saeravel.planted)."""

    _target_: str = "saeravel.planted.PlantedModel"
    n_entities: int = 200
    n_two_token: int = 4
    n_country: int = 40
    n_continent: int = 6
    n_language: int = 12
    # the attribute schema: city (Country, Continent, Language; counts model.n_*) or another
    # RAVEL type's attributes with its value counts, each at most max_values
    entity_type: str = "city"
    max_values: int = 12
    id_dims: int = 8
    basis: PlantedBasis = PlantedBasis.aligned
    nesting: float = 0.0
    value_scale: float = 1.0
    logit_scale: float = 10.0
    margin: float = 0.1
    codes: PlantedCodes = PlantedCodes.onehot
    superposition: int = 0
    absorption: bool = False
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.1, 0.3])
    world_seed: int = 0
    basis_seed: int = 0
    site_layer: int = II("layer")
    n_ctx: int = 64


# ----------------------------------------------------------------------------- SAEs


class Site(StrEnum):
    """``site=``: where in block ``layer`` the SAE reads and the interventions patch
    (``saeravel.hooks.SITES``): the residual after the block (the default), the residual
    between its attention and its MLP, or what its MLP or its attention adds to the residual."""

    resid_post = "resid_post"
    resid_mid = "resid_mid"
    mlp_out = "mlp_out"
    attn_out = "attn_out"


@dataclass
class SAEConfig:
    """Common fields of every SAE option: the SAE reads ``site`` of block ``layer`` (both
    follow the job's ``layer`` and ``site``)."""

    _target_: str = MISSING
    family: str = MISSING
    layer: int = II("layer")
    site: Site = II("site")


@dataclass
class SaeLensSAEConfig(SAEConfig):
    """A pretrained sae_lens SAE: regexes over sae_lens' directory (a catalogue family names
    its release only: each layer's id comes from the directory)."""

    _target_: str = "saeravel.saes.sae_lens.SaeLensSource"
    release: str = MISSING
    sae_id: str | None = None


@dataclass
class GemmaScopeSAEConfig(SAEConfig):
    """Google DeepMind's Gemma Scope SAEs on Gemma-2-2B (JumpReLU), via sae_lens: the release
    follows ``site`` (resid_post: ``-res``, mlp_out: ``-mlp``), the id ``layer``, ``width``
    and ``l0`` (``canonical`` or a number), checked against sae_lens' directory."""

    _target_: str = "saeravel.saes.gemma_scope.GemmaScopeSource"
    width: str = "16k"
    l0: str = "canonical"


@dataclass
class ApolloSAEConfig(SAEConfig):
    """Apollo Research e2e SAEs, read from their public wandb runs."""

    _target_: str = "saeravel.saes.apollo.ApolloWandbSource"
    project: str = "sparsify/gpt2"
    run_ids: dict[int, str] = field(default_factory=dict)
    hooks: dict[int, str] = field(default_factory=dict)
    cache_dir: str = II("paths.cache_dir")
    sae_lens_release: str | None = None  # the same SAEs in sae_lens' catalogue (no-key route)


@dataclass
class LocalSAEConfig(SAEConfig):
    """An SAE on disk: a saved sae_lens directory or an OpenAI ``sparse_autoencoder`` state dict."""

    _target_: str = "saeravel.saes.local.LocalSource"
    path: str = MISSING
    format: str = "auto"
    hook_name: str | None = None


@dataclass
class CustomSAEConfig(SAEConfig):
    """Any object with ``encode``/``decode``: ``object`` is a Hydra ``_target_`` node
    (``sae.object._target_=mypkg.saes.MySAE``, its keyword arguments beside it), built by the
    source after its checks (``_recursive_`` false: Hydra does not build it first).

    A ``_target_`` runs code. ``object._target_`` must name a class that defines ``encode``
    and ``decode`` (checked on the imported class before anything is called); a factory
    function, any other callable, or a nested ``_target_`` in its arguments runs only with
    ``allow_factory=true``, which lets this config run arbitrary code
    (saeravel.errors.check_code_target)."""

    _target_: str = "saeravel.saes.custom.CustomSource"
    _recursive_: bool = False
    object: dict[str, Any] = field(default_factory=lambda: {"_target_": MISSING})
    hook_name: str = MISSING
    d_in: int = MISSING
    allow_factory: bool = False


@dataclass
class TrainedSAEConfig(SAEConfig):
    """An SAE the pipeline trains on the chosen model and layer, cached on disk."""

    _target_: str = "saeravel.saes.trained.TrainedSource"
    architecture: str = "topk"
    k: int = 16
    expansion: int = 32
    l1_coefficient: float = 5.0
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    positions: str = "all"
    entity_weight: float = 0.5
    seed: int = 0
    n_sequences: int = 3000
    dataset: str = "Skylion007/openwebtext"
    cache_dir: str = II("paths.cache_dir")


@dataclass
class IdentitySAEConfig(SAEConfig):
    """SAEBench's identity baseline: the residual dimensions as latents (saeravel.saes.identity)."""

    _target_: str = "saeravel.saes.identity.IdentitySource"
    family: str = "identity"


@dataclass
class PCASAEConfig(SAEConfig):
    """SAEBench's PCA baseline: the principal components of the activations at the layer, fit
    here and cached (saeravel.saes.pca)."""

    _target_: str = "saeravel.saes.pca.PCASource"
    family: str = "pca"
    n_sequences: int = 3000
    batch_size: int = 4096
    seed: int = 0
    dataset: str = "Skylion007/openwebtext"
    cache_dir: str = II("paths.cache_dir")


class PlantedDictionary(StrEnum):
    """``planted``: the planted atoms; ``random``: +- a random orthonormal basis of the
    planted subspace (the chance-level control)."""

    planted = "planted"
    random = "random"


@dataclass
class PlantedSAEConfig(SAEConfig):
    """The planted world's exact SAE (saeravel.saes.planted), or its random-dictionary control."""

    _target_: str = "saeravel.saes.planted.PlantedSAESource"
    family: str = "planted"
    dictionary: PlantedDictionary = PlantedDictionary.planted
    seed: int = 0


@dataclass
class NoSAEConfig(SAEConfig):
    """No SAE: for evals or methods that do not use one (DAS, neuron masks)."""

    _target_: str = "saeravel.saes.none.NoSource"
    family: str = "none"


# ----------------------------------------------------------------------------- loggers


@dataclass
class LoggerConfig:
    """Common fields of every logger option (``conf/logger/``)."""

    _target_: str = MISSING


@dataclass
class NoLoggerConfig(LoggerConfig):
    """No experiment logger (the default)."""

    _target_: str = "saeravel.logger.NoLogger"


class WandbMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class WandbLoggerConfig(LoggerConfig):
    """One wandb run per job; ``mode`` null = ``WANDB_MODE`` if set, else offline."""

    _target_: str = "saeravel.logger.WandbLogger"
    project: str = "saeravel"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    job_type: str | None = None
    mode: WandbMode | None = None
    dir: str | None = None
    log_artifact: bool = True


# ----------------------------------------------------------------------------- top level


@dataclass
class PathsConfig:
    """Where things are written. Nothing writes anywhere else."""

    cache_dir: str = MISSING
    output_dir: str | None = MISSING  # None only outside a run (``--cfg job --resolve``)
    results_dir: str = MISSING


@dataclass
class Config:
    """The composed job: model + SAE + eval at one layer (and site of it)."""

    model: Any = MISSING
    sae: Any = MISSING
    eval: Any = MISSING
    logger: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    layer: int = II("model.default_layer")
    site: Site = Site.resid_post
    seed: int = 0
    device: str = "auto"
    force: bool = False
    reuse: Reuse = Reuse.same_code
    log_level: str = "INFO"


_REGISTERED = False


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    cs.store(name="schema_config", node=Config)
    cs.store(name="schema_model_transformer_lens", node=TransformerLensModelConfig)
    cs.store(name="schema_model_embedded", node=EmbeddedModelConfig)
    cs.store(name="schema_model_planted", node=PlantedModelConfig)
    cs.store(name="schema_sae_sae_lens", node=SaeLensSAEConfig)
    cs.store(name="schema_sae_gemma_scope", node=GemmaScopeSAEConfig)
    cs.store(name="schema_sae_apollo", node=ApolloSAEConfig)
    cs.store(name="schema_sae_local", node=LocalSAEConfig)
    cs.store(name="schema_sae_custom", node=CustomSAEConfig)
    cs.store(name="schema_sae_trained", node=TrainedSAEConfig)
    cs.store(name="schema_sae_none", node=NoSAEConfig)
    cs.store(name="schema_sae_planted", node=PlantedSAEConfig)
    cs.store(name="schema_sae_identity", node=IdentitySAEConfig)
    cs.store(name="schema_sae_pca", node=PCASAEConfig)
    cs.store(name="schema_logger_none", node=NoLoggerConfig)
    cs.store(name="schema_logger_wandb", node=WandbLoggerConfig)
    from saeravel.evals.api import discover

    for spec in discover().values():
        cs.store(name=f"schema_eval_{spec.name}", node=spec.schema)
    _REGISTERED = True


_HYDRA_FLAGS_WITH_OWN_SEARCH_PATH = (
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
)


def unknown_option_error(argv: Sequence[str], conf_dir: str | Path) -> str | None:
    """The first command-line choice of a config group that is not one of the group's options
    (``sae=no_such``, ``model=gpt3``, ``eval=rave,ravel``), as one line naming the group's real
    options with a "did you mean"; then the first value or key the schemas reject
    (``eval.method=dsa``; a misspelt key, ``eval.epoch=5``, with a "did you mean" and the
    valid keys of its level); None if all is well.

    Checked through Hydra's public API (its override parser and the config loader's group
    options, ConfigStore groups included) before ``hydra.main`` composes, whose own message is
    several lines long. Flags that change the search path or primary config, shell completion
    and overrides Hydra cannot parse are left to Hydra.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from saeravel.errors import UserError, choose

    if any(a.split("=")[0] in _HYDRA_FLAGS_WITH_OWN_SEARCH_PATH or a.startswith("-sc") or
           a.startswith("--shell-completion") for a in argv):  # fmt: skip
        return None
    lines = [a for a in argv if "=" in a and not a.startswith("-")]
    if not lines or GlobalHydra.instance().is_initialized():
        return None
    register_configs()
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except HydraException:
        return None  # a malformed override: Hydra's own message says where
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for o in overrides:
            group = o.key_or_group
            if o.is_delete() or group.startswith("hydra.") or "." in group:
                continue  # a key, not a group
            options = loader.get_group_options(group, results_filter=ObjectType.CONFIG)
            if not options:
                continue  # not a group (or one with no options): Hydra decides
            if o.is_sweep_override():
                try:
                    values = list(o.sweep_string_iterator())
                except HydraException:
                    continue  # glob(), range(): Hydra expands them
            else:
                values = [o.value()]
            for value in values:
                if not isinstance(value, str) or "${" in value:
                    continue  # null (no option) or an interpolation
                try:
                    choose(f"{group} option", value, options)
                except UserError as exc:
                    return str(exc)
        return _value_error(overrides)
    return None


def _value_error(overrides: Sequence[Any]) -> str | None:
    """Compose the job (each value of a sweep in turn) and return Hydra's complaint about a
    value or a key (``eval.method=dsa``: not one of the Enum's members), or the first check of
    the eval that fails (``eval.probe.max_iter=0``, ``eval=core sae=none``), as one line, or
    None."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def line(o: Any, value: Any) -> str:
        return f"{o.get_key_element()}={value}"

    base = []
    for o in overrides:
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else None
        except HydraException:
            return None  # glob(), range(): left to Hydra's sweeper
        base.append([line(o, v) for v in values] if values is not None else [o.input_line])
    jobs = [[vs[0] for vs in base]]
    jobs += [
        [*(vs[0] for vs in base[:i]), v, *(vs[0] for vs in base[i + 1 :])]
        for i, vs in enumerate(base)
        for v in vs[1:]
    ]
    for job in jobs:
        try:
            composed = compose("config", overrides=job, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as exc:
            cause = exc.__cause__ or exc
            if (message := _key_error(cause)) is not None:
                return message
            what = (
                str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            )
            head = str(exc).strip().splitlines()[0] if cause is not exc else ""
            bad = head.removeprefix("Error merging override ").strip().rstrip(".")
            return f"{bad}: {what}" if bad and bad != what else what
        if (message := _job_error(composed)) is not None:
            return message
    return None


def _key_error(exc: BaseException) -> str | None:
    """A key that does not exist (``eval.epoch=5``, ``modle=gpt2-small``: OmegaConf's
    "Key 'epoch' not in 'RavelEvalConfig'") as :func:`saeravel.errors.unknown_key`'s line,
    with a "did you mean" and the keys of its level; None for any other error."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from saeravel.errors import unknown_key

    parent = getattr(exc, "parent_node", None)
    full_key = getattr(exc, "full_key", None)
    if not isinstance(exc, ConfigAttributeError | ConfigKeyError) or not full_key:
        return None
    if not isinstance(parent, DictConfig) or str(getattr(exc, "key", "")) in parent:
        return None
    free_form = not dataclasses.is_dataclass(OmegaConf.get_type(parent))
    keys = sorted((str(k) for k in parent.keys()), key=lambda k: k == "hydra")  # Hydra's last
    return str(unknown_key(str(full_key), keys, free_form))


def _job_error(cfg: Any) -> str | None:
    """The eval's checks that need nothing from the model (``evals.api.check_job``: its
    schema's values, files, keys, an SAE for an eval that needs one) on a composed job, as one
    line; None if they pass or cannot run before Hydra (a value interpolating Hydra's runtime,
    a missing required value): the pipeline runs them again."""
    from omegaconf.errors import OmegaConfBaseException

    from saeravel.errors import UserError
    from saeravel.evals.api import check_job

    try:
        check_job(cfg)
    except UserError as exc:
        return str(exc)
    except OmegaConfBaseException:
        return None
    return None
