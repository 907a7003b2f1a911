"""Every RAVEL entity type (``eval.entity_type``): the attribute table against RAVEL's files,
the real-data loader and pairs on ``../shared/ravel``, matching of years and free text, the
planted world of each type's schema through the pipeline, and the bad input refused early."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeravel.errors import UserError
from saeravel.evals.api import check_job
from saeravel.evals.ravel import pairs as ravel_pairs
from saeravel.evals.ravel.config import RavelEvalConfig
from saeravel.evals.ravel.data import (
    ATTRIBUTES_BY_TYPE,
    check_entity_type,
    default_attributes,
    load_ravel,
    type_files,
)
from saeravel.evals.ravel.prompts import label_ids, matches, rule_for
from saeravel.pipeline import run
from saeravel.world import ENTITY_TYPES, RAVEL_SCHEMAS

from helpers import RAVEL_SHARED as SHARED
from helpers import ROOT, needs_shared

CONF = str(ROOT / "conf")


@needs_shared
@pytest.mark.parametrize("entity_type", ENTITY_TYPES)
def test_schema_table_matches_ravels_files(entity_type):
    """The table written as data equals what RAVEL's files say: labelled attributes in the
    templates file's order, distinct non-empty values per attribute."""
    files = type_files(entity_type)
    prompts = json.loads((SHARED / files["templates"]).read_text())
    entities = json.loads((SHARED / files["entities"]).read_text())
    want = {
        a: len({v[a] for v in entities.values() if v.get(a)})
        for a in prompts
        if any(v.get(a) for v in entities.values())
    }
    assert RAVEL_SCHEMAS[entity_type] == want
    assert list(RAVEL_SCHEMAS[entity_type]) == list(want)  # the order too


def test_default_attributes_keep_city_as_before():
    assert default_attributes("city") == ["Country", "Continent"]
    assert default_attributes("verb") == ["Definition", "Singular"]
    assert RavelEvalConfig().attributes is None  # null: resolved from the data


class _Model:
    """Just what pairs need of a model: a fast tokenizer and ``cfg.default_prepend_bos``."""

    def __init__(self, world):
        from saeravel.tiny_lm import build_tokenizer, world_vocabulary

        self.tokenizer = build_tokenizer(world_vocabulary(world))
        self.cfg = SimpleNamespace(default_prepend_bos=True)


@needs_shared
@pytest.mark.parametrize("entity_type", ENTITY_TYPES)
def test_real_data_loader_and_pairs_for_every_type(entity_type, monkeypatch, tmp_path):
    """The world of each type from RAVEL's files (attributes, both splits, templates,
    wikipedia prompts) and its pairs under the ravel protocol, with a knowledge filter that
    says the model knows everything (no trained model is needed to check the plumbing)."""
    world = load_ravel(SHARED, entity_type)
    assert tuple(world.templates) == ATTRIBUTES_BY_TYPE[entity_type]
    assert all(set(v) == set(world.templates) and all(v.values()) for v in world.entities.values())
    assert {world.entity_split[e] for e in world.entities} == {"train", "val", "test"}
    assert set(world.template_split.values()) == {"train", "val", "test"}
    assert all(t.count("%s") == 1 for ts in world.templates.values() for t in ts)
    assert world.wikipedia_prompts
    cfg = RavelEvalConfig(entity_type=entity_type, protocol="ravel", data_dir=str(SHARED),
                          max_entities=60, max_pairs_per_split=30)  # fmt: skip
    check_entity_type(cfg)
    ravel_pairs.resolve_attributes(cfg, world)
    assert cfg.attributes == default_attributes(entity_type)
    monkeypatch.setattr(ravel_pairs, "known_filter", lambda cfg, ctx, w, ps: [True] * len(ps))
    model = _Model(world)
    ctx = SimpleNamespace(model=SimpleNamespace(model=model, name="stub"), seed=0,
                          cache_dir=tmp_path)  # fmt: skip
    pairs, stats = ravel_pairs.build_pairs(cfg, ctx, world)
    for a in cfg.attributes:
        for s in ("train", "test"):
            kinds = {q.kind for q in pairs[a][s]}
            assert {"cause", "isolation"} <= kinds, (a, s, kinds)
        for q in pairs[a]["train"]:  # the template split: training pairs on training templates
            assert world.template_split[q.base.template] == "train"
            assert world.entity_split[q.base.entity] == "train"
        for q in pairs[a]["test"]:
            assert world.entity_split[q.base.entity] == "test"
    held = stats["isolation_heldout"]["attributes"]
    assert set(held) == set(world.templates) - set(cfg.attributes)  # the other attributes


