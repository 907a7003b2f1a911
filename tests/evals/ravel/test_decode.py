"""Cached greedy decoding (RAVEL's scoring) equals the naive full-forward loop token for
token: on the tiny model (local attention), on a rotary model with attention and output
soft-caps (as Gemma-2), and on the planted model; one vector set or several stacked. Passes
sized by the memory budget: one base per pass gives the generations of one pass over all,
the clean caches are dropped after each pass, a budget short of one row is one line."""

from __future__ import annotations

import random

import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.ravel.decode import CachedDecoder, naive_generate
from saeravel.evals.ravel.prompts import Prompt, bos_id, few_shot_templates, tokenize_prompt

from helpers import decode_budget, fast_and_naive_jobs, planted_ravel_job


def _tiny_prompts(tiny_model) -> list[Prompt]:
    m, world = tiny_model.model, tiny_model.world
    ents = list(world.entities)[:10] + ["New Town"]  # a two-token entity: another length
    tmpls = [few_shot_templates(world, ["Country"])["Country"], "the country of %s is"]
    return [tokenize_prompt(m.tokenizer, t, e, "Country", bos_id(m)) for t in tmpls for e in ents]


def _random_prompts(vocab: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    out = []
    for prefix in ([1, 5, 6], [1, 7], []):
        for _ in range(7):
            ent = [rng.randrange(10, vocab) for _ in range(rng.choice([1, 2]))]
            tail = [rng.randrange(10, vocab) for _ in range(rng.choice([1, 3]))]
            out.append(Prompt("t", "e", "A", prefix + ent + tail, len(prefix),
                              len(prefix) + len(ent) - 1))  # fmt: skip
    return out


def _check(
    model, prompts: list[Prompt], layers: list[int], scale: float, n_tokens: int = 3,
    must_differ: bool = True,
) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        vecs = [torch.randn(len(prompts), model.cfg.d_model, generator=g) * scale for _ in range(3)]
        mem = decode_budget(model, layer, prompts, 4, n_tokens, bases=3)
        dec = CachedDecoder(model, layer, mem)  # several passes per group
        got = dec.generate(prompts, n_tokens, [*vecs, None])
        for v, fast in zip([*vecs, None], got, strict=True):
            ref = naive_generate(model, prompts, n_tokens, layer, v, batch_size=5)
            assert fast == ref
        # one set at a time (other batch shapes) gives the same tokens
        assert dec.generate(prompts, n_tokens, [vecs[0]])[0] == got[0]
        if must_differ and layer < model.cfg.n_layers - 1:  # the patch changes the tokens
            assert got[0] != got[-1] and got[0] != got[1]


def test_cached_decoding_equals_naive_on_tiny_model(tiny_model):
    # untrained: its greedy tokens hardly depend on the patch (the other models' tests do)
    _check(tiny_model.model, _tiny_prompts(tiny_model), [0, 1], scale=30.0, must_differ=False)


def test_cached_decoding_equals_naive_with_soft_caps_and_rotary(capped_rotary):
    _check(capped_rotary, _random_prompts(50, 0), [0, 1, 2], scale=3.0, n_tokens=4)


def test_cached_decoding_equals_naive_on_gpt2_shaped_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=60, n_ctx=32,
        act_fn="gelu_new", normalization_type="LN", device="cpu",
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()
    _check(model, _random_prompts(60, 1), [0, 2], scale=3.0)


def test_cached_decoding_equals_naive_on_planted_model():
    from saeravel.planted import PlantedModel

    lm = PlantedModel("planted-city-lm", n_layers=2, d_model=48, default_layer=0, n_entities=60,
                      n_country=10, n_continent=4, n_language=6, id_dims=6, site_layer=0,
                      device="cpu").load()  # fmt: skip
    m, world = lm.model, lm.world
    attrs = list(world.templates)[:2]
    tmpls = few_shot_templates(world, attrs)
    ents = sorted(world.entities)[:12]
    prompts = [tokenize_prompt(m.tokenizer, tmpls[a], e, a, bos_id(m)) for a in attrs for e in ents]
    _check(m, prompts, [0], scale=1.0)


def _gpt2_shaped(n_layers: int = 3):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=60, n_ctx=32,
        act_fn="gelu_new", normalization_type="LN", device="cpu",
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def test_a_budget_of_one_base_per_pass_gives_the_generations_of_one_pass():
    """The budget sets how many rows share a pass, never what a row computes: passes of one
    base (the smallest budget that fits) give exactly the tokens of one pass per group, and
    the decoder keeps no clean cache between passes (only one prefix row per template)."""
    model, n_tokens = _gpt2_shaped(), 4
    prompts = _random_prompts(60, 1) + _random_prompts(60, 2)
    g = torch.Generator().manual_seed(0)
    for layer in (0, 2):
        sets = [torch.randn(len(prompts), 32, generator=g) * 3 for _ in range(3)] + [None]
        small = CachedDecoder(model, layer, decode_budget(model, layer, prompts, 4, n_tokens, 1))
        big = CachedDecoder(model, layer, 100.0)
        got = small.generate(prompts, n_tokens, sets)
        assert got == big.generate(prompts, n_tokens, sets)
        # one base x four sets in the longest prompts' passes (two in the shorter ones')
        assert small.peak_rows <= 8
        assert big.peak_rows == 4 * max(
            sum((q.prefix, len(q.tokens)) == (p.prefix, len(p.tokens)) for q in prompts)
            for p in prompts
        )
        assert got == [naive_generate(model, prompts, n_tokens, layer, v) for v in sets]
        # dropping the clean caches: the same decoder gives the same tokens again, and keeps
        # only the prefix keys/values (one row per template) between calls
        assert small.generate(prompts, n_tokens, sets) == got
        assert set(vars(small)) == set(vars(big))
        assert {k.shape[0] for kv in small.prefix_kv.values() for kk in kv for k in kk} == {1}


def test_a_budget_short_of_one_row_is_one_line():
    model = _gpt2_shaped()
    prompts = _random_prompts(60, 1)
    mem = decode_budget(model, 1, prompts, 2, 3, bases=1)
    with pytest.raises(
        UserError, match=r"eval.decode_mem_gb=.* is too small for one decoding row"
    ) as e:
        CachedDecoder(model, 1, mem * 0.5).generate(prompts, 3, [None, None])
    assert "\n" not in str(e.value)


def test_eval_scores_equal_with_and_without_caches(tmp_path):
    """``eval.fast=false`` (full forwards for training and scoring) is the reference: the
    whole job's scores are the same through the caches."""
    fast, naive = fast_and_naive_jobs(tmp_path, "cpu")
    assert fast["ravel"]["das"]["Country"]["cause"] > 0  # something was transferred
    # The references are decoded from identical vectors: equal exactly. A trained method's
    # training sees logits from two float paths (suffix cache vs full forward), so its mask may
    # differ in a near-tied entry (boundless_das's boundary, lr x10, did); sae_probe and fixed
    # swap a subset of the planted SAE's value latents, and when neither the base's nor the
    # source's value latent is in it every value's logit is exactly 0: the argmax is float
    # rounding's choice in either path. Those agree within a pair or two.
    assert fast["baselines"] == naive["baselines"]
    for name, by_attr in fast["ravel"].items():
        for attr, a in by_attr.items():
            b = naive["ravel"][name][attr]
            assert a.get("selection", {}).get("latents") == b.get("selection", {}).get("latents")
            assert abs(a["disentangle"] - b["disentangle"]) <= 0.02, (name, attr)
    same = [n for n in ("sae", "neurons", "das") if fast["ravel"][n] == naive["ravel"][n]]
    assert len(same) >= 2, same  # most trained methods come out bit-identical


def test_eval_scores_equal_under_a_tiny_decoding_budget(tmp_path):
    """eval.decode_mem_gb=0.0003 decodes 4 to 5 rows per pass on this model (one base per pass
    when five vector sets are stacked), the default one pass per group: the knowledge filter,
    the references and sae_probe's selection and scores are identical."""
    big = planted_ravel_job(tmp_path, "big")
    tiny = planted_ravel_job(tmp_path, "tiny", "eval.decode_mem_gb=0.0003")
    assert big["ravel"]["sae_probe"]["Country"]["cause"] > 0.5  # something was transferred
    assert tiny == big
