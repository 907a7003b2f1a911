"""The embedded model's architecture options (tiny sizes; the trained default is covered by
the end-to-end tests)."""

from __future__ import annotations

import re

import pytest
import torch

from saeravel.tiny_lm import build_model, build_tokenizer, train_model, world_vocabulary

ARCH = {"n_layers": 3, "d_model": 64, "n_heads": 4, "d_mlp": 128, "n_ctx": 96, "local_layers": 2}


def test_attention_only_readout_blocks(tiny_world):
    """readout_mlps=false: blocks after the token-local ones have no MLP (no parameters, no
    hook), the rest keep theirs; the weights round-trip through a state dict."""
    tok = build_tokenizer(world_vocabulary(tiny_world))
    model = build_model({**ARCH, "readout_mlps": False}, tok)
    assert [hasattr(b, "mlp") for b in model.blocks] == [True, True, False]
    assert not any(k.startswith("blocks.2.mlp") for k in model.state_dict())
    assert "blocks.2.mlp.hook_post" not in model.hook_dict
    assert "blocks.1.mlp.hook_post" in model.hook_dict
    toks = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    _, cache = model.run_with_cache(toks)
    out = model(toks)
    # The last block adds only its attention output to the residual.
    torch.testing.assert_close(
        cache["blocks.2.hook_resid_post"],
        cache["blocks.2.hook_resid_pre"] + cache["blocks.2.hook_attn_out"],
    )
    again = build_model({**ARCH, "readout_mlps": False}, tok)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(toks), out)
    full = build_model(ARCH, tok)
    assert all(hasattr(b, "mlp") for b in full.blocks)


def test_freeze_unembed_keeps_the_unembedding_and_trains_the_rest(tiny_world):
    tok = build_tokenizer(world_vocabulary(tiny_world))
    model = build_model(ARCH, tok)
    w_u, w_e = model.unembed.W_U.clone(), model.embed.W_E.clone()
    train_model(model, tiny_world, ["Country"], 3, 4, 2, 3e-3, 0, "cpu", freeze_unembed=True)
    assert torch.equal(model.unembed.W_U, w_u)
    assert not torch.equal(model.embed.W_E, w_e)
    train_model(model, tiny_world, ["Country"], 3, 4, 2, 3e-3, 0, "cpu")
    assert not torch.equal(model.unembed.W_U, w_u)


_TRAIN_SCRIPT = """
import hashlib, sys
from saeravel.tiny_lm import build_model, build_tokenizer, train_model, world_vocabulary
from saeravel.world import build_city_world

world = build_city_world(n_cities=40, seed=0)
tok = build_tokenizer(world_vocabulary(world))
arch = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "n_ctx": 96,
        "local_layers": 1, "readout_mlps": False, "seed": 0}
model = build_model(arch, tok)
train_model(model, world, ["Country", "Continent", "Language"], 30, 16, 6, 3e-3, 0, "cpu",
            freeze_unembed=True)
h = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    h.update(name.encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
print("STATE", h.hexdigest())
"""


