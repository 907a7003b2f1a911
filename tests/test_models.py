"""Model sources: cheap checks before anything loads, and the identity caches are keyed by."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from saeravel.config import DType
from saeravel.errors import UserError, instantiate
from saeravel.models import (
    TransformerLensModel,
    hub_revision,
    offline_hint,
    pretrained_identity,
    resolve_device,
    resolve_dtype,
)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=unused", *overrides])


def test_devices_are_checked_against_the_machine():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(UserError, match=re.escape("unknown device 'bogus'; valid: auto, cpu")):
        resolve_device("bogus")
    with pytest.raises(UserError, match="unknown device 'cpu:1'"):
        resolve_device("cpu:1")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda but no CUDA device is visible; valid"):
            resolve_device("cuda")
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_dtype_is_an_enum_of_the_schema():
    assert resolve_dtype(DType.bfloat16) is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("float64")
    assert _compose("model=gpt2-small", "model.dtype=bfloat16").model.dtype == "bfloat16"
    with pytest.raises(Exception) as exc:
        _compose("model=gpt2-small", "model.dtype=bogus")
    assert "expected one of [float32, float16, bfloat16]" in str(exc.value.__cause__)


def test_processing_kwargs_need_no_plus():
    cfg = _compose("model=gpt2-small", "model.from_pretrained_kwargs.center_writing_weights=false")
    source = instantiate(cfg.model, device="cpu")
    assert source.from_pretrained_kwargs == {"center_writing_weights": False}
    assert (
        instantiate(_compose("model=gpt2-small").model, device="cpu").from_pretrained_kwargs == {}
    )


def test_unknown_hf_name_fails_in_the_constructor():
    cfg = _compose("model=gpt2-small", "model.hf_name=no-such-model")
    with pytest.raises(UserError, match="hf_name='no-such-model' is not a transformer_lens"):
        instantiate(cfg.model, device="cpu")


def test_constructor_errors_surface_as_user_errors():
    """Hydra wraps a constructor's exception; saeravel.errors.instantiate unwraps UserError."""
    with pytest.raises(UserError, match="sae.k=0 must be a positive integer"):
        instantiate(_compose("sae.k=0").sae)
    with pytest.raises(UserError, match="device=bogus|unknown device 'bogus'"):
        instantiate(_compose("device=bogus").model)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae.k=0", "sae.k=0"),
        ("sae.k=-3", "sae.k=-3"),
        ("sae.steps=-1", "sae.steps=-1"),
        ("sae.batch_size=0", "sae.batch_size=0"),
        ("sae.lr=-0.1", "sae.lr=-0.1"),
        ("sae.expansion=0", "sae.expansion=0"),
        ("sae.entity_weight=2", "sae.entity_weight=2"),
        ("sae.n_sequences=0", "sae.n_sequences=0"),
    ],
)
def test_trained_sae_settings_fail_before_training(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        instantiate(_compose(override).sae)


def test_offline_hint_names_a_command_that_exists():
    hint = offline_hint("gpt2-small", "gpt2")
    assert "huggingface-cli" not in hint
    assert "python -m saeravel.prefetch model=gpt2-small" in hint


def _fake_hub(root: Path, repo: str, commit: str) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_hub_revision_reads_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_revision("EleutherAI/pythia-70m-deduped") is None
    _fake_hub(tmp_path, "EleutherAI/pythia-70m-deduped", "a" * 40)
    assert hub_revision("EleutherAI/pythia-70m-deduped") == "a" * 40


def test_identity_changes_with_every_part():
    base = pretrained_identity("gpt2", "gpt2", "a" * 40, "float32", {"fold_ln": True})
    assert base == pretrained_identity("gpt2", "gpt2", "a" * 40, "float32", {"fold_ln": True})
    others = {
        pretrained_identity("gpt2-medium", "gpt2-medium", "a" * 40, "float32", {"fold_ln": True}),
        pretrained_identity("gpt2", "gpt2", "b" * 40, "float32", {"fold_ln": True}),
        pretrained_identity("gpt2", "gpt2", None, "float32", {"fold_ln": True}),
        pretrained_identity("gpt2", "gpt2", "a" * 40, "bfloat16", {"fold_ln": True}),
        pretrained_identity("gpt2", "gpt2", "a" * 40, "float32", {"fold_ln": False}),
    }
    assert base not in others and len(others) == 5


def test_loaded_pretrained_model_carries_its_cache_key(tmp_path, monkeypatch, tiny_model):
    """TransformerLensModel.load records hf_name, hub commit, dtype and processing, and keys
    caches by them: another commit of the same name gets another cache_folder_key."""
    from huggingface_hub import constants
    from transformer_lens import HookedTransformer

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(HookedTransformer, "from_pretrained", lambda *a, **k: tiny_model.model)
    _fake_hub(tmp_path, "EleutherAI/pythia-70m-deduped", "a" * 40)

    def load(**kw):
        src = TransformerLensModel("pythia-70m", "pythia-70m-deduped", 2, 64, 1, device="cpu", **kw)
        return src.load({})

    first = load()
    assert first.info["revision"] == "a" * 40
    assert first.info["hf_repo"] == "EleutherAI/pythia-70m-deduped"
    assert load().info["cache_folder_key"] == first.info["cache_folder_key"]
    assert load(dtype="bfloat16").info["cache_folder_key"] != first.info["cache_folder_key"]
    key_cw = load(from_pretrained_kwargs={"center_writing_weights": False}).info
    assert key_cw["cache_folder_key"] != first.info["cache_folder_key"]
    (tmp_path / "models--EleutherAI--pythia-70m-deduped" / "snapshots" / ("a" * 40)).rename(
        tmp_path / "models--EleutherAI--pythia-70m-deduped" / "snapshots" / ("b" * 40)
    )
    (tmp_path / "models--EleutherAI--pythia-70m-deduped" / "refs" / "main").write_text("b" * 40)
    assert load().info["cache_folder_key"] != first.info["cache_folder_key"]
