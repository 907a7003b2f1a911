"""Hook names (saeravel.hooks): built with transformer_lens' names, parsed back."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformer_lens.utilities import get_act_name

from saeravel import hooks


def test_names_are_transformer_lens_names() -> None:
    assert hooks.resid_post(5) == "blocks.5.hook_resid_post" == get_act_name("resid_post", 5)
    assert hooks.resid_pre(6) == "blocks.6.hook_resid_pre"
    assert hooks.attn_scores(0) == "blocks.0.attn.hook_attn_scores"
    assert hooks.kv_names(range(1, 3)) == [
        "blocks.1.attn.hook_k",
        "blocks.1.attn.hook_v",
        "blocks.2.attn.hook_k",
        "blocks.2.attn.hook_v",
    ]


def test_names_exist_in_a_model(tiny_model) -> None:
    """Every name built here is a hook point of a real HookedTransformer."""
    points = set(tiny_model.model.hook_dict)
    n = tiny_model.n_layers
    built = [hooks.resid_post(n - 1), hooks.resid_pre(0), hooks.attn_scores(0)]
    built += hooks.kv_names(range(n))
    assert set(built) <= points, set(built) - points


@pytest.mark.parametrize(
    "name,parsed",
    [
        ("blocks.6.hook_resid_pre", (6, "resid_pre")),
        ("blocks.11.hook_resid_post", (11, "resid_post")),
        ("blocks.3.attn.hook_k", (3, "k")),
        ("blocks.2.mlp.hook_post", (2, "post")),
        ("hook_embed", None),
        ("ln_final.hook_normalized", None),
        ("blocks.x.hook_resid_post", None),
    ],
)
def test_parse(name: str, parsed: tuple[int, str] | None) -> None:
    assert hooks.parse(name) == parsed
    if parsed is not None:  # round trip for names without a layer type
        assert get_act_name(parsed[1], parsed[0]) == name


def test_resid_layer() -> None:
    assert hooks.resid_layer("blocks.0.hook_resid_pre", 12) == -1
    assert hooks.resid_layer("blocks.6.hook_resid_pre", 12) == 5
    assert hooks.resid_layer("blocks.11.hook_resid_post", 12) == 11
    assert hooks.resid_layer("blocks.12.hook_resid_pre", 12) is None  # no block 12
    assert hooks.resid_layer("blocks.3.attn.hook_z", 12) is None
    assert hooks.resid_layer("blocks.3.hook_resid_mid", 12) is None
    assert hooks.resid_layer("blocks.3.attn.hook_resid_pre", 12) is None
    assert hooks.resid_layer("blocks.3.hook_resid_pre_768", 12) is None  # an id, not a hook


def test_stop_layer() -> None:
    assert hooks.stop_layer("blocks.0.hook_resid_post") == 1
    assert hooks.stop_layer("blocks.4.attn.hook_k") == 5
    assert hooks.stop_layer("hook_embed") is None
    assert hooks.stop_layer("ln_final.hook_normalized") is None


@pytest.mark.parametrize(
    "name,hook",
    [
        ("blocks.6.hook_resid_pre", "blocks.6.hook_resid_pre"),
        ("blocks.8.hook_resid_pre_768", "blocks.8.hook_resid_pre"),
        ("blocks.12.hook_resid_post__trainer_0", "blocks.12.hook_resid_post"),
        ("blocks.1.hook_resid_mid", "blocks.1.hook_resid_mid"),
        ("blocks.5.hook_mlp_out", "blocks.5.hook_mlp_out"),
        ("blocks.5.hook_attn_out_x", "blocks.5.hook_attn_out"),
        ("blocks.3.attn.hook_z", "blocks.3.attn.hook_z"),  # a module's hook, whole
        ("blocks.8.hook_resid_prefix", None),
        ("blocks.8.hook_resid_pre.x", None),
        ("blocks.8.hook_mlp_in", None),
        ("layer_5/width_16k/canonical", None),
    ],
)
def test_block_hook_prefix(name: str, hook: str | None) -> None:
    assert hooks.block_hook_prefix(name) == hook


@pytest.mark.parametrize("site", hooks.SITES)
def test_site_hooks_round_trip(tiny_model, site: str) -> None:
    """Every site's hook is transformer_lens' name, a hook point of a real model, and parses
    back to (layer, site)."""
    for layer in range(tiny_model.n_layers):
        name = hooks.site_hook(site, layer)
        assert name == get_act_name(site, layer) and name in tiny_model.model.hook_dict
        assert hooks.hook_site(name, tiny_model.n_layers) == (layer, site)
        assert hooks.hook_site(name, layer) is None  # a block the model does not have


def test_hook_site() -> None:
    assert hooks.hook_site("blocks.6.hook_resid_pre") == (5, "resid_post")  # the same tensor
    assert hooks.hook_site("blocks.0.hook_resid_pre") is None  # the embeddings: no layer
    assert hooks.hook_site("blocks.3.attn.hook_z") is None  # not a site
    assert hooks.hook_site("blocks.3.hook_mlp_in") is None
    assert hooks.hook_site("blocks.3.hook_mlp_out_768") is None  # an id, not a hook
    assert hooks.hook_site("hook_embed") is None
    with pytest.raises(ValueError, match="unknown site 'mlp'; valid: resid_post, resid_mid"):
        hooks.site_hook("mlp", 3)


def test_parsing_does_not_import_transformer_lens() -> None:
    """Config checks parse hook names before any model loads; that must stay cheap."""
    code = (
        "import sys; from saeravel import hooks; "
        "hooks.resid_layer('blocks.1.hook_resid_post', 2); hooks.block_hook_prefix('x'); "
        "hooks.hook_site('blocks.1.hook_mlp_out', 2); "
        "hooks.stop_layer('blocks.1.hook_resid_post'); "
        "print('transformer_lens' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
