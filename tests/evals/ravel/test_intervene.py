"""The intervention methods and the fast suffix forward."""

from __future__ import annotations

import random

import pytest
import torch

from saeravel.evals.ravel.intervene import (
    DAS,
    NeuronMask,
    SAEMask,
    SuffixRunner,
    batches_by_prefix,
    naive_logits,
    resid_at,
    temperature,
)
from saeravel.evals.ravel.prompts import bos_id, few_shot_templates, tokenize_prompt
from saeravel.saes.base import SAE, SAEIdentity


def _prompts(tiny_model, templates):
    m = tiny_model.model
    ents = list(tiny_model.world.entities)[:12]
    return [
        tokenize_prompt(m.tokenizer, t, e, "Country", bos_id(m)) for t in templates for e in ents
    ]


@pytest.mark.parametrize("layer", [0, 1])
def test_suffix_runner_equals_full_forward(tiny_model, layer):
    m = tiny_model.model
    world = tiny_model.world
    tmpl = few_shot_templates(world, ["Country"])["Country"]
    prompts = _prompts(tiny_model, [tmpl, "%s lies in the country of", "the country of %s is"])
    runner = SuffixRunner(m, layer)
    runner.prepare(prompts)
    rng = random.Random(0)
    for batch in batches_by_prefix(prompts, lambda p: p.prefix, 5, rng):
        vec = torch.randn(len(batch), m.cfg.d_model)
        fast = runner.logits(batch, vec)
        ref = naive_logits(m, batch, vec, layer)
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_runner_rejects_mixed_prefixes(tiny_model):
    prompts = _prompts(tiny_model, ["%s lies in the country of", "the country of %s is"])
    runner = SuffixRunner(tiny_model.model, 0)
    runner.prepare(prompts)
    with pytest.raises(ValueError, match="share a prefix"):
        runner.logits([prompts[0], prompts[-1]], torch.zeros(2, 64))


def test_entity_position_is_last_entity_token(tiny_model):
    tok = tiny_model.model.tokenizer
    # A two-word entity (unknown words map to <unk> but still get their own tokens).
    p = tokenize_prompt(tok, "the country of %s is", "New Town", "Country", tok.bos_token_id)
    words = ["<bos>", "the", "country", "of", "New", "Town", "is"]
    assert len(p.tokens) == len(words)
    assert (p.entity_start, p.entity_pos) == (4, 5)
    assert p.prefix == tuple(p.tokens[:4])


def test_masks_all_zero_and_all_one():
    b, s = torch.randn(3, 8), torch.randn(3, 8)
    nm = NeuronMask(8)
    nm.mask.param.data.fill_(-5.0)
    nm.mask.hard = True
    torch.testing.assert_close(nm(b, s), b)
    nm.mask.param.data.fill_(5.0)
    torch.testing.assert_close(nm(b, s), s)


def test_das_full_mask_swaps_and_is_orthogonal():
    das = DAS(8, mode="fixed", k=8)
    R = das.rot.weight
    torch.testing.assert_close(R @ R.T, torch.eye(8), atol=1e-5, rtol=1e-5)
    b, s = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(das(b, s), s, atol=1e-5, rtol=1e-5)
    das0 = DAS(8, mode="mask")
    das0.mask.param.data.fill_(-3.0)
    das0.mask.hard = True
    torch.testing.assert_close(das0(b, s), b, atol=1e-5, rtol=1e-5)


def test_sae_mask_uses_each_inputs_normalisation():
    d, n = 6, 12
    g = torch.Generator().manual_seed(1)
    sae = SAE(torch.randn(d, n, generator=g), torch.zeros(n), torch.randn(n, d, generator=g), torch.zeros(d),
              activation="relu", normalize="layer_norm", hook_name="blocks.0.hook_resid_post",
              identity=SAEIdentity("t"))  # fmt: skip
    b, s = torch.randn(4, d) * 3 + 1, torch.randn(4, d)
    m = SAEMask(sae)
    m.mask.hard = True
    m.mask.param.data.fill_(-1.0)  # keep base latents: plain reconstruction of the base
    torch.testing.assert_close(m(b, s), sae.reconstruct(b))
    m.mask.param.data.fill_(1.0)  # all source latents, mapped back with the base's statistics
    zs, _ = sae.normalize(s)
    _, stats_b = sae.normalize(b)
    want = sae.denormalize(sae.decode_normalized(sae.encode_normalized(zs)), stats_b)
    torch.testing.assert_close(m(b, s), want)
    m.add_error = True
    torch.testing.assert_close(m(b, s), want + b - sae.reconstruct(b))


def test_temperature_schedules():
    assert temperature(0, 11, 10, 0.1, "linear") == pytest.approx(10)
    assert temperature(10, 11, 10, 0.1, "linear") == pytest.approx(0.1)
    assert temperature(5, 11, 1, 1e-4, "log") == pytest.approx(1e-2)


def test_resid_at_ignores_padding(tiny_model):
    prompts = _prompts(tiny_model, ["%s lies in the country of"])[:2]
    long = tokenize_prompt(tiny_model.model.tokenizer, "the country of %s is in the country of", "x",
                           "Country", tiny_model.model.tokenizer.bos_token_id)  # fmt: skip
    alone = resid_at(tiny_model.model, prompts, 1)
    mixed = resid_at(tiny_model.model, prompts + [long], 1)
    for a, b in zip(alone, mixed[:2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
