"""Refinement's cheap parts: each mask method's flip terms (a bit flip is one rank-1 change of
the patched vector), the budgeted search ranked by gradient x delta, the cost it states, and
the frozen SAE's latents cached per prompt for training (exactly the re-encoded result)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from saeravel.errors import UserError
from saeravel.evals.ravel.config import RavelEvalConfig, check
from saeravel.evals.ravel.featurizers import MultiTaskDAS, PCASwap, principal_components
from saeravel.evals.ravel.intervene import DAS, NeuronMask, SAEMask
from saeravel.evals.ravel.pairs import LatentBank, RavelJob
from saeravel.evals.ravel.prompts import Pair, Prompt
from saeravel.evals.ravel.train import refine_mask, train_method
from saeravel.saes.base import SAE, CustomSAE, SAEIdentity

D = 6


def _sae(normalize: str = "layer_norm", activation: str = "relu", d_sae: int = 24) -> SAE:
    g = torch.Generator().manual_seed(5)
    return SAE(
        torch.randn(D, d_sae, generator=g), torch.randn(d_sae, generator=g) * 0.1,
        torch.randn(d_sae, D, generator=g), torch.randn(D, generator=g) * 0.1,
        activation=activation, k=5 if activation == "topk" else None, normalize=normalize,
        hook_name="blocks.0.hook_resid_post", identity=SAEIdentity("t"),
    )  # fmt: skip


def _methods() -> dict[str, object]:
    torch.manual_seed(0)
    comps, _ = principal_components(torch.randn(200, D) * torch.arange(1, D + 1))
    mdas = MultiTaskDAS(D, ["A", "B"])
    mdas.active = "B"
    return {
        "neurons": NeuronMask(D),
        "sae": SAEMask(_sae()),
        "sae_error_topk": SAEMask(_sae("none", "topk"), add_error=True),
        "das": DAS(D, mode="mask"),
        "pca": PCASwap(comps[:4], scale=torch.rand(D) + 0.5),
        "mdas": mdas,
    }


@pytest.mark.parametrize("name", list(_methods()))
def test_flip_terms_equal_rerunning_the_method_with_the_bit_flipped(name):
    method = _methods()[name]
    mask = method.mask
    with torch.no_grad():
        mask.param.copy_(torch.randn(mask.param.numel()))
    mask.hard = True
    b, s = torch.randn(7, D) * 3, torch.randn(7, D) * 3
    with torch.no_grad():
        base = method(b, s)
        coef, dirs = method.flip_terms(b, s)
        assert coef.shape == (7, mask.param.numel()) and dirs.shape == (mask.param.numel(), D)
        for j in range(mask.param.numel()):
            old = float(mask.param[j])
            sign = -1.0 if old > 0 else 1.0
            mask.param[j] = -old
            rerun = method(b, s)
            mask.param[j] = old
            torch.testing.assert_close(
                base + sign * coef[:, j, None] * dirs[j], rerun, atol=1e-4, rtol=1e-4
            )
            assert (rerun - base).abs().max() > 0 or coef[:, j].abs().max() == 0


def test_methods_without_a_linear_form_have_no_flip_terms():
    assert DAS(D, mode="fixed", k=2).flip_terms(torch.zeros(1, D), torch.ones(1, D)) is None
    inner = _sae("none")
    obj = SimpleNamespace(encode=inner.encode_normalized, decode=inner.decode_normalized)
    custom = SAEMask(CustomSAE(obj, d_in=D, hook_name="h", identity=SAEIdentity("c")))
    assert custom.flip_terms(torch.zeros(1, D), torch.ones(1, D)) is None


# ----------------------------------------------------------------------------- the search


class ToyRunner:
    """Logits = W v: a query about A reads dims 0-1 (tokens 0, 1), about B dims 2-3."""

    def __init__(self) -> None:
        self.W = torch.zeros(4, D)
        self.W[0, 0] = self.W[1, 1] = self.W[2, 2] = self.W[3, 3] = 4.0

    def logits(self, bases, v, n_last=None):
        out = v @ self.W.T
        is_a = torch.tensor([p.attribute == "A" for p in bases])[:, None]
        other = torch.where(is_a, torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0])).bool()
        return out.masked_fill(other, -1e4)


def _toy(n: int = 40):
    """Cause pairs want dims 0-1 from the source, isolation pairs dims 2-3 from the base;
    dims 4-5 are noise nothing reads (as in test_ravel_scoring's refinement test)."""
    rng = torch.Generator().manual_seed(0)
    pairs, vecs = [], {}
    for i in range(n):
        a_b, a_s, b_b = i % 2, 1 - i % 2, (i // 2) % 2
        b, s = torch.zeros(D), torch.zeros(D)
        b[a_b], b[2 + b_b] = 1.0, 1.0
        s[a_s], s[3 - b_b] = 1.0, 1.0
        b[4:], s[4:] = torch.randn(2, generator=rng), torch.randn(2, generator=rng)
        kind = "cause" if i % 4 < 2 else "isolation"
        pb = Prompt("t", f"b{i}", "A" if kind == "cause" else "B", [0], 0, 0)
        ps = Prompt("t", f"s{i}", "A", [0], 0, 0)
        vecs[id(pb)], vecs[id(ps)] = b, s
        tgt = a_s if kind == "cause" else 2 + b_b
        pairs.append(Pair(pb, ps, "A", kind, "x", tgt, [tgt]))
    bank = lambda prompts: torch.stack([vecs[id(p)] for p in prompts])  # noqa: E731
    return pairs, bank


def _job(bank, **mask):
    cfg = OmegaConf.structured(RavelEvalConfig(recipe="saeravel"))
    for k, v in mask.items():
        cfg.mask[k] = v
    return RavelJob(
        cfg, SimpleNamespace(seed=0, model=None, layer=0), bank=bank, runner=ToyRunner()
    )


def _wrong_mask() -> NeuronMask:
    method = NeuronMask(D)
    with torch.no_grad():
        method.mask.param.copy_(torch.tensor([-0.1, -0.2, 0.3, 0.2, -0.1, -0.3]))
    return method


class RerunNeurons(NeuronMask):
    """The neuron mask without flip terms: refinement re-runs it per flip (the exact path)."""

    def flip_terms(self, b, s):
        return None


def test_rank1_search_equals_rerunning_the_method():
    pairs, bank = _toy()
    fast, slow = _wrong_mask(), RerunNeurons(D)
    slow.load_state_dict(fast.state_dict())
    a = refine_mask(_job(bank, refine_budget=0), fast, pairs, "fast")
    b = refine_mask(_job(bank, refine_budget=0), slow, pairs, "slow")
    assert a["rank1"] and not b["rank1"]
    assert torch.equal(fast.mask.param, slow.mask.param)
    assert (a["flips"], a["evaluations"]) == (b["flips"], b["evaluations"]) == (4, 6)
    assert a["train_ce_hard_after"] == pytest.approx(b["train_ce_hard_after"], abs=1e-5)


def test_budget_verifies_the_top_ranked_flips_only_and_states_the_cost(caplog):
    """With 6 candidates and a budget of 4, the prescan ranks the 4 flips that help (0, 1 on;
    2, 3 off) above the unread dims 4-5, whose estimate is 0: the 4 verified flips reach the
    best mask. A budget of 2 stops after 2 verifications."""
    pairs, bank = _toy()
    method = _wrong_mask()
    with caplog.at_level("INFO"):
        info = refine_mask(_job(bank, refine_budget=4), method, pairs, "toy")
    assert (method.mask.param > 0).nonzero().flatten().tolist() == [0, 1]
    assert info["ranked"] and info["evaluations"] == 4 and info["flips"] == 4
    assert info["candidates"] == 6 and info["budget"] == 4
    assert "6 candidates listed, 4 verified exactly (budget 4" in caplog.text
    method = _wrong_mask()
    info = refine_mask(_job(bank, refine_budget=2), method, pairs, "toy")
    assert info["evaluations"] == 2 and info["flips"] == 2
    assert info["train_ce_hard_after"] < info["train_ce_hard_before"]


def test_budget_above_the_candidates_is_the_exhaustive_search():
    pairs, bank = _toy()
    a, b = _wrong_mask(), _wrong_mask()
    ia = refine_mask(_job(bank, refine_budget=0), a, pairs, "all")
    ib = refine_mask(_job(bank, refine_budget=100), b, pairs, "budget")
    assert not ib["ranked"] and torch.equal(a.mask.param, b.mask.param)
    assert ia["evaluations"] == ib["evaluations"] == 6


def test_negative_budget_is_a_one_line_error():
    cfg = OmegaConf.structured(RavelEvalConfig(recipe="saeravel"))
    cfg.mask.refine_budget = -1
    with pytest.raises(UserError, match=r"eval.mask.refine_budget=-1 must be an integer >= 0") as e:
        check(cfg)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- latent cache


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_training_on_cached_latents_equals_reencoding(activation):
    """The SAE mask trained with the job's LatentBank (each prompt encoded once) ends with the
    parameters of the one re-encoding bases and sources every step. Equal to float rounding
    only: a matmul's rounding depends on its batch's row count (BLAS kernels), and the bank
    encodes in other batches than the steps do (same batches: bit-equal, test below)."""
    pairs, bank = _toy(48)
    sae = _sae("layer_norm", activation)
    runs = []
    for cached in (False, True):
        job = _job(bank)
        job.cfg.epochs, job.cfg.batch_size = 3, 8
        job.latents = LatentBank(sae, bank, batch_size=5) if cached else None
        torch.manual_seed(0)
        method = SAEMask(sae)
        curve = train_method(job, method, pairs, "t")
        runs.append((copy.deepcopy(method.mask.param.detach()), curve))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-6, rtol=0)
    assert runs[0][1] == pytest.approx(runs[1][1], abs=1e-6)
    assert runs[0][0].abs().max() > 1e-3  # it trained


def test_latent_bank_encodes_each_prompt_once_and_keeps_it_sparse():
    pairs, bank = _toy(10)
    sae = _sae("layer_norm", "topk")
    calls = []
    lb = LatentBank(sae, lambda ps: calls.append(len(ps)) or bank(ps))
    prompts = [q.base for q in pairs]
    f, (mu, std) = lb(prompts)
    lb(prompts[:3])
    assert calls == [10]  # encoded once
    z, (mu0, std0) = sae.normalize(bank(prompts))
    assert torch.equal(f, sae.encode_normalized(z))
    assert torch.equal(mu, mu0) and torch.equal(std, std0)
    assert all(len(c[1]) <= 5 for c in lb._codes.values())  # top-k 5: sparse


class RerunSAE(SAEMask):
    def flip_terms(self, b, s):
        return None


class CountingRunner(ToyRunner):
    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def logits(self, bases, v, n_last=None):
        self.rows += len(bases)
        return super().logits(bases, v, n_last)


def test_sae_flips_rerun_only_the_pairs_they_move():
    """A top-k SAE's latent is active on few pairs: its flip re-runs only those (the others'
    CE is unchanged), and the search ends where re-running every pair per flip ends."""
    pairs, bank = _toy()
    sae = _sae("layer_norm", "topk", d_sae=48)
    fast, slow = SAEMask(sae), RerunSAE(sae)
    with torch.no_grad():
        fast.mask.param.copy_(torch.randn(48, generator=torch.Generator().manual_seed(1)))
    slow.load_state_dict(fast.state_dict())
    out = []
    for m in (fast, slow):
        job = _job(bank, refine_budget=0)
        job.runner = CountingRunner()
        out.append((refine_mask(job, m, pairs, "t"), job.runner.rows))
    (a, rows_fast), (b, rows_slow) = out
    assert torch.equal(fast.mask.param, slow.mask.param) and a["flips"] == b["flips"] > 0
    assert a["train_ce_hard_after"] == pytest.approx(b["train_ce_hard_after"], abs=1e-5)
    assert rows_fast < rows_slow / 2
