"""RAVEL's interventions at sites inside a block (``site=mlp_out``, ``attn_out``,
``resid_mid``): the suffix runner (training) and the cached decoder (scoring) equal the full
model run with a transformer_lens hook at that site, built here from transformer_lens' own
names (not saeravel's), on tiny random models shaped like GPT-2 (LayerNorm), Gemma-2 (RMS
pre- and post-norms, rotary, attention and output soft-caps) and Pythia (parallel attention
and MLP, no ``resid_mid``)."""

from __future__ import annotations

import random

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities import get_act_name

from saeravel.evals.ravel.decode import CachedDecoder, naive_generate
from saeravel.evals.ravel.intervene import SuffixRunner, naive_logits, resid_at
from saeravel.evals.ravel.prompts import Prompt, pad

from helpers import decode_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, VOCAB, N_LAYERS = 32, 50, 3
SHAPES = {
    "gpt2": {"normalization_type": "LN", "act_fn": "gelu_new"},
    "gemma2": {"normalization_type": "RMS", "act_fn": "gelu", "positional_embedding_type": "rotary",
               "output_logits_soft_cap": 5.0, "attn_scores_soft_cap": 20.0,
               "use_normalization_before_and_after": True},
    "pythia": {"normalization_type": "LN", "act_fn": "gelu", "parallel_attn_mlp": True,
               "positional_embedding_type": "rotary", "rotary_dim": 4},
}  # fmt: skip
CASES = [(shape, site) for shape in SHAPES for site in ("mlp_out", "attn_out", "resid_mid")
         if not (shape == "pythia" and site == "resid_mid")]  # fmt: skip


@pytest.fixture(scope="module")
def models() -> dict[str, HookedTransformer]:
    out = {}
    for i, (name, extra) in enumerate(SHAPES.items()):
        torch.manual_seed(i)
        cfg = HookedTransformerConfig(
            n_layers=N_LAYERS, d_model=D, n_heads=4, d_head=8, d_mlp=64, d_vocab=VOCAB,
            n_ctx=32, device="cpu", **extra,
        )  # fmt: skip
        out[name] = HookedTransformer(cfg).eval()
    return out


def _prompts(seed: int = 0) -> list[Prompt]:
    """Two templates (prefixes); entities of one or two tokens; 0 or 2 tokens after them (the
    entity is then the last token, where a patch in the last block still matters)."""
    rng = random.Random(seed)
    out = []
    for prefix in ([1, 5, 6], [1, 7]):
        for tail_len in (0, 2):
            for _ in range(3):
                ent = [rng.randrange(10, VOCAB) for _ in range(rng.choice([1, 2]))]
                tail = [rng.randrange(10, VOCAB) for _ in range(tail_len)]
                out.append(Prompt("t", "e", "A", prefix + ent + tail, len(prefix),
                                  len(prefix) + len(ent) - 1))  # fmt: skip
    return out


