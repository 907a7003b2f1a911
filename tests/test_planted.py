"""The planted ground-truth world (``model=planted-city-lm``, ``sae=planted``): its known
answers, scored with the project's own RAVEL machinery on held-out entities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeravel.errors import UserError
from saeravel.evals.ravel.config import RavelEvalConfig
from saeravel.evals.ravel.featurizers import ProjectorSwap
from saeravel.evals.ravel.intervene import FixedIntervention, NeuronMask, SAEMask, naive_logits
from saeravel.evals.ravel.pairs import RavelJob, VectorBank, build_pairs
from saeravel.evals.ravel.prompts import bos_id, tokenize_prompt
from saeravel.evals.ravel.score import score
from saeravel.planted import (
    ATTRIBUTES,
    PlantedModel,
    PlantedTruth,
)
from saeravel.saes.planted import planted_sae, random_dictionary

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
BASES = ("aligned", "rotated", "mixed")
SMALL = {"n_entities": 120, "n_country": 20, "n_continent": 6, "n_language": 10, "id_dims": 6,
         "d_model": 48}  # fmt: skip


def planted(basis: str = "aligned", **kw):
    args = {**SMALL, **kw}
    d = args.pop("d_model")
    return PlantedModel("planted-city-lm", n_layers=2, d_model=d, default_layer=0, basis=basis,
                        site_layer=0, device="cpu", **args).load()  # fmt: skip


def setup(lm, cache: Path, protocol: str = "saeravel", max_pairs: int = 200):
    """Pairs per attribute (held-out entities in ``test``), a vector bank, cfg and ctx."""
    cfg = OmegaConf.structured(
        RavelEvalConfig(attributes=list(ATTRIBUTES), protocol=protocol, max_entities=None,
                        max_pairs_per_split=max_pairs)
    )  # fmt: skip
    ctx = SimpleNamespace(model=lm, seed=0, cache_dir=cache, layer=0, device="cpu", sae=None)
    pairs, stats = build_pairs(cfg, ctx, lm.world)
    prompts = [q.base for d in pairs.values() for ps in d.values() for q in ps]
    prompts += [q.source for d in pairs.values() for ps in d.values() for q in ps]
    bank = VectorBank(lm.model, 0, prompts, 64)
    return SimpleNamespace(cfg=cfg, ctx=ctx, pairs=pairs, stats=stats, bank=bank, lm=lm)


def run_score(s, method, attr: str, split: str = "test") -> dict:
    return score(RavelJob(s.cfg, s.ctx, s.lm.world, s.pairs, s.bank), method, s.pairs[attr][split])


def fixed_mask(method, keep: torch.Tensor):
    """A mask method with its hard mask set to ``keep`` (bool)."""
    method.mask.param.data = torch.where(keep, 1.0, -1.0)
    return method


def neuron_mask(d: int, keep: torch.Tensor) -> NeuronMask:
    return fixed_mask(NeuronMask(d), keep)


def neuron_patch(keep: torch.Tensor, b: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return b + keep.float() * (src - b)


def latent_patch(sae):
    """The SAE mask's patch (no normalisation: the planted SAEs have none)."""

    def patch(keep: torch.Tensor, b: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        fb, fs = sae.encode(b), sae.encode(src)
        return sae.decode(fb + keep.float() * (fs - fb))

    return patch


@torch.no_grad()
def mask_objective(s, attr: str, split: str, patch=neuron_patch):
    """Hard-mask (first-token) cross entropy and disentangle of a binary mask on a split."""
    pairs = s.pairs[attr][split]
    b = s.bank([q.base for q in pairs])
    src = s.bank([q.source for q in pairs])
    target = torch.tensor([q.target_token for q in pairs])
    cause = torch.tensor([q.kind == "cause" for q in pairs])
    model = s.lm.model

    def f(keep: torch.Tensor) -> tuple[float, float]:
        v = patch(keep, b, src)
        logits = torch.cat([naive_logits(model, [q.base for q in pairs[i : i + 512]], v[i : i + 512], 0)
                            for i in range(0, len(pairs), 512)])  # fmt: skip
        ok = logits.argmax(-1) == target
        acc = (ok[cause].float().mean() + ok[~cause].float().mean()) / 2
        return float(F.cross_entropy(logits, target)), float(acc)

    return f


def greedy_search(objective, size: int, init: torch.Tensor, passes: int = 3, seed: int = 0):
    """Greedy bit flips that lower the training CE (ties broken by accuracy)."""
    keep = init.clone()
    best = objective(keep)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(passes):
        improved = False
        for i in torch.randperm(size, generator=gen).tolist():
            keep[i] = ~keep[i]
            val = objective(keep)
            if (val[0], -val[1]) < (best[0] - 1e-6, -best[1]):
                best, improved = val, True
            else:
                keep[i] = ~keep[i]
        if not improved:
            break
    return keep, best


def best_mask(s, attr: str, inits: list[torch.Tensor], patch=neuron_patch, split: str = "train"):
    """The best binary mask greedy search finds on ``split`` (lowest CE over the starts)."""
    obj = mask_objective(s, attr, split, patch)
    results = [greedy_search(obj, len(init), init) for init in inits]
    keep, (_, acc) = min(results, key=lambda r: (r[1][0], -r[1][1]))
    return keep, acc


def neuron_inits(truth: PlantedTruth, attr: str) -> list[torch.Tensor]:
    """No swap, and the neurons with most of their energy in A's block."""
    return [
        torch.zeros(truth.d_model, dtype=torch.bool),
        torch.diagonal(truth.projector(attr)) > 0.5,
    ]


def latent_inits(truth: PlantedTruth, sae, attr: str) -> list[torch.Tensor]:
    """No swap, and the latents whose atom lies mostly in A's block."""
    energy = ((sae.W_dec @ truth.block_basis(attr)) ** 2).sum(1)
    return [torch.zeros(sae.d_sae, dtype=torch.bool), energy > 0.5]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {b: setup(planted(b), cache) for b in BASES}


# ----------------------------------------------------------------------------- construction


def test_model_answers_every_fact_and_h_is_the_embedding(worlds):
    for s in worlds.values():
        truth = s.lm.truth
        assert s.stats["n_known_prompts"] == s.stats["n_prompts"]  # every fact known
        prompts = [q.base for q in s.pairs["Country"]["test"]]
        for p, v in zip(prompts, s.bank(prompts), strict=True):
            torch.testing.assert_close(v, truth.representation(p.entity))
        # blocks are orthogonal and span the planted subspace; the marker is outside it
        P = sum(truth.projector(b) for b in truth.blocks)
        torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
        assert float((P @ truth.marker).norm()) < 1e-6
        for a in ATTRIBUTES:
            assert torch.linalg.matrix_rank(truth.projector(a)) == len(truth.blocks[a])


def test_info_is_json_and_keyed_on_the_config():
    a, b = planted("aligned"), planted("rotated")
    json.dumps(a.info)
    assert a.info["cache_folder_key"] != b.info["cache_folder_key"]
    assert a.info["cache_folder_key"] == planted("aligned").info["cache_folder_key"]
    assert a.info["planted"]["blocks"]["Country"] == SMALL["n_country"]
    m = planted("mixed").info["planted"]["mixed"]
    assert m["cross_attribute_pairs"] > 0


def test_nesting_dial_and_world_json_round_trip():
    from saeravel.evals.ravel.prompts import few_shot_templates
    from saeravel.planted import build_planted_world
    from saeravel.world import CityWorld

    sizes = {"Country": 10, "Continent": 4, "Language": 5}
    for nesting, nested in ((1.0, True), (0.0, False)):
        world, _, _ = build_planted_world(200, 2, sizes, nesting, [0.6, 0.1, 0.3], seed=0)
        cont: dict[str, set[str]] = {}
        for e in world.entities.values():
            cont.setdefault(e["Country"], set()).add(e["Continent"])
        assert all(len(v) == 1 for v in cont.values()) == nested
    again = CityWorld.from_json(json.loads(json.dumps(world.to_json())))
    assert again.few_shot_prompts == world.few_shot_prompts
    assert few_shot_templates(again, list(ATTRIBUTES)) == world.few_shot_prompts  # zero-shot


def test_suffix_runner_equals_full_forward(worlds):
    from saeravel.evals.ravel.intervene import SuffixRunner

    s = worlds["mixed"]
    bases = [q.base for q in s.pairs["Country"]["train"]][:40]
    runner = SuffixRunner(s.lm.model, 0)
    runner.prepare(bases)
    batch = [p for p in bases if p.prefix == bases[0].prefix]
    v = torch.randn(len(batch), s.lm.truth.d_model)
    torch.testing.assert_close(runner.logits(batch, v), naive_logits(s.lm.model, batch, v, 0),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_two_token_names_are_located_at_their_last_token(worlds):
    lm = worlds["aligned"].lm
    two = [e for e in lm.world.entities if " " in e]
    assert len(two) == 4
    tok = lm.model.tokenizer
    e = two[0]
    p = tokenize_prompt(tok, "the home of %s is the country", e, "Country", bos_id(lm.model))
    assert p.entity_pos == p.entity_start + 1
    assert tok.convert_ids_to_tokens(p.tokens[p.entity_pos]) == e.split()[1]
    # patching the last token with another entity's representation moves the answer to its
    # value (patching the shared first token with a whole representation, marker included,
    # would add a second marked position: an ill-posed intervention, not tested)
    other = next(x for x in lm.world.entities
                 if lm.world.entities[x]["Country"] != lm.world.entities[e]["Country"])  # fmt: skip
    h = lm.truth.representation(other)[None]
    want = tok.convert_tokens_to_ids(lm.world.entities[other]["Country"])
    own = tok.convert_tokens_to_ids(lm.world.entities[e]["Country"])
    assert naive_logits(lm.model, [p], h, 0).argmax(-1).item() == want != own
    clean = naive_logits(lm.model, [p], lm.truth.representation(e)[None], 0)
    assert clean.argmax(-1).item() == own


def test_readout_reads_each_attribute_only_from_its_own_block(worlds):
    for s in worlds.values():
        truth = s.lm.truth
        for asked in ATTRIBUTES:  # bases asking about `asked`: its cause pairs
            bases = [q.base for q in s.pairs[asked]["test"] if q.kind == "cause"]
            b = s.bank(bases)
            clean = naive_logits(s.lm.model, bases, b, 0)
            noise = torch.randn_like(b) * 3
            for blk in truth.blocks:
                got = naive_logits(s.lm.model, bases, b + noise @ truth.projector(blk), 0)
                assert torch.allclose(got, clean, atol=1e-4) == (blk != asked), (asked, blk)
            # outside the blocks only the marker and BOS dims (the attention's keys) matter
            P_out = torch.eye(truth.d_model) - sum(truth.projector(x) for x in truth.blocks)
            for k in ("marker", "bos"):
                P_out[truth.dims[k], truth.dims[k]] = 0.0
            got = naive_logits(s.lm.model, bases, b + noise @ P_out, 0)
            torch.testing.assert_close(got, clean, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("basis", BASES)
def test_oracle_swap_none(worlds, basis):
    s = worlds[basis]
    for a in ATTRIBUTES:
        oracle = run_score(s, ProjectorSwap(s.lm.truth.projector(a)), a)
        swap = run_score(s, FixedIntervention("swap"), a)
        none = run_score(s, FixedIntervention("none"), a)
        assert oracle["cause"] >= 0.98 and oracle["isolation"] >= 0.98, oracle
        assert swap["cause"] >= 0.98 and swap["isolation"] <= 0.02, swap
        assert none["cause"] <= 0.02 and none["isolation"] >= 0.98, none
        assert oracle["n_cause"] > 20 and oracle["n_isolation"] > 20


def test_ravel_protocol_works_on_the_planted_world(tmp_path):
    s = setup(planted("rotated"), tmp_path, protocol="ravel", max_pairs=100)
    assert s.stats["n_known_prompts"] == s.stats["n_prompts"]
    for a in ATTRIBUTES:
        assert {q.base.template for q in s.pairs[a]["test"]} <= {
            t for t, sp in s.lm.world.template_split.items() if sp == "test"
        }
        oracle = run_score(s, ProjectorSwap(s.lm.truth.projector(a)), a)
        assert oracle["disentangle"] >= 0.98, oracle


def test_aligned_block_mask_is_perfect(worlds):
    s = worlds["aligned"]
    d = s.lm.truth.d_model
    for a in ATTRIBUTES:
        keep = torch.zeros(d, dtype=torch.bool)
        keep[s.lm.truth.blocks[a]] = True
        r = run_score(s, neuron_mask(d, keep), a)
        assert r["disentangle"] >= 0.95, r


@pytest.mark.parametrize("basis", ["rotated"])
def test_planted_sae_mask_on_the_atoms_is_perfect(worlds, basis):
    for s in [worlds[basis]]:
        truth = s.lm.truth
        sae = planted_sae(truth, 0)
        _, labels = truth.atoms()
        rec = truth.atom_recovery(sae)
        assert rec["min"] > 0.999
        for a in ATTRIBUTES:
            keep = torch.tensor([lab.startswith(f"{a}=") for lab in labels])
            r = run_score(s, fixed_mask(SAEMask(sae), keep), a)
            assert r["disentangle"] >= 0.95, r
            recon = run_score(s, FixedIntervention("sae_recon", sae), a)
            assert recon["isolation"] >= 0.98  # exact reconstruction


def test_random_dictionary_is_graded_as_such(worlds):
    s = worlds["aligned"]
    truth = s.lm.truth
    rnd = random_dictionary(truth, 0)
    H = torch.stack([truth.representation(e) for e in list(s.lm.world.entities)[:50]])
    torch.testing.assert_close(rnd.reconstruct(H), H, atol=1e-5, rtol=0)  # exact but useless
    assert truth.atom_recovery(rnd)["mean"] < 0.8


def test_best_neuron_mask_by_search(worlds):
    """Rotated: no neuron mask comes near the oracle. Not near 0.5 either: a binary mask can
    move more than half of some value atoms and less than half of others, and the readout is an
    argmax, so greedy search finds partial credit (measured, Country, held-out entities: 0.65-0.68
    at these sizes depending on the search's starts, 0.734 at the default sizes; the issue's band of <= 0.65 does not hold for
    a searched mask)."""
    s = worlds["rotated"]
    a = "Country"
    keep, train_acc = best_mask(s, a, neuron_inits(s.lm.truth, a))
    r = run_score(s, neuron_mask(s.lm.truth.d_model, keep), a)
    print(f"\nrotated: best neuron mask by search, {a}: train {train_acc:.3f} test "
          f"{r['disentangle']:.3f} (cause {r['cause']:.3f} isolation {r['isolation']:.3f})")  # fmt: skip
    assert r["disentangle"] <= 0.8, r
    assert (
        r["disentangle"]
        < run_score(s, ProjectorSwap(s.lm.truth.projector(a)), a)["disentangle"] - 0.15
    )


def test_trained_sae_on_the_planted_model_is_graded(tmp_path):
    from saeravel.saes.trained import TrainedSource

    lm = planted("rotated")
    src = TrainedSource("trained", 0, k=4, expansion=2, steps=150, n_sequences=150,
                        cache_dir=str(tmp_path))  # fmt: skip
    sae = src.load(lm)
    assert sae.hook_name == "blocks.0.hook_resid_post"
    rec = lm.truth.atom_recovery(sae)
    assert rec["n_atoms"] == sum(SMALL[f"n_{a.lower()}"] for a in ATTRIBUTES) + 2 * SMALL["id_dims"]
    assert 0.0 < rec["min"] <= rec["mean"] <= 1.0
    assert set(rec["per_block"]) == {*ATTRIBUTES, "identity"}


# ----------------------------------------------------------------------------- margin


def rotated_projector(truth: PlantedTruth, attr: str, degrees: float) -> torch.Tensor:
    """The projector onto A's block turned by ``degrees`` into the other planted blocks (each
    basis vector of the block tilted into its own direction of the others): a subspace that
    is ``degrees`` wrong on every direction."""
    import math

    B = truth.block_basis(attr)
    C = torch.cat([truth.block_basis(b) for b in truth.blocks if b != attr], 1)[:, : B.shape[1]]
    t, m = math.radians(degrees), C.shape[1]  # m < B's dims: only the first m dims tilt
    Bt = torch.cat([B[:, :m] * math.cos(t) + C * math.sin(t), B[:, m:]], 1)
    return Bt @ Bt.T


def missing_dim_projector(truth: PlantedTruth, attr: str, j: int = 0) -> torch.Tensor:
    """The projector onto A's block less its ``j``-th dim."""
    B = truth.block_basis(attr)
    B = torch.cat([B[:, :j], B[:, j + 1 :]], 1)
    return B @ B.T


def _partial_swaps(s, attr: str) -> dict[str, float]:
    t = s.lm.truth
    ps = {"oracle": t.projector(attr), "rot30": rotated_projector(t, attr, 30),
          "missing_dim": missing_dim_projector(t, attr)}  # fmt: skip
    return {k: run_score(s, ProjectorSwap(P), attr)["disentangle"]
            for k, P in ps.items()}  # fmt: skip


@pytest.mark.parametrize("basis", BASES)
def test_margin_and_dense_codes_grade_partial_swaps(tmp_path, basis):
    """``model.codes=dense model.margin=0.99``: a 30-degree-wrong subspace swap and a swap
    missing one dim of the block both cost >= 0.2 disentangle; the exact swap keeps 1.0
    (measured at these sizes, rotated: Country rot30 0.075 / missing dim 0.657, Continent
    0.333 / 0.627)."""
    s = setup(planted(basis, codes="dense", margin=0.99), tmp_path)
    assert s.stats["n_known_prompts"] == s.stats["n_prompts"]
    for a in ("Country", "Continent"):
        d = _partial_swaps(s, a)
        assert d["oracle"] == 1.0, (a, d)
        assert d["rot30"] <= 0.8 and d["missing_dim"] <= 0.8, (a, d)


def test_default_readout_does_not_grade_partial_swaps(worlds):
    """The broken variant the dials fix: one-hot codes and the 0.1 margin give a 30-degree
    error and a missing dim (nearly) full credit (Country 0.932 / 0.968 at these sizes)."""
    d = _partial_swaps(worlds["rotated"], "Country")
    assert d["oracle"] == 1.0
    assert d["rot30"] > 0.8 and d["missing_dim"] > 0.8, d


def test_one_hot_codes_need_dense_codes_for_a_missing_dim(tmp_path):
    """A high margin alone catches the rotation, not the missing dim: with one-hot codes the
    dim is one value, touched by few pairs."""
    d = _partial_swaps(setup(planted("rotated", margin=0.99), tmp_path), "Country")
    assert d["oracle"] == 1.0 and d["rot30"] <= 0.8 and d["missing_dim"] > 0.8, d


def test_dense_codes_keep_the_exact_sae_exact(tmp_path):
    lm = planted("rotated", codes="dense", margin=0.99)
    truth = lm.truth
    sae = planted_sae(truth, 0)
    assert truth.atom_recovery(sae)["min"] > 0.999
    H = torch.stack([truth.representation(e) for e in list(lm.world.entities)[:50]])
    torch.testing.assert_close(sae.reconstruct(H), H, atol=1e-5, rtol=0)
    # every value atom uses every dim of its block (measured: top dim holds 0.24-0.66 on average)
    for a in ATTRIBUTES:
        coords = truth.value_atoms(a) @ truth.block_basis(a)
        assert bool((coords.abs() > 1e-4).all())
        assert float((coords**2).max(dim=1).values.mean()) < 0.75


# ----------------------------------------------------------------------------- superposition


def test_superposition_world_reads_values_by_their_atoms(tmp_path):
    """``model.superposition=16``: Country's 20 and Continent's 6 values are random unit atoms
    of one shared 16-dim block; the readout still answers (nearly) every fact, no subspace
    holds one attribute alone (the oracle swaps both), and the feature-swap ceiling, recorded
    in ``describe()``, is below 1 and what swapping exactly the two atoms scores."""
    lm = planted("aligned", superposition=16, d_model=64)
    truth = lm.truth
    assert truth.block_of("Country") == truth.block_of("Continent") != truth.block_of("Language")
    assert len(truth.blocks[truth.block_of("Country")]) == 16
    ceiling = lm.info["planted"]["superposition"]["feature_swap_ceiling"]
    s = setup(lm, tmp_path)
    assert s.stats["n_known_prompts"] >= 0.9 * s.stats["n_prompts"], s.stats
    for a in ("Country", "Continent"):
        assert 0.9 <= ceiling[a]["disentangle"] < 1.0, ceiling
        oracle = run_score(s, ProjectorSwap(truth.projector(a)), a)
        assert oracle["disentangle"] <= 0.8, oracle  # moves the other attribute too

        class AtomSwap(FixedIntervention):  # exactly the two atoms: the ceiling's swap
            def forward(self, b, src, a=a):
                A = truth.value_atoms(a) * truth.value_scale
                ib, isrc = truth.readout(a, b), truth.readout(a, src)
                return b - A[ib] + A[isrc]

        swap = run_score(s, AtomSwap("none"), a)
        assert abs(swap["disentangle"] - ceiling[a]["disentangle"]) <= 0.05, (swap, ceiling)
    assert set(ceiling) == {"Country", "Continent"}
    assert ceiling["Country"]["isolation_by_attribute"]["Language"] == 1.0  # its own block


def test_exact_sae_in_superposition_has_the_true_atoms(tmp_path):
    lm = planted("aligned", superposition=16, d_model=64)
    truth = lm.truth
    sae = planted_sae(truth, 0)
    assert truth.atom_recovery(sae)["min"] > 0.999
    assert sae.activation == "jumprelu"
    e = next(iter(lm.world.entities))
    f = sae.encode(truth.representation(e)[None])[0]
    _, labels = truth.atoms()
    on = {labels[i] for i in torch.nonzero(f > 0.5).flatten().tolist()}
    assert {f"{a}={truth.values[a][truth.codes[e][a]]}" for a in ATTRIBUTES} <= on


# ----------------------------------------------------------------------------- absorption


def test_absorbed_sae_moves_continent_with_country(tmp_path):
    """``model.absorption=true`` (with ``nesting=1``): the exact SAE's Country latents write
    their Continent too and no Continent latent exists; it still reconstructs every entity,
    but masking the Country latents moves Continent (isolation falls) and no latent moves
    Continent alone, while the aligned block's neurons stay exact."""
    lm = planted("aligned", nesting=1.0, absorption=True)
    truth = lm.truth
    sae = planted_sae(truth, 0)
    labels = truth.sae_labels()
    assert sae.d_sae == len(labels) and not any(lab.startswith("Continent=") for lab in labels)
    H = torch.stack([truth.representation(e) for e in list(lm.world.entities)[:50]])
    torch.testing.assert_close(sae.reconstruct(H), H, atol=1e-5, rtol=0)
    s = setup(lm, tmp_path)
    keep = torch.tensor([lab.startswith("Country=") for lab in labels])
    d = truth.d_model
    for a in ("Country", "Continent"):
        r = run_score(s, fixed_mask(SAEMask(sae), keep), a)
        print(f"\nabsorbed SAE, Country latents swapped, scored as {a}: cause {r['cause']:.3f} "
              f"isolation {r['isolation']:.3f} disentangle {r['disentangle']:.3f}")  # fmt: skip
        # isolation here spans Continent and Language prompts; Language is never moved
        assert r["disentangle"] <= 0.8 and min(r["cause"], r["isolation"]) <= 0.6, (a, r)
        block = torch.zeros(d, dtype=torch.bool)
        block[truth.blocks[a]] = True
        assert run_score(s, neuron_mask(d, block), a)["disentangle"] >= 0.95


# ----------------------------------------------------------------------------- bad input


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config", overrides=["model=planted-city-lm", "paths.output_dir=x", *overrides]
        )


def test_unknown_basis_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="bogus"):
        _compose(["model.basis=bogus"])
    with pytest.raises(ConfigCompositionException, match="bogus"):
        _compose(["sae=planted", "sae.dictionary=bogus"])
    with pytest.raises(ConfigCompositionException, match="bogus"):
        _compose(["model.codes=bogus"])
    cfg = _compose(["model.basis=mixed"])
    assert cfg.model.basis.value == "mixed"


def test_too_small_world_is_one_line_user_error():
    from hydra.utils import instantiate

    with pytest.raises(UserError, match="too small for the split") as err:
        instantiate(_compose(["model.n_entities=6"]).model).load()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="d_model"):
        instantiate(_compose(["model.d_model=20"]).model).load()
    with pytest.raises(UserError, match="not a site"):
        instantiate(_compose(["layer=1"]).model).load()  # block 1 is the readout
    with pytest.raises(UserError, match=r"model.superposition=26 must be 0 \(off\) or in 2..25"):
        instantiate(_compose(["model.superposition=26", "model.n_country=20"]).model).load()
    with pytest.raises(UserError, match="model.absorption=true needs model.nesting=1.0"):
        instantiate(_compose(["model.absorption=true"]).model).load()
    for bad in ("-0.1", "1.0"):
        with pytest.raises(UserError, match=r"model.margin=.* must be in \[0, 1\)") as err:
            instantiate(_compose([f"model.margin={bad}"]).model).load()
        assert "\n" not in str(err.value)


