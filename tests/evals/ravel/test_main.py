"""The RAVEL eval end to end on a small trained city model, through the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from saeravel.errors import UserError
from saeravel.pipeline import run

from helpers import ROOT, SMALL_CITY

CONF = str(ROOT / "conf")


def _cfg(tmp: Path, cache: Path, extra: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=SMALL_CITY
            + [
                f"paths.cache_dir={cache}",
                f"paths.output_dir={tmp / 'out'}",
                f"paths.results_dir={tmp / 'results'}",
            ]  # fmt: skip
            + extra,
        )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_invariants_and_result_record(tmp_path, cache):
    rec = run(_cfg(tmp_path, cache, ["eval.method=all"]))
    m = rec["eval_result_metrics"]
    info = rec["saeravel"]["model_info"]
    assert info["fact_accuracy"] >= 0.9, info
    for attr in ("Country", "Continent"):
        none = m["baselines"]["none"][attr]
        # No intervention: the source's (different) label is never produced; the model's own
        # answers are all correct on the known, filtered facts.
        assert none["cause"] == 0.0
        assert none["isolation"] == 1.0
        assert m["baselines"]["swap"][attr]["cause"] >= 0.9  # facts live at the city token
        for method in ("sae", "neurons", "das"):
            r = m["ravel"][method][attr]
            assert 0.0 <= r["cause"] <= 1.0 and 0.0 <= r["isolation"] <= 1.0
            assert r["disentangle"] == pytest.approx((r["cause"] + r["isolation"]) / 2)
            assert 0 <= r["mask_kept"] <= r["mask_size"]
    # DAS can always at least do what the full swap does for cause or keep isolation.
    assert max(m["ravel"]["das"]["Country"]["disentangle"], 0.5) >= 0.5
    out = tmp_path / "out"
    on_disk = json.loads((out / "result.json").read_text())
    for key in ("eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                "eval_result_details", "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict"):  # fmt: skip
        assert key in on_disk
    assert on_disk["saeravel"]["layer"] == 1
    assert on_disk["saeravel"]["hook_name"] == "blocks.1.hook_resid_post"
    assert (out / "ravel_das_Country.pt").exists()
    if "refined" in m["ravel"]["das"]["Country"]:  # the searched mask is kept apart
        trained = torch.load(out / "ravel_das_Country.pt", weights_only=True)
        refined = torch.load(out / "ravel_das_Country_refined.pt", weights_only=True)
        assert trained.keys() == refined.keys()
    assert on_disk["eval_result_details"]["data"]["split_by"] == "entity"


@pytest.mark.slow
def test_same_seed_same_numbers_and_resume(tmp_path, cache):
    a = run(_cfg(tmp_path / "a", cache, ["eval.method=neurons"]))
    b = run(_cfg(tmp_path / "b", cache, ["eval.method=neurons"]))
    assert a["eval_result_metrics"] == b["eval_result_metrics"]
    # Same results_dir: the second job is skipped and returns the stored record.
    again = run(_cfg(tmp_path / "a", cache, ["eval.method=neurons"]))
    assert again["eval_id"] == a["eval_id"]
    forced = run(_cfg(tmp_path / "a", cache, ["eval.method=neurons", "force=true"]))
    assert forced["eval_id"] != a["eval_id"]


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(tmp_path, cache):
    with pytest.raises(UserError, match="eval.attributes has \\['Elevation'\\]"):
        run(_cfg(tmp_path, cache, ["eval.method=neurons", "eval.attributes=[Country,Elevation]"]))
    from hydra.errors import ConfigCompositionException

    # A closed set (an Enum in the schema): a misspelt value fails when the config is composed.
    with pytest.raises(ConfigCompositionException, match="eval.protocol=raval"):
        _cfg(tmp_path, cache, ["eval.method=neurons", "eval.protocol=raval"])
    with pytest.raises(UserError, match="layer=7 is out of range"):
        run(_cfg(tmp_path, cache, ["eval.method=neurons", "layer=7"]))
    assert not (tmp_path / "out" / "result.json").exists()


def test_own_state_is_a_copy_that_later_flips_do_not_reach():
    """The saved trained mask must be the one whose score is reported: refinement flips
    entries in place afterwards."""
    import torch

    from saeravel.evals.ravel.intervene import NeuronMask

    m = NeuronMask(6)
    state = m.own_state()
    with torch.no_grad():
        m.mask.param[0] = 5.0
    assert state["mask.param"][0] != 5.0
