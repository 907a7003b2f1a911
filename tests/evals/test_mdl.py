"""``eval=mdl``: the description length and quantised reconstruction on hand-computed codes,
the grid's trade-off, the minimum-viable pick, a run on a tiny world, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.mdl import (
    MDLEvalConfig,
    binary_entropy,
    description_lengths,
    histogram_entropy,
    minimum_viable,
    quantize,
    run,
    truncate,
)
from saeravel.saes.identity import identity_sae

from helpers import ctx_for
from helpers import identity_sae as relu_pair_sae


def test_entropies_in_bits():
    h = binary_entropy(torch.tensor([0.0, 0.5, 1.0, 0.25]))
    assert h.tolist()[:3] == [0.0, 1.0, 0.0]
    assert h[3].item() == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    counts = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    assert histogram_entropy(counts).tolist() == [2.0, 0.0, 0.0]


def test_quantize_keeps_zeros_and_uses_each_latents_range():
    f = torch.tensor([[0.0, -2.0], [1.0, 2.0], [3.0, 0.0]])
    lo, hi = torch.tensor([0.0, -2.0]), torch.tensor([3.0, 2.0])
    q = quantize(f, lo, hi, 2)  # latent 0: bins [0, 1.5) [1.5, 3]; latent 1: [-2, 0) [0, 2]
    assert q.tolist() == [[0.0, -1.0], [0.75, 1.0], [2.25, 0.0]]


def test_truncate_keeps_the_largest_by_absolute_value():
    f = torch.tensor([[0.5, -3.0, 2.0, 0.1]])
    assert truncate(f, 2).tolist() == [[0.0, -3.0, 2.0, 0.0]]
    assert torch.equal(truncate(f, None), f) and torch.equal(truncate(f, 9), f)


def test_description_length_and_error_by_hand():
    """Identity code on 4 tokens: latent 0 is active on half of them with values 1 and 3 (one
    per bin of 2), latent 1 never: DL = H(0.5) + 0.5 * H(1/2, 1/2) = 1.5 bits per token."""
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    cfg = MDLEvalConfig(k_values=[None], num_bins_values=[2])
    (rec,) = description_lengths(identity_sae(2, layer=0), x, cfg, "cpu")
    assert rec["description_length"] == pytest.approx(1.5)
    sq_err = 0.25**2 + 0.75**2  # 1 -> 0.75, 3 -> 2.25
    assert rec["mse_loss"] == pytest.approx(math.sqrt(sq_err / 8) / 2)
    assert rec["fvu"] == pytest.approx(sq_err / 6)  # |x - mean|^2 = 0 + 1 + 4 + 1
    assert rec["l0"] == 0.5 and rec["within_threshold"] is False  # 0.14 > 0.01


def test_finer_bins_cost_bits_and_buy_accuracy():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    cfg = MDLEvalConfig(k_values=[None, 2], num_bins_values=[2, 8, 32])
    recs = description_lengths(relu_pair_sae(d=8, d_sae=16), x, cfg, "cpu")
    for k in (None, 2):
        row = [r for r in recs if r["k"] == k]
        assert [r["num_bins"] for r in row] == [2, 8, 32]
        assert (
            row[0]["description_length"]
            < row[1]["description_length"]
            < row[2]["description_length"]
        )
        assert row[0]["fvu"] > row[1]["fvu"] > row[2]["fvu"]
    full, top2 = (next(r for r in recs if r["k"] == k and r["num_bins"] == 32) for k in (None, 2))
    assert top2["l0"] == 2 and full["l0"] == pytest.approx(8, abs=0.1)  # relu(x), relu(-x)
    assert top2["description_length"] < full["description_length"] and top2["fvu"] > full["fvu"]


def test_minimum_viable_prefers_settings_within_the_threshold():
    recs = [{"description_length": 5.0, "within_threshold": False},
            {"description_length": 9.0, "within_threshold": True},
            {"description_length": 7.0, "within_threshold": True}]  # fmt: skip
    assert minimum_viable(recs)["description_length"] == 7.0
    assert (
        minimum_viable([{**r, "within_threshold": False} for r in recs])["description_length"]
        == 5.0
    )


def test_run_on_the_tiny_world(tiny_model, tmp_path: Path):
    cfg = MDLEvalConfig(n_batches=2, batch_size_prompts=4, k_values=[4, None],
                        num_bins_values=[2, 8], mse_epsilon_threshold=1.0)  # fmt: skip
    out = run(cfg, ctx_for(tiny_model, relu_pair_sae(), tmp_path))
    assert [(r["num_bins"], r["k"]) for r in out.details] == [(2, 4), (8, 4), (2, None), (8, None)]
    m = out.metrics["mdl"]
    best = min(out.details, key=lambda r: r["description_length"])  # all within 1.0
    assert m["description_length"] == best["description_length"] and m["within_threshold"]
    assert (m["num_bins"], m["k"]) == (2, 4) and m["n_tokens"] > 20
    assert out.summary[0].startswith("mdl: ")
    with pytest.raises(UserError, match="k=999, but the SAE has d_sae=128"):
        run(MDLEvalConfig(k_values=[999]), ctx_for(tiny_model, relu_pair_sae(), tmp_path))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"k_values": []}, "eval.k_values is empty"),
        ({"k_values": [0]}, "eval.k_values has k=0"),
        ({"num_bins_values": [0]}, "eval.num_bins_values has 0"),
        ({"mse_epsilon_threshold": 0.0}, "eval.mse_epsilon_threshold=0.0 must be > 0"),
        ({"n_batches": 0}, "eval.n_batches must be >= 1"),
        ({"text_source": "web"}, "unknown eval.text_source 'web'"),
    ],
)
def test_bad_values_fail_when_the_config_is_built(kw, message):
    with pytest.raises(UserError, match=message):
        MDLEvalConfig(**kw)
