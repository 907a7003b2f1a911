"""Every RAVEL method on the planted world, whose right answers are known by construction
(``model=planted-city-lm``): the bands each method must land in on held-out entities, through
the real pipeline (composition, training recipe, scoring)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from saeravel.pipeline import run

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SMALL = ["model.n_entities=120", "model.n_country=20", "model.n_continent=6",
         "model.n_language=10", "model.id_dims=6", "model.d_model=48",
         "eval.max_pairs_per_split=200", "eval.max_entities=null", "eval.checkpoint_every_s=0"]  # fmt: skip


def _run(tmp: Path, basis: str, extra: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=planted-city-lm", f"model.basis={basis}", "sae=planted", "device=cpu", *SMALL,
            f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / 'out'}",
            f"paths.results_dir={tmp / 'results'}", *extra,
        ])  # fmt: skip
    return run(cfg)["eval_result_metrics"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = {}
    for basis in ("aligned", "rotated", "mixed"):
        out[basis] = _run(tmp_path_factory.mktemp(basis), basis, ["eval.method=all"])
    return out


def _dis(m: dict, method: str) -> list[float]:
    group = m["baselines"] if method in m["baselines"] else m["ravel"]
    return [group[method][a]["disentangle"] for a in ("Country", "Continent")]


@pytest.mark.slow
@pytest.mark.parametrize("basis", ["aligned", "rotated", "mixed"])
def test_references_and_das_on_every_basis(results, basis):
    m = results[basis]
    assert min(_dis(m, "oracle")) >= 0.98
    assert _dis(m, "none") == [0.5, 0.5] and _dis(m, "swap") == [0.5, 0.5]
    assert min(_dis(m, "sae_recon")) == 0.5  # the planted SAE reconstructs exactly
    assert min(_dis(m, "das")) >= 0.95, _dis(m, "das")
    assert min(_dis(m, "sae")) >= 0.95, _dis(m, "sae")  # planted atoms: the SAE can be exact


@pytest.mark.slow
def test_neurons_can_only_when_the_basis_is_aligned(results):
    assert min(_dis(results["aligned"], "neurons")) >= 0.95
    # Rotated: a neuron mask moves parts of every value atom; with an argmax readout that earns
    # partial credit (the best mask a search finds scores ~0.68 on Country), never the oracle's.
    assert max(_dis(results["rotated"], "neurons")) <= 0.8
    assert (
        max(_dis(results["rotated"], "neurons")) <= min(_dis(results["rotated"], "oracle")) - 0.15
    )


@pytest.mark.slow
def test_trained_masks_are_as_good_as_the_search_finds(results):
    """On the mixed basis (each neuron carries two attributes), the trained mask must be within
    0.05 of the mask a greedy bit-flip search reaches from it, with a loss that has stopped
    falling: else the optimiser, not the method, sets the score."""
    for method in ("neurons", "sae"):
        for a in ("Country", "Continent"):
            r = results["mixed"]["ravel"][method][a]
            assert r["refined"]["disentangle"] - r["disentangle"] <= 0.05, (method, a, r["refined"])
            # nearly flat at these small sizes (750 steps; flat, < 1%, at full size: README)
            assert abs(r["training"]["last_epoch_change"]) < 0.05, (method, a, r["training"])


def test_training_entities_cover_every_value():
    """A held-out entity whose value no training pair shows would fail every per-value mask for
    a reason that is the data's, not the method's: the planted split rules it out."""
    from saeravel.planted import ATTRIBUTES, build_planted_world

    sizes = {"Country": 40, "Continent": 6, "Language": 12}
    world, values, _ = build_planted_world(200, 4, sizes, 0.0, [0.6, 0.1, 0.3], seed=3)
    train = [e for e, s in world.entity_split.items() if s == "train"]
    for a in ATTRIBUTES:
        assert {world.entities[e][a] for e in train} == set(values[a]), a
