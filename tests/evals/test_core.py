"""Tests of ``eval=core`` on a tiny random HookedTransformer (2 layers, d_model 64).

The core functions take token batches, so most tests need no tokenizer. Token id 1 is
BOS and 0 is pad throughout.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from saeravel.activations import counted_mask
from saeravel.errors import UserError
from saeravel.evals.api import EvalContext
from saeravel.evals.core import (
    CoreEvalConfig,
    SparsityVarianceStats,
    compute_core_metrics,
    density_metrics,
    run,
    sae_splice_hook,
)
from saeravel.models import LoadedModel
from saeravel.results import atomic_write_json
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.taskdata import embedded_texts

from helpers import HOOK0, D, identity_sae

VOCAB = 50
PAD, BOS = 0, 1
HOOK1 = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D,
        n_heads=4,
        d_head=16,
        d_mlp=128,
        d_vocab=VOCAB,
        n_ctx=32,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        device="cpu",
    )
    m = HookedTransformer(cfg)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def make_batches(n_batches: int = 2, batch: int = 4, length: int = 16, seed: int = 0):
    """Random tokens with BOS at position 0 only (as sae_lens' packed rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        toks = torch.randint(3, VOCAB, (batch, length), generator=g)
        toks[:, 0] = BOS
        out.append(toks)
    return out


def make_sae(W_enc, b_enc, W_dec, b_dec, hook=HOOK0, **kw) -> SAE:
    return SAE(W_enc, b_enc, W_dec, b_dec, hook_name=hook, identity=SAEIdentity("test"), **kw)


def zero_sae(d_sae: int = 32) -> SAE:
    return make_sae(
        torch.zeros(D, d_sae), torch.zeros(d_sae), torch.zeros(d_sae, D), torch.zeros(D)
    )


def core(model, sae, batches, hook=HOOK0, special=(BOS,), n_rec=None, n_sp=None):
    return compute_core_metrics(
        model,
        sae,
        hook,
        batches,
        n_reconstruction_batches=len(batches) if n_rec is None else n_rec,
        n_sparsity_variance_batches=len(batches) if n_sp is None else n_sp,
        special_ids=special,
    )


def flat(metrics: dict) -> dict[str, float]:
    return {k: v for group in metrics.values() for k, v in group.items()}


# ----------------------------------------------------------------------------- exact cases


def test_identity_sae_is_perfect(model):
    batches = make_batches()
    r = core(model, identity_sae(), batches)
    m = flat(r.metrics)
    assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss_without_sae"], abs=1e-7)
    assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-7)
    assert m["kl_div_with_ablation"] > 0.01
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert m["explained_variance_legacy"] == pytest.approx(1.0, abs=1e-9)
    assert m["mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["cossim"] == pytest.approx(1.0, abs=1e-9)
    assert m["l2_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-9)
    assert m["l0"] == D  # exactly one of relu(x_i), relu(-x_i) is nonzero per coordinate
    n_counted = sum(int((b != BOS).sum()) for b in batches)
    assert m["total_tokens_eval_reconstruction"] == n_counted
    assert m["total_tokens_eval_sparsity_variance"] == n_counted


def test_zero_sae_recovers_nothing(model):
    r = core(model, zero_sae(), make_batches())
    m = flat(r.metrics)
    # A zero reconstruction at the counted positions *is* the ablation: identical runs.
    assert m["ce_loss_with_sae"] == m["ce_loss_with_ablation"]
    assert m["ce_loss_score"] == 0.0
    assert m["kl_div_score"] == 0.0
    assert m["l0"] == 0.0 and m["l1"] == 0.0
    assert m["frac_alive"] == 0.0 and m["frac_dead"] == 1.0
    assert m["l2_norm_out"] == 0.0 and m["cossim"] == 0.0
    assert m["explained_variance"] < 0  # 1 - E|x|^2 / Var(x) with Var(x) < E|x|^2
    # 0 / 0 stays NaN, never -1.
    assert math.isnan(m["relative_reconstruction_bias"])
    assert math.isnan(m["normalized_freq_over_1_percent"])
    assert torch.isnan(r.consistent_activation_heuristic).all()


def test_l0_hand_made_stats():
    # Three tokens, three latents: nonzero counts 2, 0, 3 -> L0 = 5/3; |f| sums 3, 0, 9.
    f = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]]])
    x = torch.randn(1, 3, 4)
    stats = SparsityVarianceStats(d_in=4, d_sae=3)
    stats.add(x, f, x.clone(), torch.ones(1, 3, dtype=torch.bool))
    m = stats.metrics()
    assert m["sparsity"]["l0"] == pytest.approx(5 / 3)
    assert m["sparsity"]["l1"] == pytest.approx(4.0)
    assert stats.feature_density().tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert m["reconstruction_quality"]["mse"] == 0.0
    # Masking the third token leaves two tokens: L0 = 1, latent 1 never fires.
    stats = SparsityVarianceStats(d_in=4, d_sae=3)
    stats.add(x, f, x.clone(), torch.tensor([[True, True, False]]))
    assert stats.metrics()["sparsity"]["l0"] == pytest.approx(1.0)
    assert stats.feature_density().tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert stats.metrics()["misc_metrics"]["frac_dead"] == pytest.approx(1 / 3)


