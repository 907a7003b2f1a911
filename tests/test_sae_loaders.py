"""SAE loaders: each family's conversion equals its reference maths; catalogues and errors.

No network: sae_lens SAEs are built in-process, OpenAI and Apollo files are written to
``tmp_path`` in their real formats, and wandb is replaced by a fake reading a local folder.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from saeravel.errors import UserError
from saeravel.saes.base import SAE, SAEIdentity, resid_layer_of_hook
from saeravel.saes.loaders import (
    ApolloWandbSource,
    CustomSource,
    LocalSource,
    NoSource,
    SaeLensSource,
    from_sae_lens,
    hook_of_sae_id,
    resolve_sae_lens_id,
)

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

CONF_SAE = Path(__file__).resolve().parents[1] / "conf" / "sae"
D_IN, D_SAE, K = 64, 128, 8
HOOK = "blocks.3.hook_resid_post"
ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers


def make_sae_lens(arch: str, *, seed: int = 0, meta: dict[str, Any] | None = None, **cfg: Any):
    """An sae_lens inference SAE with random weights (and thresholds of both signs)."""
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
    }
    sae_cls, cfg_cls = classes[arch]
    if arch == "topk":
        cfg.setdefault("k", K)
    metadata = SAEMetadata(hook_name=HOOK, **(meta or {}))
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=metadata, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.5)
        sae.b_dec.copy_(0.2 * torch.randn(D_IN, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 1.5 - 0.5)
    return sae


def inputs(n: int = 32, seed: int = 1, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * scale + shift


def assert_matches_sae_lens(ours: SAE, theirs: Any, x: torch.Tensor) -> torch.Tensor:
    """Latents and reconstruction equal sae_lens' own encode/decode; returns the latents."""
    with torch.no_grad():
        f_ref = theirs.encode(x)
        x_ref = theirs.decode(f_ref)  # decode right after encode: sae_lens keeps LN stats
        f = ours.encode(x)
        x_hat = ours.reconstruct(x)
    torch.testing.assert_close(f, f_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(x_hat, x_ref, atol=ATOL, rtol=0)
    active = (f != 0).float().sum(-1)
    assert 0 < active.mean() < D_SAE  # a sparse, non-trivial code: the test can fail
    return f


IDENT = SAEIdentity(family="test")


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


# ----------------------------------------------------------------------------- local: sae_lens


@pytest.mark.filterwarnings(r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs")
def test_local_sae_lens_directory_round_trip(tmp_path: Path) -> None:
    theirs = make_sae_lens(
        "jumprelu", meta={"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    )
    theirs.save_model(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {
        "cfg.json",
        "sae_weights.safetensors",
    }
    src = LocalSource(family="local", layer=3, path=str(tmp_path / "saved"))
    assert src.required_model_kwargs() == {"center_writing_weights": True}
    ours = src.load(None)
    assert ours.identity.path == str(tmp_path / "saved")
    assert ours.model_from_pretrained_kwargs == {"center_writing_weights": True}
    assert_matches_sae_lens(ours, theirs, inputs())

    wrong = LocalSource(family="local", layer=3, path=str(tmp_path / "saved"), hook_name="x")
    with pytest.raises(UserError, match="trained on blocks.3.hook_resid_post"):
        wrong.load(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a saved sae_lens SAE"):
        LocalSource(family="local", layer=3, path=str(tmp_path / "empty")).load(None)


# ----------------------------------------------------------------------------- local: OpenAI


def openai_state_dict(activation: str, seed: int = 0, flat: bool = False) -> dict[str, Any]:
    """The keys and value types of OpenAI's ``Autoencoder.state_dict()``."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {
        "pre_bias": 0.1 * torch.randn(D_IN, generator=g),
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
        "latent_bias": 0.1 * torch.randn(D_SAE, generator=g),
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 3.0,
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.ones(D_SAE),
        "latents_mean_square": torch.zeros(D_SAE),
        "activation": activation,
    }
    if activation == "TopK":
        if flat:
            sd["activation_state_dict.k"] = K
            sd["activation_state_dict.postact_fn"] = "ReLU"
        else:
            sd["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"}
    else:
        sd["activation_state_dict"] = {}
    return sd


def openai_reference(sd: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI's formula, written out independently of the library."""
    topk = sd["activation"] == "TopK"
    if topk:
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)  # unbiased
        x = (x - mu) / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if topk:
        vals, idx = pre.topk(K, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        latents = pre.relu()
    recons = latents @ sd["decoder.weight"].T + sd["pre_bias"]
    if topk:
        recons = recons * std + mu
    return latents, recons


@pytest.mark.parametrize("activation,flat", [("TopK", False), ("TopK", True), ("ReLU", False)])
def test_local_openai_state_dict(tmp_path: Path, activation: str, flat: bool) -> None:
    sd = openai_state_dict(activation, flat=flat)
    torch.save(sd, tmp_path / "v5_32k_layer_5.pt")
    src = LocalSource(
        family="local",
        layer=5,
        path=str(tmp_path / "v5_32k_layer_5.pt"),
        hook_name="blocks.5.hook_resid_post",
    )
    assert src.required_model_kwargs() == {"center_writing_weights": False}
    ours = src.load(None)
    assert ours.normalize_mode == ("layer_norm" if activation == "TopK" else "none")
    x = inputs(scale=0.5, shift=0.3)
    latents, recons = openai_reference(sd, x)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), latents, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.reconstruct(x), recons, atol=ATOL, rtol=0)
    assert (latents != 0).any()


def test_local_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "nope.pt")).load(None)
    torch.save(openai_state_dict("TopK"), tmp_path / "sae.pt")
    with pytest.raises(UserError, match="hook_name"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "sae.pt")).load(None)
    with pytest.raises(UserError, match="unknown local SAE format"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "sae.pt"), format="npz")
    bad = openai_state_dict("TopK")
    del bad["latent_bias"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="latent_bias"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "bad.pt"), hook_name=HOOK).load(
            None
        )


