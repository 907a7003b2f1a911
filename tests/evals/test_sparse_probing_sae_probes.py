"""``eval=sparse_probing_sae_probes``: sae-probes' protocol (its validation scheme, latent
ranking, balanced split, L1 probes), the embedded tasks on a tiny city world, the sae-probes
data folder read from local files, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_sparse_probing import city  # noqa: F401  (the tiny model with a planted continent)

from saeravel.errors import UserError
from saeravel.evals.sparse_probing_sae_probes import (
    C_GRID,
    SparseProbingSaeProbesEvalConfig,
    balanced_split,
    best_reg_probe,
    check_data,
    cv_splits,
    latent_order,
    logistic,
    run,
)

from helpers import ctx_for, identity_sae

# ----------------------------------------------------------------------------- the protocol


def test_validation_scheme_follows_the_number_of_training_rows():
    y = np.array([0, 1] * 5)  # 10 rows: leave two out, only pairs holding both classes
    splits = cv_splits(y, seed=0)
    assert len(splits) == 25 and all(len(va) == 2 and set(y[va]) == {0, 1} for _, va in splits)
    y = np.array([0, 1] * 30)  # 60 rows: 6 stratified folds
    assert [len(va) for _, va in cv_splits(y, seed=0)] == [10] * 6
    for n, held in ((200, 40), (1024, 100)):  # one block at the end: min(20%, 100) rows
        ((tr, va),) = cv_splits(np.arange(n) % 2, seed=0)
        assert list(va) == list(range(n - held, n)) and list(tr) == list(range(n - held))
    assert cv_splits(np.array([0, 1] * 50 + [0] * 100), seed=0) == []  # one class held out


def test_probe_chooses_c_on_validation_and_reports_test_once():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] + 0.1 * rng.normal(size=300) > 0).astype(int)
    train, test = (x[:200], y[:200]), (x[200:], y[200:])
    a = best_reg_probe(train, test, "l2", seed=0)
    assert a.C in C_GRID and a.test_accuracy > 0.85 and a.test_auc > 0.9
    assert 0 < a.test_f1 <= 1 and a.val_auc > 0.9
    noise = (rng.normal(size=(100, 5)), rng.integers(0, 2, 100))
    b = best_reg_probe(train, noise, "l2", seed=0)  # the test rows never choose C
    assert b.C == a.C and b.val_auc == a.val_auc and b.test_accuracy != a.test_accuracy


def test_l1_probe_zeroes_irrelevant_inputs_and_l2_does_not():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 10))
    y = (x[:, 0] > 0).astype(int)
    l1 = logistic(0.05, "l1", seed=0).fit(x, y).coef_[0]
    l2 = logistic(0.05, "l2", seed=0).fit(x, y).coef_[0]
    assert (l1[1:] == 0).sum() >= 8 and l1[0] != 0
    assert (l2 == 0).sum() == 0


def test_latents_are_ranked_after_mean_normalisation():
    """Latent 0 differs by 10 on a scale of 100, latent 1 by 1 on a scale of 1: the raw mean
    difference ranks latent 0 first, sae-probes' normalised one ranks latent 1 first."""
    y = np.array([1, 1, 0, 0])
    x = np.array([[100.0, 1.0], [100.0, 1.0], [90.0, 0.0], [90.0, 0.0]])
    assert list(latent_order(x, y)) == [1, 0]
    raw = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    assert list(np.argsort(-raw)) == [0, 1]


def test_balanced_split_is_disjoint_balanced_and_seeded():
    y = np.array([0] * 300 + [1] * 300)
    train, test = balanced_split(y, 200, 299, seed=3, name="d")
    assert len(train) == 200 and len(test) == 299 and not set(train) & set(test)
    assert y[train].sum() == 100 and y[test].sum() == 150
    again = balanced_split(y, 200, 299, seed=3, name="d")
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(balanced_split(y, 200, 299, seed=4, name="d")[0], train)
    with pytest.raises(UserError, match="sae-probes dataset d has 200 positive and 400 negative"):
        balanced_split(np.array([0] * 400 + [1] * 200), 200, 299, seed=0, name="d")


# ----------------------------------------------------------------------------- embedded


def test_embedded_tasks_one_per_value_with_entity_split(city, tmp_path):  # noqa: F811
    cfg = SparseProbingSaeProbesEvalConfig(
        ks=[1, 4], attributes=["Continent"], min_train_entities=3
    )
    out = run(cfg, ctx_for(city, identity_sae(), tmp_path))
    names = [d["dataset_name"] for d in out.details]
    assert names and all(n.startswith("Continent=") for n in names)
    # continent is planted in the city embedding: held-out cities are classified well
    assert out.metrics["llm"]["llm_test_accuracy"] > 0.85
    assert out.metrics["sae"]["sae_top_4_test_accuracy"] > 0.7
    assert set(out.metrics["sae"]) == {f"sae_top_{k}_{m}" for k in (1, 4)
                                       for m in ("test_accuracy", "test_auc", "test_f1")}  # fmt: skip
    row = out.details[0]
    assert row["sae_metrics_by_k"]["1"]["test_accuracy"] == row["sae_top_1_test_accuracy"]
    rows = out.unstructured["n_rows"][names[0]]
    assert rows["train"] % 2 == 0 and rows["test"] % 2 == 0  # balanced
    assert out.summary[0].startswith("sparse_probing_sae_probes: residual ")
    no_llm = run(
        SparseProbingSaeProbesEvalConfig(ks=[1], attributes=["Continent"], min_train_entities=3,
                                         include_llm_baseline=False),
        ctx_for(city, identity_sae(), tmp_path),
    )  # fmt: skip
    assert no_llm.metrics["llm"]["llm_test_accuracy"] is None