def _hooked(model, prompts: list[Prompt], site: str, layer: int, vectors: torch.Tensor):
    """Logits at every position of the full model with ``vectors`` put at each prompt's entity
    by a transformer_lens hook at ``site`` of block ``layer`` (the reference)."""
    toks, last = pad(prompts, 0, "cpu")
    rows = torch.arange(len(prompts))
    pos = torch.tensor([p.entity_pos for p in prompts])

    def put(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        x[rows, pos] = vectors
        return x

    return model.run_with_hooks(toks, fwd_hooks=[(get_act_name(site, layer), put)]), last


def _greedy(model, prompts: list[Prompt], site: str, layer: int, vectors, n_tokens: int):
    """Greedy continuation by full hooked forwards, one prompt at a time (no padding)."""
    out = []
    for i, p in enumerate(prompts):
        q = Prompt(p.template, p.entity, p.attribute, list(p.tokens), p.entity_start, p.entity_pos)
        for _ in range(n_tokens):
            if vectors is None:
                logits = model(torch.tensor([q.tokens]))[0, -1]
            else:
                logits = _hooked(model, [q], site, layer, vectors[i : i + 1])[0][0, -1]
            q.tokens.append(int(logits.argmax()))
        out.append(q.tokens[len(p.tokens) :])
    return out


@pytest.mark.parametrize(("shape", "site"), CASES)
def test_suffix_runner_equals_a_hook_at_the_site(models, shape, site):
    model = models[shape]
    prompts = _prompts()
    g = torch.Generator().manual_seed(0)
    moved = 0
    for layer in range(N_LAYERS):
        runner = SuffixRunner(model, layer, site=site)
        runner.prepare(prompts)
        for prefix in {p.prefix for p in prompts}:
            batch = [p for p in prompts if p.prefix == prefix]
            v = torch.randn(len(batch), D, generator=g) * 3
            ref, last = _hooked(model, batch, site, layer, v)
            ref = ref[torch.arange(len(batch)), last]
            torch.testing.assert_close(runner.logits(batch, v), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(naive_logits(model, batch, v, layer, site=site), ref,
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
            # the site matters: the same vectors after the block give other logits
            at_resid = naive_logits(model, batch, v, layer)
            moved += int(not torch.allclose(at_resid, ref, atol=1e-3))
    assert moved >= N_LAYERS  # every layer's patch at the site is not the residual's


@pytest.mark.parametrize(("shape", "site"), CASES)
def test_cached_decoder_equals_a_hook_at_the_site(models, shape, site):
    model = models[shape]
    prompts = _prompts(1)
    g = torch.Generator().manual_seed(1)
    n_tokens = 3
    for layer in range(N_LAYERS):
        sets = [torch.randn(len(prompts), D, generator=g) * 3 for _ in range(2)]
        mem = decode_budget(model, layer, prompts, 3, n_tokens, bases=2, site=site)
        dec = CachedDecoder(model, layer, mem, site=site)  # passes of 2 bases x 3 sets
        got = dec.generate(prompts, n_tokens, [sets[0], None, sets[1]])
        for v, fast in zip([sets[0], None, sets[1]], got, strict=True):
            assert fast == _greedy(model, prompts, site, layer, v, n_tokens)
        ref = naive_generate(model, prompts, n_tokens, layer, sets[0], batch_size=5, site=site)
        assert got[0] == ref
        if layer < N_LAYERS - 1:  # the patch changes what is generated
            assert got[0] != got[1] and got[2] != got[1]


def test_gradients_reach_the_vectors_through_a_site_inside_the_block(models):
    model = models["gemma2"]
    prompts = [p for p in _prompts() if p.prefix == (1, 5, 6)]
    runner = SuffixRunner(model, 1, site="attn_out")
    runner.prepare(prompts)
    v = torch.randn(len(prompts), D, requires_grad=True)
    runner.logits(prompts, v).logsumexp(-1).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_mlp_out_patch_is_the_same_change_of_the_residual(models):
    """``hook_mlp_out`` is what the MLP adds to the residual (after Gemma-2's post-MLP norm,
    beside the attention in Pythia): putting v there moves the residual after block L by
    v - mlp_out, the same forward as patching that residual."""
    for shape in ("gpt2", "gemma2", "pythia"):
        model = models[shape]
        prompts = [p for p in _prompts() if p.prefix == (1, 7)]
        layer = 1
        ent = [p.entity_pos for p in prompts]
        mlp = torch.stack([r[e] for r, e in zip(resid_at(model, prompts, layer, site="mlp_out"),
                                                 ent, strict=True)])  # fmt: skip
        post = torch.stack([r[e] for r, e in zip(resid_at(model, prompts, layer), ent,
                                                  strict=True)])  # fmt: skip
        v = torch.randn(len(prompts), D)
        at_mlp = naive_logits(model, prompts, v, layer, site="mlp_out")
        at_resid = naive_logits(model, prompts, post + (v - mlp), layer)
        torch.testing.assert_close(at_mlp, at_resid, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("site", ["resid_post", "mlp_out"])
def test_float32_vectors_on_a_bfloat16_model(site):
    """The vector bank keeps float32 (what the methods train in); on a bfloat16 model (Gemma-2
    on a GPU) the fast paths cast them at the patch, as the reference does."""
    from saeravel.evals.ravel.pairs import VectorBank

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D, n_heads=4, d_head=8, d_mlp=64, d_vocab=VOCAB, n_ctx=32,
        device="cpu", dtype=torch.bfloat16, **SHAPES["gemma2"],
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    prompts = [p for p in _prompts() if p.prefix == (1, 5, 6)]
    bank = VectorBank(model, 0, prompts, 4, site=site)
    v = bank(prompts[::-1])  # other entities' vectors
    assert v.dtype == torch.float32
    runner = SuffixRunner(model, 0, site=site)
    runner.prepare(prompts)
    fast = runner.logits(prompts, v)
    ref, last = _hooked(model, prompts, site, 0, v.to(torch.bfloat16))
    torch.testing.assert_close(fast, ref[torch.arange(len(prompts)), last], atol=0.05, rtol=0.05)
    dec = CachedDecoder(model, 0, 1.0, site=site)
    assert dec.generate(prompts, 2, [v])[0] == naive_generate(model, prompts, 2, 0, v, site=site)
