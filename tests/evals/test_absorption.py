"""Tests of ``eval=absorption`` on hand-made arrays, a planted city world and the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.absorption import (
    AbsorptionEvalConfig,
    absorption_scores,
    alphabetic_tokens,
    run,
    select_main_latents,
    spelling_prompt,
)
from saeravel.models import LoadedModel
from saeravel.probing import ProbeConfig
from saeravel.saes.base import SAE, SAEIdentity

from helpers import ARCH, HOOK0, D, ctx_for, identity_sae

# ----------------------------------------------------------------------------- the maths


def test_absorption_scores_by_hand():
    """Main latent 0 = e0 (the probe direction), latent 1 = (0.6, 0.8, 0, 0) (cos 0.6), latent
    2 = e2 (cos 0). SAEBench's rules (module docstring), worked out by hand in the comments."""
    w_dec = np.array([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1.0, 0]])
    f = np.array([[2, 0, 1], [0, 2, 1], [1, 1, 0], [0, 0.5, 0], [0, 2, 0], [1, 2, 0]], dtype=float)
    x = np.array(
        [[2.5, 0, 1, 0], [1.5, 1.6, 1, 0], [2.0, 0.8, 0, 0], [1.0, 0.4, 0, 0], [-1.0, 1.6, 0, 0],
         [2.0, 1.6, 0, 0]]
    )  # fmt: skip
    # P = x.e0 = 2.5, 1.5, 2, 1, -1, 2; main m = 2, 0, 1, 0, 0, 1; absorbed a (latent 1 only)
    # = 0, 1.2, 0.6, 0.3, 1.2, 1.2. Rows: 0 nothing absorbs; 1 m <= 0 and a/P = 0.8 -> 1;
    # 2 a/P = 0.3 < 0.4 -> 0; 3 a/P = 0.3 -> 0; 4 P <= 0 -> 0; 5 min(1.2, 2 - 1) = 1, so
    # 1 / (1 + 1) = 0.5. Full: main silent, top latent cos 0.6 and 1.2/1.5 >= 0.4: row 1 only.
    args = (w_dec, np.array([3.0, 0, 0, 0]), [0], 0.1, 0.025, 0.4, 3)
    res = absorption_scores(x, f, np.ones(6), *args)
    np.testing.assert_allclose(res["fraction"], [0, 1, 0, 0, 0, 0.5])
    assert res["full"].tolist() == [False, True, False, False, False, False]
    assert res["top"].tolist() == [-1, 1, -1, -1, -1, -1]
    # Cosine bars above 0.6 leave no absorbing latent and no full absorption.
    strict = absorption_scores(x, f, np.ones(6), w_dec, args[1], [0], 0.7, 0.7, 0.4, 3)
    assert not strict["fraction"].any() and not strict["full"].any()
    # Layer-norm SAEs: latents act in model space times the input's std. With std 2 in row 5
    # the main latent's projection is 2 >= P, so the main latents explain it: fraction 0.
    scaled = absorption_scores(x, f, np.array([1, 1, 1, 1, 1, 2.0]), *args)
    assert scaled["fraction"][5] == 0


def test_absorption_fraction_sums_at_most_the_allowed_absorbing_latents():
    """No main latent fires; two aligned latents each carry less than 0.4 of P, together
    more: the cap on absorbing latents decides whether the fraction is 0 or 1."""
    w_dec = np.eye(4)
    probe = np.array([1.0, 1.0, 1.0, 0])  # cos 1/sqrt(3) with latents 0..2, 0 with latent 3
    x = np.array([[1.0, 0.5, 0.3, 0]])  # P = 1.8 / sqrt(3) = 1.039
    f = np.array([[0, 0.5, 0.3, 0.2]])  # proj = 0, 0.289, 0.173, 0
    one = absorption_scores(x, f, np.ones(1), w_dec, probe, [0], 0.1, 0.025, 0.4, 1)
    two = absorption_scores(x, f, np.ones(1), w_dec, probe, [0], 0.1, 0.025, 0.4, 2)
    # cap 1: a = 0.289 = 0.28 P < 0.4 P -> 0; cap 2: a = 0.462 = 0.44 P, m = 0 -> 1.
    assert one["fraction"][0] == 0 and two["fraction"][0] == 1


