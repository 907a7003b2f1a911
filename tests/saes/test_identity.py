"""``sae=identity``: SAEBench's identity baseline (d_sae = d_model, encode = x, decode = f),
built from the Hydra option, exact on signed inputs, and run through eval=core and eval=ravel
on the embedded default model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from saeravel.results import sae_architecture
from saeravel.saes.identity import IdentitySource, identity_sae
from saeravel.saes.source import build_sae_source

from helpers import ROOT


def test_identity_sae_returns_its_input_signed() -> None:
    sae = identity_sae(8, layer=2)
    x = torch.randn(5, 8)
    assert x.min() < 0  # the latents keep the sign: no ReLU
    assert sae.d_sae == sae.d_in == 8
    assert torch.equal(sae.encode(x), x)
    assert torch.equal(sae.decode(x), x)
    assert torch.equal(sae.reconstruct(x), x)
    assert sae.hook_name == "blocks.2.hook_resid_post"
    assert sae_architecture(sae.cfg_dict) == "identity"


def test_sae_identity_option_builds_the_source_at_the_jobs_layer() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["sae=identity", "layer=1", "paths.output_dir=x"])
    source = build_sae_source(cfg.sae)
    assert isinstance(source, IdentitySource)
    assert (source.family, source.layer) == ("identity", 1)
    assert source.required_model_kwargs() == {}
    sae = source.load(SimpleNamespace(d_model=6))
    assert sae.d_sae == 6 and torch.equal(sae.W_enc, torch.eye(6))


def run_job(root: Path, overrides: list[str]) -> dict:
    """One pipeline job on the embedded default model; its result.json."""
    from saeravel.pipeline import run

    out = root / "job"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            *overrides, "device=cpu", f"paths.output_dir={out}",
            f"paths.results_dir={root / 'results'}",
        ])  # fmt: skip
    run(cfg)
    return json.loads((out / "result.json").read_text())


CORE = ["eval=core", "eval.n_eval_reconstruction_batches=1",
        "eval.n_eval_sparsity_variance_batches=1", "eval.batch_size_prompts=4"]  # fmt: skip
RAVEL = ["eval=ravel", "eval.method=sae", "eval.epochs=1",
         "eval.max_pairs_per_split=16", "eval.checkpoint_every_s=0"]  # fmt: skip


def test_identity_runs_core_and_ravel_on_the_embedded_model(tmp_path: Path) -> None:
    """core: an exact dictionary (explained variance 1, CE unchanged, every dimension alive);
    ravel: the SAE-latent mask over the identity is a mask over the residual dimensions."""
    core = run_job(tmp_path / "core", ["sae=identity", *CORE])
    m = core["eval_result_metrics"]
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    ce = m["model_performance_preservation"]
    assert ce["ce_loss_with_sae"] == pytest.approx(ce["ce_loss_without_sae"], abs=1e-5)
    assert m["misc_metrics"]["frac_alive"] == 1.0
    assert core["sae_cfg_dict"]["architecture"] == "identity"
    d_model = core["sae_cfg_dict"]["d_sae"]
    assert core["sae_cfg_dict"]["d_in"] == d_model
    assert m["sparsity"]["l0"] == pytest.approx(d_model, rel=0.02)
    ravel = run_job(tmp_path / "ravel", ["sae=identity", *RAVEL])["eval_result_metrics"]["ravel"]
    for attr, score in ravel["sae"].items():
        assert 0 <= score["first_token"]["cause"] <= 1, attr


def test_identity_latents_probe_exactly_like_the_residual(tmp_path: Path) -> None:
    """eval=sparse_probing: the identity's latents are the residual dimensions, so every SAE
    probe scores what the same residual probe scores."""
    rec = run_job(tmp_path, ["sae=identity", "eval=sparse_probing", "eval.k_values=[1,2]",
                             "eval.probe.c_grid=[1.0]"])  # fmt: skip
    llm, sae = rec["eval_result_metrics"]["llm"], rec["eval_result_metrics"]["sae"]
    for key, value in llm.items():
        assert sae[key.replace("llm", "sae")] == pytest.approx(value), key
