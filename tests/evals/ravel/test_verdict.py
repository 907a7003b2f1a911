"""Paired differences between methods: aligned outcomes, entity-level resampling."""

from __future__ import annotations

import pytest

from saeravel.evals.ravel.verdict import decode, encode, paired_difference, verdict, verdict_line


def _data(n_ent=30, per=4):
    entities = [f"e{j}" for j in range(n_ent) for _ in range(per)]
    kinds = "ci" * (n_ent * per // 2)
    return entities, kinds


def test_encode_roundtrip():
    ok = [True, False, False, True]
    assert encode(ok) == "1001"
    assert decode(encode(ok)).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_a_method_better_on_every_pair_has_an_interval_above_zero():
    entities, kinds = _data()
    a = encode([True] * len(kinds))
    b = encode([i % 3 != 0 for i in range(len(kinds))])
    d = paired_difference(a, b, kinds, entities, n_boot=500, seed=1)
    assert d["disentangle"]["diff"] > 0
    assert d["disentangle"]["ci"][0] > 0
    assert d["disentangle"]["p_a_better"] == 1.0
    assert "isolation_heldout" not in d  # no held-out pairs


def test_identical_methods_differ_by_exactly_zero():
    entities, kinds = _data()
    a = encode([i % 2 == 0 for i in range(len(kinds))])
    d = paired_difference(a, a, kinds, entities, n_boot=200)
    assert d["cause"]["diff"] == 0 and d["cause"]["ci"] == [0.0, 0.0]


def test_pairing_narrows_the_interval_for_correlated_methods():
    """Two methods that fail on the same hard entities: the paired interval of their small
    difference is much narrower than the spread of either score."""
    entities, kinds = _data(n_ent=40, per=4)
    hard = {f"e{j}" for j in range(0, 40, 2)}
    a = [e not in hard for e in entities]
    b = list(a)
    b[1] = not b[1]  # one pair differs
    d = paired_difference(encode(a), encode(b), kinds, entities, n_boot=500)
    width = d["disentangle"]["ci"][1] - d["disentangle"]["ci"][0]
    assert width < 0.05


def test_heldout_pairs_get_their_own_rate():
    entities = ["x", "x", "x", "y", "y", "y"]
    kinds = "cih" * 2
    d = paired_difference("111111", "110110", kinds, entities, n_boot=100)
    assert d["isolation_heldout"]["diff"] == pytest.approx(1.0)
    assert d["cause"]["diff"] == 0.0


def test_verdict_covers_every_pair_of_methods_and_misaligned_input_is_refused():
    entities, kinds = _data(n_ent=4, per=2)
    out = {"entity": entities, "kind": kinds,
           "methods": {"sae": "1" * 8, "neurons": "0" * 8, "das": "10" * 4}}  # fmt: skip
    v = verdict(out, n_boot=50)
    assert list(v) == ["sae - neurons", "sae - das", "neurons - das"]
    assert verdict_line("sae - neurons", "Country", v["sae - neurons"]).endswith("*")
    with pytest.raises(ValueError, match="aligned"):
        paired_difference("1", "10", "cc", ["a", "a"])


def test_pooling_one_run_is_that_run_and_a_missing_method_is_refused():
    from saeravel.evals.ravel.verdict import pooled_difference

    ents = [f"e{j}" for j in range(12) for _ in range(2)]
    out = {"entity": ents, "kind": "ci" * 12,
           "methods": {"a": "10" * 6 + "11" * 6, "b": "01" * 12}}  # fmt: skip
    one = pooled_difference([out], "a", "b", n_boot=200)
    alone = paired_difference(out["methods"]["a"], out["methods"]["b"], out["kind"], ents, 200)
    assert one["disentangle"]["diff"] == pytest.approx(alone["disentangle"]["diff"])
    assert one["disentangle"]["per_run"] == [pytest.approx(alone["disentangle"]["diff"])]
    two = pooled_difference([out, out], "a", "b", n_boot=200)
    w1 = one["disentangle"]["ci"][1] - one["disentangle"]["ci"][0]
    w2 = two["disentangle"]["ci"][1] - two["disentangle"]["ci"][0]
    assert w2 < w1  # two independent resamples average: a narrower interval
    with pytest.raises(ValueError, match="no outcomes for 'a' and 'c'"):
        pooled_difference([out], "a", "c")