def test_select_main_latents_adds_while_f1_jumps():
    """Latent 0 fires on 60% of the positives, latent 1 on the other 40%, latent 2 is noise:
    k=2 jumps in F1, k=3 does not, so the main latents are [0, 1]."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat([1, 0], n)
        f = np.zeros((2 * n, 3))
        first = rng.random(n) < 0.6
        f[:n][first, 0] = 2.0
        f[:n][~first, 1] = 1.0
        f[:, 2] = rng.random(2 * n) * 0.1
        return f, y

    (ft, yt), (fv, yv) = split(200), split(100)
    cfg = AbsorptionEvalConfig(max_k_value=3, probe=ProbeConfig(c_grid=[1.0]))
    main, f1s = select_main_latents({"train": ft, "val": fv}, {"train": yt, "val": yv}, cfg)
    assert main.tolist() == [0, 1]
    assert len(f1s) == 3 and f1s[1] - f1s[0] > 0.03 and f1s[1] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- planted world

CONTINENTS = {"Alpha": 0, "Beta": 1, "Gamma": 2}
# country -> (continent, cities, country-direction scale); Xland is absorbed, Yland is a big
# non-absorbing sibling whose latent outranks Xland's (so k-sparse probing stops at k=1).
COUNTRIES = {
    "Xland": ("Alpha", 4, 2.0), "Yland": ("Alpha", 8, 4.0), "Zland": ("Alpha", 8, 2.0),
    "Bone": ("Beta", 8, 2.0), "Btwo": ("Beta", 8, 2.0), "Bthree": ("Beta", 6, 2.0),
    "Cone": ("Gamma", 8, 2.0), "Ctwo": ("Gamma", 8, 2.0), "Cthree": ("Gamma", 6, 2.0),
}  # fmt: skip
AXIS = {c: 3 + i for i, c in enumerate(COUNTRIES)}


@pytest.fixture(scope="module")
def planted():
    """A world whose city embeddings carry 3 * e_continent + scale * e_country (block 0 made
    an identity, so the activation is the embedding plus small noise), and an SAE with
    one latent per continent and one per country in which Xland's latent absorbed Alpha:
    Alpha's latent is suppressed on Xland cities and Xland's decoder is (3 e_Alpha + 2 e_X)."""
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary
    from saeravel.world import TEMPLATES, CityWorld

    entities, split = {}, {}
    for country, (cont, n, _) in COUNTRIES.items():
        for i in range(n):
            name = f"{country.lower()}city{i}"
            entities[name] = {
                "Continent": cont, "Country": country, "Language": "Lang", "Timezone": "Tz",
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
        for param in (model.blocks[0].attn.W_O, model.blocks[0].mlp.W_out):
            param.zero_()  # block 0 passes the embedding through: x = W_E + W_pos (+ biases)
        for name, a in entities.items():
            row = model.W_E[tok.convert_tokens_to_ids(name)]
            row[CONTINENTS[a["Continent"]]] += 3.0
            row[AXIS[a["Country"]]] += COUNTRIES[a["Country"]][2]
    for p in model.parameters():
        p.requires_grad_(False)
    lm = LoadedModel(model=model, name="planted", world=world)

    d_sae = len(CONTINENTS) + len(COUNTRIES)
    W_enc, W_dec = torch.zeros(D, d_sae), torch.zeros(d_sae, D)
    b_enc = torch.full((d_sae,), -0.5)
    for k in CONTINENTS.values():
        W_enc[k, k], W_dec[k, k], b_enc[k] = 2.0, 1.0, -1.0  # 5 on its cities, ~0 elsewhere
    W_enc[AXIS["Xland"], CONTINENTS["Alpha"]] = -5.0
    for ax in AXIS.values():
        W_enc[ax, ax], W_dec[ax, ax] = 1.0, 1.0
    x = AXIS["Xland"]
    W_dec[x] = 0.0
    W_dec[x, 0], W_dec[x, x] = 3 / math.sqrt(13), 2 / math.sqrt(13)
    W_enc[x, x], b_enc[x] = (math.sqrt(13) + 1) / 2, -1.0  # sqrt(13) on Xland: 3 e_A + 2 e_X
    sae = SAE(W_enc, b_enc, W_dec, torch.zeros(D), hook_name=HOOK0, identity=SAEIdentity("p"))
    return lm, sae


def test_planted_absorption_end_to_end(planted, tmp_path):
    lm, sae = planted
    cfg = AbsorptionEvalConfig(
        max_k_value=5, probe=ProbeConfig(c_grid=[0.1, 1.0]), min_train_entities=3, batch_size=256
    )
    # ctx.hook_name deliberately differs: the eval reads at the SAE's own hook.
    out = run(cfg, ctx_for(lm, sae, tmp_path, hook="blocks.1.hook_resid_post"))
    assert out.unstructured["hook_name"] == HOOK0
    assert out.metrics["status"]["valid"] and out.metrics["status"]["n_classes_passing"] == 3
    by = {d["continent"]: d for d in out.details}
    alpha = by["Alpha"]
    assert alpha["main_latents"] == [CONTINENTS["Alpha"]]
    # Exactly the Xland test rows (cities x templates) are fully absorbed, by Xland's latent.
    n_x = sum(1 for e, s in lm.world.entity_split.items() if s == "test" and e.startswith("xland"))
    n_rows = n_x * sum(len(t) for t in lm.world.templates.values())
    assert alpha["absorbed_groups"] == {"Xland": n_rows}
    assert alpha["top_absorbing_latents"] == {AXIS["Xland"]: n_rows}
    assert alpha["full_absorption_rate"] == pytest.approx(
        n_rows / alpha["num_probe_true_positives"]
    )
    assert alpha["mean_absorption_fraction"] >= alpha["full_absorption_rate"] * 0.8
    [lat] = alpha["absorbing_latents"]
    assert lat["dominant_child"] == "Xland" and lat["child_purity"] == pytest.approx(1.0)
    for cont in ("Beta", "Gamma"):
        assert by[cont]["full_absorption_rate"] == 0.0
        assert by[cont]["main_latents"] == [CONTINENTS[cont]]
    mean = out.metrics["mean"]
    assert mean["mean_full_absorption_score"] == pytest.approx(alpha["full_absorption_rate"] / 3)
    assert mean["mean_num_split_features"] == 1.0
    assert out.summary[0].startswith("absorption: fraction ")


def test_too_few_passing_classes_is_a_reported_outcome(planted, tmp_path):
    lm, sae = planted
    cfg = AbsorptionEvalConfig(
        max_k_value=2,
        probe=ProbeConfig(c_grid=[1.0]),
        min_train_entities=3,
        min_passing_classes=4,
        batch_size=256,
    )
    out = run(cfg, ctx_for(lm, sae, tmp_path))
    st = out.metrics["status"]
    assert not st["valid"] and st["n_classes_passing"] == 3 and st["n_classes_required"] == 4
    assert "only 3 of 3 classes pass" in st["reason"]
    assert all(math.isnan(v) for v in out.metrics["mean"].values())
    assert out.summary[0].startswith("absorption: not scored")


def test_bad_input_is_a_one_line_user_error(planted, tmp_path):
    lm, sae = planted
    cases = [  # built inside pytest.raises: a schema checks its values when built
        (
            lambda: AbsorptionEvalConfig(max_k_value=50),
            "max_k_value=50 must be between 1 and d_sae=12",
        ),
        (lambda: AbsorptionEvalConfig(data_source="embeded"), "did you mean 'embedded'"),
        (lambda: AbsorptionEvalConfig(parent_attribute="Colour"), "unknown attribute 'Colour'"),
        (
            lambda: AbsorptionEvalConfig(absorption_fraction_probe_cos_sim_threshold=2.0),
            "threshold=2.0",
        ),
        (lambda: AbsorptionEvalConfig(letters="ABC"), "must be lower-case letters"),
    ]
    for cfg, msg in cases:
        with pytest.raises(UserError, match=msg) as err:
            run(cfg(), ctx_for(lm, sae, tmp_path))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="needs an SAE"):
        run(AbsorptionEvalConfig(), ctx_for(lm, None, tmp_path))
    no_world = LoadedModel(model=lm.model, name="plain")
    with pytest.raises(UserError, match="use eval.data_source=first_letter"):
        run(AbsorptionEvalConfig(data_source="embedded"), ctx_for(no_world, sae, tmp_path))


# ----------------------------------------------------------------------------- first letter


def test_spelling_prompt_puts_the_word_token_where_it_says(tiny_model):
    tok = tiny_model.tokenizer
    words = dict((t, i) for i, t in alphabetic_tokens(tok, 2))
    assert "country" in words and "<pad>" not in words and "." not in words
    cfg = AbsorptionEvalConfig(
        prompt_template="{word} is a city in the", answer_template=" {letter}"
    )
    ids, pos = spelling_prompt(tok, words["country"], ["people", "city"], cfg, tok.bos_token_id)
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<bos>" and toks[pos] == "country"
    assert toks[pos + 1 :] == ["is", "a", "city", "in", "the"]
    assert toks[1:5] == ["people", "is", "a", "city"]


def test_first_letter_path_on_a_word_level_model(tiny_world, tmp_path):
    """Word tokens carry 3 * e_(first letter); with the identity SAE each letter's main latent
    is relu(x_letter) and nothing is absorbed."""
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary

    tok = build_tokenizer(world_vocabulary(tiny_world))
    torch.manual_seed(0)
    model = build_model(ARCH, tok)
    model.eval()
    with torch.no_grad():
        for i, t in alphabetic_tokens(tok, 2):
            model.W_E[i, ord(t.strip()[0].lower()) - ord("a")] += 3.0
    for p in model.parameters():
        p.requires_grad_(False)
    lm = LoadedModel(model=model, name="words")  # no world: the first-letter path
    cfg = AbsorptionEvalConfig(
        max_icl_examples=3, max_k_value=3, probe=ProbeConfig(c_grid=[1.0]), seed=0, batch_size=256
    )
    out = run(cfg, ctx_for(lm, identity_sae(), tmp_path))
    assert out.unstructured["data_source"] == "first_letter"
    assert len(out.details) == 26 and {"first_letter", "passed"} <= set(out.details[0])
    passing = [d for d in out.details if d["passed"]]
    assert out.metrics["status"]["valid"] and len(passing) >= 3
    for d in passing:
        assert d["main_latents"][0] == ord(d["first_letter"]) - ord("a")
        assert d["full_absorption_rate"] == 0.0
    assert out.metrics["mean"]["mean_full_absorption_score"] == 0.0
    failing = [d for d in out.details if not d["passed"]]
    assert all(isinstance(d["reason"], str) for d in failing)
