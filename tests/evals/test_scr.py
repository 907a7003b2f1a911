"""Tests of ``eval=scr`` on hand-made arrays and a planted city world (2 layers, d_model 64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.scr import ScrEvalConfig, headline_direction, ranking_scores, run, scr_score
from saeravel.models import LoadedModel
from saeravel.probing import ProbeConfig, top_latents
from saeravel.saes.base import SAE, SAEIdentity

from helpers import ARCH, HOOK0, ROOT, D, cell_world, ctx_for, identity_sae

# ----------------------------------------------------------------------------- units


def test_scr_score_by_hand():
    assert scr_score(0.9, 0.6, 0.8) == pytest.approx(1.5)
    assert math.isnan(scr_score(0.9, 0.7, 0.7, denominator="ratio"))


def test_denominator_rules_by_hand():
    """SAEBench: 0 when A_clean - A_orig < 0.001 (negative too); ratio: the plain ratio."""
    for rule in ("saebench", "ratio"):  # a clear denominator: both give the ratio
        assert scr_score(0.9, 0.6, 0.8, rule) == pytest.approx(0.3 / 0.2)
        assert scr_score(0.701, 0.7, 0.702, rule) == pytest.approx(0.5)  # 0.001 / 0.002
    assert scr_score(0.9, 0.7, 0.7) == 0.0  # default = saebench
    assert scr_score(0.75, 0.7, 0.7005) == 0.0  # 0.0005 < 0.001
    assert scr_score(0.75, 0.7, 0.7005, "ratio") == pytest.approx(100.0)  # 0.05 / 0.0005
    assert scr_score(0.5, 0.7, 0.6) == 0.0  # negative denominator
    assert scr_score(0.5, 0.7, 0.6, "ratio") == pytest.approx(2.0)  # -0.2 / -0.1
    with pytest.raises(UserError, match="did you mean 'ratio'"):
        scr_score(0.5, 0.7, 0.6, "ratoi")


def test_headline_direction_rule_by_hand():
    """SAEBench: dir1 if the biased probe is worse on the column1 test set than on the
    column2 one, dir2 if better, none on a tie; dir1: always dir1."""
    assert headline_direction(0.5, 1.0) == 1
    assert headline_direction(1.0, 0.5) == 2
    assert headline_direction(0.8, 0.8) is None
    assert [headline_direction(*accs, "dir1") for accs in ((0.5, 1), (1, 0.5), (0.8, 0.8))] == [
        1, 1, 1
    ]  # fmt: skip


def test_ranking_and_nonzero_rules_by_hand():
    effects = np.array([1.5, -3.0, 0.0, 0.5, 0.0])
    absolute, signed = ranking_scores(effects, "absolute"), ranking_scores(effects, "signed")
    np.testing.assert_array_equal(absolute, [1.5, 3.0, 0.0, 0.5, 0.0])
    assert top_latents(absolute, 2).tolist() == [1, 0]
    assert top_latents(signed, 2).tolist() == [0, 3]
    # Three nonzero effects: SAEBench ablates min(5, 3) latents, the largest scores first;
    # signed, that takes the zero-effect latent 2 before the negative latent 1.
    assert top_latents(absolute, 5, only_nonzero=True).tolist() == [1, 0, 3]
    assert top_latents(signed, 5, only_nonzero=True).tolist() == [0, 3, 2]
    assert top_latents(absolute, 5).tolist() == [1, 0, 3, 2, 4]
    assert top_latents(signed, 5).tolist() == [0, 3, 2, 4, 1]
    assert top_latents(np.zeros(4), 2, only_nonzero=True).tolist() == []
    with pytest.raises(UserError, match="did you mean 'absolute'"):
        ranking_scores(effects, "absolut")


# ----------------------------------------------------------------------------- planted world


def _planted(continent: float, language: float) -> LoadedModel:
    """Continent (+-``continent`` on axis 0) and language (+-``language`` on axis 1) planted
    in the city embeddings of a model whose block 0 passes the embedding through; 10 cities
    per (continent, language)."""
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary

    world = cell_world({(c, lang): 10 for c in ("Alpha", "Beta") for lang in ("Lone", "Ltwo")})
    tok = build_tokenizer(world_vocabulary(world))
    torch.manual_seed(0)
    model = build_model(ARCH, tok)
    model.eval()
    with torch.no_grad():
        model.blocks[0].attn.W_O.zero_()
        model.blocks[0].mlp.W_out.zero_()
        for name, a in world.entities.items():
            row = model.W_E[tok.convert_tokens_to_ids(name)]
            row[0] += continent if a["Continent"] == "Alpha" else -continent
            row[1] += language if a["Language"] == "Lone" else -language
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, name="planted", world=world)


@pytest.fixture(scope="module")
def planted():
    """Language (+-4) planted stronger than continent (+-2): the biased probe follows language."""
    return _planted(2.0, 4.0)


@pytest.fixture(scope="module")
def planted_continent():
    """Continent (+-4) planted stronger than language (+-2): the biased probe follows continent."""
    return _planted(4.0, 2.0)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_ablating_the_planted_spurious_latents_removes_the_bias(planted, tmp_path, normalize):
    cfg = ScrEvalConfig(n_values=[2, 500], probe=ProbeConfig(c_grid=[0.01, 1.0]), batch_size=256)
    out = run(cfg, ctx_for(planted, identity_sae(normalize=normalize), tmp_path))
    [pair] = out.details
    assert pair["pair"] == ["Alpha", "Beta", "Lone", "Ltwo"]
    # The language probe's top latents are relu(x_1) and relu(-x_1): latents 1 and 65.
    assert set(pair["top_latents"]["column2_probe"][:2]) == {1, 1 + D}
    assert set(pair["top_latents"]["column1_probe"][:2]) == {0, D}
    # The biased probe follows the stronger language signal: chance on the continent test set
    # (A_orig), while the continent probe is perfect (A_clean); ablating the two language
    # latents restores the continent: score (1 - 0.5) / (1 - 0.5) = 1.
    assert pair["original_accuracy"]["dir1"] == 0.5 and pair["clean_accuracy"]["dir1"] == 1.0
    assert pair["ablated_accuracy"]["dir1"]["2"] == 1.0
    m = out.metrics["scr_metrics"]
    assert m["scr_dir1_threshold_2"] == 1.0 and m["scr_metric_threshold_2"] == 1.0
    assert list(m) == [
        f"scr_{k}_threshold_{n}" for n in (2, 500) for k in ("dir1", "metric", "dir2")
    ]
    # The biased probe is worse on continent (0.5) than on language (1.0): SAEBench's
    # headline is dir1.
    assert pair["original_accuracy"]["dir2"] == 1.0 and pair["headline_direction"] == 1
    # dir2: the biased probe is already perfect on language (A_clean - A_orig = 0 < 0.001):
    # SAEBench scores 0.
    assert m["scr_dir2_threshold_2"] == 0.0 and out.unstructured["n_pairs_undefined"] == {}
    assert out.unstructured["rules"] == {
        "ranking": "absolute", "only_nonzero_effects": True, "direction": "saebench",
        "denominator": "saebench", "saebench": True, "masked_positions_ablated": False,
    }  # fmt: skip
    # N = 500 > d_sae = 128 is capped and noted.
    assert out.unstructured["n_values_capped"] == {"500": 2 * D}
    assert any("capped at d_sae=128" in line for line in out.summary)
    if normalize == "none":  # every latent ablated: x' = b_dec + error = 0, one class for all
        assert pair["ablated_accuracy"]["dir1"]["500"] == 0.5


def test_headline_is_dir2_when_the_biased_probe_follows_column1(planted_continent, tmp_path):
    """The biased probe follows continent: perfect on the continent test set (A_orig(dir1) =
    1), chance on language (A_orig(dir2) = 0.5). SAEBench's rule reports dir2: ablating the
    two continent latents makes it follow language, (1 - 0.5) / (1 - 0.5) = 1. dir1 has
    A_clean - A_orig = 0: 0 by SAEBench's denominator rule, NaN as a ratio."""
    sae = identity_sae()
    base = {"n_values": [2], "probe": ProbeConfig(c_grid=[0.01, 1.0]), "batch_size": 256}
    out = run(ScrEvalConfig(**base), ctx_for(planted_continent, sae, tmp_path))
    [pair] = out.details
    assert pair["original_accuracy"] == {"dir1": 1.0, "dir2": 0.5}
    assert pair["clean_accuracy"] == {"dir1": 1.0, "dir2": 1.0}
    assert pair["headline_direction"] == 2
    m = out.metrics["scr_metrics"]
    assert m["scr_dir2_threshold_2"] == 1.0 and m["scr_dir1_threshold_2"] == 0.0
    assert m["scr_metric_threshold_2"] == 1.0
    assert out.summary[0] == "scr: scr_metric N=2 1.000"
    # Our variants: always dir1 (0 by SAEBench's denominator rule, NaN as a ratio).
    out = run(ScrEvalConfig(**base, direction="dir1"), ctx_for(planted_continent, sae, tmp_path))
    assert out.details[0]["headline_direction"] == 1
    assert out.metrics["scr_metrics"]["scr_metric_threshold_2"] == 0.0
    assert out.unstructured["rules"]["direction"] == "dir1"
    assert out.unstructured["rules"]["saebench"] is False
    cfg = ScrEvalConfig(**base, direction="dir1", denominator="ratio")
    out = run(cfg, ctx_for(planted_continent, sae, tmp_path))
    assert math.isnan(out.metrics["scr_metrics"]["scr_metric_threshold_2"])
    assert out.unstructured["n_pairs_undefined"]["scr_metric_threshold_2"] == 1