# ----------------------------------------------------------------------------- Apollo (wandb)

RUN_ID = "tvj2owza"
APOLLO_HOOK = "blocks.6.hook_resid_pre"


def apollo_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """An ``SAETransformer.saes.state_dict()``: ModuleDict keys are hooks with '-' for '.'."""
    g = torch.Generator().manual_seed(seed)
    p = APOLLO_HOOK.replace(".", "-")
    return {
        f"{p}.encoder.0.weight": torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
        f"{p}.encoder.0.bias": 0.1 * torch.randn(D_SAE, generator=g),
        f"{p}.decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 2.0,  # not unit norm
        f"{p}.decoder.bias": 0.1 * torch.randn(D_IN, generator=g),
    }


class FakeFile:
    def __init__(self, src: Path, log: list[str]) -> None:
        self.name, self._src, self._log = src.name, src, log

    def download(self, root: str = ".", replace: bool = False, exist_ok: bool = False) -> Any:
        dest = Path(root) / self.name
        if dest.exists() and not replace:
            raise ValueError("File already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self._src, dest)
        self._log.append(self.name)
        return open(dest)


class FakeApi:
    """``wandb.Api`` reading runs from ``<remote>/<run_id>/``."""

    remote: Path
    downloads: list[str] = []

    def run(self, path: str) -> Any:
        project, run_id = path.rsplit("/", 1)
        assert project == "sparsify/gpt2"
        folder = self.remote / run_id
        if not folder.is_dir():
            raise ValueError(f"Could not find run {path}")
        files = [FakeFile(p, self.downloads) for p in sorted(folder.iterdir())]
        return SimpleNamespace(files=lambda: files)


@pytest.fixture()
def fake_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    import wandb

    remote = tmp_path / "remote" / RUN_ID
    remote.mkdir(parents=True)
    (remote / "final_config.yaml").write_text(
        "tlens_model_name: gpt2\nsaes:\n  sae_positions: blocks.6.hook_resid_pre\n"
        "  dict_size_to_input_ratio: 2.0\n"
    )
    torch.save(apollo_state_dict(seed=100), remote / "samples_100.pt")
    torch.save(apollo_state_dict(seed=200), remote / "samples_200.pt")
    torch.save(apollo_state_dict(seed=30), remote / "samples_30.pt")  # sorts last as text
    (remote / "output.log").write_text("log\n")

    api = type("Api", (FakeApi,), {"remote": tmp_path / "remote", "downloads": []})
    monkeypatch.setattr(wandb, "Api", api)
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    return api


def apollo_source(tmp_path: Path, layer: int = 5) -> ApolloWandbSource:
    cfg = OmegaConf.load(CONF_SAE / "apollo_e2e.yaml")
    return ApolloWandbSource(
        family=cfg.family,
        layer=layer,
        project=cfg.project,
        run_ids=cfg.run_ids,
        hooks=cfg.hooks,
        cache_dir=str(tmp_path / "cache"),
    )


def test_apollo_loads_latest_checkpoint_with_apollo_maths(
    tmp_path: Path, fake_wandb: type[FakeApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = apollo_source(tmp_path)
    assert src.required_model_kwargs() == {}
    sae = src.load(None)
    run_dir = tmp_path / "cache" / "apollo" / RUN_ID
    assert sorted(fake_wandb.downloads) == ["final_config.yaml", "samples_200.pt"]
    assert (run_dir / "samples_200.pt").is_file() and not (run_dir / "samples_100.pt").exists()
    assert sae.identity.extra["checkpoint"] == "samples_200.pt"
    assert sae.identity.extra["tlens_model_name"] == "gpt2"
    assert sae.hook_name == APOLLO_HOOK and not sae.apply_b_dec_to_input

    p = APOLLO_HOOK.replace(".", "-")
    x = inputs()
    for seed, should_match in ((200, True), (100, False)):
        sd = apollo_state_dict(seed)
        c = torch.relu(x @ sd[f"{p}.encoder.0.weight"].T + sd[f"{p}.encoder.0.bias"])
        x_hat = F.linear(c, F.normalize(sd[f"{p}.decoder.weight"], dim=0), sd[f"{p}.decoder.bias"])
        with torch.no_grad():
            same = torch.allclose(sae.encode(x), c, atol=ATOL) and torch.allclose(
                sae.reconstruct(x), x_hat, atol=ATOL
            )
        assert same == should_match
        if should_match:
            assert (c != 0).any() and (c == 0).any()

    # second use: from the cache, with no key and no wandb at all
    monkeypatch.delenv("WANDB_API_KEY")
    fake_wandb.downloads.clear()
    monkeypatch.setattr(fake_wandb, "run", lambda self, path: pytest.fail("wandb was called"))
    again = apollo_source(tmp_path).load(None)
    torch.testing.assert_close(again.W_enc, sae.W_enc)
    assert fake_wandb.downloads == []


def test_apollo_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"no SAE for layer 3; layers: 1, 5, 9$"):
        apollo_source(tmp_path, layer=3).load(None)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(UserError) as info:
        apollo_source(tmp_path, layer=5).load(None)
    msg = str(info.value)
    assert "WANDB_API_KEY" in msg and "sae=sae_lens sae.release=gpt2-small-res_sle-ajt" in msg
    assert "\n" not in msg


def test_apollo_wrong_hook_lists_what_the_checkpoint_holds(
    tmp_path: Path, fake_wandb: type[FakeApi]
) -> None:
    src = apollo_source(tmp_path)
    src.hooks[5] = "blocks.5.hook_resid_post"
    with pytest.raises(UserError, match="has SAEs at: blocks.6.hook_resid_pre"):
        src.load(None)


# ----------------------------------------------------------------------------- catalogues


def sae_yamls() -> dict[str, Any]:
    return {p.stem: OmegaConf.load(p) for p in sorted(CONF_SAE.glob("*.yaml"))}


def test_catalogue_ids_read_the_residual_after_their_layer() -> None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    checked = set()
    for name, cfg in sae_yamls().items():
        if cfg.get("sae_ids"):
            assert cfg.release in directory, name
            for layer, sae_id in cfg.sae_ids.items():
                assert sae_id in directory[cfg.release].saes_map, (name, sae_id)
                assert resid_layer_of_hook(sae_id, 12) == layer, (name, layer, sae_id)
                src = SaeLensSource(cfg.family, layer, cfg.release, sae_ids=cfg.sae_ids)
                assert src.resolve() == (cfg.release, sae_id)
            checked.add(name)
        if cfg.get("run_ids"):
            assert set(cfg.run_ids) == set(cfg.hooks), name
            for layer, hook in cfg.hooks.items():
                assert resid_layer_of_hook(hook, 12) == layer, (name, layer, hook)
            checked.add(name)
    assert {"jbloom", "openai_v5_32k", "openai_v5_128k", "apollo_e2e", "apollo_e2e_ds"} <= checked
    jb = sae_yamls()["jbloom"].sae_ids
    assert jb[11] == "blocks.11.hook_resid_post" and jb[5] == "blocks.6.hook_resid_pre"


def test_catalogue_missing_layer() -> None:
    cfg = sae_yamls()["jbloom"]
    with pytest.raises(UserError, match=r"family jbloom has no SAE for layer 12; layers: 0, 1, "):
        SaeLensSource("jbloom", 12, cfg.release, sae_ids=cfg.sae_ids)  # before any loading


def test_every_yaml_instantiates_with_its_schema(tmp_path: Path) -> None:
    """The schema fields are the constructor's keyword arguments (as Hydra passes them)."""
    from hydra.utils import instantiate

    from saeravel import config as C

    schemas = {
        "schema_sae_lens": C.SaeLensSAEConfig,
        "schema_apollo": C.ApolloSAEConfig,
        "schema_local": C.LocalSAEConfig,
        "schema_custom": C.CustomSAEConfig,
        "schema_none": C.NoSAEConfig,
    }
    fill = {
        "layer": 5,
        "cache_dir": str(tmp_path),
        "path": str(tmp_path),
        "hook_name": "blocks.5.hook_resid_post",
        "d_in": 64,
        "release": "gpt2-small-res-jb",
    }
    expected = {
        "schema_sae_lens": SaeLensSource,
        "schema_apollo": ApolloWandbSource,
        "schema_local": LocalSource,
        "schema_custom": CustomSource,
        "schema_none": NoSource,
    }
    seen = set()
    for name, raw in sae_yamls().items():
        schema = "schema_" + raw.defaults[0].split("@")[0].removeprefix("/schema_sae_")
        if schema not in schemas:
            continue  # e.g. the trained family, which lives elsewhere
        body = OmegaConf.masked_copy(raw, [k for k in raw if k != "defaults"])
        cfg = OmegaConf.merge(OmegaConf.structured(schemas[schema]), body)
        for key, value in fill.items():  # interpolations and ??? fields
            if key in cfg.keys() and (  # `key in cfg` is False for ??? fields
                key in ("layer", "cache_dir") or OmegaConf.is_missing(cfg, key)
            ):
                cfg[key] = value
        if "object" in cfg.keys() and OmegaConf.is_missing(cfg.object, "_target_"):
            cfg.object._target_ = "saeravel.saes.base.SAE"  # a class with encode/decode
        src = instantiate(cfg)
        assert isinstance(src, expected[schema]), name
        assert src.layer == 5 and src.family == raw.get("family", "none")
        seen.add(schema)
    assert seen == set(schemas)


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
    src = SaeLensSource("sae_lens", 5, "gpt2-small-resid-post-v5-32k", sae_ids={})
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
    assert hook_of_sae_id("blocks.8.hook_resid_pre_768") == "blocks.8.hook_resid_pre"
    assert hook_of_sae_id("blocks.1.hook_resid_mid") is None


def test_offline_hub_load_is_a_quick_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline_before = hub_constants.HF_HUB_OFFLINE
    cfg = sae_yamls()["jbloom"]
    src = SaeLensSource("jbloom", 5, cfg.release, sae_ids=cfg.sae_ids)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        src.required_model_kwargs()
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "gpt2-small-res-jb / blocks.6.hook_resid_pre" in msg
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert hub_constants.HF_HUB_OFFLINE == offline_before  # restored


# ----------------------------------------------------------------------------- custom, none

TOY = """
import torch


class ToySAE:
    def __init__(self, d_in, d_sae, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d_in, d_sae, generator=g)

    def encode(self, x):
        return torch.relu(x @ self.W)

    def decode(self, f):
        return f @ self.W.T


class NoDecode:
    def encode(self, x):
        return x
"""


def test_custom_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy_sae_module.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_sae_module", raising=False)
    src = CustomSource(
        family="custom",
        layer=5,
        object=OmegaConf.create({"_target_": "toy_sae_module.ToySAE", "d_in": D_IN, "d_sae": 96}),
        hook_name="blocks.5.hook_resid_post",
        d_in=D_IN,
    )
    assert src.required_model_kwargs() == {}
    sae = src.load(None)
    assert (sae.d_in, sae.d_sae, sae.hook_name) == (D_IN, 96, "blocks.5.hook_resid_post")
    x = inputs()
    W = sae.obj.W
    torch.testing.assert_close(sae.reconstruct(x), torch.relu(x @ W) @ W.T)

    with pytest.raises(UserError, match="cannot be imported"):
        CustomSource("custom", 5, {"_target_": "toy_sae_module.Missing"}, HOOK, D_IN).load(None)
    with pytest.raises(UserError, match="cannot be imported"):
        CustomSource("custom", 5, {"_target_": "no_such_package.SAE"}, HOOK, D_IN).load(None)
    with pytest.raises(UserError, match="no callable decode"):
        CustomSource("custom", 5, {"_target_": "toy_sae_module.NoDecode"}, HOOK, D_IN).load(None)


def test_no_source() -> None:
    src = NoSource(family="none", layer=5)
    assert src.required_model_kwargs() == {}
    assert src.load(None) is None


# ----------------------------------------------------------------------------- bad SAE files

ROOT = Path(__file__).resolve().parents[1]
BAD_TOY = """
import torch


class Boom:
    def __init__(self, **kwargs):
        raise ValueError("boom: no weights at /nowhere")

    def encode(self, x):
        return x

    def decode(self, f):
        return f


class Square:
    def __init__(self, d_in=128):
        self.W = torch.ones(d_in, 2 * d_in)

    def encode(self, x):
        return torch.relu(x @ self.W)

    def decode(self, f):
        return f @ self.W.T


class WrongWidth(Square):
    def decode(self, f):
        return (f @ self.W.T)[..., :3]


class NoDecode:
    def encode(self, x):
        return x
"""


def saved_sae_lens(folder: Path, **cfg: Any) -> Path:
    make_sae_lens("standard", **cfg).save_model(folder)
    return folder


def bad_sae(tmp_path: Path, case: str) -> Path:
    """A file or folder with exactly one thing wrong with it."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path / case
    if case == "missing":
        return tmp_path / "no_such_sae"
    if case in ("cfg_not_json", "cfg_no_d_sae", "weights_truncated", "weights_text",
                "weights_wrong_shape", "weights_missing_key", "cfg_list", "arch_gated"):  # fmt: skip
        saved_sae_lens(folder)
        cfg_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
        cfg = json.loads(cfg_path.read_text())
        if case == "cfg_not_json":
            cfg_path.write_text('{"d_in": 64, "d_sae": ')
        elif case == "cfg_list":
            cfg_path.write_text("[64, 128]")
        elif case == "cfg_no_d_sae":
            del cfg["d_sae"]
            cfg_path.write_text(json.dumps(cfg))
        elif case == "arch_gated":
            cfg["architecture"] = "gated"
            cfg_path.write_text(json.dumps(cfg))
        elif case == "weights_truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif case == "weights_text":
            weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
        elif case == "weights_wrong_shape":
            sd = {"W_enc": torch.zeros(D_IN, D_SAE), "b_enc": torch.zeros(D_SAE)}
            sd |= {"W_dec": torch.zeros(D_SAE, D_IN + 1), "b_dec": torch.zeros(D_IN)}
            save_file(sd, weights)
        elif case == "weights_missing_key":
            save_file({"W_enc": torch.zeros(D_IN, D_SAE), "b_enc": torch.zeros(D_SAE)}, weights)
        return folder
    path = tmp_path / f"{case}.pt"
    if case == "text_file":
        path.write_text("this is not an SAE\n")
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "pt_truncated":
        torch.save(openai_state_dict("TopK"), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "pt_wrong_shape":
        sd = openai_state_dict("ReLU")
        sd["pre_bias"] = torch.zeros(D_IN + 2)
        torch.save(sd, path)
    elif case == "pt_not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif case == "pt_missing_key":
        sd = openai_state_dict("ReLU")
        del sd["encoder.weight"]
        torch.save(sd, path)
    else:
        raise AssertionError(case)
    return path


BAD_FILES = {  # case -> (format, what the message must say)
    "missing": ("auto", "does not exist"),
    "cfg_not_json": ("auto", "cfg.json is not valid JSON"),
    "cfg_list": ("auto", "holds a JSON list"),
    "cfg_no_d_sae": ("auto", "has no d_sae"),
    "arch_gated": ("auto", "architecture 'gated' is not supported"),
    "weights_truncated": ("auto", "sae_weights.safetensors is not a complete safetensors file"),
    "weights_text": ("auto", "sae_weights.safetensors is not a complete safetensors file"),
    "weights_wrong_shape": ("auto", "W_dec has shape [128, 65], expected [128, 64]"),
    "weights_missing_key": ("auto", "lacks W_dec, b_dec"),
    "text_file": ("auto", "is not a torch.save file"),
    "empty_file": ("openai", "is empty (0 bytes)"),
    "pt_truncated": ("auto", "truncated or corrupt"),
    "pt_wrong_shape": ("auto", "pre_bias has shape [66], expected [64]"),
    "pt_not_a_dict": ("auto", "holds a list, not a state dict"),
    "pt_missing_key": ("auto", "no encoder.weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_local_file_problems_are_named_before_anything_loads(tmp_path: Path, case: str) -> None:
    fmt, expected = BAD_FILES[case]
    path = bad_sae(tmp_path, case)
    src = LocalSource(family="local", layer=3, path=str(path), format=fmt, hook_name=HOOK)
    with pytest.raises(UserError) as info:  # what the pipeline calls before loading the model
        src.required_model_kwargs()
    msg = str(info.value)
    assert expected in msg and "\n" not in msg
    assert str(path) in msg or path.name in msg


def test_local_format_and_path_mismatches(tmp_path: Path) -> None:
    folder = saved_sae_lens(tmp_path / "saved")
    with pytest.raises(UserError, match="is a folder; format=openai"):
        LocalSource("local", 3, str(folder), format="openai", hook_name=HOOK).check()
    with pytest.raises(UserError, match=r"part of a saved sae_lens SAE; set sae.path to its"):
        LocalSource("local", 3, str(folder / "sae_weights.safetensors")).check()
    with pytest.raises(UserError, match="give its folder"):
        LocalSource("local", 3, str(folder / "cfg.json"), format="sae_lens").check()
    with pytest.raises(UserError, match="sae.path is empty"):
        LocalSource("local", 3, "")
    # a good file is accepted and still needs its hook
    torch.save(openai_state_dict("ReLU"), tmp_path / "ok.pt")
    with pytest.raises(UserError, match="do not record their hook"):
        LocalSource("local", 3, str(tmp_path / "ok.pt")).required_model_kwargs()


def custom(target: str, d_in: int = 128, kwargs: dict[str, Any] | None = None) -> CustomSource:
    node = {"_target_": target, **(kwargs or {})}
    return CustomSource("custom", 1, node, "blocks.1.hook_resid_post", d_in)


@pytest.fixture()
def bad_toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "bad_toy_sae.py").write_text(BAD_TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_toy_sae", raising=False)
    return tmp_path


def test_custom_problems_are_one_line_before_the_model(bad_toy: Path) -> None:
    cases = {
        "": "needs sae.object._target_",
        "bad_toy_sae.Missing": "cannot be imported: bad_toy_sae has no 'Missing'",
        "no_such_package.SAE": "cannot be imported: no module named 'no_such_package'",
        "bad toy": "is not a dotted import path",
        "bad_toy_sae.Boom": "raised ValueError: boom: no weights at /nowhere",
        "bad_toy_sae.NoDecode": "has no callable decode()",
        "bad_toy_sae.WrongWidth": "decode returns width 3 but sae.d_in=128",
    }
    for target, expected in cases.items():
        with pytest.raises(UserError) as info:
            custom(target).required_model_kwargs()  # what the pipeline calls before the model
        assert expected in str(info.value) and "\n" not in str(info.value), target
    with pytest.raises(UserError, match=r"zero input of width sae.d_in=64 failed"):
        custom("bad_toy_sae.Square", d_in=64, kwargs={"d_in": 128}).required_model_kwargs()
    with pytest.raises(UserError, match=r"sae.d_in=0"):
        custom("bad_toy_sae.Square", d_in=0)
    sae = custom("bad_toy_sae.Square").load(None)
    assert (sae.d_in, sae.d_sae) == (128, 256)


def test_apollo_checks_layer_and_key_before_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(UserError, match="no SAE for layer 3"):
        apollo_source(tmp_path, layer=3)  # the constructor
    src = apollo_source(tmp_path, layer=5)  # prefetch builds it to say what is missing
    with pytest.raises(UserError, match="needs WANDB_API_KEY"):
        src.required_model_kwargs()  # the pipeline's first call, before the model loads


def test_sae_lens_identity_keeps_the_neuronpedia_id() -> None:
    from saeravel.saes.loaders import directory_neuronpedia_id

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


# ----------------------------------------------------------------------------- the entrypoint


def run_cli(args: list[str], tmp_path: Path, pythonpath: Path | None = None):
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", WANDB_MODE="offline",
               SAERAVEL_CACHE=str(tmp_path / "cache"), SAERAVEL_RESULTS=str(tmp_path / "res"))  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    paths = [str(ROOT / "src"), *([str(pythonpath)] if pythonpath else [])]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    # The cache is empty: had the embedded model been loaded, it would train for minutes
    # and the timeout would fail the test, so a pass also shows the check came first.
    return subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'out'}", "eval=core", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def assert_one_line_error(proc: Any, tmp_path: Path, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "result.json").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("model.pt"))


CLI_FILE_CASES = [
    "missing",
    "cfg_no_d_sae",
    "weights_truncated",
    "weights_wrong_shape",
    "text_file",
]


@pytest.mark.parametrize("case", CLI_FILE_CASES)
def test_cli_bad_local_file(tmp_path: Path, case: str) -> None:
    fmt, expected = BAD_FILES[case]
    path = bad_sae(tmp_path, case)
    proc = run_cli(["sae=local", f"sae.path={path}", f"sae.format={fmt}"], tmp_path)
    assert_one_line_error(proc, tmp_path, expected)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["sae=local"], "needs sae.path (a saved sae_lens folder or an OpenAI"),
        (["sae=local", "sae.path=/tmp", "sae.format=npz"], "unknown local SAE format 'npz'"),
        (["sae=custom", "sae.hook_name=blocks.1.hook_resid_post", "sae.d_in=128"],
         "needs sae.object._target_"),
        (["sae=custom", "sae.object._target_=bad_toy_sae.Boom", "sae.hook_name=blocks.1.hook_resid_post",
          "sae.d_in=128"], "raised ValueError: boom"),
        (["sae=custom", "sae.object._target_=bad_toy_sae.Square",
          "sae.hook_name=blocks.1.hook_resid_post", "sae.d_in=64", "+sae.object.d_in=128"], "zero input of width sae.d_in=64 failed"),
        (["sae=apollo_e2e", "layer=1"], "needs WANDB_API_KEY"),
        # a hub model that is not cached: the cheap SAE checks come first
        (["model=gpt2-small", "sae=apollo_e2e", "layer=3"], "apollo_e2e has no SAE for layer 3"),
        (["model=gpt2-small", "sae=apollo_e2e", "layer=5"], "needs WANDB_API_KEY"),
    ],
)  # fmt: skip
def test_cli_bad_sae_config(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "bad_toy_sae.py").write_text(BAD_TOY)
    proc = run_cli(args, tmp_path, pythonpath=tmp_path)
    assert_one_line_error(proc, tmp_path, expected)


def test_cli_good_file_of_the_wrong_width_says_so(tmp_path: Path) -> None:
    """A valid OpenAI SAE of width 64 on the embedded model (d_model 128): the width, not the
    weight processing the SAE asks for (which the embedded model also lacks)."""
    torch.save(openai_state_dict("TopK"), tmp_path / "v5.pt")
    args = ["sae=local", f"sae.path={tmp_path / 'v5.pt'}", "sae.hook_name=blocks.1.hook_resid_post"]
    proc = run_cli(args, tmp_path)
    assert_one_line_error(proc, tmp_path, "has d_in=64 but model tiny-city-lm has d_model=128")


def test_known_width_is_checked_against_the_config(tmp_path: Path, bad_toy: Path) -> None:
    from saeravel.saes.loaders import check_known_width

    folder = saved_sae_lens(tmp_path / "saved")
    src = LocalSource("local", 3, str(folder))
    assert src.known_d_in() is None  # not read yet
    src.required_model_kwargs()
    assert src.known_d_in() == D_IN
    check_known_width(src, "m", D_IN)
    with pytest.raises(UserError, match=r"saved\) has d_in=64 but model m has d_model=128"):
        check_known_width(src, "m", 128)
    with pytest.raises(UserError, match="has d_in=128 but model m has d_model=64"):
        check_known_width(custom("bad_toy_sae.Square"), "m", 64)
    check_known_width(NoSource(), "m", 64)  # nothing known: nothing checked
