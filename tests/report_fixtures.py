"""Realistic results folders for the report's tests: RAVEL records of all eight methods with
the none / swap / SAE-reconstruction (and, on the planted model, oracle) references, per-epoch
training curves, bootstrap intervals, several layers, SAE families and seeds, two models in
one folder, plus core and sparse-probing records of the same SAEs. Every record is built by the
project's own :func:`saeravel.results.build_record` from a composed config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeravel.config import register_configs
from saeravel.results import atomic_write_json, build_record, job_hash

register_configs()  # (tests/conftest.py does it too; this module also runs outside pytest)

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = ("sae", "neurons", "das", "pca", "boundless_das", "mdas", "sae_probe", "fixed")
ATTRS = ("Country", "Continent")  # the config's order
# disentangle at the middle layer, as in the default embedded run (/tmp/baseline_result.json)
LEVEL = {"sae": 0.53, "neurons": 0.59, "das": 0.85, "pca": 0.50, "boundless_das": 0.84,
         "mdas": 0.86, "sae_probe": 0.48, "fixed": 0.46}  # fmt: skip
MODELS = {
    "tiny": ["model=tiny-city-lm", "sae=trained"],
    "planted": ["model=planted-city-lm", "sae=planted", "model.n_layers=5"],
}


def _compose(overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/x", *overrides])
    return cfg, OmegaConf.to_container(cfg, resolve=True)


def _scores(d: float, spread: float = 0.04) -> dict[str, Any]:
    cause, iso = min(1.0, d + 0.05), max(0.0, d - 0.05)
    return {
        "cause": cause, "isolation": iso, "disentangle": d,
        "ci95": {"cause": [cause - spread, cause + spread], "isolation": [iso - spread, iso + spread],
                 "disentangle": [d - spread, d + spread]},
        "mask_kept": 12, "mask_size": 1024, "kept_top": [607, 426, 417],
    }  # fmt: skip


def ravel_record(
    model: str, layer: int, family: str = "trained", seed: int = 0, extra: tuple = (),
    verdict: bool = False, millis: int = 1, outcomes: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A RAVEL record of ``model`` (a key of :data:`MODELS`) at ``layer``."""
    overrides = [*MODELS[model], f"layer={layer}", f"seed={seed}", *extra]
    if family != "trained":  # a second SAE: a wider TopK, or the planted world's random control
        overrides.append("sae.k=32" if model == "tiny" else "sae.dictionary=random")
    cfg, resolved = _compose(overrides)
    shape = 1 - 0.04 * (layer - 2) ** 2  # a layer profile peaking in the middle
    ravel: dict[str, Any] = {}
    for m in METHODS:
        bump = 0.03 * seed + (0.04 if family != "trained" and m.startswith("sae") else 0)
        ravel[m] = {a: _scores(min(0.99, LEVEL[m] * shape + bump + 0.01 * i))
                    for i, a in enumerate(ATTRS)}  # fmt: skip
    refs = {
        "none": {a: {"cause": 0.0, "isolation": 1.0, "disentangle": 0.5} for a in ATTRS},
        "swap": {a: {"cause": 1.0, "isolation": 0.0, "disentangle": 0.5} for a in ATTRS},
        "sae_recon": {a: {"cause": 0.01, "isolation": 0.95, "disentangle": 0.48} for a in ATTRS},
    }
    if model == "planted":
        refs["oracle"] = {a: {"cause": 1.0, "isolation": 0.98, "disentangle": 0.99} for a in ATTRS}
    ravel["baseline"] = refs["none"]
    curves = {f"{m}/{a}": [3.0 * math.exp(-e / (5 + i)) + 1.0 for e in range(30)]
              for i, m in enumerate(METHODS[:6]) for a in ATTRS}  # fmt: skip
    details: dict[str, Any] = {"training_curves": curves}
    if verdict:
        details["verdict"] = {a: {
            "das - sae": {"disentangle": {"diff": 0.31, "ci": [0.25, 0.37]}},
            "neurons - sae": {"disentangle": {"diff": 0.06, "ci": [-0.01, 0.12]}},
            "das - neurons": {"disentangle": {"diff": 0.25, "ci": [0.2, 0.3]}},
        } for a in ATTRS}  # fmt: skip
    if outcomes is not None:  # per-pair outcomes: 10 entities x (2 cause, 2 isolation pairs)
        details["outcomes"] = {a: {
            "entity": [f"e{j}" for j in range(10) for _ in range(4)], "kind": "ccii" * 10,
            "methods": {m: ok * 10 for m, ok in outcomes.items()},
        } for a in ATTRS}  # fmt: skip
    ident = {"family": family, "release": None, "sae_id": None, "path": f"/c/{family}-{layer}",
             "extra": {}, "neuronpedia_id": None}  # fmt: skip
    rec = build_record(
        eval_name="ravel", eval_cfg=resolved["eval"], metrics={"ravel": ravel, "baselines": refs},
        details=details, unstructured=None, sae_identity=ident,
        sae_cfg={"d_sae": 1024, "architecture": "topk"}, model_name=cfg.model.name,
        model_info={}, layer=layer, hook_name=f"blocks.{layer}.hook_resid_post",
        resolved_config=resolved, job_id=job_hash(resolved), runtime_s=1.0,
    )  # fmt: skip
    rec["datetime_epoch_millis"] = millis
    return rec


