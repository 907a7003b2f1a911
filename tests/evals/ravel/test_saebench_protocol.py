"""``eval.protocol=saebench``, SAEBench 0.6.0's RAVEL: its defaults (one table, read by the
schema's interpolations of the protocol), its bad input refused before any model, its accepted answers, its
entity/prompt selection and pairs on RAVEL's own files (``../shared/ravel``), and the protocol
end to end on the planted model with its SAEBench copy checked against the wheel's schema."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

# SAEBench 0.6.0's JSON schemas, read from its wheel by tests/evals/test_saebench_schemas.py's
# fixture (skips without the wheel); that module sits one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_saebench_schemas import schema_errors, schemas  # noqa: E402, F401

from saeravel.errors import UserError
from saeravel.evals.api import check_job
from saeravel.evals.ravel import pairs as ravel_pairs
from saeravel.evals.ravel.config import (
    PROTOCOL_DEFAULTS,
    SAEBENCH_ATTRIBUTES,
    RavelEvalConfig,
    SAEBenchProtocolConfig,
)
from saeravel.evals.ravel.data import load_ravel
from saeravel.evals.ravel.prompts import matches_any, saebench_answers
from saeravel.pipeline import run

from helpers import RAVEL_SHARED as SHARED
from helpers import ROOT, needs_shared

CONF = str(ROOT / "conf")
SMALL = ["model=planted-city-lm", "sae=planted", "device=cpu", "model.n_entities=60",
         "model.n_country=10", "model.n_continent=4", "model.n_language=6", "model.id_dims=4",
         "model.d_model=48", "eval.checkpoint_every_s=0"]  # fmt: skip


def _job(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------- defaults


def test_protocol_sets_saebenchs_defaults_and_a_set_value_wins():
    cfg = _job("eval.protocol=saebench")
    for key, value in PROTOCOL_DEFAULTS["saebench"].items():
        assert _get(cfg.eval, key) == value, key
    assert cfg.eval.attributes == ["Country", "Continent", "Language"]
    assert cfg.eval.saebench.top_entities == 500 and cfg.eval.saebench.pairs_per_attribute == 5000
    # SAEBench's facts, stated once more here so a change of the table is a decision
    want = {"method": "sae", "match": "prefix", "match_tokens": 6, "epochs": 2, "lr": 1e-3,
            "mask.schedule": "log", "mask.t_start": 1.0, "mask.t_end": 1e-4,
            "mask.anneal_fraction": 1.0, "mask.init": 0.0, "mask.l1": 0.0, "mask.eval": "hard",
            "split_fractions": [0.7, 0.0, 0.3], "isolation_attributes": [], "recipe": "saebench"}  # fmt: skip
    assert {k: _get(cfg.eval, k) for k in want} == want
    nobel = _job("eval.protocol=saebench", "eval.entity_type=nobel_prize_winner", "eval.epochs=5",
                 "eval.match_tokens=8")  # fmt: skip
    assert nobel.eval.attributes == ["Country of Birth", "Field", "Gender"]
    assert (nobel.eval.epochs, nobel.eval.match_tokens, nobel.eval.batch_size) == (5, 8, 8)
    # the other protocols keep saeravel's values, and a Python-built config fills itself
    plain = _job()
    assert (plain.eval.method, plain.eval.epochs, plain.eval.attributes) == ("all", 30, None)
    built = RavelEvalConfig(protocol="saebench", entity_type="nobel_prize_winner")
    assert built.mask.schedule == "log" and built.attributes == SAEBENCH_ATTRIBUTES[
        "nobel_prize_winner"]  # fmt: skip
    assert RavelEvalConfig().mask.t_start == 10.0 and RavelEvalConfig().max_entities == 200


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval.entity_type=verb"], "eval.protocol=saebench has no entity type verb (SAEBench's "
         "RAVEL defines city and nobel_prize_winner); valid eval.entity_type: city, "
         "nobel_prize_winner"),
        (["eval.attributes=[Country,Latitude]"], "eval.attributes has ['Latitude'], which "
         "SAEBench's RAVEL does not define for city (eval.protocol=saebench); valid: Country, "
         "Continent, Language"),
        (["eval.entity_type=nobel_prize_winner", "eval.attributes=[Field,Award Year]"],
         "valid: Country of Birth, Field, Gender"),
        (["eval.saebench.top_entities=1"], "eval.saebench.top_entities=1 must be an integer >= 2"),
    ],
)  # fmt: skip
def test_bad_protocol_input_is_one_line_before_any_model(overrides, expected):
    with pytest.raises(UserError) as e:
        check_job(_job("eval.protocol=saebench", *overrides))
    assert expected in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- answers


def test_saebench_answers_keep_its_alternatives_but_not_its_mistakes():
    assert saebench_answers("United Kingdom", "Country") == [
        "United Kingdom", "the United Kingdom", "England"]  # fmt: skip
    assert "England" not in saebench_answers("United States", "Country")  # SAEBench's mistake
    assert saebench_answers("North America", "Continent") == ["North America", "America", "NA"]
    assert "Korea" in saebench_answers("South Korea", "Country")
    assert saebench_answers("Arabic,Kurdish,Turkish", "Language")[1:] == [
        "Arabic", "Kurdish", "Turkish"]  # fmt: skip
    assert saebench_answers("Peace,Chemistry", "Field") == ["Peace,Chemistry"]
    # token ids, prefix over the common length: Niger is not Nigeria unless the tokens say so
    niger, nigeria = [[7]], [[7, 8]]
    assert matches_any([7, 8, 9], nigeria, "prefix") and not matches_any([7, 9], nigeria, "prefix")
    assert matches_any([7, 9], niger, "prefix")


# ----------------------------------------------------------------------------- selection


class _Model:
    """Just what pairs need of a model: a fast tokenizer and ``cfg.default_prepend_bos``."""

    def __init__(self, world):
        from saeravel.tiny_lm import build_tokenizer, world_vocabulary

        self.tokenizer = build_tokenizer(world_vocabulary(world))
        self.cfg = SimpleNamespace(default_prepend_bos=True)


@needs_shared
def test_selection_and_pairs_follow_saebench_on_ravels_files(monkeypatch, tmp_path):
    """On RAVEL's city files, with a knowledge filter that knows a prompt when a fixed hash
    says so: every template of SAEBench's three attributes for every entity is asked; the kept
    entities are those with the most known prompts (ties in the file's order); pairs are
    SAEBench's (cause: base and source ask A, labels differ; isolation: another attribute,
    as many, target the base's); the split is by entity, 70/30, ignoring RAVEL's."""
    world = load_ravel(SHARED, "city")
    cfg = RavelEvalConfig(protocol="saebench", data_dir=str(SHARED), max_entities=120,
                          saebench=SAEBenchProtocolConfig(top_entities=40, pairs_per_attribute=300))  # fmt: skip
    asked: list = []

    def known(cfg, ctx, w, prompts):
        asked.extend(prompts)
        return [random.Random(f"{p.entity}|{p.template}").random() < 0.5 for p in prompts]

    monkeypatch.setattr(ravel_pairs, "known_filter", known)
    ctx = SimpleNamespace(model=SimpleNamespace(model=_Model(world), name="stub"), seed=0,
                          cache_dir=tmp_path)  # fmt: skip
    pairs, stats = ravel_pairs.build_pairs(cfg, ctx, world)
    attrs = ["Country", "Continent", "Language"]
    entities = sorted({p.entity for p in asked}, key=list(world.entities).index)
    assert len(entities) == 120  # eval.max_entities: a random cap before the filter
    n_templates = sum(len(world.templates[a]) for a in attrs)
    assert len(asked) == 120 * n_templates and {p.attribute for p in asked} == set(attrs)
    flags = known(None, None, None, asked)
    count = {e: 0 for e in entities}
    for p, k in zip(asked, flags, strict=True):
        count[p.entity] += k
    top = sorted(entities, key=lambda e: -count[e])[:40]  # stable: ties in the file's order
    used = {q.base.entity for d in pairs.values() for ps in d.values() for q in ps}
    assert used <= set(top) and len(used) > 30
    assert stats["saebench"] == {"entities_known": 120, "entities_kept": 40,
                                 "pairs_per_attribute": 300}  # fmt: skip
    assert stats["entities_per_split"] == {"train": 28, "val": 0, "test": 12}
    known_keys = {(p.template, p.entity) for p, k in zip(asked, flags, strict=True) if k}
    for a in attrs:
        train = {q.base.entity for q in pairs[a]["train"]} | {
            q.source.entity for q in pairs[a]["train"]
        }
        test = {q.base.entity for q in pairs[a]["test"]} | {
            q.source.entity for q in pairs[a]["test"]
        }
        assert not train & test and not pairs[a]["val"]  # split by entity, no validation
        for split in ("train", "test"):
            ps = pairs[a][split]
            cause = [q for q in ps if q.kind == "cause"]
            iso = [q for q in ps if q.kind == "isolation"]
            assert len(cause) == len(iso) == round(300 * (0.7 if split == "train" else 0.3))
            assert len({id(q.base) for q in cause}) == len(cause)  # bases without replacement
            for q in ps:
                assert (q.base.template, q.base.entity) in known_keys
                assert (q.source.template, q.source.entity) in known_keys
                assert q.source.attribute == q.base.attribute
                b_lab = world.entities[q.base.entity][q.base.attribute]
                s_lab = world.entities[q.source.entity][q.base.attribute]
                assert b_lab != s_lab
                assert q.target == (s_lab if q.kind == "cause" else b_lab)
                assert (q.base.attribute == a) == (q.kind == "cause")
            assert len({q.source.template for q in cause}) > 1  # any template, not the base's
    # RAVEL's entity split is not SAEBench's: the split ignores it
    assert any(world.entity_split[q.base.entity] != "train" for q in pairs["Country"]["train"])


# ----------------------------------------------------------------------------- end to end


def test_saebench_protocol_end_to_end_on_the_planted_model(tmp_path, schemas):  # noqa: F811
    """The planted model with its exact SAE: the SAE mask learned in SAEBench's recipe moves
    each attribute and nothing else; the result says the protocol, its recipe and SAEBench's
    per-class block; the SAEBench copy has SAEBench's metric names and values and passes its
    RAVEL schema."""
    paths = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}",
             f"paths.results_dir={tmp_path / 'results'}"]  # fmt: skip
    cfg = _job(*SMALL, *paths, "eval.protocol=saebench", "eval.saebench.pairs_per_attribute=120")
    rec = run(cfg)
    conf = rec["eval_config"]
    assert (conf["protocol"], conf["recipe"], conf["method"], conf["epochs"]) == (
        "saebench", "saebench", "sae", 2)  # fmt: skip
    m = rec["eval_result_metrics"]["ravel"]
    attrs = ["Country", "Continent", "Language"]
    assert set(m) == {"sae", "baseline"} and set(m["sae"]) == set(attrs)
    for a in attrs:
        assert m["sae"][a]["disentangle"] >= 0.95, (a, m["sae"][a])
        assert m["baseline"][a]["cause"] == 0.0
        assert m["sae"][a]["n_cause"] == m["sae"][a]["n_isolation"] == 36  # 120 x 0.3
    assert rec["eval_result_details"]["data"]["isolation_heldout"]["attributes"] == []
    per_class = rec["eval_result_unstructured"]["city_results"]
    assert per_class["city_Country"]["disentangle_score"] == m["sae"]["Country"]["disentangle"]
    (path,) = (tmp_path / "out" / "saebench").rglob("*_eval_results.json")
    copy = json.loads(path.read_text())
    assert copy["eval_type_id"] == "ravel"
    assert schema_errors(schemas, copy) == []
    head = copy["eval_result_metrics"]["ravel"]
    assert head["disentanglement_score"] == pytest.approx(
        sum(m["sae"][a]["disentangle"] for a in attrs) / 3)  # fmt: skip
    assert head["cause_score"] == pytest.approx(sum(m["sae"][a]["cause"] for a in attrs) / 3)
    sb = copy["eval_config"]
    assert sb["entity_attribute_selection"] == {"city": attrs}
    assert (sb["n_generated_tokens"], sb["num_epochs"], sb["learning_rate"], sb["llm_batch_size"],
            sb["top_n_entities"], sb["num_pairs_per_attribute"], sb["train_test_split"]) == (
        6, 2, 1e-3, 8, 500, 120, 0.7)  # fmt: skip
    assert copy["eval_result_unstructured"]["eval"]["city_results"] == per_class
