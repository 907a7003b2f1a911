"""Every config group composes against its schema; typos fail at composition."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_composes(model):
    cfg = _compose([f"model={model}"])
    assert cfg.model.name == model
    assert 0 <= cfg.layer < cfg.model.n_layers


@pytest.mark.parametrize("sae", _options("sae"))
def test_every_sae_composes(sae):
    extra = {
        "sae_lens": ["sae.release=gpt2-small-res-jb"],
        "local": ["sae.path=/nonexistent"],
        "custom": [
            "sae.object._target_=x.Y",
            "sae.hook_name=blocks.1.hook_resid_post",
            "sae.d_in=128",
        ],
    }.get(sae, [])
    cfg = _compose([f"sae={sae}", *extra])
    assert cfg.sae.layer == cfg.layer
    assert cfg.sae._target_.startswith("saeravel.")


@pytest.mark.parametrize("ev", _options("eval"))
def test_every_eval_composes_and_is_registered(ev):
    from saeravel.evals.api import discover

    cfg = _compose([f"eval={ev}"])
    assert cfg.eval.name == ev
    assert ev in discover()
    OmegaConf.to_container(cfg.eval, resolve=True, throw_on_missing=True)


def test_layer_interpolates_into_the_sae():
    cfg = _compose(["layer=0"])
    assert cfg.sae.layer == 0
    assert _compose([]).layer == cfg.model.default_layer


@pytest.mark.parametrize(
    "override",
    ["eval.epoch=3", "model.n_layer=2", "sae.kk=3", "eval.mask.tmperature=1", "sae=opneai_v5_32k"],
)
def test_typos_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.dtype=float33"],  # DType
        ["model=planted-city-lm", "sae=planted", "model.basis=rotatd"],  # PlantedBasis
        ["model=planted-city-lm", "sae=planted", "sae.dictionary=randm"],  # PlantedDictionary
        ["logger=wandb", "logger.mode=onlin"],  # WandbMode
        ["eval.protocol=ravell"],  # the eval's own StrEnum
        ["sae.k=many"],  # an int field of the sae schema
    ],
)
def test_enum_typos_fail_at_composition(overrides):
    """The schemas still type every option after moving out of the option groups."""
    with pytest.raises(ConfigCompositionException):
        _compose(overrides)


def test_schemas_are_not_options_of_any_group():
    """The schemas are extended by absolute path (``/schema_<group>_<kind>@_here_``), in no
    config group: a group's options (what --help, TAB completion and errors list) are its
    YAML files only, and selecting a schema is an unknown option."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    from saeravel.config import unknown_option_error

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = loader.get_group_options("", results_filter=ObjectType.GROUP)
        assert "schema" not in groups
        for group in ("model", "sae", "eval", "logger"):
            assert loader.get_group_options(group) == _options(group)
    for override in ("sae=schema_trained", "model=schema_embedded", "eval=schema_ravel"):
        with pytest.raises(ConfigCompositionException):
            _compose([override])
        assert "unknown" in unknown_option_error([override], CONF)
    assert unknown_option_error(["sae=jbloom", "model=gpt2-small", "layer=1"], CONF) is None
    for path in sorted(CONF.glob("*/*.yaml")):
        if path.parent.name in ("model", "sae", "eval", "logger"):
            first = yaml.safe_load(path.read_text())["defaults"][0]
            assert first.startswith(f"/schema_{path.parent.name}_"), path
            assert first.endswith("@_here_"), path


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose(["eval.epochs=many"])


def test_every_yaml_key_has_a_comment():
    """Every option file documents its keys (a trailing or preceding comment)."""
    for group in ("model", "sae", "eval"):
        for path in (CONF / group).glob("*.yaml"):
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                s = line.strip()
                if not s or s.startswith(("#", "-", "defaults")) or ":" not in s:
                    continue
                if s.split(":")[0].strip().isdigit():
                    continue  # catalogue rows (layer: id) are documented by their block comment
                prev = lines[i - 1].strip() if i else ""
                assert "#" in line or prev.startswith("#") or line.startswith(" "), (
                    f"{path.name}: {line}"
                )


LOCAL = """# @package _global_
device: cuda
seed: 7
paths:
  cache_dir: /shared/cache
"""


def test_optional_local_site_settings(tmp_path):
    """``- optional local: default``: a conf/local/default.yaml is picked up when present (after
    the config and the experiment, before the command line), and nothing happens without it."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("local"))

    def compose_in(overrides):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    absent = compose_in([])
    assert (absent.device, absent.seed) == ("auto", 0)
    assert absent.paths.cache_dir != "/shared/cache"
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text(LOCAL)
    (conf / "local" / "other.yaml").write_text("# @package _global_\nseed: 9\n")
    present = compose_in([])
    assert (present.device, present.seed, present.paths.cache_dir) == ("cuda", 7, "/shared/cache")
    assert compose_in(["seed=3"]).seed == 3  # the command line wins
    assert compose_in(["experiment=paper_grid"]).device == "cuda"  # and over an experiment
    assert compose_in(["local=other"]).seed == 9
    (conf / "local" / "default.yaml").write_text("devise: cuda\n")  # a typo fails at composition
    with pytest.raises(ConfigCompositionException):
        compose_in([])


def _schema_enums() -> set[type]:
    """Every Enum type a field of a registered schema (nested dataclasses included) can hold."""
    import dataclasses
    import enum
    import typing

    from hydra.core.config_store import ConfigStore

    from saeravel.config import register_configs

    register_configs()
    found: set[type] = set()
    seen: set[type] = set()

    def walk(tp: object) -> None:
        for arg in typing.get_args(tp):
            walk(arg)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            found.add(tp)
        elif dataclasses.is_dataclass(tp) and tp not in seen:
            seen.add(tp)
            for f in dataclasses.fields(tp):
                walk(typing.get_type_hints(tp).get(f.name, f.type))

    for entry in ConfigStore.instance().repo.values():
        node = getattr(entry, "node", None)
        if node is not None:
            walk(OmegaConf.get_type(node))
    return found


def test_every_schema_enum_prints_as_its_value():
    """An option set that reaches a folder name, a log line or an interpolation prints as its
    value (``aligned``), never as Python's ``PlantedBasis.aligned``."""
    enums = _schema_enums()
    names = {e.__name__ for e in enums}
    assert {"PlantedBasis", "PlantedCodes", "DType", "PlantedDictionary", "RavelMethod"} <= names
    for kind in enums:
        for member in kind:
            logged = "%s" % member  # noqa: UP031 (logging formats with %s)
            assert str(member) == f"{member}" == logged == str(member.value), member


def test_enum_values_interpolate_as_their_names():
    cfg = _compose(["model=planted-city-lm", "sae=planted", "model.basis=rotated",
                    "+tag=${model.basis}-${model.codes}-${model.dtype}-${sae.dictionary}"])  # fmt: skip
    assert cfg.tag == "rotated-onehot-float32-planted"
