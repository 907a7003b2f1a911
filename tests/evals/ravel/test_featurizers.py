"""The algebra of each featurizer in saeravel.evals.ravel.featurizers (no model needed), and MDAS
trained on one attribute equals DAS through the real training loop."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from saeravel.evals.ravel.featurizers import (
    BoundaryMask,
    BoundlessDAS,
    MultiTaskDAS,
    PCASwap,
    ProjectorSwap,
    principal_components,
    rank_latents_by_probe,
)
from saeravel.evals.ravel.intervene import DAS, NeuronMask

from helpers import planted_ravel_job


def _axis_set(n: int = 2000, d: int = 8) -> torch.Tensor:
    """Points whose variance lies on axes 2, 5, 0 (in that order of size), none elsewhere, the
    three coordinates exactly uncorrelated (so the axes are THE principal directions)."""
    z = torch.randn(n, 3, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # centred, orthonormal columns
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, [2, 5, 0]] = q * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * n**0.5
    return (x + torch.randn(d, dtype=torch.float64)).float()  # an offset: PCA centres


def test_pca_on_an_axis_aligned_set_recovers_the_axes():
    comps, var = principal_components(_axis_set())
    for row, axis in zip(comps[:3], (2, 5, 0), strict=True):
        assert row[axis] == pytest.approx(1.0, abs=1e-3)  # sign fixed: largest entry positive
        assert row.abs().sum() == pytest.approx(1.0, abs=1e-2)
    assert var[0] > var[1] > var[2] > 10 * var[3]
    assert torch.allclose(comps @ comps.T, torch.eye(8), atol=1e-5)


def test_pca_swap_of_the_top_components_is_the_neuron_swap_on_their_axes():
    comps, _ = principal_components(_axis_set())
    b, s = torch.randn(5, 8), torch.randn(5, 8)
    pca = PCASwap(comps, mode="fixed", k=2)
    neurons = NeuronMask(8)
    neurons.mask.param.data[:] = -1.0
    neurons.mask.param.data[[2, 5]] = 1.0
    neurons.mask.hard = True
    assert torch.allclose(pca(b, s), neurons(b, s), atol=1e-3)
    assert torch.allclose(PCASwap(comps, mode="fixed", k=8)(b, s), s, atol=1e-5)
    masked = PCASwap(comps[:3], mode="mask")
    masked.mask.hard = True
    masked.mask.param.data[:] = 1.0  # all three kept: the offset axes' part moves, the rest stays
    out = masked(b, s)
    assert torch.allclose(out[:, [0, 2, 5]], s[:, [0, 2, 5]], atol=1e-3)
    assert torch.allclose(out[:, [1, 3, 4, 6, 7]], b[:, [1, 3, 4, 6, 7]], atol=1e-3)


@pytest.mark.parametrize("boundary", [0.05, 0.3, 0.5, 0.97])
@pytest.mark.parametrize("temp", [50.0, 1.0, 0.1])
def test_boundary_mask_is_monotone_and_its_hard_form_keeps_the_dims_below(boundary, temp):
    m = BoundaryMask(20, init=boundary)
    m.temperature = temp
    soft = m()
    assert (soft[1:] <= soft[:-1] + 1e-7).all()  # non-increasing in the rotated dim's index
    assert ((soft >= 0) & (soft <= 1)).all()
    m.hard = True
    hard = m()
    assert (hard[1:] <= hard[:-1]).all()
    assert hard.sum() == m.kept() == sum(i < boundary * 20 for i in range(20))
    assert m.top(100) == list(range(m.kept()))


def test_boundless_das_at_full_and_empty_boundary():
    torch.manual_seed(0)
    b, s = torch.randn(4, 12), torch.randn(4, 12)
    full = BoundlessDAS(12, init=1.0)
    full.mask.hard = True
    assert torch.allclose(full(b, s), s, atol=1e-5)
    empty = BoundlessDAS(12, init=1e-3)
    empty.mask.hard = True
    assert empty.mask.kept() == 1 and torch.allclose(empty.mask(), torch.eye(12)[0])
    groups = full.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert groups[1]["params"] == [full.mask.param]


def test_mdas_with_one_attribute_is_das():
    torch.manual_seed(3)
    das = DAS(10, mode="mask")
    torch.manual_seed(3)
    mdas = MultiTaskDAS(10, ["Country"])
    assert torch.allclose(das.rot.weight, mdas.rot.weight)
    b, s = torch.randn(6, 10), torch.randn(6, 10)
    for hard in (False, True):
        das.mask.hard = mdas.mask.hard = hard
        assert torch.allclose(das(b, s), mdas(b, s))


def test_mdas_routes_each_pair_to_its_attributes_mask():
    torch.manual_seed(0)
    m = MultiTaskDAS(8, ["Country", "Continent"])
    m.masks["Country"].param.data[:] = torch.linspace(-2, 2, 8)
    m.masks["Continent"].param.data[:] = torch.linspace(2, -2, 8)
    b, s = torch.randn(4, 8), torch.randn(4, 8)
    rows = ["Country", "Continent", "Continent", "Country"]
    m.route([SimpleNamespace(intervened=a) for a in rows])
    mixed = m(b, s)
    for attr in ("Country", "Continent"):
        m.active = attr
        alone = m(b, s)
        for i, a in enumerate(rows):
            if a == attr:
                assert torch.allclose(mixed[i], alone[i])
    m.active = "Country"
    m.route([SimpleNamespace(intervened=a) for a in rows])
    m(b, s)
    m.active = "Continent"  # the routing was used once: the next call takes the active mask
    assert torch.allclose(m(b, s)[0], alone[0]) and not torch.allclose(m(b, s)[0], mixed[0])


def test_fixed_identity_basis_is_the_neuron_swap():
    b, s = torch.randn(5, 6), torch.randn(5, 6)
    assert torch.allclose(ProjectorSwap.from_basis(torch.eye(6))(b, s), s, atol=1e-6)
    chosen = [1, 4]
    neurons = NeuronMask(6)
    neurons.mask.param.data[:] = -1.0
    neurons.mask.param.data[chosen] = 1.0
    neurons.mask.hard = True
    assert torch.allclose(
        ProjectorSwap.from_basis(torch.eye(6)[chosen])(b, s), neurons(b, s), atol=1e-6
    )
    # Any basis of the same span swaps the same thing (rows need not be orthonormal).
    skew = torch.tensor([[2.0, 1.0], [0.5, -3.0]]) @ torch.eye(6)[chosen]
    assert torch.allclose(ProjectorSwap.from_basis(skew)(b, s), neurons(b, s), atol=1e-5)
    assert ProjectorSwap.from_basis(skew).rank() == 2


def test_probe_ranks_the_latent_that_carries_the_value_first():
    gen = torch.Generator().manual_seed(0)
    n, d = 300, 12
    values = [random.Random(i).choice("abc") for i in range(n)]
    x = torch.rand(n, d, generator=gen)  # noise latents
    x[:, 7] = torch.tensor([{"a": 0.0, "b": 1.0, "c": 2.0}[v] for v in values]) + 0.05 * x[:, 0]
    x[:, 3] = 0.0  # dead latent: never ranked
    ranked, info = rank_latents_by_probe(x, values, steps=300, seed=0)
    assert ranked[0] == 7
    assert 3 not in ranked
    assert info["probe_train_accuracy"] >= 0.95 and info["n_live_latents"] == d - 1


def _dense_probe(latents, labels, steps=300, lr=0.05, l1=0.01, seed=0):
    """The probe before it read sparse latents (the dense standardised matrix), the reference."""
    gen = torch.Generator().manual_seed(seed)
    values = sorted(set(labels))
    y = torch.tensor([values.index(v) for v in labels])
    x = latents.to_dense().float() if latents.is_sparse else latents.float()
    mu, sd = x.mean(0), x.std(0)
    live = sd > 1e-8
    z = torch.where(live, (x - mu) / sd.clamp_min(1e-8), torch.zeros_like(x))
    w = torch.zeros(x.shape[1], len(values))
    w.normal_(0, 1e-3, generator=gen)
    w.requires_grad_(True)
    bias = torch.zeros(len(values), requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(z @ w + bias, y) + l1 * w.abs().sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float(((z @ w + bias).argmax(1) == y).float().mean())
        score = w.abs().max(1).values * live
    order = torch.argsort(score, descending=True)
    ranked = [int(j) for j in order if score[j] > 0]
    return ranked, {"probe_train_accuracy": acc, "n_values": len(values), "n_examples": len(labels),
                    "n_live_latents": int(live.sum())}  # fmt: skip


def _topk_latents(seed: int, n: int = 400, d: int = 256, k: int = 8):
    """TopK-like latents (k of d nonzero per row): latents 0, 3, 6, 9, 12 carry the value."""
    gen = torch.Generator().manual_seed(seed)
    values = [random.Random(seed * 1000 + i).choice("abcde") for i in range(n)]
    pre = torch.randn(n, d, generator=gen)
    pre[torch.arange(n), torch.tensor(["abcde".index(v) * 3 for v in values])] += 3.0
    top = pre.topk(k, 1)
    x = torch.zeros(n, d).scatter_(1, top.indices, top.values.relu())
    x[:, 200] = 0.0  # dead
    return x, values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_probe_on_sparse_latents_ranks_as_the_dense_probe(seed):
    """Sparse (never standardised densely) and dense probes: the same ranking, accuracy and
    live latents while Adam's trajectories agree (100 steps: every latent in the same order).
    At 300 steps the L1 probe has overfit the noise latents, whose order is then chaotic in
    float rounding: the dense probe itself reorders them when the same rows come in another
    order; the value latents still come first, in the same order, in every path."""
    x, values = _topk_latents(seed)
    for steps in (30, 100):
        assert rank_latents_by_probe(x.to_sparse(), values, steps=steps) == _dense_probe(
            x, values, steps=steps
        )
    sparse, info = rank_latents_by_probe(x.to_sparse(), values)
    dense, info_dense = _dense_probe(x, values)
    assert info == info_dense
    assert set(sparse) == set(dense) and 200 not in sparse
    assert sparse[:5] == dense[:5] and set(sparse[:5]) == {0, 3, 6, 9, 12}
    assert rank_latents_by_probe(x, values) == (sparse, info)  # dense input: the same path


def test_sae_probe_selection_on_sparse_latents_equals_the_dense_probe(tmp_path, monkeypatch):
    """On the planted world, sae_probe with the probe on sparse latents picks the latents and
    gets the scores of the dense probe (the reference, put in its place)."""
    from saeravel.evals.ravel import methods

    sparse = planted_ravel_job(tmp_path, "sparse")
    monkeypatch.setattr(methods, "rank_latents_by_probe", _dense_probe)
    dense = planted_ravel_job(tmp_path, "dense")
    for attr, r in sparse["ravel"]["sae_probe"].items():
        assert (
            r["selection"]["latents"] == dense["ravel"]["sae_probe"][attr]["selection"]["latents"]
        )
    assert sparse == dense


def test_mdas_on_one_attribute_trains_exactly_as_das():
    """Same seed, same data, same optimiser: the one-attribute MDAS and DAS stay equal step by
    step (the parameters correspond one to one, created in the same order)."""
    torch.manual_seed(1)
    das = DAS(8, mode="mask")
    torch.manual_seed(1)
    mdas = MultiTaskDAS(8, ["Country"])
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (das, mdas)]
    target = torch.randn(8)
    for step in range(25):
        gen = torch.Generator().manual_seed(step)
        b, s = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
        for m, opt in zip((das, mdas), opts, strict=True):
            m.mask.temperature = 10.0 / (step + 1)
            loss = ((m(b, s) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(das.rot.weight, mdas.rot.weight, atol=1e-6)
    assert torch.allclose(das.mask.param, mdas.masks["Country"].param, atol=1e-6)


def test_fixed_basis_ignores_float32_noise_directions():
    """A float32 projector of rank 3 (noise singular values ~1e-7): the swap is that rank-3
    projection, not a near-identity from inverting the noise."""
    q, _ = torch.linalg.qr(torch.randn(10, 3))
    P = (q @ q.T).float()
    swap = ProjectorSwap.from_basis(P)
    assert swap.rank() == 3
    assert torch.allclose(swap.projector, P, atol=1e-5)


def test_rlap_fantope_projection_and_subspace_recovery():
    """R-LACE's Fantope projection (eigenvalues in [0, 1], trace = rank, symmetric), and the
    adversarial subspace of a value carried in 3 rotated dims: it covers that span, and a
    probe on what is left reads the value at about chance."""
    from saeravel.evals.ravel.featurizers import fantope_projection, rlace_basis

    g = torch.Generator().manual_seed(0)
    P = fantope_projection(torch.randn(12, 12, generator=g), 3)
    lam = torch.linalg.eigvalsh(P.double())
    assert torch.allclose(P, P.T) and abs(float(lam.sum()) - 3) < 1e-4
    assert float(lam.min()) >= -1e-6 and float(lam.max()) <= 1 + 1e-6
    n, d = 200, 30
    y = torch.randint(0, 4, (n,), generator=g)
    other = torch.randint(0, 6, (n,), generator=g)
    x = torch.zeros(n, d)
    x[torch.arange(n), y] = 1.0
    x[torch.arange(n), 4 + other] = 1.0
    x[:, 10:] = 0.3 * torch.randn(n, 20, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = x @ Q
    span = Q[:4] - Q[:4].mean(0)  # the centred value atoms span 3 dims
    proj = torch.linalg.pinv(span) @ span
    basis, info = rlace_basis(x, [str(int(v)) for v in y], 3, steps=300)
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-4)
    assert float(torch.linalg.norm(basis @ proj) ** 2 / 3) >= 0.9  # in the value's span
    assert info["adversary_accuracy_after"] <= 0.4  # 4 values: chance 0.25
