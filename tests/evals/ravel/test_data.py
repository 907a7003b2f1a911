"""RAVEL data loading (real files), prompts, matching rules and pairs."""

from __future__ import annotations

import random
import shutil

import pytest

from saeravel.errors import UserError
from saeravel.evals.ravel.data import CITY_FILES, load_ravel_city
from saeravel.evals.ravel.prompts import (
    PAPER_FEW_SHOT,
    label_prefix,
    make_pairs,
    matches,
    split_entities,
    tokenize_prompt,
)

from helpers import ROOT

SHARED = ROOT.parent / "shared" / "ravel"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/ravel not present")


@needs_shared
def test_real_ravel_files_load_with_expected_counts():
    w = load_ravel_city(SHARED)
    assert len(w.entities) == 3552
    counts = {a: len(t) for a, t in w.templates.items()}
    assert counts == {"Country": 46, "Continent": 43, "Latitude": 42, "Longitude": 25,
                      "Language": 44, "Timezone": 73}  # fmt: skip
    splits = [w.entity_split[e] for e in w.entities]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (1787, 818, 947)
    assert all(t.count("%s") == 1 for ts in w.templates.values() for t in ts)
    assert set(w.template_split.values()) == {"train", "val", "test"}
    assert w.entities["Aalborg"]["Country"] == "Denmark"


def test_missing_file_is_a_one_line_error(tmp_path):
    if SHARED.exists():
        for f in list(CITY_FILES.values())[:-1]:
            shutil.copy(SHARED / f, tmp_path / f)
    with pytest.raises(UserError, match="wikipedia_city_entity_prompts.json"):
        load_ravel_city(tmp_path)


@needs_shared
def test_gpt2_style_bpe_offsets_locate_multi_token_entities():
    """A byte-level BPE tokenizer (trained here on RAVEL's own text, as GPT-2's is byte-level
    BPE) splits long city names into several tokens; the entity span must cover them all."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    w = load_ravel_city(SHARED)
    bpe = ByteLevelBPETokenizer()
    corpus = [t for ts in w.templates.values() for t in ts] + list(w.entities)[:300]
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    for city in ["Rio de Janeiro", "Aalborg", "San Francisco"]:
        p = tokenize_prompt(tok, PAPER_FEW_SHOT["Country"], city, "Country", bos=0)
        span = tok.decode(p.tokens[p.entity_start : p.entity_pos + 1])
        assert span.strip() == city
        after = tok.decode(p.tokens[p.entity_pos + 1 :])
        assert after.startswith(" is a city")
        assert p.entity_pos - p.entity_start >= 1  # several tokens


def test_matching_rules():
    # Token ids: first_token compares the first ids, prefix the common length.
    assert matches([7], [7, 8], "first_token")  # " North" vs "North America"
    assert not matches([9], [7, 8], "first_token")
    assert matches([7, 8, 3], [7, 8], "prefix")
    assert matches([7], [7, 8], "prefix")  # generation shorter than label
    assert not matches([7, 9], [7, 8], "prefix")
    assert not matches([], [7], "first_token")
    with pytest.raises(UserError, match="valid: first_token, prefix"):
        matches([1], [1], "exact")


def test_label_prefix():
    assert label_prefix("in the country of") == " "
    assert label_prefix('"country": "') == ""
    assert label_prefix("a latitude of ") == ""


def test_entity_split_is_disjoint_and_seeded(tiny_world):
    ents = [f"c{i}" for i in range(50)]
    from saeravel.world import CityWorld

    w = CityWorld(entities={e: {} for e in ents})
    a = split_entities(ents, w, [0.6, 0.1, 0.3], seed=1)
    b = split_entities(ents, w, [0.6, 0.1, 0.3], seed=1)
    assert a == b
    assert sorted(a.values()).count("train") == 30 and sorted(a.values()).count("test") == 15


def test_pairs_drop_equal_labels_and_target_the_right_entity(tiny_model):
    w, tok = tiny_model.world, tiny_model.tokenizer
    ents = list(w.entities)[:20]
    base = [tokenize_prompt(tok, t, e, a, tok.bos_token_id) for e in ents
            for a, t in [("Country", "%s lies in the country of"), ("Continent", "%s lies on the continent of")]]  # fmt: skip
    by_ent = {e: [p for p in base if p.entity == e] for e in ents}
    pairs = make_pairs(base, by_ent, w, "Country", tok, 200, random.Random(0), True, ents)
    assert pairs
    for q in pairs:
        attr = q.base.attribute
        assert w.entities[q.base.entity][attr] != w.entities[q.source.entity][attr]
        owner = q.source.entity if q.kind == "cause" else q.base.entity
        assert q.target == w.entities[owner][attr]
        assert (q.kind == "cause") == (attr == "Country")
        assert q.target_token == tok.convert_tokens_to_ids(q.target.split()[0])
        assert q.target_tokens == tok.convert_tokens_to_ids(q.target.split())
    kept = make_pairs(base, by_ent, w, "Country", tok, 200, random.Random(0), False, ents)
    assert any(q.meta["same_label"] for q in kept)


def test_pairs_drop_labels_equal_under_the_matching_rule():
    from saeravel.world import CityWorld

    w = CityWorld(entities={"A": {"Country": "United States"}, "B": {"Country": "United Kingdom"},
                            "C": {"Country": "France"}})  # fmt: skip

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [sum(map(ord, w)) for w in text.split()]}  # word-level

    from saeravel.evals.ravel.prompts import Prompt

    ps = {e: [Prompt("%s x", e, "Country", [0, 1], 1, 1)] for e in w.entities}
    bases = [ps["A"][0]]
    pairs = make_pairs(
        bases, ps, w, "Country", Tok(), 50, random.Random(0), True, ["B", "C"], "first_token"
    )
    assert pairs and {q.source.entity for q in pairs} == {
        "C"
    }  # "United ..." would match "United ..."
    exact = make_pairs(bases, ps, w, "Country", Tok(), 50, random.Random(0), True, ["B", "C"])
    assert {q.source.entity for q in exact} == {"B", "C"}
