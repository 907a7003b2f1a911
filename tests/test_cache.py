"""Cache entries heal: the mechanics of saeravel.cache, and every cache kind built on them
(the embedded model, the trained SAE) with truncated, zero-byte and wrong-type files.

Tiny sizes throughout (an embedded model of 2 layers, d_model 32, 5 training steps; an SAE of
5 steps), in temporary cache folders: the shared cache is never touched."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from saeravel.cache import (
    CorruptEntry,
    MissingEntry,
    file_record,
    load_or_build,
    read_json,
    torch_load,
    verify_files,
)
from saeravel.results import atomic_torch_save, atomic_write_json

# ----------------------------------------------------------------------------- mechanics


def _entry(tmp_path: Path, payload: dict) -> tuple[Path, object, object, list]:
    """A toy entry (weights.pt + meta.json with checksums, written last) and its load/build."""
    folder = tmp_path / "entry"
    builds: list[int] = []

    def build() -> None:
        builds.append(1)
        atomic_torch_save(folder / "weights.pt", payload)
        atomic_write_json(folder / "meta.json", {"files": file_record(folder, ["weights.pt"])})

    def load() -> dict:
        meta = read_json(folder / "meta.json", required=("files",))
        verify_files(folder, meta["files"])
        return torch_load(folder / "weights.pt")

    return folder, load, build, builds


def test_load_or_build_builds_once_then_loads(tmp_path):
    folder, load, build, builds = _entry(tmp_path, {"w": torch.arange(3)})
    first = load_or_build(folder, load, build, what="toy")
    again = load_or_build(folder, load, build, what="toy")
    assert builds == [1]
    assert torch.equal(first["w"], again["w"])


@pytest.mark.parametrize(
    "damage",
    ["truncate_weights", "zero_weights", "text_weights", "truncate_meta", "list_meta", "no_files"],
)
def test_corrupt_entry_is_quarantined_and_rebuilt_with_one_line(tmp_path, caplog, damage):
    folder, load, build, builds = _entry(tmp_path, {"w": torch.arange(100)})
    load_or_build(folder, load, build, what="toy")
    w, m = folder / "weights.pt", folder / "meta.json"
    if damage == "truncate_weights":
        w.write_bytes(w.read_bytes()[:50])
    elif damage == "zero_weights":
        w.write_bytes(b"")
    elif damage == "text_weights":
        w.write_text("not a tensor file")
    elif damage == "truncate_meta":
        m.write_text(m.read_text()[:20])
    elif damage == "list_meta":
        m.write_text("[1, 2]")
    else:
        (folder / "weights.pt").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saeravel.cache"):
        out = load_or_build(folder, load, build, what="toy")
    assert torch.equal(out["w"], torch.arange(100))
    assert builds == [1, 1]
    lines = [r for r in caplog.records if r.name == "saeravel.cache"]
    assert len(lines) == 1 and "corrupt" in lines[0].getMessage()
    assert (tmp_path / "entry.corrupt").is_dir()


def test_missing_marker_is_an_unbuilt_entry_not_a_corrupt_one(tmp_path, caplog):
    """A build killed before its marker (meta.json) is simply built again, silently."""
    folder, load, build, builds = _entry(tmp_path, {"w": torch.ones(2)})
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="saeravel.cache"):
        load_or_build(folder, load, build, what="toy")
    assert builds == [1]
    assert not [r for r in caplog.records if r.name == "saeravel.cache"]
    assert not (tmp_path / "entry.corrupt").exists()


def test_a_build_that_does_not_load_is_an_error_not_a_loop(tmp_path):
    folder = tmp_path / "entry"

    def load() -> None:
        raise CorruptEntry("always broken")

    with pytest.raises(RuntimeError, match="was just built but does not load"):
        load_or_build(folder, load, lambda: None, what="toy")


def test_readers_raise_corrupt_entry(tmp_path):
    with pytest.raises(MissingEntry):
        read_json(tmp_path / "absent.json")
    with pytest.raises(CorruptEntry) as exc:
        read_json(tmp_path / "absent.json", missing_ok=False)
    assert not isinstance(exc.value, MissingEntry)
    (tmp_path / "d.json").write_text('{"a": 1}')
    with pytest.raises(CorruptEntry, match="lacks b"):
        read_json(tmp_path / "d.json", required=("a", "b"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CorruptEntry, match="holds a list"):
        torch_load(tmp_path / "list.pt")
    (tmp_path / "f").write_text("abc")
    rec = file_record(tmp_path, ["f"])
    verify_files(tmp_path, rec)
    (tmp_path / "f").write_text("abd")
    with pytest.raises(CorruptEntry, match="sha256"):
        verify_files(tmp_path, rec)


# ----------------------------------------------------------------------------- embedded model

TINY_LM = dict(
    name="tiny-test-lm", n_layers=2, d_model=32, default_layer=0, n_heads=2, d_mlp=64, n_ctx=96,
    local_layers=1, n_cities=20, attributes=["Country"], train_steps=5, train_batch=4,
    facts_per_sequence=2, lr=3e-3, world_seed=0, train_seed=0, min_fact_accuracy=0.0,
    readout_mlps=False, freeze_unembed=True, device="cpu",
)  # fmt: skip


@pytest.fixture(scope="module")
def built_lm(tmp_path_factory):
    """One tiny embedded model, trained once into a template cache."""
    from saeravel.tiny_lm import EmbeddedModel

    cache = tmp_path_factory.mktemp("lm-cache")
    source = EmbeddedModel(**TINY_LM, cache_dir=str(cache))
    loaded = source.load()
    return cache, source.folder().relative_to(cache), loaded.info["weights_sha256"]


def _damage_lm(folder: Path, damage: str) -> None:
    model, meta, world = folder / "model.pt", folder / "meta.json", folder / "world.json"
    if damage == "model_truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "model_zero_bytes":
        model.write_bytes(b"")
    elif damage == "model_wrong_type":
        torch.save([1, 2, 3], model)
    elif damage == "model_wrong_tensors_checksummed":  # passes the checksum, not the shapes
        torch.save({"embed.W_E": torch.zeros(3, 3)}, model)
        data = json.loads(meta.read_text())
        data["files"] = file_record(folder, ["model.pt", "world.json"])
        meta.write_text(json.dumps(data))
    elif damage == "meta_truncated":
        meta.write_text(meta.read_text()[:100])
    elif damage == "meta_wrong_type":
        meta.write_text('["arch", "train"]')
    elif damage == "world_missing":
        world.unlink()
    elif damage == "world_wrong_type":
        world.write_text("[]")
    else:
        raise AssertionError(damage)


@pytest.mark.parametrize(
    "damage",
    [
        "model_truncated", "model_zero_bytes", "model_wrong_type",
        "model_wrong_tensors_checksummed", "meta_truncated", "meta_wrong_type",
        "world_missing", "world_wrong_type",
    ],
)  # fmt: skip
def test_corrupt_embedded_model_is_rebuilt(built_lm, tmp_path, caplog, damage):
    """One warning line, the entry moved aside, and the same model again (training is
    bit-reproducible on one machine, so the rebuilt weights equal the first ones)."""
    from saeravel.tiny_lm import EmbeddedModel

    template, rel, weights = built_lm
    cache = tmp_path / "cache"
    shutil.copytree(template, cache)
    _damage_lm(cache / rel, damage)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = EmbeddedModel(**TINY_LM, cache_dir=str(cache)).load()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "corrupt" in r.msg]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert (cache / rel).with_name(rel.name + ".corrupt").is_dir()
    assert loaded.info["weights_sha256"] == weights
    assert loaded.info["attributes"] == ["Country"]
    assert set(json.loads((cache / rel / "meta.json").read_text())["files"]) == {
        "model.pt",
        "world.json",
    }


# ----------------------------------------------------------------------------- trained SAE

TINY_SAE = dict(
    family="trained", layer=0, k=4, expansion=2, steps=5, batch_size=16, n_sequences=20, seed=0
)


@pytest.fixture(scope="module")
def built_sae(tmp_path_factory, tiny_model):
    from saeravel.saes.trained import TrainedSource

    cache = tmp_path_factory.mktemp("sae-cache")
    source = TrainedSource(**TINY_SAE, cache_dir=str(cache))
    sae = source.load(tiny_model)
    return cache, source._folder(tiny_model).relative_to(cache), sae.W_enc.clone()


def _damage_sae(folder: Path, damage: str) -> None:
    weights, meta = folder / "sae.pt", folder / "meta.json"
    if damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "weights_zero_bytes":
        weights.write_bytes(b"")
    elif damage == "weights_wrong_type":
        weights.write_text("{}")
    elif damage == "weights_wrong_shape_checksummed":
        w = torch.load(weights)
        w["W_enc"] = w["W_enc"][:, :3]
        torch.save(w, weights)
        data = json.loads(meta.read_text())
        data["files"] = file_record(folder, ["sae.pt"])
        meta.write_text(json.dumps(data))
    elif damage == "meta_truncated":
        meta.write_text(meta.read_text()[:30])
    elif damage == "meta_zero_bytes":
        meta.write_bytes(b"")
    elif damage == "meta_wrong_type":
        meta.write_text('"metrics"')
    else:
        raise AssertionError(damage)


@pytest.mark.parametrize(
    "damage",
    [
        "weights_truncated", "weights_zero_bytes", "weights_wrong_type",
        "weights_wrong_shape_checksummed", "meta_truncated", "meta_zero_bytes",
        "meta_wrong_type",
    ],
)  # fmt: skip
def test_corrupt_trained_sae_is_rebuilt(built_sae, tiny_model, tmp_path, caplog, damage):
    from saeravel.saes.trained import TrainedSource

    template, rel, w_enc = built_sae
    cache = tmp_path / "cache"
    shutil.copytree(template, cache)
    _damage_sae(cache / rel, damage)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sae = TrainedSource(**TINY_SAE, cache_dir=str(cache)).load(tiny_model)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "corrupt" in r.msg]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert (cache / rel).with_name(rel.name + ".corrupt").is_dir()
    assert torch.equal(sae.W_enc, w_enc)


def test_embedded_cache_key_follows_recorded_weights(built_lm, tmp_path):
    """Another model under the same config (another machine, properly recorded) gets another
    cache_folder_key, so filters and SAEs built on the old weights are not reused."""
    from saeravel.tiny_lm import EmbeddedModel

    template, rel, weights = built_lm
    cache = tmp_path / "cache"
    shutil.copytree(template, cache)
    folder = cache / rel
    state = torch.load(folder / "model.pt")
    state["unembed.b_U"] = state["unembed.b_U"] + 1e-3
    torch.save(state, folder / "model.pt")
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = file_record(folder, ["model.pt", "world.json"])
    (folder / "meta.json").write_text(json.dumps(meta))
    source = EmbeddedModel(**TINY_LM, cache_dir=str(cache))
    info = source.load().info
    assert info["weights_sha256"] != weights
    assert info["cache_folder_key"] == f"{source.key()}-{info['weights_sha256']}"
    assert not folder.with_name(folder.name + ".corrupt").exists()