def test_k_larger_than_d_sae_is_one_line(city, tmp_path):  # noqa: F811
    cfg = SparseProbingSaeProbesEvalConfig(ks=[1, 20], attributes=["Continent"])
    with pytest.raises(UserError, match="k=20, but the SAE has only d_sae=16"):
        run(cfg, ctx_for(city, identity_sae(d_sae=16), tmp_path))


# ----------------------------------------------------------------------------- sae-probes data


def fake_sae_probes(folder: Path, world) -> None:
    """A data folder in sae-probes' layout (plain CSV): a master table with two binary
    datasets and a multiclass one; the label of a prompt is its last city's continent being
    the most common one."""
    import pandas as pd

    (folder / "cleaned_data").mkdir(parents=True)
    cities = sorted(world.entities)
    top = max({a["Continent"] for a in world.entities.values()},
              key=lambda c: sum(a["Continent"] == c for a in world.entities.values()))  # fmt: skip
    rng = np.random.default_rng(0)
    inside = [c for c in cities if world.entities[c]["Continent"] == top]
    outside = [c for c in cities if world.entities[c]["Continent"] != top]
    rows = []
    for name in ("1_city_top", "2_city_top_again"):
        picks = np.concatenate([rng.choice(inside, 150), rng.choice(outside, 150)])
        prompts = [f"{rng.choice(cities)} . {c}" for c in picks]
        target = [str(world.entities[c]["Continent"] == top) for c in picks]
        pd.DataFrame({"prompt": prompts, "target": target}).to_csv(
            folder / "cleaned_data" / f"{name}.csv", index=False
        )
        rows.append({"Dataset Tag": name.split("_", 1)[1], "Data type": "Binary Classification",
                     "Dataset save name": f"cleaned_data/{name}.csv"})  # fmt: skip
    rows.append({"Dataset Tag": "multi", "Data type": "Multiclass Classification",
                 "Dataset save name": "cleaned_data/3_multi.csv"})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "probing_datasets_MASTER.csv", index=False)


def test_sae_probes_datasets_from_a_data_folder(city, tmp_path):  # noqa: F811
    fake_sae_probes(tmp_path / "data", city.world)
    cfg = SparseProbingSaeProbesEvalConfig(
        data_source="sae_probes", data_dir=str(tmp_path / "data"), ks=[1, 2],
        dataset_names=["1_city_top"],
    )  # fmt: skip
    check_data(cfg)  # the folder and the name are fine
    out = run(cfg, ctx_for(city, identity_sae(), tmp_path))
    assert [d["dataset_name"] for d in out.details] == ["1_city_top"]
    assert out.unstructured["n_rows"]["1_city_top"] == {"train": 200, "test": 99}
    assert out.metrics["llm"]["llm_test_accuracy"] > 0.8  # the last token's continent
    every = SparseProbingSaeProbesEvalConfig(data_source="sae_probes", ks=[1],
                                             data_dir=str(tmp_path / "data"))  # fmt: skip
    out = run(every, ctx_for(city, identity_sae(), tmp_path))
    assert [d["dataset_name"] for d in out.details] == ["1_city_top", "2_city_top_again"]


def test_unknown_dataset_and_missing_folder_are_one_line(tmp_path, city):  # noqa: F811
    fake_sae_probes(tmp_path / "data", city.world)
    bad = SparseProbingSaeProbesEvalConfig(data_source="sae_probes", data_dir=str(tmp_path / "data"),
                                           dataset_names=["1_city_tpo"])  # fmt: skip
    with pytest.raises(UserError, match=r"unknown sae-probes dataset '1_city_tpo' \(did you mean"):
        check_data(bad)
    with pytest.raises(
        UserError, match="has no probing_datasets_MASTER.csv.*pip install sae-probes"
    ):
        check_data(
            SparseProbingSaeProbesEvalConfig(data_source="sae_probes", data_dir=str(tmp_path))
        )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ks": []}, "eval.ks is empty"),
        ({"ks": [0, 1]}, "eval.ks has k=0"),
        ({"ks": [1, 1]}, "repeats a k"),
        ({"data_source": "hf"}, "unknown eval.data_source 'hf'"),
        ({"reg_type": "l3"}, "unknown eval.reg_type 'l3'"),
        ({"max_seq_len": 0}, "eval.max_seq_len must be >= 1"),
    ],
)
def test_bad_values_fail_when_the_config_is_built(kw, message):
    with pytest.raises(UserError, match=message):
        SparseProbingSaeProbesEvalConfig(**kw)