@pytest.mark.slow  # two fresh interpreters importing transformer_lens
def test_training_is_bit_identical_across_processes():
    """Two processes (different PYTHONHASHSEED, same thread count) train the same small config
    for 30 steps and end with identical weights. Without deterministic algorithms the
    multi-threaded CPU backward of the embedding lookup made them differ from the first step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    hashes = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": src}
        env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        out = subprocess.run(
            [sys.executable, "-c", _TRAIN_SCRIPT],
            env=env, capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        hashes.append([ln for ln in out.stdout.splitlines() if ln.startswith("STATE")][-1])
    assert hashes[0] == hashes[1]


def test_training_restores_the_deterministic_setting(tiny_world):
    tok = build_tokenizer(world_vocabulary(tiny_world))
    model = build_model(ARCH, tok)
    assert not torch.are_deterministic_algorithms_enabled()
    train_model(model, tiny_world, ["Country"], 2, 4, 2, 3e-3, 0, "cpu")
    assert not torch.are_deterministic_algorithms_enabled()


BASE = dict(
    name="t", n_layers=2, d_model=32, default_layer=0, n_heads=2, d_mlp=64, n_ctx=96,
    local_layers=1, n_cities=20, attributes=["Country"], train_steps=5, train_batch=4,
    facts_per_sequence=2, lr=3e-3, world_seed=0, train_seed=0, min_fact_accuracy=0.0,
    cache_dir="unused", device="cpu",
)  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train_steps": -1}, "model.train_steps=-1 must be a positive integer"),
        ({"train_batch": 0}, "model.train_batch=0 must be a positive integer"),
        ({"lr": 0.0}, "model.lr=0.0 must be > 0"),
        ({"d_model": 30, "n_heads": 4}, "multiple of model.n_heads"),
        ({"local_layers": 3}, "model.local_layers=3 must be in 0..n_layers=2"),
        ({"attributes": ["Contry"]}, "unknown model attribute 'Contry'"),
        ({"min_fact_accuracy": 1.5}, "model.min_fact_accuracy=1.5 must be in"),
        ({"device": "bogus"}, "unknown device 'bogus'"),
        ({"n_countries": 3}, "model.n_countries=3 must be null (every country) or an integer >= 6"),
    ],
)
def test_embedded_settings_are_checked_before_training(override, message):
    from saeravel.errors import UserError
    from saeravel.tiny_lm import EmbeddedModel

    with pytest.raises(UserError, match=re.escape(message)):
        EmbeddedModel(**{**BASE, **override})


def test_too_low_fact_accuracy_is_a_user_error(tmp_path):
    from saeravel.errors import UserError
    from saeravel.tiny_lm import EmbeddedModel

    source = EmbeddedModel(**{**BASE, "min_fact_accuracy": 1.0, "cache_dir": str(tmp_path)})
    with pytest.raises(UserError, match="raise model.train_steps"):
        source.load()
    assert not (source.folder() / "meta.json").exists()


def test_trained_sae_text_uses_only_the_attributes_the_model_learned(tiny_model):
    """sae=trained on the embedded model: training sentences come from the model's trained
    attributes (info["attributes"]), never from templates it never saw (Timezone)."""
    from dataclasses import replace

    from saeravel.saes.train import embedded_texts

    world = tiny_model.world

    def used(template: str, text: str) -> bool:
        before, after = (re.escape(part.strip()) for part in template.split("%s"))
        return re.search(rf"{before}\s*\S+\s*{after}", text) is not None

    learned = replace(tiny_model, info={**tiny_model.info, "attributes": ["Country", "Language"]})
    joined = " ".join(embedded_texts(learned, 200, seed=0))
    for attr in ("Continent", "Timezone"):
        assert not any(used(t, joined) for t in world.templates[attr]), attr
    for attr in ("Country", "Language"):
        assert any(used(t, joined) for t in world.templates[attr]), attr
    # unrecorded (older models): every attribute of the world, Timezone included
    all_text = " ".join(embedded_texts(tiny_model, 200, seed=0))
    assert any(used(t, all_text) for t in world.templates["Timezone"])


def test_embedded_model_accepts_an_sae_that_asks_for_no_processing(tmp_path):
    """An SAE recording center_writing_weights=False (OpenAI's format) fits an unprocessed
    model; one asking for processing does not."""
    from saeravel.errors import UserError
    from saeravel.tiny_lm import EmbeddedModel

    src = EmbeddedModel(
        "tiny-city-lm", n_layers=2, d_model=32, default_layer=1, n_heads=2, d_mlp=64, n_ctx=96,
        local_layers=1, n_cities=20, attributes=["Country", "Continent"], train_steps=1,
        train_batch=4, facts_per_sequence=2, lr=1e-3, world_seed=0, train_seed=0,
        min_fact_accuracy=0.0, cache_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    with pytest.raises(UserError, match="no weight processing"):
        src.load({"center_writing_weights": True})
    assert src.load({"center_writing_weights": False}).name == "tiny-city-lm"


def test_n_countries_keeps_the_most_populous_share_per_continent_and_null_changes_nothing():
    """``model.n_countries``: N countries, N/6 per continent, cities still continent-balanced;
    null draws the same world as before the dial existed (and the same cache key)."""
    from collections import Counter

    from saeravel.tiny_lm import EmbeddedModel
    from saeravel.world import build_city_world

    full = build_city_world(n_cities=120, seed=0)
    few = build_city_world(n_cities=120, seed=0, n_countries=12)
    per = Counter({(e["Continent"], e["Country"]) for e in few.entities.values()})
    assert len({e["Country"] for e in few.entities.values()}) == 12
    assert Counter(c for c, _ in per) == Counter({c: 2 for c, _ in per})
    assert len({e["Country"] for e in full.entities.values()}) > 12
    assert build_city_world(n_cities=120, seed=0, n_countries=None).entities == full.entities
    assert EmbeddedModel(**BASE).key() == EmbeddedModel(**{**BASE, "n_countries": None}).key()
    assert EmbeddedModel(**BASE).key() != EmbeddedModel(**{**BASE, "n_countries": 12}).key()


def test_independent_attributes_permute_every_column_but_country():
    """``model.independent_attributes``: the same cities and countries, each other attribute's
    column permuted across cities (counts kept, no longer a function of the country); false
    draws the world and cache key as before the dial existed."""
    from collections import Counter, defaultdict

    from saeravel.tiny_lm import EmbeddedModel
    from saeravel.world import build_city_world

    nested = build_city_world(n_cities=120, seed=0)
    indep = build_city_world(n_cities=120, seed=0, independent=True)
    assert build_city_world(n_cities=120, seed=0, independent=False).entities == nested.entities
    assert nested.entities.keys() == indep.entities.keys()
    for attr in ("Country", "Continent", "Language"):
        column = {e: v[attr] for e, v in indep.entities.items()}
        assert Counter(column.values()) == Counter(v[attr] for v in nested.entities.values())
    assert all(indep.entities[e]["Country"] == v["Country"] for e, v in nested.entities.items())
    for attr in ("Continent", "Language"):
        per_country = defaultdict(set)
        for v in nested.entities.values():
            per_country[v["Country"]].add(v[attr])
        assert all(len(s) == 1 for s in per_country.values())  # nested: a function of Country
        per_country = defaultdict(set)
        for v in indep.entities.values():
            per_country[v["Country"]].add(v[attr])
        assert any(len(s) > 1 for s in per_country.values())
    off = EmbeddedModel(**{**BASE, "independent_attributes": False}).key()
    assert EmbeddedModel(**{**BASE, "n_countries": None}).key() == off
    assert EmbeddedModel(**{**BASE, "independent_attributes": True}).key() != off