def test_l0_hand_made_through_the_model(model):
    # W_enc = 0 and b_enc = (1, 2, -1, 0): every token gets latents (1, 2, 0, 0).
    sae = make_sae(
        torch.zeros(D, 4),
        torch.tensor([1.0, 2.0, -1.0, 0.0]),
        torch.zeros(4, D),
        torch.zeros(D),
        apply_b_dec_to_input=False,
    )
    batches = make_batches(length=12)
    r = core(model, sae, batches)
    m = flat(r.metrics)
    assert m["l0"] == 2.0 and m["l1"] == 3.0
    assert r.feature_density.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert m["frac_alive"] == 0.5 and m["freq_over_10_percent"] == 0.5
    assert m["normalized_freq_over_1_percent"] == 1.0
    # 11 counted tokens per prompt fire each live latent.
    assert r.consistent_activation_heuristic[:2].tolist() == [11.0, 11.0]


def test_cossim_and_l2_ratio_average_over_non_zero_activations_only():
    # Four tokens: two with a zero activation (left out), two reconstructed as x and x / 2.
    x = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    x_hat = torch.tensor([[[3.0, 4.0], [0.5, 0.0], [0.5, 0.0], [0.0, 0.0]]])
    stats = SparsityVarianceStats(d_in=2, d_sae=1)
    stats.add(x, torch.zeros(1, 4, 1), x_hat, torch.ones(1, 4, dtype=torch.bool))
    m = stats.metrics()
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(1.0)  # not (1 + 1) / 4
    assert m["shrinkage"]["l2_ratio"] == pytest.approx((1.0 + 0.5) / 2)  # not a floor of 1
    assert m["reconstruction_quality"]["mse"] == pytest.approx(0.5 / 4)  # over all 4 tokens
    # A zero reconstruction of a non-zero activation counts as cosine 0.
    stats = SparsityVarianceStats(d_in=2, d_sae=1)
    stats.add(x, torch.zeros(1, 4, 1), torch.zeros_like(x), torch.ones(1, 4, dtype=torch.bool))
    assert stats.metrics()["reconstruction_quality"]["cossim"] == 0.0
    # Only zero activations: undefined (NaN), never 0.
    stats = SparsityVarianceStats(d_in=2, d_sae=1)
    stats.add(torch.zeros(1, 2, 2), torch.zeros(1, 2, 1), torch.zeros(1, 2, 2),
              torch.ones(1, 2, dtype=torch.bool))  # fmt: skip
    assert math.isnan(stats.metrics()["reconstruction_quality"]["cossim"])
    assert math.isnan(stats.metrics()["shrinkage"]["l2_ratio"])


def test_density_metrics_nan_without_tokens():
    assert all(math.isnan(v) for v in density_metrics(torch.full((3,), math.nan)).values())


def test_all_special_tokens_give_nan_not_zero(model):
    toks = torch.full((2, 6), PAD)
    toks[:, 0] = BOS
    m = flat(core(model, identity_sae(), [toks], special=(BOS, PAD)).metrics)
    assert m["total_tokens_eval_reconstruction"] == 0
    assert m["total_tokens_eval_sparsity_variance"] == 0
    for key in ("ce_loss_score", "kl_div_score", "explained_variance", "mse", "l0", "frac_alive"):
        assert math.isnan(m[key]), key


