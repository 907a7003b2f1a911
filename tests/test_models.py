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
    assert "expected one of [auto, float32, float16, bfloat16]" in str(exc.value.__cause__)


def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_on_cpu(monkeypatch):
    """``dtype: auto`` (gemma-2-2b's preset) is resolved when the source is built, and what
    is recorded (and keys caches) is the dtype that ran."""
    assert _compose("model=gemma-2-2b").model.dtype == "auto"
    assert resolve_dtype("auto", "cpu") is torch.float32
    src = TransformerLensModel("gemma-2-2b", "gemma-2-2b", 26, 2304, 12, dtype="auto", device="cpu")
    assert (src.dtype_name, src.dtype) == ("float32", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") is torch.float32  # a GPU without bfloat16


def _gated_errors():
    """What a load of a gated repo raises without access: the hub's GatedRepoError, and the
    OSError transformers wraps it in (its text names the gated repo)."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    url = "https://huggingface.co/google/gemma-2-2b/resolve/main/config.json"
    response = httpx2.Response(401, request=httpx2.Request("GET", url))
    hub = GatedRepoError("401 Client Error. Access to model google/gemma-2-2b is restricted. "
                         "You must have access to it and be authenticated.", response=response)  # fmt: skip
    try:
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it "
                      "at https://huggingface.co/google/gemma-2-2b.\n401 Client Error.") from hub  # fmt: skip
    except OSError as wrapped:
        return [hub, wrapped, OSError("Cannot access gated repo for url " + url)]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["hub", "transformers", "text"])
def test_gated_model_is_one_line_naming_the_licence_and_token(cli, monkeypatch, which):
    """google/gemma-2-2b is gated: without HF_TOKEN, or with an account that has not accepted
    its licence, the job ends in one line saying so (not a traceback, not the offline hint)."""
    from transformer_lens import HookedTransformer

    def refuse(*args, **kwargs):
        raise _gated_errors()[which]

    monkeypatch.setattr(HookedTransformer, "from_pretrained", refuse)
    line = cli(["model=gemma-2-2b", "sae=none", "eval.method=neurons", "device=cpu"]).error_line()
    assert line == (
        "error: model gemma-2-2b: google/gemma-2-2b is gated on Hugging Face: accept its licence "
        "at https://huggingface.co/google/gemma-2-2b with your account, then set HF_TOKEN to a "
        "token of that account (or run `hf auth login`)"
    )


def test_gated_repo_in_prefetch_is_one_line(monkeypatch):
    from huggingface_hub import HfApi

    from saeravel.offline import hub_model_need

    raised = [_gated_errors()[0]]

    def refuse(*args, **kwargs):
        raise raised[0]

    monkeypatch.setattr(HfApi, "list_repo_files", refuse)
    need = hub_model_need("google/gemma-2-2b", "model google/gemma-2-2b")
    with pytest.raises(UserError, match=r"^google/gemma-2-2b is gated on Hugging Face: accept"):
        need.fetch()
    raised[0] = OSError("boom")  # any other failure is left as it was
    with pytest.raises(OSError, match="boom"):
        need.fetch()


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
