"""sae=sae_lens and the catalogue families: the conversion equals sae_lens' own maths, the
ids come from sae_lens' pretrained directory, regexes resolve to one SAE, errors are one line."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sae_lens
import torch
from saes_helpers import (
    ATOL,
    D_IN,
    D_SAE,
    HOOK,
    IDENT,
    K,
    assert_matches_sae_lens,
    inputs,
    make_sae_lens,
    sae_yamls,
)

from saeravel import hooks
from saeravel.errors import UserError
from saeravel.hooks import resid_layer
from saeravel.saes.base import SAEIdentity
from saeravel.saes.formats import from_sae_lens
from saeravel.saes.sae_lens import (
    SaeLensSource,
    hook_of_sae_id,
    release_layers,
    release_sites,
    resolve_sae_lens_id,
)

# ----------------------------------------------------------------------------- sae_lens


@pytest.mark.parametrize(
    "arch,cfg",
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("standard", {"normalize_activations": "layer_norm"}),
        ("topk", {}),
        ("topk", {"normalize_activations": "layer_norm"}),
        ("topk", {"rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
    ],
)
def test_from_sae_lens_matches_sae_lens(arch: str, cfg: dict[str, Any]) -> None:
    theirs = make_sae_lens(arch, **cfg)
    ours = from_sae_lens(theirs, IDENT)
    # inputs off-centre and small-spread, so layer-norm statistics matter
    f = assert_matches_sae_lens(ours, theirs, inputs(scale=0.7, shift=0.4))
    assert ours.hook_name == HOOK
    assert ours.apply_b_dec_to_input == cfg.get("apply_b_dec_to_input", True)
    assert ours.normalize_mode == cfg.get("normalize_activations", "none")
    if arch == "topk":
        assert ours.activation == "topk" and ours.k == K
        assert int((f != 0).sum(-1).max()) <= K
    if arch == "jumprelu":
        assert (theirs.threshold < 0).any()  # the clamp at 0 is exercised
        assert ours.activation == "jumprelu" and (ours.threshold >= 0).all()


def test_from_sae_lens_does_not_modify_the_sae_lens_sae() -> None:
    theirs = make_sae_lens("topk", rescale_acts_by_decoder_norm=True)
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    from_sae_lens(theirs, IDENT)
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_expected_average_scaling_factor_is_folded() -> None:
    # the one release in sae_lens' directory with a scaling factor for this id
    release, sae_id = "gpt2-small-mlp-tm", "blocks.0.hook_mlp_out"
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    scale = get_norm_scaling_factor(release, sae_id)
    assert scale is not None and scale != 1.0
    theirs = make_sae_lens("standard", normalize_activations="expected_average_only_in")
    ours = from_sae_lens(theirs, SAEIdentity(family="t", release=release, sae_id=sae_id))
    assert ours.normalize_mode == "none"
    x = inputs()
    with torch.no_grad():  # the SAE was trained on scale * x; sae_lens leaves scaling to us
        f_ref = theirs.encode(x * scale)
        x_ref = theirs.decode(f_ref) / scale
        torch.testing.assert_close(ours.encode(x), f_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.reconstruct(x), x_ref, atol=ATOL, rtol=0)

    with pytest.raises(UserError, match="dataset-wide factor"):
        from_sae_lens(theirs, IDENT)  # no release/id: factor unknown


def test_unsupported_sae_lens_settings_are_user_errors() -> None:
    theirs = make_sae_lens("standard", normalize_activations="constant_norm_rescale")
    with pytest.raises(UserError, match="constant_norm_rescale"):
        from_sae_lens(theirs, IDENT)
    gated = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    gated.cfg.metadata.hook_name = HOOK
    with pytest.raises(UserError, match="architecture 'gated'"):
        from_sae_lens(gated, IDENT)
    no_hook = make_sae_lens("standard")
    no_hook.cfg.metadata.hook_name = None
    with pytest.raises(UserError, match="hook"):
        from_sae_lens(no_hook, IDENT)


def test_layer_norm_undoes_with_the_bare_std() -> None:
    """OpenAI and sae_lens divide by std + eps but multiply back by std."""
    sae = from_sae_lens(make_sae_lens("topk", normalize_activations="layer_norm"), IDENT)
    x = inputs(scale=1e-4, shift=2.0)  # tiny spread: std and std + eps differ by 10 %
    xn, (mu, std) = sae.normalize(x)
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(std, centred.std(-1, keepdim=True))
    torch.testing.assert_close(xn, centred / (centred.std(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(sae.denormalize(xn, (mu, std)), mu + xn * std)


# ----------------------------------------------------------------------------- catalogues


# The ids conf/sae/{jbloom,openai_v5_32k,openai_v5_128k}.yaml listed by hand (sae_ids) before
# sae_lens' directory gave them: reference data, layer L -> sae_lens id.
HAND_COPIED = {
    "jbloom": ("gpt2-small-res-jb", {
        0: "blocks.1.hook_resid_pre", 1: "blocks.2.hook_resid_pre", 2: "blocks.3.hook_resid_pre",
        3: "blocks.4.hook_resid_pre", 4: "blocks.5.hook_resid_pre", 5: "blocks.6.hook_resid_pre",
        6: "blocks.7.hook_resid_pre", 7: "blocks.8.hook_resid_pre", 8: "blocks.9.hook_resid_pre",
        9: "blocks.10.hook_resid_pre", 10: "blocks.11.hook_resid_pre",
        11: "blocks.11.hook_resid_post",
    }),
    "openai_v5_32k": ("gpt2-small-resid-post-v5-32k", {
        0: "blocks.0.hook_resid_post", 1: "blocks.1.hook_resid_post",
        2: "blocks.2.hook_resid_post", 3: "blocks.3.hook_resid_post",
        4: "blocks.4.hook_resid_post", 5: "blocks.5.hook_resid_post",
        6: "blocks.6.hook_resid_post", 7: "blocks.7.hook_resid_post",
        8: "blocks.8.hook_resid_post", 9: "blocks.9.hook_resid_post",
        10: "blocks.10.hook_resid_post", 11: "blocks.11.hook_resid_post",
    }),
    "openai_v5_128k": ("gpt2-small-resid-post-v5-128k", {
        0: "blocks.0.hook_resid_post", 1: "blocks.1.hook_resid_post",
        2: "blocks.2.hook_resid_post", 3: "blocks.3.hook_resid_post",
        4: "blocks.4.hook_resid_post", 5: "blocks.5.hook_resid_post",
        6: "blocks.6.hook_resid_post", 7: "blocks.7.hook_resid_post",
        8: "blocks.8.hook_resid_post", 9: "blocks.9.hook_resid_post",
        10: "blocks.10.hook_resid_post", 11: "blocks.11.hook_resid_post",
    }),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(HAND_COPIED))
def test_catalogue_ids_equal_the_hand_copied_ones(family: str) -> None:
    """Each layer's id, derived from sae_lens' directory, is the one the YAML listed."""
    release, ids = HAND_COPIED[family]
    cfg = sae_yamls()[family]
    assert re.fullmatch(cfg.release, release) and "sae_ids" not in cfg
    assert release_layers(release) == release_layers(cfg.release) == sorted(ids) == list(range(12))
    for layer, sae_id in ids.items():
        assert resolve_sae_lens_id(cfg.release, None, layer) == (release, sae_id)
        assert SaeLensSource(family, layer, cfg.release).resolve() == (release, sae_id)
        assert resid_layer(sae_id, 12) == layer
    assert sum(len(i) for _, i in HAND_COPIED.values()) == 36


@pytest.mark.parametrize("family", sorted(HAND_COPIED))
def test_catalogue_missing_layer(family: str) -> None:
    """The same one line as when the layers were listed in the YAML, before any loading."""
    cfg = sae_yamls()[family]
    with pytest.raises(UserError) as info:
        SaeLensSource(family, 12, cfg.release)
    layers = ", ".join(str(L) for L in range(12))
    assert str(info.value) == f"family {family} has no SAE for layer 12; layers: {layers}"


def test_release_layers_of_a_regex_or_an_unnamed_release() -> None:
    assert release_layers("gpt2-small-res-j.") == list(range(12))  # its releases' layers
    assert release_layers("gpt2-(") == []  # an invalid regex: resolution names it
    directory = {"r": SimpleNamespace(saes_map={"width_1k": "x"}, config_overrides=None)}
    assert release_layers("r", directory) == []  # ids that do not name their hook
    assert release_sites("r", directory) == {}
    with pytest.raises(UserError) as info:
        SaeLensSource("sae_lens", 12, "gpt2-small-res-j.")
    layers = ", ".join(str(L) for L in range(12))
    assert str(info.value) == f"family sae_lens has no SAE for layer 12; layers: {layers}"


@pytest.mark.parametrize("family", ["openai_v5_32k", "openai_v5_128k"])
@pytest.mark.parametrize(
    ("site", "kind"),
    [("resid_post", "resid-post"), ("resid_mid", "resid-mid"), ("mlp_out", "mlp-out"),
     ("attn_out", "attn-out")],
)  # fmt: skip
def test_openai_families_pick_the_release_of_the_site(family: str, site: str, kind: str) -> None:
    """One family, OpenAI's four v5 releases: the site picks the release, the layer the id."""
    cfg = sae_yamls()[family]
    width = family.rsplit("_", 1)[1]
    assert release_sites(cfg.release) == {s: list(range(12)) for s in hooks.SITES}
    for layer in (0, 5, 11):
        src = SaeLensSource(family, layer, cfg.release, site=site)
        want = (f"gpt2-small-{kind}-v5-{width}", hooks.site_hook(site, layer))
        assert src.resolve() == want
    with pytest.raises(UserError) as info:
        SaeLensSource(family, 12, cfg.release, site=site)
    at = "" if site == "resid_post" else f" at site={site}"
    assert str(info.value).startswith(f"family {family} has no SAE for layer 12{at}; layers: 0, 1")


