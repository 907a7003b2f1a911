"""Tests of ``eval=tpp`` on a planted city world (2 layers, d_model 64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.tpp import TppEvalConfig, TppTask, run, tpp_task
from saeravel.models import LoadedModel
from saeravel.probing import ProbeConfig
from saeravel.saes.base import CustomSAE, SAEIdentity

from helpers import ARCH, HOOK0, ROOT, D, ctx_for, identity_sae

CONTINENTS = ("Alpha", "Beta", "Gamma", "Delta")


@pytest.fixture(scope="module")
def planted():
    """Continent k planted as 3 * e_k in the city embeddings (12 cities per continent) of a
    model whose block 0 passes the embedding through: with the identity SAE, latent k is
    continent k's own latent."""
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary
    from saeravel.world import TEMPLATES, CityWorld

    entities, split = {}, {}
    for cont in CONTINENTS:
        for i in range(12):
            name = f"{cont.lower()}city{i}"
            entities[name] = {
                "Continent": cont, "Country": cont + "land", "Language": "Lang", "Timezone": "Tz",
                "Latitude": "0", "Longitude": "0",
            }  # fmt: skip
            split[name] = ("train", "train", "val", "test", "train", "test")[i % 6]
    templates = {a: t[:1] for a, t in TEMPLATES.items()}  # 4 rows per city keep the test fast
    world = CityWorld(entities=entities, templates=templates, entity_split=split)
    tok = build_tokenizer(world_vocabulary(world))
    torch.manual_seed(0)
    model = build_model(ARCH, tok)
    model.eval()
    with torch.no_grad():
        model.blocks[0].attn.W_O.zero_()
        model.blocks[0].mlp.W_out.zero_()
        for name, a in entities.items():
            model.W_E[tok.convert_tokens_to_ids(name), CONTINENTS.index(a["Continent"])] += 3.0
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, name="planted", world=world)


def test_ablating_a_class_latent_hurts_its_probe_not_the_others(planted, tmp_path):
    cfg = TppEvalConfig(n_values=[1, 2, 500], probe=ProbeConfig(c_grid=[0.01, 1.0]), min_train_entities=3,
                        batch_size=256)  # fmt: skip
    out = run(cfg, ctx_for(planted, identity_sae(), tmp_path))
    [task] = out.details
    assert sorted(task["classes"]) == sorted(CONTINENTS)
    for cont in CONTINENTS:
        assert task["top_latents"][cont][0] == CONTINENTS.index(cont)
        assert task["clean_accuracy"][cont] == 1.0
        # Ablating continent k's latent sends its probe to chance and leaves the others.
        after = task["ablated_accuracy"]["1"][cont]
        assert after[cont] <= 0.6
        assert all(after[o] == 1.0 for o in CONTINENTS if o != cont)
    m = out.metrics["tpp_metrics"]
    assert m["tpp_threshold_1_intended_diff_only"] >= 0.4
    assert m["tpp_threshold_1_unintended_diff_only"] == 0.0
    assert m["tpp_threshold_1_total_metric"] == pytest.approx(
        m["tpp_threshold_1_intended_diff_only"] - m["tpp_threshold_1_unintended_diff_only"]
    )
    assert m["tpp_threshold_2_intended_diff_only"] > m["tpp_threshold_2_unintended_diff_only"]
    assert list(m)[:3] == [
        "tpp_threshold_1_total_metric",
        "tpp_threshold_1_intended_diff_only",
        "tpp_threshold_1_unintended_diff_only",
    ]
    assert out.unstructured["n_values_capped"] == {"500": 2 * D}
    assert out.summary[0].startswith("tpp: total metric ")
    # SAEBench's rules: only latents with a nonzero (clamped) effect are ablated, so N = 500
    # (capped at d_sae = 128) ablates fewer than 128 (about half: the mean difference of a
    # latent is negative about as often as positive).
    assert out.unstructured["rules"] == {"clamp_mean_diff": True, "only_nonzero_effects": True,
                                         "saebench": True, "masked_positions_ablated": False}  # fmt: skip
    for cont in CONTINENTS:
        assert task["n_latents_ablated"]["500"][cont] == task["n_nonzero_effects"][cont] < 2 * D
        assert task["n_latents_ablated"]["1"][cont] == 1
    # Always N (our variant): every latent ablated, x' = 0, every probe loses alike.
    cfg.only_nonzero_effects = False
    out = run(cfg, ctx_for(planted, identity_sae(), tmp_path))
    assert out.details[0]["n_latents_ablated"]["500"] == {c: 2 * D for c in CONTINENTS}
    assert out.metrics["tpp_metrics"]["tpp_threshold_500_total_metric"] == pytest.approx(0.0)
    assert out.unstructured["rules"]["saebench"] is False


def _three_classes() -> TppTask:
    """Class k's rows are all 2 e_k in R^3, latents a = x, W_dec = I."""
    classes = ["A", "B", "C"]
    per_split = {"train": 8, "val": 4, "test": 6}
    x, labels = {}, {}
    for split, n in per_split.items():
        labels[split] = np.repeat(classes, n)
        x[split] = 2.0 * np.repeat(np.eye(3), n, axis=0)
    return TppTask("three", classes, x, {s: v.copy() for s, v in x.items()}, labels)


