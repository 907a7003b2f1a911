"""sae=custom (any object with encode/decode, built by Hydra's _target_) and sae=none."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from saes_helpers import (
    D_IN,
    HOOK,
    custom,
    inputs,
)

from saeravel.errors import UserError
from saeravel.saes.custom import CustomSource
from saeravel.saes.none import NoSource

TOY = """
import torch


class ToySAE:
    def __init__(self, d_in, d_sae, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d_in, d_sae, generator=g)

    def encode(self, x):
        return torch.relu(x @ self.W)

    def decode(self, f):
        return f @ self.W.T


class NoDecode:
    def encode(self, x):
        return x
"""


def test_custom_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy_sae_module.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_sae_module", raising=False)
    src = CustomSource(
        family="custom",
        layer=5,
        object=OmegaConf.create({"_target_": "toy_sae_module.ToySAE", "d_in": D_IN, "d_sae": 96}),
        hook_name="blocks.5.hook_resid_post",
        d_in=D_IN,
    )
    assert src.required_model_kwargs() == {}
    sae = src.load(None)
    assert (sae.d_in, sae.d_sae, sae.hook_name) == (D_IN, 96, "blocks.5.hook_resid_post")
    x = inputs()
    W = sae.obj.W
    torch.testing.assert_close(sae.reconstruct(x), torch.relu(x @ W) @ W.T)

    with pytest.raises(UserError, match="cannot be imported"):
        CustomSource("custom", 5, {"_target_": "toy_sae_module.Missing"}, HOOK, D_IN).load(None)
    with pytest.raises(UserError, match="cannot be imported"):
        CustomSource("custom", 5, {"_target_": "no_such_package.SAE"}, HOOK, D_IN).load(None)
    with pytest.raises(UserError, match="no callable decode"):
        CustomSource("custom", 5, {"_target_": "toy_sae_module.NoDecode"}, HOOK, D_IN).load(None)


def test_no_source() -> None:
    src = NoSource(family="none", layer=5)
    assert src.required_model_kwargs() == {}
    assert src.load(None) is None


def test_custom_problems_are_one_line_before_the_model(bad_toy: Path) -> None:
    cases = {
        "": "needs sae.object._target_",
        "bad_toy_sae.Missing": "cannot be imported: bad_toy_sae has no 'Missing'",
        "no_such_package.SAE": "cannot be imported: no module named 'no_such_package'",
        "bad toy": "is not a dotted import path",
        "bad_toy_sae.Boom": "raised ValueError: boom: no weights at /nowhere",
        "bad_toy_sae.NoDecode": "has no callable decode()",
        "bad_toy_sae.WrongWidth": "decode returns width 3 but sae.d_in=128",
    }
    for target, expected in cases.items():
        with pytest.raises(UserError) as info:
            custom(target).required_model_kwargs()  # what the pipeline calls before the model
        assert expected in str(info.value) and "\n" not in str(info.value), target
    with pytest.raises(UserError, match=r"zero input of width sae.d_in=64 failed"):
        custom("bad_toy_sae.Square", d_in=64, kwargs={"d_in": 128}).required_model_kwargs()
    with pytest.raises(UserError, match=r"sae.d_in=0"):
        custom("bad_toy_sae.Square", d_in=0)
    sae = custom("bad_toy_sae.Square").load(None)
    assert (sae.d_in, sae.d_sae) == (128, 256)