def test_a_site_the_release_lacks_names_its_sites() -> None:
    """Before sites, an MLP-out release was refused as if its ids did not name their hook."""
    cfg = sae_yamls()["jbloom"]
    with pytest.raises(UserError) as info:
        SaeLensSource("jbloom", 5, cfg.release, site="mlp_out")
    assert str(info.value) == "family jbloom has no SAE at site=mlp_out; sites: resid_post"
    with pytest.raises(UserError) as info:
        SaeLensSource("sae_lens", 5, "gpt2-small-mlp-out-v5-32k")  # site=resid_post
    assert str(info.value) == "family sae_lens has no SAE at site=resid_post; sites: mlp_out"
    src = SaeLensSource("sae_lens", 5, "gpt2-small-mlp-out-v5-32k", site="mlp_out")
    assert src.resolve() == ("gpt2-small-mlp-out-v5-32k", "blocks.5.hook_mlp_out")
    with pytest.raises(UserError, match="unknown site 'mlp'; valid: resid_post, resid_mid"):
        SaeLensSource("sae_lens", 5, "gpt2-small-mlp-out-v5-32k", site="mlp")


# ----------------------------------------------------------------------------- regexes


def test_regex_resolution_against_sae_lens_directory() -> None:
    assert resolve_sae_lens_id("gpt2-small-res-jb", r"blocks\.6\.hook_resid_pre", 5) == (
        "gpt2-small-res-jb",
        "blocks.6.hook_resid_pre",
    )
    # no id: the one whose hook is the residual after block `layer`
    assert resolve_sae_lens_id("gpt2-small-res-jb", None, 5)[1] == "blocks.6.hook_resid_pre"
    assert resolve_sae_lens_id("gpt2-small-res-jb", None, 11)[1] == "blocks.11.hook_resid_post"
    assert resolve_sae_lens_id(r"gpt2-small-res_sle-.*", None, 9) == (
        "gpt2-small-res_sle-ajt",
        "blocks.10.hook_resid_pre",
    )
    src = SaeLensSource("sae_lens", 5, "gpt2-small-resid-post-v5-32k")
    assert src.resolve() == ("gpt2-small-resid-post-v5-32k", "blocks.5.hook_resid_post")

    with pytest.raises(UserError, match="SAEs match") as info:
        resolve_sae_lens_id("gpt2-small-res.*", None, 5)
    assert "gpt2-small-res-jb blocks.6.hook_resid_pre" in str(info.value)
    with pytest.raises(UserError, match="no sae_lens release matches 'gpt2-smal-res-jb'") as info:
        resolve_sae_lens_id("gpt2-smal-res-jb", None, 5)
    assert "gpt2-small-res-jb" in str(info.value)  # a close name is suggested
    with pytest.raises(UserError, match="matches sae_id='nothing'"):
        resolve_sae_lens_id("gpt2-small-res-jb", "nothing", 5)
    with pytest.raises(UserError, match="do not name their hook"):
        resolve_sae_lens_id("gemma-scope-2b-pt-res-canonical", None, 5)
    with pytest.raises(UserError, match="invalid regex"):
        resolve_sae_lens_id("gpt2-(", None, 5)


