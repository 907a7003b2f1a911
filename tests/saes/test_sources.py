"""The SAE source contract: every conf/sae option builds an SAESource from its schema's fields,
and bad SAE settings are one line before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from saes_helpers import sae_yamls

from saeravel.saes.apollo import ApolloWandbSource
from saeravel.saes.custom import CustomSource
from saeravel.saes.gemma_scope import GemmaScopeSource
from saeravel.saes.local import LocalSource
from saeravel.saes.none import NoSource
from saeravel.saes.sae_lens import SaeLensSource
from saeravel.saes.source import SAESource


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
        "schema_gemma_scope": C.GemmaScopeSAEConfig,
    }
    fill = {
        "layer": 5,
        "site": "resid_post",
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
        "schema_gemma_scope": GemmaScopeSource,
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
                key in ("layer", "site", "cache_dir") or OmegaConf.is_missing(cfg, key)
            ):
                cfg[key] = value
        if "object" in cfg.keys() and OmegaConf.is_missing(cfg.object, "_target_"):
            cfg.object._target_ = "saeravel.saes.base.SAE"  # a class with encode/decode
        src = instantiate(cfg)
        assert isinstance(src, expected[schema]), name
        assert src.layer == 5 and src.family == raw.get("family", "none")
        assert src.site == "resid_post" and type(src.site) is str  # not the config's enum
        seen.add(schema)
    assert seen == set(schemas)


def _schemas() -> list[type]:
    from saeravel import config as C

    return [c for c in vars(C).values() if isinstance(c, type) and issubclass(c, C.SAEConfig)]


def test_every_schema_targets_an_sae_source() -> None:
    """Each ``sae=`` schema's ``_target_`` is a class following the SAESource contract (a
    source's module moved without its target fails here)."""
    from hydra.utils import get_class

    from saeravel import config as C

    targets = {c.__name__: c._target_ for c in _schemas() if c is not C.SAEConfig}
    # sae_lens, gemma_scope, apollo, local, custom, trained, planted, identity, pca, none
    assert len(targets) == 10, targets
    for name, target in targets.items():
        cls = get_class(target)
        assert SAESource in cls.__mro__, (name, target)  # subclassed: the protocol's defaults
        assert target.startswith("saeravel.saes."), (name, target)
        for method in ("required_model_kwargs", "load", "offline_needs"):
            assert getattr(cls, method) is not getattr(SAESource, method), (target, method)


def test_known_d_in_defaults_to_unknown() -> None:
    assert NoSource().known_d_in() is None  # the protocol's default
    assert SaeLensSource.known_d_in is SAESource.known_d_in
    assert LocalSource.known_d_in is not SAESource.known_d_in  # read from the file
    assert CustomSource.known_d_in is not SAESource.known_d_in  # sae.d_in


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
def test_cli_bad_sae_config(
    cli, bad_toy: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    """In-process (``cli``); ``bad_toy`` puts the user's module bad_toy_sae on sys.path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    line = cli(["eval=core", *args], WANDB_MODE="offline").error_line()
    assert expected in line, line


@pytest.mark.parametrize("family", ["apollo_e2e", "apollo_e2e_ds"])
def test_apollo_no_key_route_runs_as_typed(
    cli, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """The route the wandb-key error suggests, typed after the user's ``layer=5``, passes every
    check up to the download: the same hook as the family's, on GPT-2 small (not the default
    model's layer range); offline, the next line is the sae_lens SAE not being cached."""
    from hydra import compose, initialize_config_dir
    from saes_helpers import ROOT

    from saeravel.config import unknown_option_error

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    line = cli([f"sae={family}", "layer=5"], WANDB_MODE="offline").error_line()
    route = line.split("without a key: ", 1)[1].split()
    assert route[0] == "sae=sae_lens" and "model=gpt2-small" in route, line
    args = [*route, "layer=5"]
    assert unknown_option_error(args, ROOT / "conf") is None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/x", *args])
    source = SaeLensSource(cfg.sae.family, cfg.layer, cfg.sae.release, cfg.sae.sae_id)
    assert source.resolve()[1] == sae_yamls()[family].hooks[5]  # the same site as the family's
    line = cli(args).error_line()
    assert "is not in the local Hugging Face cache" in line and "out of range" not in line, line


def test_trained_sae_has_a_cache_folder_per_site(tmp_path: Path) -> None:
    """An SAE trained at mlp_out is another cache entry; the residual's entry keeps the name it
    had before sites existed (SAEs cached then are still found)."""
    import hashlib
    import json
    from types import SimpleNamespace

    from saeravel.saes.trained import FORMAT_VERSION, TrainedSource

    lm = SimpleNamespace(name="m", info={"cache_folder_key": "k"}, processing={})
    resid = TrainedSource("trained", 1, cache_dir=str(tmp_path))
    mlp = TrainedSource("trained", 1, cache_dir=str(tmp_path), site="mlp_out")
    assert (resid.hook_name, mlp.hook_name) == ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out")
    blob = json.dumps({"v": FORMAT_VERSION, "model": "m", "mk": "k", "layer": 1, **resid.hparams},
                      sort_keys=True)  # fmt: skip
    assert resid._folder(lm).name == f"m-L1-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    assert mlp._folder(lm).name.startswith("m-L1-mlp_out-")
