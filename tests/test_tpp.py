"""Tests of ``eval=tpp`` on a planted city world (2 layers, d_model 64)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.tpp import TppEvalConfig, run
from saeravel.models import LoadedModel
from saeravel.pipeline import EvalContext
from saeravel.saes.base import SAE, CustomSAE, SAEIdentity

ROOT = Path(__file__).resolve().parents[1]
D = 64
HOOK0 = "blocks.0.hook_resid_post"
ARCH = {"n_layers": 2, "d_model": D, "n_heads": 4, "d_mlp": 128, "n_ctx": 96, "local_layers": 1}
CONTINENTS = ("Alpha", "Beta", "Gamma", "Delta")


def identity_sae() -> SAE:
    """Latents relu(x), relu(-x) with an exact decoder."""
    eye = torch.eye(D)
    return SAE(
        torch.cat([eye, -eye], 1), torch.zeros(2 * D), torch.cat([eye, -eye], 0), torch.zeros(D),
        hook_name=HOOK0, identity=SAEIdentity("t"),
    )  # fmt: skip


def ctx_for(lm: LoadedModel, sae: SAE | None, tmp_path: Path) -> EvalContext:
    return EvalContext(lm, sae, 0, HOOK0, "cpu", 0, tmp_path, tmp_path)


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
    cfg = TppEvalConfig(n_values=[1, 2, 500], c_grid=[0.01, 1.0], min_train_entities=3,
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
    # N = 500 is capped at d_sae: every latent ablated, x' = 0, every probe loses alike.
    assert out.unstructured["n_values_capped"] == {"500": 2 * D}
    assert m["tpp_threshold_500_total_metric"] == pytest.approx(0.0)
    assert out.summary[0].startswith("tpp: total metric ")


class _NoDecoder:
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f


def test_bad_input_is_a_one_line_user_error(planted, tmp_path):
    sae = identity_sae()
    cases = [
        (TppEvalConfig(n_values=[-1]), "every N must be >= 1"),
        (TppEvalConfig(n_values=[]), "n_values is empty"),
        (TppEvalConfig(max_classes=1), "max_classes must be >= 2"),
        (TppEvalConfig(attribute="Colour"), "unknown attribute 'Colour'"),
        (TppEvalConfig(min_train_entities=50), "needs >= 2 Continent values"),
        (
            TppEvalConfig(data_source="hf", dataset_names=["LabHC/bias_in_bios"]),
            "unknown TPP dataset",
        ),
    ]
    for cfg, msg in cases:
        with pytest.raises(UserError, match=msg) as err:
            run(cfg, ctx_for(planted, sae, tmp_path))
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


def test_yaml_matches_schema_and_is_commented():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["eval=tpp"])
    assert OmegaConf.to_container(cfg.eval) == asdict(TppEvalConfig())
    lines = (ROOT / "conf/eval/tpp.yaml").read_text().splitlines()
    keys = [ln for ln in lines if ln and not ln.startswith(("#", " ", "defaults"))]
    assert len(keys) == len(asdict(TppEvalConfig()))
    assert all("#" in ln for ln in keys)
