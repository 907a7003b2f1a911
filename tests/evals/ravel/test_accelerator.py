"""The cached paths equal the full-forward references on an accelerator, in float32 and
bfloat16, on a GPT-2-shaped model (12 layers, d_model 768, vocab 50257, random weights).

Run by ``scripts/gpu_check.sh`` (``SAERAVEL_TEST_DEVICE=cuda``, the default); skipped where the
device is absent, so CI and the fast tier never run them. ``SAERAVEL_TEST_DEVICE=cpu`` runs them
here on a smaller model (a check of the checks).

float32: the suffix runner's logits equal the full forward's to 1e-4 (relative to their
scale) and the cached greedy tokens equal the full-forward loop's. bfloat16: the two paths round
differently (other kernels for other shapes), so logits agree to bfloat16 rounding (3% of their
scale) and a first greedy token must agree wherever the reference's top-2 margin exceeds
twice the two paths' measured logit difference.
"""

from __future__ import annotations

import os

import pytest
import torch

from saeravel.evals.ravel.decode import CachedDecoder, naive_generate
from saeravel.evals.ravel.intervene import SuffixRunner, naive_logits
from saeravel.evals.ravel.prompts import Prompt

from helpers import fast_and_naive_jobs

DEVICE = os.environ.get("SAERAVEL_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device"
    ),
]
DTYPES = {"float32": (torch.float32, 1e-4), "bfloat16": (torch.bfloat16, 3e-2)}


def _model(dtype: torch.dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    big = DEVICE.startswith("cuda")
    d, layers, vocab = (768, 12, 50257) if big else (64, 4, 1000)
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=layers, d_model=d, n_heads=12 if big else 4, d_head=64 if big else 16,
        d_mlp=4 * d, d_vocab=vocab, n_ctx=1024, act_fn="gelu_new", normalization_type="LN",
        device=DEVICE, dtype=dtype,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def _prompts(vocab: int, n: int = 16, ctx: int = 60, tail: int = 8) -> list[Prompt]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, vocab, (ctx - tail,), generator=g).tolist()
    rest = torch.randint(1, vocab, (tail - 1,), generator=g).tolist()
    ents = torch.randint(1, vocab, (n,), generator=g).tolist()
    return [Prompt("t", "e", "A", prefix + [e] + rest, len(prefix), len(prefix)) for e in ents]


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("layer", [1, 5, 9])
def test_suffix_runner_logits_equal_full_forward(name, layer):
    dtype, tol = DTYPES[name]
    model = _model(dtype)
    layer = min(layer, model.cfg.n_layers - 2)
    prompts = _prompts(model.cfg.d_vocab)
    g = torch.Generator().manual_seed(2)
    vecs = torch.randn(len(prompts), model.cfg.d_model, generator=g).to(DEVICE) * 3
    runner = SuffixRunner(model, layer)
    runner.prepare(prompts)
    with torch.no_grad():
        fast = runner.logits(prompts, vecs).float()
        ref = naive_logits(model, prompts, vecs, layer).float()
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= tol * scale, (name, layer)
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= (1.0 if name == "float32" else 0.9)


@pytest.mark.parametrize("name", list(DTYPES))
def test_cached_decoding_equals_full_forward_loop(name):
    dtype, tol = DTYPES[name]
    model = _model(dtype)
    layer = min(5, model.cfg.n_layers - 2)
    prompts = _prompts(model.cfg.d_vocab)
    g = torch.Generator().manual_seed(3)
    vecs = [torch.randn(len(prompts), model.cfg.d_model, generator=g).to(DEVICE) * 3,
            None]  # fmt: skip
    got = CachedDecoder(model, layer).generate(prompts, 3, vecs)
    for v, fast in zip(vecs, got, strict=True):
        ref = naive_generate(model, prompts, 3, layer, v)
        if name == "float32":
            assert fast == ref
            continue
        # bfloat16: a first token may differ only where the reference's top-2 margin is
        # within the two paths' rounding difference (measured: the suffix runner computes the
        # decoder's first step)
        toks = torch.tensor([p.tokens for p in prompts], device=DEVICE)
        with torch.no_grad():
            if v is None:
                ref_logits = model(toks)[:, -1].float()
                err = torch.zeros(())
            else:
                ref_logits = naive_logits(model, prompts, v, layer).float()
                runner = SuffixRunner(model, layer)
                runner.prepare(prompts)
                err = (runner.logits(prompts, v).float() - ref_logits).abs().max()
        top = ref_logits.topk(2, -1).values
        sure = (top[:, 0] - top[:, 1]) > 2 * err
        for i in torch.nonzero(sure).flatten().tolist():
            assert fast[i][0] == ref[i][0], (name, i)
        assert sure.any()  # the check is not vacuous


def test_whole_job_scores_equal_with_and_without_caches(tmp_path):
    """The whole planted job (every method) on the device: ``eval.fast=true`` vs ``false``,
    float32 (the CPU test's tolerances: tests/evals/ravel/test_decode.py)."""
    fast, naive = fast_and_naive_jobs(tmp_path, DEVICE)
    assert fast["baselines"] == naive["baselines"]
    for name, by_attr in fast["ravel"].items():
        for attr, a in by_attr.items():
            assert abs(a["disentangle"] - naive["ravel"][name][attr]["disentangle"]) <= 0.02