def test_planted_sae_needs_the_planted_model(tiny_model):
    from saeravel.saes.planted import PlantedSAESource

    with pytest.raises(UserError, match="planted-city-lm"):
        PlantedSAESource("planted", 0).load(tiny_model)


# ----------------------------------------------------------------------------- entrypoint


def _run(tmp_path: Path, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    args = [sys.executable, str(ROOT / "run.py"), "model=planted-city-lm", "device=cpu",
            f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}",
            f"paths.results_dir={tmp_path / 'results'}", "hydra.run.dir=" + str(tmp_path / "h"),
            *extra]  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_run_py_writes_a_result(tmp_path):
    p = _run(tmp_path, ["eval.method=all", "sae=planted", "eval.epochs=1", "model.basis=rotated",
                        "model.n_entities=80", "eval.max_pairs_per_split=60",
                        "eval.attributes=[Country,Continent,Language]"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((tmp_path / "out" / "result.json").read_text())
    m = rec["eval_result_metrics"]
    assert m["baselines"]["sae_recon"]["Country"]["isolation"] == 1.0  # exact SAE
    assert rec["saeravel"]["model_info"]["planted"]["basis"] == "rotated"
    assert 0.0 <= m["ravel"]["sae"]["Country"]["disentangle"] <= 1.0


def main() -> None:
    """``python tests/test_planted.py [--small]``: the numbers of the README table (default
    sizes of conf/model/planted-city-lm.yaml, held-out entities, saeravel protocol)."""
    import argparse
    import logging
    import tempfile

    from saeravel.config import PlantedModelConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="the test sizes")
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--search-attrs", default="Country")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    full = PlantedModelConfig()
    sizes = SMALL if args.small else {k: getattr(full, k) for k in SMALL} | {"d_model": 80}
    cache = Path(tempfile.mkdtemp())
    rows = []
    for basis in args.bases.split(","):
        lm = PlantedModel(
            "planted-city-lm",
            n_layers=2,
            d_model=sizes["d_model"],
            default_layer=0,
            basis=basis,
            site_layer=0,
            device="cpu",
            **{k: v for k, v in sizes.items() if k != "d_model"},
        ).load()
        s = setup(lm, cache, max_pairs=500)
        truth, d = lm.truth, lm.truth.d_model
        sae, rnd = planted_sae(truth, 0), random_dictionary(truth, 0)
        _, labels = truth.atoms()
        for a in ATTRIBUTES:
            block = torch.zeros(d, dtype=torch.bool)
            block[truth.blocks[a]] = True
            atoms = torch.tensor([lab.startswith(f"{a}=") for lab in labels])
            rnd_keep = latent_inits(truth, rnd, a)[1]
            r = {
                "oracle": run_score(s, ProjectorSwap(truth.projector(a)), a),
                "swap": run_score(s, FixedIntervention("swap"), a),
                "none": run_score(s, FixedIntervention("none"), a),
                "neurons_on_block_coords": run_score(s, neuron_mask(d, block), a),
                "planted_sae_atoms": run_score(s, fixed_mask(SAEMask(sae), atoms), a),
                "random_dict_block_latents": run_score(s, fixed_mask(SAEMask(rnd), rnd_keep), a),
            }
            if a in args.search_attrs.split(","):
                keep, tr = best_mask(s, a, neuron_inits(truth, a))
                r["neurons_search"] = run_score(s, neuron_mask(d, keep), a) | {"train": tr}
                keep, tr = best_mask(s, a, latent_inits(truth, rnd, a), latent_patch(rnd))
                r["random_dict_search"] = run_score(s, fixed_mask(SAEMask(rnd), keep), a) | {
                    "train": tr
                }
            for name, v in r.items():
                extra = f" train {v['train']:.3f}" if "train" in v else ""
                rows.append(f"{basis:<8} {a:<10} {name:<26} cause {v['cause']:.3f} isolation "
                            f"{v['isolation']:.3f} disentangle {v['disentangle']:.3f}"
                            f" (n {v['n_cause']}/{v['n_isolation']}){extra}")  # fmt: skip
                print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
