"""sae=apollo_e2e / apollo_e2e_ds: Apollo's maths from a checkpoint in its real format, wandb
replaced by a fake reading a local folder; the layer and key checks come before the model."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from saes_helpers import (
    ATOL,
    CONF_SAE,
    D_IN,
    D_SAE,
    inputs,
    sae_yamls,
)

from saeravel.errors import UserError
from saeravel.hooks import resid_layer
from saeravel.saes.apollo import ApolloWandbSource

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
        sae_lens_release=cfg.sae_lens_release,
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
    # Neuronpedia's id from sae_lens' catalogue entry of the same family, at the same hook
    assert sae.identity.neuronpedia_id == "gpt2-small/6-res_sle-ajt"
    assert sae.identity.extra["sae_lens_release"] == "gpt2-small-res_sle-ajt"

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
    route = "sae=sae_lens sae.release=gpt2-small-res_sle-ajt model=gpt2-small"
    assert "WANDB_API_KEY" in msg and msg.endswith(f"without a key: {route}")
    assert "\n" not in msg


@pytest.mark.parametrize("family", ["apollo_e2e", "apollo_e2e_ds"])
def test_apollo_sae_lens_release_is_the_same_sites_on_the_same_model(family: str) -> None:
    """The catalogue entry ``sae.sae_lens_release`` names is for the model the family selects
    (its defaults list), and has an SAE at each of the family's hooks."""
    import yaml
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from saeravel.saes.sae_lens import _id_hooks

    raw = yaml.safe_load((CONF_SAE / f"{family}.yaml").read_text())
    selected = next(
        d for d in raw["defaults"] if isinstance(d, dict) and "override /model@_global_.model" in d
    )
    entry = get_pretrained_saes_directory()[raw["sae_lens_release"]]
    assert entry.model == selected["override /model@_global_.model"] == "gpt2-small"
    assert set(raw["hooks"].values()) <= set(_id_hooks(entry).values())


def test_apollo_wrong_hook_lists_what_the_checkpoint_holds(
    tmp_path: Path, fake_wandb: type[FakeApi]
) -> None:
    src = apollo_source(tmp_path)
    src.hooks[5] = "blocks.5.hook_resid_post"
    with pytest.raises(UserError, match="has SAEs at: blocks.6.hook_resid_pre"):
        src.load(None)


def test_apollo_checks_layer_and_key_before_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(UserError, match="no SAE for layer 3"):
        apollo_source(tmp_path, layer=3)  # the constructor
    src = apollo_source(tmp_path, layer=5)  # prefetch builds it to say what is missing
    with pytest.raises(UserError, match="needs WANDB_API_KEY"):
        src.required_model_kwargs()  # the pipeline's first call, before the model loads


@pytest.mark.parametrize("family", ["apollo_e2e", "apollo_e2e_ds"])
def test_apollo_yaml_hooks_read_the_residual_after_their_layer(family: str) -> None:
    cfg = sae_yamls()[family]
    assert set(cfg.run_ids) == set(cfg.hooks) == {1, 5, 9}
    for layer, hook in cfg.hooks.items():
        assert resid_layer(hook, 12) == layer, (layer, hook)


def test_apollo_neuronpedia_id_follows_the_catalogue(
    tmp_path: Path, fake_wandb: type[FakeApi]
) -> None:
    """The id is the catalogue's for the release and the hook (read, not written in code): a
    release whose hook has no SAE, or no release, gives no id."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from saeravel.saes.sae_lens import hook_neuronpedia_id

    catalogue = get_pretrained_saes_directory()["gpt2-small-res_slefr-ajt"].neuronpedia_id
    assert hook_neuronpedia_id("gpt2-small-res_slefr-ajt", APOLLO_HOOK) == catalogue[APOLLO_HOOK]
    assert hook_neuronpedia_id("gpt2-small-res_slefr-ajt", "blocks.5.hook_resid_pre") is None
    assert hook_neuronpedia_id("no-such-release", APOLLO_HOOK) is None
    src = apollo_source(tmp_path)
    src.sae_lens_release = None
    assert src.load(None).identity.neuronpedia_id is None