def _sae_with_extra_latents() -> SAE:
    """The identity SAE (latents 0..127) plus latent 128 = relu(x_1) decoded as -2 e_1 (it is
    more active on language b1 but its decoder points against the language probe: a large
    negative effect) and latent 129, which is never active (effect exactly 0)."""
    eye = torch.eye(D)
    extra_enc = torch.zeros(D, 2)
    extra_enc[1, 0] = 1.0
    extra_dec = torch.zeros(2, D)
    extra_dec[0, 1] = -2.0
    return SAE(
        torch.cat([eye, -eye, extra_enc], 1), torch.cat([torch.zeros(2 * D + 1), -torch.ones(1)]),
        torch.cat([eye, -eye, extra_dec], 0), torch.zeros(D), hook_name=HOOK0,
        identity=SAEIdentity("t"),
    )  # fmt: skip


def test_absolute_ranking_and_nonzero_cap_on_the_plantedcell_world(planted, tmp_path):
    """Language probe effects (w_1 > 0, mean differences +-4 on axis 1): latents 1 and 65
    about +4 w_1, latent 128 about (+4) (-2 w_1) = -8 w_1, latent 129 exactly 0."""
    sae = _sae_with_extra_latents()
    base = {"n_values": [2, 500], "probe": ProbeConfig(c_grid=[0.01, 1.0]), "batch_size": 256}
    out = run(ScrEvalConfig(**base), ctx_for(planted, sae, tmp_path))
    [pair] = out.details
    # SAEBench ranks by |effect|: latent 128 first.
    assert pair["top_latents"]["column2_probe"][0] == 2 * D
    assert 2 * D + 1 not in pair["top_latents"]["column2_probe"]
    # N = 500 is capped at d_sae = 130; the dead latent has no effect and is not ablated.
    assert pair["n_nonzero_effects"]["column2_probe"] == 2 * D + 1
    assert pair["n_latents_ablated"]["dir1"] == {"2": 2, "500": 2 * D + 1}
    absolute_n2 = out.metrics["scr_metrics"]["scr_dir1_threshold_2"]
    # Signed: latent 128 ranks last, the top 2 are the language latents 1 and 65, whose
    # ablation removes language entirely: score 1 (absolute ablates 128, which adds language).
    cfg = ScrEvalConfig(**base, ranking="signed", only_nonzero_effects=False)
    out = run(cfg, ctx_for(planted, sae, tmp_path))
    [pair] = out.details
    assert set(pair["top_latents"]["column2_probe"][:2]) == {1, 1 + D}
    assert 2 * D not in pair["top_latents"]["column2_probe"]
    assert pair["n_latents_ablated"]["dir1"] == {"2": 2, "500": 2 * D + 2}
    assert out.metrics["scr_metrics"]["scr_dir1_threshold_2"] == 1.0 > absolute_n2
    assert out.unstructured["rules"]["ranking"] == "signed"