def test_regex_resolution_uses_release_hook_override() -> None:
    def lookup(ids: list[str], overrides: dict[str, Any] | None = None) -> Any:
        return SimpleNamespace(saes_map={i: i for i in ids}, config_overrides=overrides)

    directory = {
        "rel-a": lookup(["width_1k", "width_2k"], {"hook_name": "blocks.4.hook_resid_post"}),
        "rel-b": lookup(["blocks.2.hook_resid_post__trainer_0", "blocks.2.hook_mlp_out"]),
    }
    with pytest.raises(UserError, match="2 SAEs match"):
        resolve_sae_lens_id("rel-a", None, 4, directory)
    assert resolve_sae_lens_id("rel-a", "width_2k", 4, directory) == ("rel-a", "width_2k")
    assert resolve_sae_lens_id("rel-.*", None, 2, directory) == (
        "rel-b",
        "blocks.2.hook_resid_post__trainer_0",
    )
    assert resolve_sae_lens_id("rel-.*", None, 2, directory, site="mlp_out") == (
        "rel-b",
        "blocks.2.hook_mlp_out",
    )
    with pytest.raises(UserError, match="matches attn_out of block 2"):
        resolve_sae_lens_id("rel-b", None, 2, directory, site="attn_out")
    assert hook_of_sae_id("blocks.8.hook_resid_pre_768") == "blocks.8.hook_resid_pre"
    assert hook_of_sae_id("blocks.1.hook_resid_mid") == "blocks.1.hook_resid_mid"
    assert hook_of_sae_id("layer_1/width_16k/canonical") is None


