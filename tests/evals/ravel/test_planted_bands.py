"""Every RAVEL method on the planted world, whose right answers are known by construction
(``model=planted-city-lm``): the bands each method must land in on held-out entities, through
the real pipeline (composition, training recipe, scoring)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from saeravel.pipeline import run

from helpers import ROOT

CONF = str(ROOT / "conf")
SMALL = ["model.n_entities=120", "model.n_country=20", "model.n_continent=6",
         "model.n_language=10", "model.id_dims=6", "model.d_model=48",
         "eval.max_pairs_per_split=200", "eval.max_entities=null", "eval.checkpoint_every_s=0"]  # fmt: skip


def _run(tmp: Path, basis: str, extra: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=planted-city-lm", f"model.basis={basis}", "device=cpu", *SMALL,
            *([] if any(x.startswith("sae=") for x in extra) else ["sae=planted"]),
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


@pytest.mark.slow
@pytest.mark.parametrize("basis", ["aligned", "rotated", "mixed"])
def test_the_other_featurizers_on_every_basis(results, basis):
    """PCA (masked components), boundless DAS and MDAS can all represent the oracle's swap:
    near DAS. The planted SAE's probe-ranked latents are the value atoms: sae_probe near 1.0,
    and ``fixed`` (under ``all``: the decoder directions of those latents) the same swap."""
    m = results[basis]
    das = min(_dis(m, "das"))
    for method in ("pca", "boundless_das", "mdas"):
        assert min(_dis(m, method)) >= min(0.9, das - 0.05), (method, _dis(m, method))
    assert min(_dis(m, "sae_probe")) >= 0.95, _dis(m, "sae_probe")
    assert min(_dis(m, "fixed")) >= 0.95, _dis(m, "fixed")
    for a in ("Country", "Continent"):
        sel = m["ravel"]["sae_probe"][a]["selection"]
        assert sel["split"] == "val" and sel["best_count"] in [r["count"] for r in sel["curve"]]
        assert m["ravel"]["fixed"][a]["basis"]["from"] == "sae_probe"
        assert m["ravel"]["mdas"][a]["mdas"]["attributes"] == ["Country", "Continent"]
        assert 0 < m["ravel"]["boundless_das"][a]["mask_kept"] <= 48


@pytest.mark.slow
def test_sae_probe_with_a_random_dictionary_is_low(tmp_path):
    """A random orthonormal dictionary of the planted subspace: every latent mixes attributes,
    so no set of latents swaps one attribute alone."""
    m = _run(tmp_path, "rotated", ["sae.dictionary=random", "eval.method=sae_probe"])
    assert max(_dis(m, "sae_probe")) <= 0.8, _dis(m, "sae_probe")
    assert max(_dis(m, "sae_probe")) <= min(_dis(m, "oracle")) - 0.2


def test_fixed_with_the_oracles_basis_is_the_oracle(tmp_path):
    """A basis file holding the planted Country block (its projector: ``fixed`` takes any
    spanning rows): ``fixed`` is then the oracle's swap on Country; scored as Continent's
    intervention it moves exactly the wrong attribute (cause 0: Continent's block stays;
    isolation 0: every Country answer follows the source)."""
    import torch
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["model=planted-city-lm", "model.basis=rotated",
                                            "device=cpu", *SMALL, "paths.output_dir=unused"])  # fmt: skip
    truth = instantiate(cfg.model).load().truth
    path = tmp_path / "country.pt"
    torch.save(truth.projector("Country"), path)
    m = _run(
        tmp_path, "rotated", ["sae=none", "eval.method=fixed", f"eval.fixed.basis_file={path}"]
    )
    country, continent = m["ravel"]["fixed"]["Country"], m["ravel"]["fixed"]["Continent"]
    assert country["disentangle"] == m["baselines"]["oracle"]["Country"]["disentangle"] >= 0.98
    assert continent["cause"] == 0.0 and continent["isolation"] == 0.0
    assert country["basis"]["from"] == "basis_file" and country["basis"]["rank"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("basis", ["aligned", "rotated"])
def test_heldout_isolation_sees_the_attribute_no_method_trains_on(results, basis):
    """Language is never trained on: the references grade it exactly (none and the oracle keep
    it, a full swap moves it), and on a rotated basis DAS's 1.0 on the two trained attributes
    hides a leak into it that held-out isolation shows."""
    m = results[basis]
    for a in ("Country", "Continent"):
        assert m["baselines"]["none"][a]["isolation_heldout"] == 1.0
        assert m["baselines"]["swap"][a]["isolation_heldout"] == 0.0
        assert m["baselines"]["oracle"][a]["isolation_heldout"] >= 0.98
        assert m["baselines"]["oracle"][a]["disentangle_all"] >= 0.98
        assert m["ravel"]["das"][a]["n_heldout"] > 0
    if basis == "rotated":
        das = [m["ravel"]["das"][a]["isolation_heldout"] for a in ("Country", "Continent")]
        assert min(das) <= 0.8, das


def test_convergence_is_signed():
    from saeravel.evals.ravel.train import convergence

    assert convergence([1.0, 0.995])["flattened"] is True
    rising = convergence([1.0, 1.009])
    assert rising["flattened"] is False and rising["rising"] is True
    assert convergence([1.0, 0.9])["flattened"] is False  # still falling


def _three(tmp: Path, basis: str, dials: list[str]) -> dict[str, dict]:
    """sae, das and neurons (one job each) on a planted world with ``dials``."""
    return {meth: _run(tmp / meth, basis, [*dials, f"eval.method={meth}"])
            for meth in ("sae", "das", "neurons")}  # fmt: skip


@pytest.mark.slow
def test_absorption_band(tmp_path):
    """The SAE's Country latents carry their Continent (``model.absorption``): the SAE mask
    cannot isolate either attribute, DAS and the aligned neurons can."""
    m = _three(tmp_path, "aligned", ["model.nesting=1.0", "model.absorption=true"])
    print("\nabsorption: " + " ".join(f"{k} {_dis(m[k], k)}" for k in m))
    assert max(_dis(m["sae"], "sae")) <= 0.55, _dis(m["sae"], "sae")
    assert min(_dis(m["das"], "das")) >= 0.95, _dis(m["das"], "das")
    assert min(_dis(m["neurons"], "neurons")) >= 0.9, _dis(m["neurons"], "neurons")


SUPERPOSITION = ["model.superposition=16", "model.d_model=64"]


@pytest.fixture(scope="module")
def superposition(tmp_path_factory) -> dict[str, list[float]]:
    """Country / Continent disentangle of the planted SAE mask, DAS and neurons (trained by
    the pipeline), the oracle and the feature-swap ceiling, on the aligned superposition
    world (20 Country + 6 Continent values as random unit atoms of one 16-dim block)."""
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["model=planted-city-lm", "device=cpu", *SMALL,
                                            *SUPERPOSITION, "paths.output_dir=unused"])  # fmt: skip
    ceiling = instantiate(cfg.model).load().info["planted"]["superposition"]["feature_swap_ceiling"]
    m = _three(tmp_path_factory.mktemp("superposition"), "aligned", SUPERPOSITION)
    out = {k: _dis(m[k], k) for k in m} | {"oracle": _dis(m["sae"], "oracle")}
    out["ceiling"] = [ceiling[a]["disentangle"] for a in ("Country", "Continent")]
    print(f"\nsuperposition: {out}")
    return out


@pytest.mark.slow
def test_superposition_sae_beats_das_and_neurons(superposition):
    """Measured: ceiling 0.963 / 0.961, sae 0.890 / 0.880, das 0.803 / 0.800, neurons 0.48 /
    0.52, oracle (the shared block: both attributes) 0.5 / 0.5."""
    m = superposition
    for i in range(2):
        assert m["sae"][i] >= m["das"][i] + 0.05, m
        assert m["neurons"][i] <= 0.6 and m["oracle"][i] <= 0.55, m
        assert m["sae"][i] <= m["ceiling"][i] + 0.01, m  # the ceiling bounds a latent mask


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: the exact JumpReLU SAE's mask scores 0.890 / "
                   "0.880 against a ceiling of 0.963 / 0.961 (its latents read 1 plus the "
                   "atoms' interference, the ceiling swaps exact atoms); the issue's band of "
                   "0.03 does not hold with an SAE whose encoder is linear")  # fmt: skip
def test_superposition_sae_within_003_of_the_ceiling(superposition):
    m = superposition
    for i in range(2):
        assert m["sae"][i] >= m["ceiling"][i] - 0.03, m


@pytest.mark.parametrize("basis", ["aligned", "rotated"])
def test_rlap_band(tmp_path, basis):
    """RLAP (RAVEL's adversarial probe subspace, no interchange training) on the planted world:
    the value's block is linearly readable, so the subspace a probe cannot read past holds it
    and its swap transfers the value (never the oracle's 1.0 exactly: the relaxation is fit on
    the training vectors only)."""
    m = _run(tmp_path, basis, ["eval.method=rlap", "sae=none", "eval.protocol=ravel"])
    dis = _dis(m, "rlap")
    assert min(dis) >= 0.7, dis
    assert min(dis) > max(_dis(m, "none")), dis


def _into(sub: dict, blocks: tuple[str, ...]) -> float:
    """Share of a method's swapped span inside the given planted blocks."""
    return sum(v for b, v in sub["into_blocks"].items() if b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("basis", ["aligned", "rotated", "mixed"])
def test_subspace_recovery_grades_where_each_method_swaps(results, basis):
    """Principal angles between what each method swaps and the planted block (small size,
    seed 0; measured on rotated: DAS captured 0.92 / 0.90 with a max angle of 40 / 44 degrees,
    18% / 29% of its span in the Language block; sae_probe and fixed exact). Every method gets
    a reading; the probe-selected planted latents and their decoder basis swap exactly the
    block; DAS swaps nearly all of it; the SAE mask all of it and nothing of the other trained
    attribute's block; neurons only on the aligned basis. And the readout is stricter than the
    score: a method that scores >= 0.95 while swapping a subspace tilted >= 30 degrees from
    the block, or reaching into the Language block, exists here (the score's argmax readout
    gives full credit to a partial swap and the two-attribute score never asks about
    Language; held-out isolation does)."""
    m = results[basis]["ravel"]
    methods = (
        "sae",
        "neurons",
        "das",
        "pca",
        "boundless_das",
        "mdas",
        "sae_probe",
        "fixed",
        "rlap",
    )
    for method in methods:
        for a in ("Country", "Continent"):
            sub = m[method][a]["subspace"]
            assert "skipped" not in sub and 0 <= sub["captured"] <= 1, (method, a, sub)
    other = {"Country": ("Continent",), "Continent": ("Country",)}
    for a in ("Country", "Continent"):
        for method in ("sae_probe", "fixed"):
            sub = m[method][a]["subspace"]
            assert sub["captured"] >= 0.99 and sub["spill"] <= 0.01, (method, sub)
        sae, das, neurons = (m[x][a]["subspace"] for x in ("sae", "das", "neurons"))
        assert das["captured"] >= 0.85, das
        if basis != "mixed":  # mixed: each SAE atom is a 45-degree pair of two facts' dims
            assert sae["captured"] >= 0.99 and _into(sae, other[a]) <= 0.01, sae
        if basis == "aligned":
            assert neurons["captured"] >= 0.99 and _into(neurons, other[a]) <= 0.01, neurons
        else:
            assert neurons["max_angle_deg"] >= 30, neurons
    lenient = [
        (method, a) for method in methods for a in ("Country", "Continent")
        if m[method][a]["disentangle"] >= 0.95
        and (m[method][a]["subspace"]["max_angle_deg"] >= 30
             or _into(m[method][a]["subspace"], ("Language",)) >= 0.1)
    ]  # fmt: skip
    assert lenient, "every high score swapped exactly its block: the readout found nothing"
