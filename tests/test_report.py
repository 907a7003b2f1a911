"""The report never merges two jobs: rows keyed by job hash, differing settings as columns,
mean +- std only over the seeds of otherwise identical jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeravel import report
from saeravel.results import atomic_write_json, build_record, job_hash

CONF = Path(__file__).resolve().parents[1] / "conf"
BASE = ["paths.output_dir=/x", "eval.method=das", "sae=none"]


def _record(overrides: list[str], cause: float, millis: int = 1) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    scores = {a: {"cause": cause, "isolation": 0.5, "disentangle": (cause + 0.5) / 2}
              for a in ("Country", "Continent")}  # fmt: skip
    base = {a: {"cause": 0.0, "isolation": 1.0, "disentangle": 0.5} for a in scores}
    rec = build_record(
        eval_name="ravel", eval_cfg=resolved["eval"],
        metrics={"ravel": {"das": scores, "baseline": base}}, details=None, unstructured=None,
        sae_identity=None, sae_cfg=None, model_name=cfg.model.name, model_info={},
        layer=cfg.layer, hook_name=f"blocks.{cfg.layer}.hook_resid_post",
        resolved_config=resolved, job_id=job_hash(resolved), runtime_s=1.0,
    )  # fmt: skip
    rec["datetime_epoch_millis"] = millis
    return rec


def _sweep(tmp: Path, jobs: dict[str, tuple[list[str], float]]) -> report.Report:
    for name, (overrides, cause) in jobs.items():
        atomic_write_json(tmp / name / "result.json", _record(overrides, cause), strict=True)
    return report.build_report(tmp, tmp / "report")


def test_a_sweep_over_model_train_seed_shows_three_seeds(tmp_path: Path) -> None:
    rep = _sweep(tmp_path, {f"s{s}": ([f"model.train_seed={s}"], 0.2 * s) for s in range(3)})
    ravel, spread = rep.tables[:2]
    assert len(ravel.rows) == 3 * 2  # three jobs x two attributes: none merged
    assert sorted({r["model.train_seed"] for r in ravel.rows}) == [0, 1, 2]
    assert len({r["job_hash"] for r in ravel.rows}) == 3
    assert not ravel.notes  # nothing dropped
    assert len(spread.rows) == 2 and all(r["n_seeds"] == 3 for r in spread.rows)
    row = spread.rows[0]
    assert row["cause_mean"] == pytest.approx(0.2)
    assert row["cause_std"] == pytest.approx(0.2)  # sample std of 0, 0.2, 0.4
    assert "model.train_seed" in ravel.about and "seed keys: seed, model.train_seed" in ravel.about
    assert "model.train_seed" in rep.markdown and "n_seeds" in rep.markdown


def test_a_sweep_over_eval_lr_shows_two_rows(tmp_path: Path) -> None:
    rep = _sweep(tmp_path, {"a": (["eval.lr=1e-3"], 0.3), "b": (["eval.lr=1e-2"], 0.7)})
    ravel, spread = rep.tables[:2]
    country = [r for r in ravel.rows if r["attribute"] == "Country"]
    assert sorted((r["eval.lr"], r["cause"]) for r in country) == [(0.001, 0.3), (0.01, 0.7)]
    assert "eval.lr" in ravel.columns and ravel.settings == ["eval.lr"]
    assert "settings that differ between these jobs: eval.lr" in ravel.about
    spread_country = [r for r in spread.rows if r["attribute"] == "Country"]
    assert len(spread_country) == 2 and all(r["n_seeds"] == 1 for r in spread_country)
    header = (tmp_path / "report" / "ravel.csv").read_text().splitlines()[0].split(",")
    assert "eval.lr" in header


def test_jobs_differing_in_layer_and_epochs_are_never_one_line(tmp_path: Path) -> None:
    """The issue's case: a 2-epoch job at layer 0 and a default-epochs job at layer 1."""
    rep = _sweep(tmp_path, {"a": (["layer=0", "eval.epochs=2"], 0.1), "b": (["layer=1"], 0.9)})
    ravel = rep.tables[0]
    assert ravel.settings == ["eval.epochs"]
    labels = {report.line_label(r, ravel.settings) for r in ravel.rows}
    assert labels == {"das (eval.epochs=2)", "das (eval.epochs=30)"}  # 30: the saeravel recipe


def test_seed_and_setting_together(tmp_path: Path) -> None:
    """Two lrs x two seeds: two groups of two seeds each, never one group of four."""
    jobs = {f"{lr}-{s}": ([f"eval.lr={lr}", f"seed={s}"], 0.1 + s * 0.1 + (lr == "1e-2") * 0.5)
            for lr in ("1e-3", "1e-2") for s in (0, 1)}  # fmt: skip
    rep = _sweep(tmp_path, jobs)
    spread = rep.tables[1]
    country = sorted(
        (r["eval.lr"], r["n_seeds"], round(r["cause_mean"], 6))
        for r in spread.rows
        if r["attribute"] == "Country"
    )
    assert country == [(0.001, 2, 0.15), (0.01, 2, 0.65)]


def test_a_force_rerun_of_one_job_keeps_the_newest(tmp_path: Path) -> None:
    old, new = _record([], 0.1, millis=1), _record([], 0.8, millis=2)
    atomic_write_json(tmp_path / "a" / "result.json", old, strict=True)
    atomic_write_json(tmp_path / "b" / "result.json", new, strict=True)
    ravel = report.build_report(tmp_path).tables[0]
    assert {r["cause"] for r in ravel.rows} == {0.8}
    assert len(ravel.notes) == 2 and all("kept b/result.json" in n for n in ravel.notes)


def test_saebench_copies_and_null_scores_are_read_right(tmp_path: Path) -> None:
    rec = _record([], float("nan"))
    atomic_write_json(tmp_path / "a" / "result.json", rec, strict=True)
    (tmp_path / "a" / "x_eval_results.json").write_text(json.dumps({"eval_type_id": "ravel"}))
    rep = report.build_report(tmp_path)
    assert not rep.skipped  # the SAEBench copy is not read as a saeravel record
    ravel = rep.tables[0]
    assert all(r["cause"] != r["cause"] for r in ravel.rows)  # null -> NaN
