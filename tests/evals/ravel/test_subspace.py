"""Subspace recovery: the principal-angle readout grades partial errors (a 30-degree-wrong
subspace, a missing dim, extra dims) and reads every featurizer's swapped span."""

from __future__ import annotations

import math

import pytest
import torch

from saeravel.evals.ravel.featurizers import LatentSwap, ProjectorSwap
from saeravel.evals.ravel.intervene import DAS, NeuronMask, rotation
from saeravel.evals.ravel.subspace import recovery, swapped_basis

D = 12


def _block(dims: list[int]) -> torch.Tensor:
    return torch.eye(D)[:, dims]


def _rotated_rows(dims: list[int], other: list[int], degrees: float) -> torch.Tensor:
    """Rows e_i rotated by ``degrees`` towards e_j (i in dims, j in other, paired)."""
    t = math.radians(degrees)
    rows = torch.zeros(len(dims), D)
    for r, (i, j) in enumerate(zip(dims, other, strict=True)):
        rows[r, i], rows[r, j] = math.cos(t), math.sin(t)
    return rows


def test_the_exact_block_is_full_marks():
    got = recovery(torch.eye(D)[[0, 1, 2]], _block([0, 1, 2]))
    assert got["captured"] == 1.0 and got["spill"] == 0.0 and got["max_angle_deg"] == 0.0


@pytest.mark.parametrize("degrees", [10.0, 30.0])
def test_a_rotated_subspace_is_graded_by_its_angle(degrees):
    """The broken variant of the exact block: rotated ``degrees`` into other dims. Its max
    angle is the rotation and captured is cos^2 (0.75 at 30 degrees, where an argmax score
    still reads 0.98): a band like captured >= 0.95 fails it."""
    got = recovery(_rotated_rows([0, 1, 2], [5, 6, 7], degrees), _block([0, 1, 2]))
    assert got["max_angle_deg"] == pytest.approx(degrees, abs=0.01)
    assert got["captured"] == pytest.approx(math.cos(math.radians(degrees)) ** 2, abs=1e-4)
    assert got["spill"] == pytest.approx(math.sin(math.radians(degrees)) ** 2, abs=1e-4)
    if degrees == 30.0:
        assert got["captured"] < 0.95


def test_a_missing_dim_and_extra_dims():
    missing = recovery(torch.eye(D)[[0, 1]], _block([0, 1, 2]))
    assert missing["captured"] == pytest.approx(2 / 3, abs=1e-4) and missing["max_angle_deg"] == 90
    extra = recovery(torch.eye(D)[[0, 1, 2, 8, 9, 10]], _block([0, 1, 2]))
    assert extra["captured"] == 1.0 and extra["spill"] == pytest.approx(0.5)
    assert recovery(torch.zeros(0, D), _block([0]))["captured"] == 0.0


def test_neuron_mask_das_and_projector_spans():
    neurons = NeuronMask(D)
    with torch.no_grad():
        neurons.mask.param.copy_(torch.tensor([1.0] * 3 + [-1.0] * (D - 3)))
    assert recovery(swapped_basis(neurons, D), _block([0, 1, 2]))["captured"] == 1.0
    das = DAS(D, orthogonal_map="cayley")
    with torch.no_grad():
        das.mask.param.copy_(torch.tensor([1.0] * 4 + [-1.0] * (D - 4)))
    span = swapped_basis(das, D)
    assert span.shape == (4, D)
    R = rotation(das.rot).detach()  # the rotation is a parametrisation: read it back
    assert recovery(span, R[:, :4])["captured"] == pytest.approx(1.0, abs=1e-4)
    assert das.mask.hard is False  # restored
    proj = ProjectorSwap.from_basis(_rotated_rows([0, 1], [4, 5], 30.0))
    got = recovery(swapped_basis(proj, D), _block([0, 1]))
    assert got["max_angle_deg"] == pytest.approx(30.0, abs=0.01)


class _TinySAE:
    """Identity normalisation, ReLU encoder: enough for LatentSwap."""

    def __init__(self, W_dec: torch.Tensor) -> None:
        self.W_dec, self.d_sae = W_dec, W_dec.shape[0]

    def normalize(self, x):
        return x, None

    def denormalize(self, x, stats):
        return x

    def encode_normalized(self, x):
        return torch.relu(x @ self.W_dec.T)

    def decode_normalized(self, f):
        return f @ self.W_dec


def test_sae_latents_span_their_decoder_rows_and_a_nonlinear_method_gets_none():
    W = torch.eye(D)[[0, 1, 2, 3]]
    swap = LatentSwap(_TinySAE(W), [1, 2])
    assert recovery(swapped_basis(swap, D), _block([1, 2]))["captured"] == 1.0

    class Squash(NeuronMask):
        def forward(self, b, s):
            return torch.tanh(super().forward(b, s))

    squash = Squash(D)
    with torch.no_grad():
        squash.mask.param.fill_(1.0)
    assert swapped_basis(squash, D) is None


class _Truth:
    """Blocks Country 0-2, Continent 3-4, Language 5-6, identity 7-8 of a 12-dim site."""

    d_model = D
    blocks = {"Country": [0, 1, 2], "Continent": [3, 4], "Language": [5, 6], "identity": [7, 8]}

    def block_of(self, attr):
        return attr

    def block_basis(self, name):
        return _block(self.blocks[name])


def test_subspace_recovery_says_which_other_blocks_a_swap_reaches():
    from saeravel.evals.ravel.subspace import subspace_recovery

    leaky = NeuronMask(D)  # Country's block plus one Language dim
    with torch.no_grad():
        leaky.mask.param.copy_(torch.tensor([1.0, 1, 1, -1, -1, 1, -1, -1, -1, -1, -1, -1]))
    got = subspace_recovery(leaky, _Truth(), "Country")
    assert got["captured"] == 1.0 and got["spill"] == pytest.approx(0.25)
    assert got["into_blocks"] == {"Continent": 0.0, "Language": 0.25, "identity": 0.0}