@pytest.mark.parametrize(
    ("clamp", "only_nonzero", "n_ablated", "intended", "unintended"),
    [(True, True, 1, 0.5, 0.0), (False, True, 2, 0.5, 0.25), (True, False, 2, 0.5, 0.25),
     (False, False, 2, 0.5, 0.25)],
)  # fmt: skip
def test_clamp_and_nonzero_rules_by_hand(clamp, only_nonzero, n_ablated, intended, unintended):
    """Probe A (rows 2 e_A vs 2 e_B, 2 e_C) has weights (v, -u, -u) with v = 2u and intercept
    -u < 0 (L2 optimum, unpenalised intercept), so a zeroed row is classified negative. Mean
    differences (2, -1, -1): effects (2v, u, u); clamped (2v, 0, 0).
    SAEBench (clamp, nonzero only): N = 2 ablates latent A alone: A's positives go to 0 ->
    A's probe drops from 1 to 0.5, the others keep 1 (their A negatives stay negative).
    Unclamped or always N: latent A and another class's J are ablated: A's probe 0.5, J's
    probe 0.5 (its positives are zeroed), the third probe 1: unintended (0.5 + 0) / 2."""
    cfg = TppEvalConfig(
        probe=ProbeConfig(c_grid=[1.0]), clamp_mean_diff=clamp, only_nonzero_effects=only_nonzero
    )
    out = tpp_task(_three_classes(), np.eye(3), [(2, 2)], cfg, np.random.default_rng(0))
    assert out["clean_accuracy"] == {"A": 1.0, "B": 1.0, "C": 1.0}
    assert out["n_latents_ablated"]["2"] == {"A": n_ablated, "B": n_ablated, "C": n_ablated}
    assert out["n_nonzero_effects"] == {c: 1 if clamp else 3 for c in "ABC"}
    assert all(out["top_latents"][c][0] == i for i, c in enumerate("ABC"))
    assert out["tpp_threshold_2_intended_diff_only"] == pytest.approx(intended)
    assert out["tpp_threshold_2_unintended_diff_only"] == pytest.approx(unintended)
    assert out["tpp_threshold_2_total_metric"] == pytest.approx(intended - unintended)


class _NoDecoder:
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f


def test_bad_input_is_a_one_line_user_error(planted, tmp_path):
    sae = identity_sae()
    cases = [  # built inside pytest.raises: a schema checks its values when built
        (lambda: TppEvalConfig(n_values=[-1]), "every N must be >= 1"),
        (lambda: TppEvalConfig(n_values=[]), "n_values is empty"),
        (lambda: TppEvalConfig(max_classes=1), "max_classes must be >= 2"),
        (lambda: TppEvalConfig(attribute="Colour"), "unknown attribute 'Colour'"),
        (lambda: TppEvalConfig(min_train_entities=50), "needs >= 2 Continent values"),
        (
            lambda: TppEvalConfig(data_source="hf", dataset_names=["LabHC/bias_in_bios"]),
            "unknown TPP dataset",
        ),
    ]
    for cfg, msg in cases:
        with pytest.raises(UserError, match=msg) as err:
            run(cfg(), ctx_for(planted, sae, tmp_path))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="needs an SAE"):
        run(TppEvalConfig(), ctx_for(planted, None, tmp_path))
    custom = CustomSAE(_NoDecoder(), d_in=D, hook_name=HOOK0, identity=SAEIdentity("custom"))
    with pytest.raises(UserError, match="needs an SAE with a decoder matrix W_dec"):
        run(TppEvalConfig(), ctx_for(planted, custom, tmp_path))


def test_hf_dataset_that_cannot_be_loaded_is_a_one_line_error(planted, tmp_path, monkeypatch):
    """The hub unreachable (as ``datasets`` reports it offline): a one-line error naming the
    dataset and this eval (the real offline behaviour is tested in test_sparse_probing)."""
    import datasets

    def offline(path: str, *args: object, **kwargs: object) -> None:
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        run(TppEvalConfig(data_source="hf"), ctx_for(planted, identity_sae(), tmp_path))
    msg = str(err.value)
    assert "'LabHC/bias_in_bios_class_set1'" in msg and "run eval=tpp once" in msg
    assert "HF_DATASETS_OFFLINE=1" in msg and "\n" not in msg


def test_saebench_rules_are_the_defaults_and_checked():
    """SAEBench's rules are the defaults; a misspelt one fails when the config is composed
    (that the YAML equals the schema's defaults is tests/evals/test_eval_yaml.py's check)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["eval=tpp"])
    # SAEBench's rules are the defaults; a non-boolean value fails when the config is composed.
    assert cfg.eval.clamp_mean_diff is True and cfg.eval.only_nonzero_effects is True
    for bad in ("eval.clamp_mean_diff=maybe", "eval.only_nonzero_effects=sometimes"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            with pytest.raises(ConfigCompositionException):
                compose(config_name="config", overrides=["eval=tpp", bad])
