"""The evals' YAML files set no value: the schema dataclass is the one source of every default,
and the YAML documents each key (with its default) in a comment. RAVEL's default recipe is the
dataclass's defaults too; only a reproduction preset (recipe/paper.yaml) pins values."""

import dataclasses
import re
from enum import Enum
from pathlib import Path

import pytest
import yaml

from saeravel.evals.api import discover

from helpers import ROOT

CONF = ROOT / "conf" / "eval"
NOT_COVERED: set[str] = set()
# Defaults-list entries beyond the schema and _self_: RAVEL's training-recipe group.
EXTRA_DEFAULTS = {"ravel": [{"recipe": "saeravel"}]}
# Values a YAML may set although the dataclass has a default: none today. A value set here would
# have to differ from the dataclass default on purpose (say why beside it).
INTENTIONAL: dict[str, dict[str, object]] = {}
YAMLS = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem not in NOT_COVERED)
_DOC = re.compile(r"^#( *)([A-Za-z_]\w*):(?: (.*?))?(?:\s{2,}.*)?$")


def _plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _documented(path: Path) -> dict[str, str | None]:
    """``key -> documented default`` of every ``# key: value  what it does`` line (nested keys
    as ``parent.key``)."""
    out: dict[str, str | None] = {}
    parent = None
    for line in path.read_text().splitlines():
        m = _DOC.match(line)
        if not m:
            continue
        indent, key, value = len(m.group(1)), m.group(2), m.group(3)
        if indent == 1:
            parent = key
            out[key] = value
        elif indent == 3 and parent is not None:
            out[f"{parent}.{key}"] = value
    return out


def test_every_saebench_eval_has_a_yaml():
    names = set(discover()) - NOT_COVERED
    assert names == set(YAMLS)


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_composes_to_the_schema_defaults(name):
    """``eval=<name>`` composes (through Hydra, the schema registered) to exactly the eval's
    schema defaults."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saeravel.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"eval={name}"])
    # resolved: RAVEL's protocol-dependent defaults are interpolations of the protocol
    got = OmegaConf.to_container(cfg.eval, resolve=True)
    assert got == dataclasses.asdict(discover()[name].schema())


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_sets_no_value_and_documents_every_default(name):
    schema = discover()[name].schema
    defaults = _plain(dataclasses.asdict(schema()))
    data = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    want_defaults = [f"/schema_eval_{name}@_here_", "_self_", *EXTRA_DEFAULTS.get(name, [])]
    assert data.pop("defaults") == want_defaults
    extra = INTENTIONAL.get(name, {})
    for key, value in data.items():
        assert key in extra, (
            f"{name}.yaml sets {key}={value!r}: "
            + ("a duplicate of the dataclass default" if defaults.get(key) == value else
               "a value the dataclass does not have; change the dataclass instead")
        )  # fmt: skip
    documented = _documented(CONF / f"{name}.yaml")
    for field in dataclasses.fields(schema):
        assert field.name in documented, f"{name}.yaml does not document {field.name}"
        nested = defaults[field.name]
        if isinstance(nested, dict) and dataclasses.is_dataclass(field.default_factory()):
            for sub in nested:
                assert f"{field.name}.{sub}" in documented, f"{name}.yaml: {field.name}.{sub}"
    # the default written in each comment is the dataclass's (documentation cannot go stale)
    for key, text in documented.items():
        if not text or key.split(".")[0] not in defaults:
            continue  # a block documented below its key, or prose such as the column header
        want: object = defaults
        for part in key.split("."):
            want = want[part]  # type: ignore[index]
        assert yaml.safe_load(text) == want, f"{name}.yaml documents {key}: {text}, not {want!r}"


def test_the_default_ravel_recipe_sets_nothing_the_paper_recipe_pins_its_values():
    from saeravel.evals.ravel.config import RavelEvalConfig

    assert yaml.safe_load((CONF / "recipe" / "saeravel.yaml").read_text()) is None
    paper = yaml.safe_load((CONF / "recipe" / "paper.yaml").read_text())
    defaults = _plain(dataclasses.asdict(RavelEvalConfig()))
    assert paper["recipe"] == "paper" and paper["epochs"] != defaults["epochs"]
    # every training setting the paper's result depends on is pinned, not inherited
    assert {"epochs", "batch_size", "lr", "mask"} <= set(paper)
    assert set(paper["mask"]) == {"schedule", "t_start", "t_end", "anneal_fraction", "estimator"}