# ----------------------------------------------------------------------------- special tokens


def _special_batches():
    """BOS at 0, a second BOS as document separator at 7 in row 0, pads at the end of rows
    1 and 2."""
    (toks,) = make_batches(n_batches=1, batch=4, length=14, seed=3)
    toks[0, 7] = BOS
    toks[1, 10:] = PAD
    toks[2, 12:] = PAD
    return [toks]


def test_splice_leaves_special_positions_untouched():
    toks = _special_batches()[0]
    mask = counted_mask(toks, (BOS, PAD))
    act = torch.randn(*toks.shape, D)
    captured: dict = {}
    out = sae_splice_hook(zero_sae(), mask, captured)(act, None)
    assert torch.equal(out[~mask], act[~mask])
    assert torch.equal(out[mask], torch.zeros_like(act[mask]))
    assert captured["x"] is act


def test_special_positions_do_not_change_metrics(model):
    """Perturbing the activation at BOS/pad positions (at the last block, so it reaches no
    counted position) changes no metric when they are excluded, and changes them when not."""
    batches = _special_batches()
    toks = batches[0]
    special = (toks == BOS) | (toks == PAD)
    noise = 50 * torch.randn(*toks.shape, D, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    sae = make_sae(
        torch.randn(D, 96, generator=g) / 8,
        torch.full((96,), -0.1),
        torch.randn(96, D, generator=g) / 8,
        torch.zeros(D),
        hook=HOOK1,
    )

    def perturb(act, hook):
        return torch.where(special[..., None], act + noise, act)

    def metrics(excluded):
        return flat(core(model, sae, batches, hook=HOOK1, special=excluded).metrics)

    base, base_all = metrics((BOS, PAD)), metrics(())
    model.add_hook(HOOK1, perturb, is_permanent=True)
    try:
        moved, moved_all = metrics((BOS, PAD)), metrics(())
    finally:
        model.reset_hooks(including_permanent=True)
    for key, val in base.items():
        assert moved[key] == pytest.approx(val, rel=1e-6, abs=1e-9), key
    for key in ("l0", "mse", "kl_div_with_sae", "ce_loss_without_sae", "l2_norm_in"):
        assert moved_all[key] != pytest.approx(base_all[key], rel=1e-3), key
    n_counted = int((~special).sum())
    assert base["total_tokens_eval_reconstruction"] == n_counted
    assert base["total_tokens_eval_sparsity_variance"] == n_counted
    assert base_all["total_tokens_eval_reconstruction"] == toks.numel()


# ----------------------------------------------------------------------------- sae_lens


class ListStore:
    """The part of sae_lens' ActivationsStore that run_evals uses, over fixed batches."""

    def __init__(self, batches):
        self.batches = batches
        self.i = 0
        self.context_size = batches[0].shape[1]
        self.store_batch_size_prompts = batches[0].shape[0]

    def get_batch_tokens(self, batch_size=None, **_):
        out = self.batches[self.i % len(self.batches)]
        self.i += 1
        return out

    def reset_input_dataset(self):
        self.i = 0


def sae_lens_pair(seed: int = 0):
    """A sae_lens StandardSAE with random weights and the same weights as our SAE.

    The weights are a noisy soft-threshold of the identity (latents relu(+-x_i - 0.3)):
    sparse-ish, shrinking, imperfect but not degenerate.
    """
    from sae_lens import SAE as SLSAE

    d_sae = 2 * D
    sl = SLSAE.from_dict(
        {
            "architecture": "standard",
            "d_in": D,
            "d_sae": d_sae,
            "apply_b_dec_to_input": True,
            "metadata": {"hook_name": HOOK0},
        }
    )
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(D)
    with torch.no_grad():
        sl.W_enc.copy_(torch.cat([eye, -eye], 1) + 0.05 * torch.randn(D, d_sae, generator=g))
        sl.W_dec.copy_(torch.cat([eye, -eye], 0) + 0.05 * torch.randn(d_sae, D, generator=g))
        sl.b_enc.copy_(-0.3 + 0.05 * torch.randn(d_sae, generator=g))
        sl.b_dec.copy_(0.05 * torch.randn(D, generator=g))
    ours = make_sae(sl.W_enc, sl.b_enc, sl.W_dec, sl.b_dec, apply_b_dec_to_input=True)
    return sl, ours


def run_sae_lens(model, sl, batches, exclude, n_sp=None):
    from sae_lens.evals import get_eval_everything_config, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    cfg = get_eval_everything_config(
        batch_size_prompts=batches[0].shape[0],
        n_eval_reconstruction_batches=len(batches),
        n_eval_sparsity_variance_batches=n_sp or len(batches),
    )
    metrics, features = run_evals(
        sl, ListStore(batches), model, ActivationScaler(), cfg, exclude_special_tokens=exclude
    )
    return flat(metrics), features


AGREE = (
    "ce_loss_without_sae", "ce_loss_with_sae", "kl_div_with_sae", "l0", "l1",
    "explained_variance", "explained_variance_legacy", "mse", "l2_norm_in", "l2_norm_out",
    "l2_ratio",
)  # fmt: skip


def test_agrees_with_sae_lens_without_special_tokens(model):
    """Nothing excluded: every definition coincides with sae_lens 6.x (``mse`` is the
    per-token squared error there too), except three stated below."""
    sl, ours = sae_lens_pair()
    batches = make_batches()
    theirs, feats = run_sae_lens(model, sl, batches, exclude=False)
    r = core(model, ours, batches, special=())
    mine = flat(r.metrics)
    for key in (*AGREE, "ce_loss_with_ablation", "kl_div_with_ablation", "ce_loss_score"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    assert mine["kl_div_score"] == pytest.approx(theirs["kl_div_score"], rel=1e-5)
    assert 0 < mine["l0"] < D and 0.5 < mine["explained_variance"] < 1
    assert mine["l2_ratio"] < 1  # soft thresholding shrinks
    for key in ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"):
        assert mine[key] == theirs[key]
    assert r.feature_density.tolist() == pytest.approx(feats["feature_density"], rel=1e-6)
    assert r.consistent_activation_heuristic.tolist() == pytest.approx(
        feats["consistent_activation_heuristic"], rel=1e-6, nan_ok=True
    )  # a latent that never fires: 0 / 0 = NaN in both
    for key in ("encoder_norm", "encoder_bias", "encoder_decoder_cosine_sim"):
        assert r.weights[key].tolist() == pytest.approx(feats[key], rel=1e-5, abs=1e-6), key
    # (1) cossim: ours leaves zero activations out, sae_lens divides by their norm (NaN);
    # no activation here is zero, so they agree.
    assert mine["cossim"] == pytest.approx(theirs["cossim"], rel=1e-5)
    # (2) relative_reconstruction_bias: sae_lens averages one ratio per batch, ours is the
    # ratio of means over all tokens; they coincide for a single batch.
    theirs_1, _ = run_sae_lens(model, sl, batches, exclude=False, n_sp=1)
    mine_1 = flat(core(model, ours, batches, special=(), n_sp=1).metrics)
    assert mine_1["relative_reconstruction_bias"] == pytest.approx(
        theirs_1["relative_reconstruction_bias"], rel=1e-5
    )
    # (3) explained_variance: sae_lens 6.x uses the same centred formula as ours (its
    # ExplainedVarianceCalculator); SAEBench's core eval reported the per-token legacy one,
    # which both call explained_variance_legacy and which is checked in AGREE above.


def test_agrees_with_sae_lens_excluding_bos(model):
    """BOS excluded. sae_lens masks BOS out of the averages and the SAE splice but zero-
    ablates *every* position, BOS included; ours ablates exactly where the SAE is spliced
    (so a zero SAE scores 0). Everything but the ablation terms agrees; ours is checked
    against a direct computation."""
    sl, ours = sae_lens_pair(seed=1)
    batches = make_batches(seed=4)
    theirs, feats = run_sae_lens(model, sl, batches, exclude=[BOS])
    r = core(model, ours, batches, special=(BOS,))
    mine = flat(r.metrics)
    for key in AGREE:
        assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    assert r.feature_density.tolist() == pytest.approx(feats["feature_density"], rel=1e-6)
    # sae_lens counts every position (ctx * batch * n); ours counts the non-BOS ones.
    n_bos = sum(int((b == BOS).sum()) for b in batches)
    assert (
        mine["total_tokens_eval_reconstruction"]
        == theirs["total_tokens_eval_reconstruction"] - n_bos
    )

    # Ablation of the non-BOS positions only, computed directly.
    ce_sum = kl_sum = 0.0
    n_ce = n_kl = 0
    for toks in batches:
        keep = (toks != BOS)[..., None]
        clean, clean_ce = model(toks, return_type="both", loss_per_token=True)
        abl, abl_ce = model.run_with_hooks(
            toks,
            return_type="both",
            loss_per_token=True,
            fwd_hooks=[(HOOK0, lambda act, hook, keep=keep: act * ~keep)],
        )
        ce_sum += abl_ce[:, 1:].sum().item()  # position 0 predicts from BOS
        n_ce += abl_ce[:, 1:].numel()
        kl = torch.nn.functional.kl_div(
            abl.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        kl_sum += kl[:, 1:].sum().item()
        n_kl += kl[:, 1:].numel()
    assert mine["ce_loss_with_ablation"] == pytest.approx(ce_sum / n_ce, rel=1e-5)
    assert mine["kl_div_with_ablation"] == pytest.approx(kl_sum / n_kl, rel=1e-5)
    assert mine["ce_loss_with_ablation"] != pytest.approx(theirs["ce_loss_with_ablation"], rel=1e-3)
    ce_score = (mine["ce_loss_with_ablation"] - mine["ce_loss_with_sae"]) / (
        mine["ce_loss_with_ablation"] - mine["ce_loss_without_sae"]
    )
    assert mine["ce_loss_score"] == pytest.approx(ce_score, rel=1e-9)


# ----------------------------------------------------------------------------- text sources


@pytest.fixture(scope="module")
def city():
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary
    from saeravel.world import build_city_world

    world = build_city_world(n_cities=20)
    tok = build_tokenizer(world_vocabulary(world))
    arch = {"n_layers": 2, "d_model": D, "n_heads": 4, "d_mlp": 128, "n_ctx": 96, "local_layers": 1}
    m = build_model(arch, tok)
    m.eval()
    return LoadedModel(model=m, name="tiny-test", world=world)


def test_embedded_end_to_end(city, tmp_path):
    cfg = CoreEvalConfig(
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=3,
        batch_size_prompts=4,
        facts_per_sequence=3,
        seed=7,
    )
    _, sae = sae_lens_pair(seed=2)
    ctx = EvalContext(
        model=city,
        sae=sae,
        layer=0,
        hook_name=HOOK0,
        device="cpu",
        seed=0,
        cache_dir=tmp_path,
        output_dir=tmp_path,
    )
    out = run(cfg, ctx)
    m = flat(out.metrics)
    assert set(out.metrics) == {
        "model_behavior_preservation", "model_performance_preservation",
        "reconstruction_quality", "shrinkage", "sparsity", "token_stats", "misc_metrics",
    }  # fmt: skip
    assert all(math.isfinite(v) for v in m.values()), m
    # The word-level tokenizer makes one token per word; BOS and pads are not counted.
    words = [len(t.split()) for t in embedded_texts(city.world, 12, 3, 7)]
    assert max(words) + 1 <= city.model.cfg.n_ctx  # nothing truncated
    assert m["total_tokens_eval_reconstruction"] == sum(words[:8])
    assert m["total_tokens_eval_sparsity_variance"] == sum(words)
    assert out.unstructured["n_ce_terms"] == sum(w - 1 for w in words[:8])
    assert out.unstructured["special_token_ids"] == [0, 1]
    assert len(out.details) == 2 * D and out.details[0]["index"] == 0
    assert out.summary[0].startswith("core: L0 ")
    path = atomic_write_json(tmp_path / "r.json", {"m": out.metrics, "d": out.details})
    assert json.loads(path.read_text())["m"]["sparsity"]["l0"] == pytest.approx(m["l0"])


def test_embedded_source_needs_the_world(city, tmp_path):
    plain = LoadedModel(model=city.model, name="plain")
    ctx = EvalContext(plain, identity_sae(), 0, HOOK0, "cpu", 0, tmp_path, tmp_path)
    with pytest.raises(UserError, match="text_source=embedded"):
        run(CoreEvalConfig(text_source="embedded"), ctx)
    with pytest.raises(UserError, match="did you mean"):
        run(CoreEvalConfig(text_source="embeded"), ctx)
