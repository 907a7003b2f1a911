"""The activation helpers every eval shares (saeravel/activations.py): special tokens, hook
activations, SAE latents (one encoder pass), firing counts, pooled text features and the
decoder space, on the tiny untrained model and hand-made SAEs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saeravel.activations import (
    counted_mask,
    encode_latents,
    hook_activations,
    latent_firing_counts,
    latents_and_reconstruction,
    model_space_latents,
    pooled_text_features,
    require_decoder,
    special_token_ids,
)
from saeravel.errors import UserError
from saeravel.saes.base import SAE, SAEIdentity

from helpers import HOOK0, D, identity_sae

HOOK1 = "blocks.1.hook_resid_post"


def test_special_tokens_and_the_counted_mask():
    tok = SimpleNamespace(bos_token_id=1, eos_token_id=1, pad_token_id=0, sep_token_id=None)
    assert special_token_ids(tok) == [0, 1] and special_token_ids(None) == []
    tokens = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]])
    assert counted_mask(tokens, [0, 1]).tolist() == [
        [False, True, True, False],
        [False, True, False, False],
    ]
    assert counted_mask(tokens, []).all()


@pytest.mark.parametrize("hook", [HOOK0, HOOK1])
def test_hook_activations_equal_a_full_forward_pass(tiny_model, hook):
    """Only the blocks up to the hook run; the activation is the full pass's."""
    tokens = torch.randint(
        0, tiny_model.model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0)
    )
    _, cache = tiny_model.model.run_with_cache(tokens)
    torch.testing.assert_close(hook_activations(tiny_model.model, hook, tokens), cache[hook])


def test_one_encoder_pass_equals_public_api():
    g = torch.Generator().manual_seed(5)
    sae = SAE(
        torch.randn(D, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, D, generator=g),
        torch.randn(D, generator=g), hook_name=HOOK0, identity=SAEIdentity("t"),
        normalize="layer_norm", activation="topk", k=5,
    )  # fmt: skip
    x = 3 + 2 * torch.randn(3, 7, D, generator=g)
    f, x_hat = latents_and_reconstruction(sae, x)
    assert torch.allclose(f, sae.encode(x)) and torch.allclose(x_hat, sae.reconstruct(x))


def test_latents_are_computed_in_the_saes_dtype():
    sae = identity_sae().to(torch.float64)
    f = encode_latents(sae, torch.randn(2, D))
    assert f.dtype == torch.float64


def test_firing_counts_skip_special_tokens(tiny_model):
    """Identity SAE: latent i fires where x_i > 0, latent D + i where x_i < 0; specials and
    the tokens they mask are not counted."""
    model = tiny_model.model
    tokens = torch.randint(2, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0
    counts, n = latent_firing_counts(model, identity_sae(), HOOK0, [tokens], special_ids=[0])
    x = hook_activations(model, HOOK0, tokens)[:, 1:].reshape(-1, D)
    assert n == 8
    want = torch.cat([(x > 0).sum(0), (x < 0).sum(0)]).double()
    torch.testing.assert_close(counts, want)


def test_pooled_text_features_average_the_counted_tokens(tiny_model):
    city = sorted(tiny_model.world.entities)[0]
    texts = [f"{city} is in", f"{city} is in the country of"]
    resid, lat = pooled_text_features(tiny_model.model, identity_sae(), HOOK0, texts, 12, 1)
    assert resid.shape == (2, D) and lat.shape == (2, 2 * D)
    # the identity SAE's pooled latents: mean relu(x), relu(-x); their difference is mean x
    np.testing.assert_allclose(lat[:, :D] - lat[:, D:], resid, atol=1e-5)
    again, _ = pooled_text_features(tiny_model.model, identity_sae(), HOOK0, texts, 12, 2)
    np.testing.assert_allclose(again, resid, atol=1e-5)  # padding is not counted


def test_decoder_space():
    sae = identity_sae()
    w = require_decoder(sae, "scr")
    assert w.dtype == np.float64 and w.shape == (2 * D, D)
    with pytest.raises(UserError, match="eval=scr needs an SAE"):
        require_decoder(None, "scr")
    no_decoder = SimpleNamespace(W_dec=None, identity=SAEIdentity("custom"))
    with pytest.raises(UserError, match="needs an SAE with a decoder matrix W_dec"):
        require_decoder(no_decoder, "tpp")
    x = np.random.default_rng(0).normal(size=(3, D)).astype(np.float32)
    f = sae.encode(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(model_space_latents(sae, x, f), f)  # no normalisation: unchanged
