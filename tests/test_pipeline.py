"""SAE/model fit checks, processing merge, atomic writes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from saeravel.errors import UserError
from saeravel.models import merge_processing
from saeravel.pipeline import check_sae_fits
from saeravel.results import atomic_write_json
from saeravel.saes.base import SAE, SAEIdentity


def _sae(d_in: int, hook: str) -> SAE:
    return SAE(torch.zeros(d_in, 4), torch.zeros(4), torch.zeros(4, d_in), torch.zeros(d_in),
               hook_name=hook, identity=SAEIdentity("test"))  # fmt: skip


def _model(d_model: int = 64, n_layers: int = 4):
    return SimpleNamespace(d_model=d_model, n_layers=n_layers, name="m")


def test_sae_fits_the_residual_after_the_layer():
    check_sae_fits(_sae(64, "blocks.2.hook_resid_post"), _model(), 2)
    check_sae_fits(_sae(64, "blocks.3.hook_resid_pre"), _model(), 2)  # same tensor
    check_sae_fits(_sae(64, "blocks.3.hook_resid_pre"), _model(), 2, "resid_post")


@pytest.mark.parametrize("site", ["resid_mid", "mlp_out", "attn_out"])
def test_sae_fits_a_site_inside_the_block(site):
    check_sae_fits(_sae(64, f"blocks.2.hook_{site}"), _model(), 2, site)
    with pytest.raises(UserError, match=f"site=resid_post .*; it fits layer=2 site={site}$"):
        check_sae_fits(_sae(64, f"blocks.2.hook_{site}"), _model(), 2)


@pytest.mark.parametrize(
    ("d_in", "hook", "site", "match"),
    [
        (32, "blocks.2.hook_resid_post", "resid_post", "d_in=32 but model m has d_model=64"),
        (64, "blocks.2.hook_resid_pre", "resid_post",
         r"reads blocks.2.hook_resid_pre, which is not the job's layer=2 site=resid_post "
         r"\(blocks.2.hook_resid_post\); it fits layer=1 site=resid_post$"),
        (64, "blocks.2.hook_mlp_out", "attn_out", "it fits layer=2 site=mlp_out"),
        (64, "blocks.3.hook_mlp_out", "mlp_out", "it fits layer=3 site=mlp_out"),
        (64, "blocks.2.attn.hook_z", "attn_out",
         "saeravel intervenes at blocks.L.hook_<site>, site one of resid_post, resid_mid, "
         "mlp_out, attn_out"),
        (64, "blocks.0.hook_resid_pre", "resid_post", "saeravel intervenes at"),  # embeddings
        (64, "blocks.4.hook_mlp_out", "mlp_out", "saeravel intervenes at"),  # no block 4
    ],
)  # fmt: skip
def test_sae_that_does_not_fit_is_an_error(d_in, hook, site, match):
    with pytest.raises(UserError, match=match):
        check_sae_fits(_sae(d_in, hook), _model(), 2, site)


def test_processing_merge():
    assert merge_processing("m", {}, {"center_writing_weights": False}) == {
        "center_writing_weights": False
    }
    assert merge_processing("m", {"fold_ln": False}, {}) == {"fold_ln": False}
    with pytest.raises(UserError, match="center_writing_weights=True but the SAE was trained with"):
        merge_processing("m", {"center_writing_weights": True}, {"center_writing_weights": False})


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1, "nan": float("nan")})
    assert json.loads(path.read_text())["a"] == 1
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text())["a"] == 1  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left
    assert "NaN" in path.read_text()  # NaN stays NaN


def _hold_lock(lock, log, name):
    import time

    from saeravel.results import file_lock

    with file_lock(lock):
        with open(log, "a") as fh:
            fh.write(f"{name}+\n")
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write(f"{name}-\n")


def test_file_lock_serialises_builders_across_processes(tmp_path):
    """Two processes that build the same cache entry take turns: the log never shows one
    entering while the other is inside."""
    import multiprocessing as mp

    lock, log = tmp_path / "entry.lock", tmp_path / "log"
    procs = [mp.get_context("fork").Process(target=_hold_lock, args=(lock, log, n)) for n in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    lines = log.read_text().split()
    assert len(lines) == 4 and all(p.exitcode == 0 for p in procs)
    assert lines[0][0] == lines[1][0] and lines[2][0] == lines[3][0], lines
    assert [line[1] for line in lines] == ["+", "-", "+", "-"]