def generic_record(
    eval_name: str, model: str, layer: int, family: str, metrics: dict[str, Any],
    arch: str = "topk", k: int = 0,
) -> dict[str, Any]:  # fmt: skip
    overrides = [*MODELS[model], f"layer={layer}", f"eval={eval_name}", f"sae.seed={k}"]
    cfg, resolved = _compose(overrides)
    ident = {"family": family, "release": None, "sae_id": f"{family}-{layer}-{k}", "path": None,
             "extra": {}, "neuronpedia_id": None}  # fmt: skip
    return build_record(
        eval_name=eval_name, eval_cfg=resolved["eval"], metrics=metrics, details=None,
        unstructured=None, sae_identity=ident, sae_cfg={"d_sae": 1024, "architecture": arch},
        model_name=cfg.model.name, model_info={}, layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post", resolved_config=resolved,
        job_id=job_hash(resolved), runtime_s=1.0,
    )  # fmt: skip


def core_metrics(l0: float, ce_score: float, undefined: bool = False) -> dict[str, Any]:
    clean, abl = (2.5, 9.0) if not undefined else (9.5, 9.0)  # clean CE above ablated: undefined
    return {
        "sparsity": {"l0": l0, "l1": 2 * l0},
        "model_performance_preservation": {
            "ce_loss_score": 2.75 if undefined else ce_score, "ce_loss_with_sae": 3.0,
            "ce_loss_without_sae": clean, "ce_loss_with_ablation": abl},
        "model_behavior_preservation": {"kl_div_score": ce_score, "kl_div_with_ablation": 1.0},
        "reconstruction_quality": {"explained_variance": ce_score - 0.1, "mse": 0.1, "cossim": 0.9},
        "misc_metrics": {"frac_alive": 1.0, "freq_over_1_percent": 0.2},
        "shrinkage": {"l2_ratio": 0.9},
    }  # fmt: skip


def write(folder: Path, name: str, record: dict[str, Any]) -> Path:
    return atomic_write_json(folder / name / "result.json", record, strict=True)


def paper_folder(folder: Path, models: tuple[str, ...] = ("tiny", "planted")) -> Path:
    """RAVEL at layers 0-4 (two seeds at layer 2, a second SAE at layers 1-3, a verdict at
    layer 2) for each of ``models``, and core / sparse probing for three SAEs each."""
    for model in models:
        for layer in range(5):
            write(folder, f"{model}-L{layer}-s0", ravel_record(model, layer, verdict=layer == 2))
        write(folder, f"{model}-L2-s1", ravel_record(model, 2, seed=1))
        for layer in (1, 2, 3):
            second = "trained_k32" if model == "tiny" else "planted_random"
            write(folder, f"{model}-L{layer}-{second}", ravel_record(model, layer, family=second))
        for k, (l0, ce, arch) in enumerate([(8, 0.8, "topk"), (32, 0.93, "topk"),
                                            (120, 0.97, "standard")]):  # fmt: skip
            core = generic_record("core", model, 2, "trained", core_metrics(l0, ce), arch, k)
            write(folder, f"{model}-core-{k}", core)
            probe = generic_record("sparse_probing", model, 2, "trained", {
                "llm": {"llm_test_accuracy": 0.96, "llm_top_1_test_accuracy": 0.7},
                "sae": {"sae_test_accuracy": ce, "sae_top_1_test_accuracy": ce - 0.2}}, arch, k)  # fmt: skip
            write(folder, f"{model}-sp-{k}", probe)
        bad = generic_record("core", model, 2, "trained", core_metrics(4, 0.5, True), "jumprelu", 9)
        write(folder, f"{model}-core-undefined", bad)
    return folder
