"""The data the evals share (saeravel/taskdata.py): the embedded/hub seam, hub text and its
one-line errors offline, token packing, the world's entities and the paired cells."""

from __future__ import annotations

import json

import pytest

from saeravel.errors import UserError
from saeravel.taskdata import (
    EMBEDDED,
    cells_of,
    choose_embedded_pairs,
    data_source,
    dataset_texts,
    entity_splits,
    load_hf_task_texts,
    load_paired_texts,
    pack_token_batches,
    resolve_source,
    world_entities,
)

from helpers import HOOK0, D, cell_world, identity_sae


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub cannot be reached (the libraries' flags, read when a dataset is loaded)."""
    import datasets.config
    import huggingface_hub.constants

    for module, name in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):  # fmt: skip
        monkeypatch.setattr(module, name, True)


def test_the_data_source_seam(tiny_model):
    assert resolve_source("auto", True) == EMBEDDED and resolve_source("auto", False) == "hf"
    assert resolve_source("auto", False, other="json") == "json"
    assert data_source("auto", tiny_model) == EMBEDDED
    no_world = type("M", (), {"world": None, "name": "gpt2-small"})()
    assert data_source("auto", no_world) == "hf"
    with pytest.raises(UserError, match="eval.data_source=embedded needs the embedded model"):
        data_source("embedded", no_world)
    with pytest.raises(UserError, match="did you mean 'embedded'"):
        data_source("embeded", tiny_model)


def test_entities_and_cells(tiny_world):
    splits = entity_splits(tiny_world)
    assert set(splits.values()) <= {"train", "val", "test"} and splits
    assert not set(world_entities(tiny_world)) & set(tiny_world.few_shot_cities)
    assert cells_of(("a1", "a2", "b1", "b2")) == [
        ("a1", "b1"),
        ("a1", "b2"),
        ("a2", "b1"),
        ("a2", "b2"),
    ]


@pytest.mark.parametrize(
    ("load", "name"),
    [
        (lambda: next(dataset_texts("Skylion007/openwebtext")), "Skylion007/openwebtext"),
        (lambda: load_hf_task_texts("fancyzhx/ag_news", 8, 4, 4, 0), "fancyzhx/ag_news"),
        (lambda: load_hf_task_texts("Helsinki-NLP/europarl", 8, 4, 4, 0), "Helsinki-NLP/europarl"),
        (lambda: load_paired_texts("LabHC/bias_in_bios_class_set1", [("professor", "male")], 4, 4, 4, 0),
         "LabHC/bias_in_bios"),
        (lambda: load_paired_texts("canrager/amazon_reviews_mcauley_1and5", [("Books", "5.0")], 4, 4, 4, 0),
         "canrager/amazon_reviews_mcauley_1and5"),
    ],
    ids=["core-text", "probing-ag-news", "probing-europarl", "scr-bias-in-bios", "scr-amazon"],
)  # fmt: skip
def test_a_hub_dataset_offline_is_a_one_line_error(offline, load, name):
    """Not cached and no hub: one line naming the dataset and how to cache it."""
    with pytest.raises(UserError) as err:
        load()
    msg = str(err.value)
    assert f"{name!r}" in msg and "HF_DATASETS_OFFLINE=1" in msg and "\n" not in msg


def test_embedded_pairs_are_the_largest_complete_ones():
    cells = {("Alpha", "Lone"): 9, ("Alpha", "Ltwo"): 4, ("Beta", "Lone"): 5, ("Beta", "Ltwo"): 8,
             ("Gamma", "Lone"): 2, ("Gamma", "Ltwo"): 20}  # fmt: skip
    world = cell_world(cells)
    # Only Alpha/Beta has all four cells >= 3; biased cells (Alpha, Lone) & (Beta, Ltwo) = 9, 8.
    assert choose_embedded_pairs(world, "Continent", "Language", 3, 5) == [
        ("Alpha", "Beta", "Lone", "Ltwo")
    ]
    # Below 2 Gamma joins; Alpha/Beta (smallest cell 4) still comes first.
    got = choose_embedded_pairs(world, "Continent", "Language", 2, 5)
    assert got[0] == ("Alpha", "Beta", "Lone", "Ltwo") and len(got) == 3
    # Orientation: the larger cells are the biased ones.
    assert ("Alpha", "Gamma", "Lone", "Ltwo") in got and ("Beta", "Gamma", "Lone", "Ltwo") in got