def test_bad_input_is_a_one_line_user_error(planted, tmp_path):
    sae = identity_sae()
    cases = [  # built inside pytest.raises: a schema checks its values when built
        (lambda: ScrEvalConfig(n_values=[0]), "every N must be >= 1"),
        (lambda: ScrEvalConfig(data_source="embeded"), "did you mean 'embedded'"),
        (
            lambda: ScrEvalConfig(embedded_attributes=["Continent", "Colour"]),
            "unknown attribute 'Colour'",
        ),
        (
            lambda: ScrEvalConfig(embedded_pairs=[["Alpha", "Betta", "Lone", "Ltwo"]]),
            "did you mean 'Beta'",
        ),
        (
            lambda: ScrEvalConfig(embedded_pairs=[["Alpha", "Beta", "Lone"]]),
            "must be \\[Continent a1",
        ),
        (lambda: ScrEvalConfig(min_entities_per_cell=11), "no two Continent values"),
        (lambda: ScrEvalConfig(probe=ProbeConfig(c_grid=[])), "c_grid is empty"),
        (lambda: ScrEvalConfig(ranking="abs"), "unknown eval.ranking 'abs'"),
        (lambda: ScrEvalConfig(direction="first"), "unknown eval.direction 'first'"),
        (lambda: ScrEvalConfig(denominator="ratoi"), "did you mean 'ratio'"),
    ]
    for cfg, msg in cases:
        with pytest.raises(UserError, match=msg) as err:
            run(cfg(), ctx_for(planted, sae, tmp_path))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="needs an SAE"):
        run(ScrEvalConfig(), ctx_for(planted, None, tmp_path))
    no_world = LoadedModel(model=planted.model, name="plain")
    for cfg, msg in [
        (ScrEvalConfig(data_source="embedded"), "use eval.data_source=hf"),
        (ScrEvalConfig(dataset_names=["LabHC/bias_in_bio"]), "unknown SCR dataset"),
        (ScrEvalConfig(column2_vals_lookup={"LabHC/bias_in_bios_class_set1": ["male", "femal"]}),
         "did you mean 'female'"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=msg):
            run(cfg, ctx_for(no_world, sae, tmp_path))


# ----------------------------------------------------------------------------- config


def test_saebench_rules_are_the_defaults_and_checked():
    """SAEBench's rules are the defaults; a misspelt one fails when the config is composed
    (that the YAML equals the schema's defaults is tests/evals/test_eval_yaml.py's check)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["eval=scr"])
    # SAEBench's rules are the defaults; a misspelt rule fails when the config is composed.
    assert (cfg.eval.ranking, cfg.eval.direction, cfg.eval.denominator) == (
        "absolute", "saebench", "saebench"
    )  # fmt: skip
    assert cfg.eval.only_nonzero_effects is True
    for bad in ("eval.ranking=abs", "eval.direction=first", "eval.denominator=zero",
                "eval.only_nonzero_effects=maybe"):  # fmt: skip
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            with pytest.raises(ConfigCompositionException):
                compose(config_name="config", overrides=["eval=scr", bad])