def test_offline_hub_load_is_a_quick_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline_before = hub_constants.HF_HUB_OFFLINE
    cfg = sae_yamls()["jbloom"]
    src = SaeLensSource("jbloom", 5, cfg.release)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        src.required_model_kwargs()
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "gpt2-small-res-jb / blocks.6.hook_resid_pre" in msg
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert hub_constants.HF_HUB_OFFLINE == offline_before  # restored


def test_sae_lens_identity_keeps_the_neuronpedia_id() -> None:
    from saeravel.saes.sae_lens import directory_neuronpedia_id

    assert directory_neuronpedia_id("gpt2-small-res-jb", "blocks.6.hook_resid_pre") == (
        "gpt2-small/6-res-jb"
    )
    assert directory_neuronpedia_id("gpt2-small-res-jb", "nope") is None
    theirs = make_sae_lens("standard", meta={"neuronpedia_id": "gpt2-small/3-res-test"})
    ours = from_sae_lens(theirs, SAEIdentity(family="t"))
    assert ours.identity.neuronpedia_id == "gpt2-small/3-res-test"
    assert ours.cfg_dict["neuronpedia_id"] == "gpt2-small/3-res-test"
    given = SAEIdentity(family="t", neuronpedia_id="from-directory")
    assert from_sae_lens(theirs, given).identity.neuronpedia_id == "from-directory"