def test_hub_pairs_through_the_shared_seam(tiny_model, monkeypatch):
    """paired_cells on the hub side: texts read once per dataset (a quarter of each size per
    cell), then per pair the four cells' mean-pooled rows with both labels."""
    from saeravel import taskdata
    from saeravel.taskdata import PairRequest, paired_cells

    cities = sorted(tiny_model.world.entities)
    calls = []

    def fake(name, cells, n_train, n_val, n_test, seed):
        calls.append((name, tuple(cells), n_train, n_val, n_test))
        return {
            s: {c: [f"{x} is a city" for x in cities[i : i + n]] for i, c in enumerate(cells)}
            for s, n in (("train", n_train), ("val", n_val), ("test", n_test))
        }

    monkeypatch.setattr(taskdata, "load_paired_texts", fake)
    pairs = [("p", "q", "m", "f"), ("r", "q", "m", "f")]
    req = PairRequest(("Continent", "Language"), [0.5, 0.2, 0.3], (8, 4, 4), 8, 4, 0)
    out = list(paired_cells("hf", tiny_model, identity_sae(), HOOK0, [("ds", pairs)], req))
    assert len(calls) == 1 and calls[0][2:] == (2, 1, 1)
    assert [(n, p) for n, p, _ in out] == [("ds", pairs[0]), ("ds", pairs[1])]
    data = out[1][2]
    assert sorted(set(data.v1["train"])) == ["q", "r"] and len(data.v1["train"]) == 8
    assert data.x["test"].shape == (4, D) and data.a["test"].shape == (4, identity_sae().d_sae)


def test_unknown_hf_dataset_lists_valid_ones():
    with pytest.raises(UserError, match="LabHC/bias_in_bios_class_set1"):
        load_hf_task_texts("LabHC/bias_in_bios", 8, 4, 4, 0)


def test_hub_tasks_through_the_shared_seam(tiny_model, monkeypatch):
    """classification_tasks on the hub side: the first hub_max_classes classes with data in
    every split, one mean-pooled row per text, model-space latents when asked."""
    from saeravel import taskdata
    from saeravel.taskdata import TaskRequest, classification_tasks

    cities = sorted(tiny_model.world.entities)
    data = {
        s: {c: [f"{x} is in the country of" for x in cities[i : i + 3]] for c, i in (("a", 0), ("b", 3), ("c", 6))}
        for s in ("train", "val", "test")
    }  # fmt: skip
    data["val"].pop("b")
    monkeypatch.setattr(taskdata, "load_hf_task_texts", lambda *a, **k: data)
    req = TaskRequest(
        attributes=[], dataset_names=["fancyzhx/ag_news"], max_classes=5, min_train_entities=1,
        sizes=(6, 6, 6), context_length=8, batch_size=4, seed=0, hub_max_classes=2,
        model_space=True,
    )  # fmt: skip
    [task] = classification_tasks("hf", tiny_model, identity_sae(), HOOK0, req)
    assert task.name == "fancyzhx/ag_news" and task.classes == ["a", "c"]
    assert task.labels["train"].tolist() == ["a"] * 3 + ["c"] * 3
    assert task.resid["test"].shape == (6, D) and task.latents["test"].shape == (6, 2 * D)


def test_hf_path_packs_local_json(tiny_model, tmp_path):
    docs = ["Paris is in France .", "Lima lies on the continent of South America ."]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 5))
    tok = tiny_model.tokenizer
    texts = dataset_texts("json", data_files=str(data), streaming=True, shuffle_buffer=0)
    batches = list(pack_token_batches(texts, tok, context_size=8, batch_size=2))
    stream = []
    for d in docs * 5:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.bos_token_id]
    rows = [r for b in batches for r in b.tolist()]
    assert all(r[0] == tok.bos_token_id and len(r) == 8 for r in rows)
    assert [t for r in rows for t in r[1:]] == stream[: 7 * len(rows)]
    assert len(rows) == len(stream) // 7 // 2 * 2  # whole batches only


def test_missing_local_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="could not be loaded") as err:
        next(dataset_texts("json", data_files=str(tmp_path / "nope.jsonl")))
    assert "\n" not in str(err.value)


def test_wrong_column_is_a_user_error(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no column 'text'; valid: body"):
        next(dataset_texts("json", data_files=str(data), shuffle_buffer=0))


def test_packing_keeps_a_separator_that_starts_a_row():
    """GPT-2's BOS is its EOS: a document ending at a row's end leaves the separator to open
    the next row after its BOS head (sae_lens' own begin-of-batch token would drop one and
    shift every later row)."""

    class Tok:
        bos_token_id = eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(w) for w in text.split()]}

    rows = [
        r
        for b in pack_token_batches(["1 2 3", "4 5 6", "7 8"], Tok(), context_size=4, batch_size=1)
        for r in b.tolist()
    ]
    assert rows == [[0, 1, 2, 3], [0, 0, 4, 5], [0, 6, 0, 7]]
