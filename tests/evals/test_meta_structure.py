"""``eval=meta_structure``: a decoder built from a few shared directions is compressed by the
meta-SAE, a random one is not; the variance formula, seeding and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.meta_structure import (
    MetaStructureEvalConfig,
    decoder_variance,
    meta_width,
    run,
    unit_rows,
)
from saeravel.saes.base import SAE, CustomSAE, SAEIdentity

from helpers import ctx_for

D_IN, D_SAE = 16, 96
SMALL = {"train_steps": 300, "train_batch_size": 64, "learning_rate": 5e-3, "k": 1,
         "autocast": False}  # fmt: skip


def sae_with_decoder(w_dec: torch.Tensor) -> SAE:
    d_sae, d_in = w_dec.shape
    return SAE(torch.zeros(d_in, d_sae), torch.zeros(d_sae), w_dec, torch.zeros(d_in),
               hook_name="blocks.0.hook_resid_post", identity=SAEIdentity("t"))  # fmt: skip


def structured_decoder(seed: int = 0) -> torch.Tensor:
    """Every row is one of 8 shared directions plus 5% noise: a meta-SAE of width 24 with one
    active latent per row explains nearly all of it."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(8, D_IN, generator=gen)
    which = torch.arange(D_SAE) % 8
    return atoms[which] + 0.05 * torch.randn(D_SAE, D_IN, generator=gen)


def score(w_dec: torch.Tensor, tmp_path: Path, **kw) -> dict:
    cfg = MetaStructureEvalConfig(**{**SMALL, **kw})
    return run(cfg, ctx_for(None, sae_with_decoder(w_dec), tmp_path)).metrics["meta_structure"]


def test_shared_structure_is_explained_and_random_directions_are_not(tmp_path: Path) -> None:
    shared = score(structured_decoder(), tmp_path)
    random = score(torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(1)), tmp_path)
    key = "decoder_fraction_variance_explained"
    assert shared[key] > 0.85, shared  # measured 0.93
    assert random[key] < 0.6, random  # measured 0.44
    assert shared[key] - random[key] > 0.3
    assert shared["final_reconstruction_mse"] < random["final_reconstruction_mse"]
    assert shared["train_time_seconds"] > 0


def test_same_seed_same_result_other_seed_other_result(tmp_path: Path) -> None:
    w = torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)  # the global RNG state must not matter
    a = score(w, tmp_path, train_steps=50)
    torch.manual_seed(456)
    b = score(w, tmp_path, train_steps=50)
    c = score(w, tmp_path, train_steps=50, seed=7)
    key = "decoder_fraction_variance_explained"
    assert a[key] == b[key] and a["final_reconstruction_mse"] == b["final_reconstruction_mse"]
    assert c[key] != a[key]


def test_variance_formula_and_unit_rows() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]])
    unit = unit_rows(w)
    assert torch.allclose(unit, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, 1.0]]))

    class Const(torch.nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fn(x)

    assert decoder_variance(Const(lambda x: x), unit, 2) == (1.0, 0.0)
    explained, mse = decoder_variance(Const(torch.zeros_like), unit, 2)  # batches of 2 and 1
    total = float(((unit - unit.mean(0)) ** 2).sum())
    assert explained == pytest.approx(1 - float((unit**2).sum()) / total)
    assert mse == pytest.approx(float((unit**2).sum()) / 6)
    assert decoder_variance(Const(lambda x: x), torch.ones(3, 2), 8)[0] == 0.0  # no variance
    assert meta_width(96, 0.25, 4) == 24 and meta_width(8, 0.25, 4) == 4


def test_an_sae_without_a_decoder_matrix_is_one_line(tmp_path: Path) -> None:
    class Obj:
        def encode(self, x):
            return x

        def decode(self, f):
            return f

    sae = CustomSAE(Obj(), d_in=4, hook_name="blocks.0.hook_resid_post",
                    identity=SAEIdentity("custom"))  # fmt: skip
    with pytest.raises(UserError, match="needs an SAE with a decoder matrix W_dec"):
        run(MetaStructureEvalConfig(**SMALL), ctx_for(None, sae, tmp_path))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"width_ratio": 0.0}, r"eval.width_ratio=0.0 must be in \(0, 1\]"),
        ({"k": 0}, "eval.k must be >= 1"),
        ({"learning_rate": -1.0}, "eval.learning_rate=-1.0 must be a finite number > 0"),
        ({"dtype": "float8"}, "float8"),
    ],
)
def test_bad_values_fail_when_the_config_is_built(kw: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        MetaStructureEvalConfig(**kw)
