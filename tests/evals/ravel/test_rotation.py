"""Rotations of the DAS family: both orthogonal maps stay orthogonal and start from the same
rotation; the no-gradient cache is reused until the parameters change."""

from __future__ import annotations

import pytest
import torch

from saeravel.evals.ravel.intervene import DAS, orthogonal_linear, rotation


@pytest.mark.parametrize("orthogonal_map", ["cayley", "matrix_exp"])
def test_rotation_stays_orthogonal_through_training(orthogonal_map):
    lin = orthogonal_linear(16, orthogonal_map)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    for _ in range(5):
        loss = (torch.randn(8, 16) @ rotation(lin))[:, :3].pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = rotation(lin)
    assert torch.allclose(R @ R.T, torch.eye(16), atol=1e-5)


def test_both_maps_start_from_the_same_rotation():
    torch.manual_seed(3)
    a = orthogonal_linear(12, "cayley").weight
    torch.manual_seed(3)
    b = orthogonal_linear(12, "matrix_exp").weight
    assert torch.allclose(a, b, atol=1e-5)


def test_no_grad_rotation_is_cached_until_the_parameters_change():
    lin = orthogonal_linear(10, "matrix_exp")
    with torch.no_grad():
        first = rotation(lin)
        assert rotation(lin) is first  # reused: not recomputed
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    (torch.randn(4, 10) @ rotation(lin)).sum().backward()
    opt.step()
    with torch.no_grad():
        after = rotation(lin)
        assert after is not first and not torch.allclose(after, first)
        assert torch.allclose(after, lin.weight)
    lin.load_state_dict(orthogonal_linear(10, "matrix_exp").state_dict())
    with torch.no_grad():
        assert torch.allclose(rotation(lin), lin.weight)  # a loaded state is seen


def test_das_scores_with_the_cached_rotation_equal_the_recomputed_one():
    das = DAS(10, mode="fixed", k=3, orthogonal_map="matrix_exp")
    b, s = torch.randn(5, 10), torch.randn(5, 10)
    with torch.no_grad():
        cached = das(b, s)
        R = das.rot.weight
        m = das.fixed
        ref = ((b @ R) + m * ((s @ R) - (b @ R))) @ R.T
    assert torch.allclose(cached, ref, atol=1e-6)


def test_an_unknown_orthogonal_map_is_named():
    with pytest.raises(ValueError, match="valid: cayley, matrix_exp"):
        orthogonal_linear(4, "qr")
