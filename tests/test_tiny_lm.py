"""The embedded model's architecture options (tiny sizes; the trained default is covered by
the end-to-end tests)."""

from __future__ import annotations

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