def test_years_and_free_text_match_by_prefix_on_token_ids():
    from saeravel.tiny_lm import build_tokenizer

    tok = build_tokenizer(["to", "leave", "someone", "1943", "1958", "x", "/", "is"])
    assert rule_for("Birth Year", "first_token") == "prefix"
    assert rule_for("Definition", "first_token") == "prefix"
    assert rule_for("Country", "first_token") == "first_token"  # city keeps eval.match
    # The prompt already ends with "to": the label's "to" is not asked for again.
    ids = label_ids(tok, 'The definition of "x" is to', "to leave someone", "Definition")
    assert ids == tok(" leave someone", add_special_tokens=False)["input_ids"]
    gen = tok(" leave x", add_special_tokens=False)["input_ids"]
    assert not matches(gen, ids, "prefix")  # "x" is not "someone"
    assert matches(gen[:1], ids, "prefix")


SMALL = ["model=planted-city-lm", "model.max_values=4", "model.n_entities=60", "model.id_dims=4",
         "model.d_model=40", "device=cpu", "sae=planted", "eval.method=das", "eval.epochs=3",
         "eval.max_pairs_per_split=60", "eval.max_entities=null", "eval.checkpoint_every_s=0"]  # fmt: skip


@pytest.mark.parametrize("entity_type", [t for t in ENTITY_TYPES if t != "city"])
def test_planted_world_of_every_type_runs_end_to_end(entity_type, tmp_path):
    """``model.entity_type``: the planted world with the type's attributes (value counts from
    the table, at most model.max_values), through the real pipeline, offline."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, f"model.entity_type={entity_type}",
            f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}",
            f"paths.results_dir={tmp_path / 'results'}"])  # fmt: skip
    record = run(cfg)
    attrs = default_attributes(entity_type)
    assert record["eval_config"]["attributes"] is None  # the job's config, as hashed
    assert record["eval_result_details"]["data"]["attributes"] == attrs  # what was used
    m = record["eval_result_metrics"]
    for a in attrs:
        assert m["baselines"]["oracle"][a]["disentangle"] >= 0.98
        assert m["baselines"]["none"][a]["disentangle"] == 0.5
        assert "das" in m["ravel"] and a in m["ravel"]["das"]
    planted = record["eval_result_details"]["planted"]["blocks"]
    want = {a: min(n, 4) for a, n in RAVEL_SCHEMAS[entity_type].items()}
    assert {b: n for b, n in planted.items() if b != "identity"} == want


def _job(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval.entity_type=verb", "eval.protocol=ravel", "eval.attributes=[Country,Size]"],
         "eval.attributes has ['Country', 'Size'], not attributes of RAVEL's verb; valid: "
         "Definition, Singular, Past Tense, Pronunciation"),
        (["eval.data_source=ravel", "eval.attributes=[Country,Color]"],
         "valid: Country, Continent, Latitude, Longitude, Language, Timezone"),
        (["eval.entity_type=occupation", "eval.protocol=ravel",
          "eval.isolation_attributes=[Gender Bias]"], "eval.isolation_attributes has"),
        (["eval.entity_type=nobel_prize_winner"],
         "eval.protocol=saeravel has no 5-shot prompt for RAVEL's nobel_prize_winner"),
    ],
)  # fmt: skip
def test_bad_entity_input_is_one_line_before_any_model(overrides, expected):
    cfg = _job(overrides)
    with pytest.raises(UserError) as e:
        check_job(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_unknown_entity_type_is_refused_by_the_schema_and_the_loader():
    with pytest.raises(Exception, match="eval.entity_type"):
        OmegaConf.to_object(_job(["eval.entity_type=animal"]).eval)
    with pytest.raises(UserError, match="valid: city, nobel_prize_winner, occupation"):
        type_files("animal")
    from saeravel.planted import PlantedModel

    with pytest.raises(UserError, match="unknown model.entity_type 'animal'; valid: city"):
        PlantedModel("p", n_layers=2, d_model=80, default_layer=0, entity_type="animal").validate()


def test_download_extracts_every_type_and_prefetch_names_the_type(tmp_path):
    """The archive (a local file:// copy of data.tgz's layout) yields every type's files; the
    prefetch need of a type looks for that type's files."""
    import io
    import tarfile

    from saeravel.evals.ravel.data import ALL_FILES, download_ravel, offline_need

    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        for name in ALL_FILES:
            data = b"{}"
            info = tarfile.TarInfo(f"data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "data.tgz"
    archive.write_bytes(blob.getvalue())
    need = offline_need(tmp_path / "cache", "verb")
    with pytest.raises(UserError, match="lacks 5 of 5 verb files"):
        need.check()
    dest = download_ravel(tmp_path / "cache", url=archive.as_uri(), entity_type="verb")
    assert sorted(p.name for p in dest.iterdir()) == sorted(ALL_FILES)
    assert need.check() == [dest]
