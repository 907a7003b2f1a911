"""Tests of ``eval=unlearning`` on a planted tiny model (2 layers, d_model 64).

The planted model answers the prompt ``<bos> City`` with the city's continent: every city
embedding carries its continent's direction (orthonormal directions, scale 10) and the
unembedding of each continent's first token reads it. Attention is local, so the residual at
the city token decides the answer. The SAE at block 0 has a "." latent (frequent everywhere),
a Europe latent, a Europe-or-Asia latent, two latents of other continents and a dead one.
Unlearning Europe: clamping the Europe latent drops Europe accuracy to 0 while the other
continents stay at 1; adding the Europe-or-Asia latent also breaks Asia, so that
configuration fails the retain threshold.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.unlearning import (
    PermutedQuestions,
    UnlearningEvalConfig,
    all_orders_correct,
    clamp_hook,
    hf_question,
    letter_token_ids,
    packed_rows,
    read_forget_corpus,
    run,
    select_features,
    unlearning_score,
)
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, SAEIdentity

from helpers import HOOK0, D, ctx_for

CONTINENTS = ["Africa", "Asia", "Europe", "North America", "Oceania", "South America"]
SCALE, READ = 10.0, 3.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted(tiny_world):
    """(model, SAE, world, the South American city planted with the wrong answer)."""
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary
    from saeravel.world import CityWorld

    world = CityWorld(entities=dict(tiny_world.entities), templates={"Continent": ["%s"]})
    tok = build_tokenizer(world_vocabulary(world))
    arch = {"n_layers": 2, "d_model": D, "n_heads": 4, "d_mlp": 128, "n_ctx": 96, "local_layers": 2}
    torch.manual_seed(0)
    model = build_model(arch, tok)
    model.eval()
    g = torch.Generator().manual_seed(2)
    dirs = torch.linalg.qr(torch.randn(D, len(CONTINENTS) + 1, generator=g))[0].T
    u = {c: dirs[i] for i, c in enumerate(CONTINENTS)}
    u_dot = dirs[-1]
    wrong = next(c for c, a in sorted(world.entities.items()) if a["Continent"] == "South America")
    with torch.no_grad():
        for city, attrs in world.entities.items():
            sign = -1.0 if city == wrong else 1.0
            model.W_E[tok.convert_tokens_to_ids(city)] += sign * SCALE * u[attrs["Continent"]]
        model.W_E[tok.convert_tokens_to_ids(".")] += SCALE * u_dot
        for c in CONTINENTS:
            model.W_U[:, tok.convert_tokens_to_ids(c.split()[0])] += READ * u[c]
    for p in model.parameters():
        p.requires_grad_(False)
    mixed = (u["Europe"] + u["Asia"]) / math.sqrt(2)
    enc = [u_dot, u["Europe"], mixed, u["Africa"], u["Oceania"], torch.zeros(D)]
    W_enc = torch.stack(enc, 1)
    b_enc = torch.tensor([-5.0, -5.0, -3.5, -5.0, -5.0, -1.0])
    sae = SAE(
        W_enc, b_enc, W_enc.T.clone(), torch.zeros(D), hook_name=HOOK0, identity=SAEIdentity("t")
    )
    lm = LoadedModel(model=model, name="tiny-planted", world=world)
    return lm, sae, world, wrong


def small_cfg(**kw) -> UnlearningEvalConfig:
    base = dict(
        attributes=["Continent"],
        forget_continent="Europe",
        retain_thresholds=[0.01, 0.1],
        n_features_list=[1, 2],
        multipliers=[0.0, 20.0],
        dataset_size=100,
        facts_per_sequence=4,
    )
    base.update(kw)
    return UnlearningEvalConfig(**base)


# ----------------------------------------------------------------------------- end to end


def test_planted_forget_topic_is_unlearned_and_retain_kept(planted, tmp_path):
    lm, sae, world, wrong = planted
    out = run(small_cfg(), ctx_for(lm, sae, tmp_path))
    conts = [a["Continent"] for a in world.entities.values()]
    n_cont = {c: conts.count(c) for c in CONTINENTS}

    # Baseline filter: every Europe question, every other one except the mis-planted city.
    q = out.unstructured["questions"]
    assert q["Europe"] == {"questions": n_cont["Europe"], "originally_correct": n_cont["Europe"]}
    sa = n_cont["South America"]
    assert q["South America"] == {"questions": sa, "originally_correct": sa - 1}
    assert wrong and all(q[c]["originally_correct"] == n_cont[c] for c in ("Asia", "Africa"))

    # Selection: "." (0) is frequent on the retain corpus, Africa/Oceania (3, 4) never fire on
    # the forget corpus, the Europe-or-Asia latent (2) passes only the looser threshold; the
    # Europe latent (1) ties with it on forget frequency and wins on its lower index.
    sel = {
        thr: [f["latent"] for f in fs] for thr, fs in out.unstructured["selected_features"].items()
    }
    assert sel == {"0.01": [1], "0.1": [1, 2]}
    mixed = out.unstructured["selected_features"]["0.1"][1]
    assert 0.01 <= mixed["retain_freq"] < 0.1

    rows = {(r["retain_threshold"], r["n_features"], r["multiplier"]): r for r in out.details}
    assert len(rows) == 8
    clamp = rows[(0.01, 1, 20.0)]
    assert clamp["features"] == [1]
    assert clamp["forget_accuracy"] == 0.0  # Europe unlearned
    assert clamp["retain_accuracy"] == 1.0 and clamp["passes"]
    assert rows[(0.01, 1, 0.0)]["forget_accuracy"] == 1.0  # clamping to 0 keeps the answer
    assert rows[(0.01, 2, 20.0)]["features"] == [1]  # only one latent passes 0.01
    both = rows[(0.1, 2, 20.0)]
    assert both["features"] == [1, 2]
    assert both["accuracy_per_set"]["Asia"] == 0.0  # the side effect
    assert both["accuracy_per_set"]["Africa"] == 1.0
    n_retain = sum(v["originally_correct"] for k, v in q.items() if k != "Europe")
    assert both["retain_accuracy"] == pytest.approx(1 - n_cont["Asia"] / n_retain)
    assert not both["passes"]

    passing = [r["forget_accuracy"] for r in out.details if r["retain_accuracy"] >= 0.99]
    assert out.metrics == {"unlearning": {"unlearning_score": 1.0 - min(passing)}}
    assert out.metrics["unlearning"]["unlearning_score"] == 1.0
    best = out.unstructured["best_configuration"]
    assert best["forget_accuracy"] == 0.0 and best["features"] == [1]
    json.dumps(out.details)  # the record must be JSON-serialisable


def test_score_is_zero_when_nothing_is_forgotten(planted, tmp_path):
    lm, sae, _, _ = planted
    out = run(small_cfg(multipliers=[0.0], retain_thresholds=[0.01]), ctx_for(lm, sae, tmp_path))
    assert [r["forget_accuracy"] for r in out.details] == [1.0, 1.0]
    assert out.metrics["unlearning"]["unlearning_score"] == 0.0


# ----------------------------------------------------------------------------- units


def test_select_features_threshold_and_ranking():
    forget = np.array([0.5, 0.2, 0.2, 0.0, 0.9, 0.3])
    retain = np.array([0.0, 0.005, 0.0, 0.0, 0.01, 0.02])
    # Retain frequency must be strictly below the threshold; zero forget frequency is dropped;
    # ties in forget frequency go to the lower index.
    assert select_features(forget, retain, 0.01) == [0, 1, 2]
    assert select_features(forget, retain, 0.05) == [4, 0, 5, 1, 2]
    assert select_features(forget, retain, 0.0) == []


def test_unlearning_score_on_hand_made_accuracies():
    rows = [
        {"forget_accuracy": 0.2, "retain_accuracy": 0.98},
        {"forget_accuracy": 0.5, "retain_accuracy": 0.99},
        {"forget_accuracy": 0.7, "retain_accuracy": 1.0},
        {"forget_accuracy": math.nan, "retain_accuracy": 1.0},
    ]
    assert unlearning_score(rows, 0.99) == pytest.approx(0.5)  # 0.99 itself qualifies
    assert unlearning_score(rows, 0.98) == pytest.approx(0.8)
    assert unlearning_score(rows, 1.0) == pytest.approx(0.3)
    assert unlearning_score(rows[:2], 1.0) == 0.0  # no configuration keeps the retain set
    assert unlearning_score([], 0.99) == 0.0


def test_clamp_sets_active_features_and_keeps_the_error():
    """relu(x), relu(-x) SAE with a lossy decoder: the clamp moves x by exactly
    (value - f) * W_dec[j] where feature j is active, nowhere else."""
    eye = torch.eye(D)
    W_dec = torch.cat([eye, -eye], 0) * 0.5  # reconstruction is x / 2: large error term
    sae = SAE(torch.cat([eye, -eye], 1), torch.zeros(2 * D), W_dec, torch.zeros(D),
              hook_name=HOOK0, identity=SAEIdentity("t"))  # fmt: skip
    x = torch.randn(2, 5, D)
    x[0, 1, 0], x[0, 2, 0], x[1, 3, 0] = 2.0, -1.5, 4.0
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False  # a special position
    out = clamp_hook(sae, [0], -3.0, mask)(x.clone(), None)
    expected = x.clone()
    active = (x[..., 0] > 0) & mask
    expected[..., 0] = torch.where(active, x[..., 0] + 0.5 * (-3.0 - x[..., 0]), x[..., 0])
    torch.testing.assert_close(out, expected)
    assert out[1, 3, 0] == 4.0 and out[0, 2, 0] == -1.5
    assert torch.equal(clamp_hook(sae, [0], -3.0, torch.zeros_like(mask))(x, None), x)


class CharTokenizer:
    """Characters as tokens (ids = code points), BOS 1, a visible chat template."""

    bos_token_id = 1
    chat_template = "<user>{content}</user><model>"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return self.chat_template.format(content=messages[0]["content"])


def test_hf_question_permutes_choices_and_answer():
    tok = CharTokenizer()
    letters = letter_token_ids(tok)
    assert letters == [[ord(c)] for c in "ABCD"]  # " A" is two tokens here
    row = {"question": " Which? ", "choices": ["w", "x", "y", "z"], "answer": 0}
    q = hf_question(tok, row, "biology", "About {subject}.\n", "Answer: (", letters, (2, 0, 1, 3))
    text = "".join(chr(i) for i in q.prompt_ids[1:])
    assert q.prompt_ids[0] == 1
    assert text == "<user>About biology.\nWhich?\nA. y\nB. w\nC. x\nD. z</user><model>Answer: ("
    assert q.answer == 1 and q.options == letters


def test_permuted_questions_are_row_major_with_mapped_answers():
    """The baseline's 24 orders per question are consecutive, as all_orders_correct expects."""
    import functools
    import itertools

    tok = CharTokenizer()
    letters = letter_token_ids(tok)
    rows = [
        {"question": "q0", "choices": ["a", "b", "c", "d"], "answer": 2},
        {"question": "q1", "choices": ["e", "f", "g", "h"], "answer": 0},
    ]
    orders = list(itertools.permutations(range(4)))
    make = functools.partial(
        hf_question, tok, subject="s", header="", answer_prefix="", letters=letters
    )
    pq = PermutedQuestions(rows, orders, make)
    assert len(pq) == 48
    chunk = pq[20:30]
    assert len(chunk) == 10
    for i, q in zip(range(20, 30), chunk, strict=True):
        row, order = rows[i // 24], orders[i % 24]
        assert q.answer == order.index(row["answer"])
        text = "".join(chr(t) for t in q.prompt_ids)
        assert row["question"] in text
        assert text.count(f"{'ABCD'[q.answer]}. {row['choices'][row['answer']]}") == 1


def test_forget_corpus_reading_and_packing(planted, tmp_path):
    lm, _, _, _ = planted
    f = tmp_path / "corpus.jsonl"
    long = " ".join(["Paris Europe ."] * 10)
    f.write_text(json.dumps({"text": long}) + "\n\n" + json.dumps({"text": "short"}) + "\n")
    texts = read_forget_corpus(str(f), min_chars=50)
    assert texts == [long]  # the short document is dropped, the blank line skipped
    batches = packed_rows(texts * 3, lm.tokenizer, seq_len=8, n_rows=5, batch_size=2, seed=0)
    rows = torch.cat(batches)
    assert rows.shape == (5, 8)
    assert (rows[:, 0] == lm.tokenizer.bos_token_id).all()


def test_all_orders_correct():
    ok = np.array([1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert all_orders_correct(ok, 4).tolist() == [True, False]
    assert all_orders_correct(ok, 1).tolist() == ok.tolist()


# ----------------------------------------------------------------------------- errors


def test_hf_needs_an_instruction_tuned_model_and_the_gated_corpus(planted, tmp_path, monkeypatch):
    lm, sae, _, _ = planted
    no_world = LoadedModel(model=lm.model, name="tiny-hf", world=None)
    with pytest.raises(UserError, match="instruction-tuned.*gemma-2-2b-it") as err:
        run(small_cfg(), ctx_for(no_world, sae, tmp_path))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(
        lm.tokenizer, "chat_template", "{{ messages[0]['content'] }}", raising=False
    )
    with pytest.raises(UserError, match="forget_corpus_path.*cais/wmdp-bio-forget-corpus") as err:
        run(small_cfg(), ctx_for(no_world, sae, tmp_path))
    assert "\n" not in str(err.value)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match="nope.jsonl does not exist"):
        run(small_cfg(forget_corpus_path=str(missing)), ctx_for(no_world, sae, tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "' + "x" * 60 + '"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 of .*bad.jsonl"):
        run(small_cfg(forget_corpus_path=str(bad)), ctx_for(no_world, sae, tmp_path))


def test_bad_config_values_are_one_line_errors(planted, tmp_path):
    lm, sae, _, _ = planted
    ctx = ctx_for(lm, sae, tmp_path)
    cases = [
        (dict(forget_continent="Europa"), "did you mean 'Europe'"),
        (dict(attributes=["Colour"]), "unknown attribute 'Colour'"),
        (dict(multipliers=[]), "eval.multipliers is empty"),
        (dict(n_features_list=[0, 2]), "n_features_list has \\[0\\]"),
        (dict(n_features_list=[7]), "d_sae=6"),
        (dict(retain_accuracy_threshold=1.5), "retain_accuracy_threshold must be in"),
        (dict(data_source="embeded"), "did you mean 'embedded'"),
    ]
    for kw, message in cases:
        with pytest.raises(UserError, match=message) as err:
            run(small_cfg(**kw), ctx)
        assert "\n" not in str(err.value)
    no_world = LoadedModel(model=lm.model, name="tiny-hf", world=None)
    with pytest.raises(UserError, match="needs the embedded model"):
        run(small_cfg(data_source="embedded"), ctx_for(no_world, sae, tmp_path))
    with pytest.raises(UserError, match="needs an SAE"):
        run(small_cfg(), ctx_for(lm, None, tmp_path))
