"""``eval=core``: SAEBench's core metrics (reconstruction, sparsity, downstream loss).

Text comes from a Hugging Face dataset (packed into ``context_size`` rows that start with
BOS, documents separated by BOS) or, for the embedded model, from fact sequences of the
city world. Every metric averages over *counted* tokens only: tokens that are not BOS,
EOS, pad or sep. The SAE (and the zero-ablation baseline) replace the activation only at
counted positions; special positions keep their own activation.

Definitions (sums over counted tokens; ``x`` the activation at the hook, ``f`` the
latents, ``x_hat = sae.reconstruct(x)``):

* ``ce_loss_*``: mean next-token cross-entropy over positions ``i`` with tokens ``i`` and
  ``i+1`` both counted (clean, SAE spliced in, hook zero-ablated);
  ``ce_loss_score = (CE_abl - CE_sae) / (CE_abl - CE_clean)``.
* ``kl_div_*``: mean over counted positions of ``KL(p_clean || p_patched)``;
  ``kl_div_score = (KL_abl - KL_sae) / KL_abl``.
* ``explained_variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`` over all counted
  tokens; ``explained_variance_legacy`` = per-token ``1 - ||x - x_hat||^2 / ||x - mean_b||^2``
  (``mean_b`` the mean of the token's batch), averaged (SAEBench's original definition).
* ``mse = E||x - x_hat||^2`` (sum over dimensions, mean over tokens); ``cossim`` = mean
  per-token ``cos(x, x_hat)`` over the tokens whose activation is non-zero (``||x|| >=``
  :data:`L2_NORM_FLOOR`; a zero ``x_hat`` there counts as 0).
* ``l0 = E #{f != 0}``, ``l1 = E sum |f|``; ``l2_ratio = E ||x_hat|| / ||x||`` over the same
  non-zero tokens; ``relative_reconstruction_bias = E||x_hat||^2 / E<x, x_hat>``.
* feature density = fraction of counted tokens on which a latent is nonzero.

A ratio with a zero denominator is NaN, and NaN is reported as NaN (``null`` in
``result.json``; -1 in the SAEBench copy, as SAEBench's core writes it).

Differences from SAEBench (``sae_bench/evals/core/main.py``, v0.6.0; same names, other numbers):

* ``explained_variance``: SAEBench's total variance is ``E||x||^2 - (E_{t,d} x_{t,d}^2)^2``
  (the squared mean of the squared entries, not ``||E x||^2``), so its EV is lower for the
  same reconstruction (0.968 where ours is 0.990 on one trained SAE).
* ``mse``: SAEBench divides each token's ``||x - x_hat||^2`` by the number of counted tokens
  in its batch before averaging; ours is the plain per-token mean (hundreds of times larger
  than SAEBench's at its batch sizes).
* zero ablation: SAEBench zeroes the hook at every position, BOS included; ours only at
  counted positions (special positions keep their activation), so ``ce_loss_with_ablation``
  and ``kl_div_with_ablation`` differ (8.39 vs 8.12 on the embedded model) and so do the
  scores.
* SAE splicing: SAEBench's default (``exclude_special_tokens_from_reconstruction=False``)
  splices the SAE at special positions too; ours never does (``exclude_special_tokens``).
* ``cossim``: SAEBench divides by ``||x||`` and ``||x_hat||`` without a floor, so one zero
  vector makes the mean NaN (-1 in its file); ours averages over tokens with a non-zero
  activation and counts a zero reconstruction there as 0.
* ``l2_ratio``: SAEBench counts ``||x|| < 1e-4`` as 1 (such tokens weigh ``||x_hat||``);
  ours leaves them out.
* ``l1``: SAEBench sums the latents as they are; ours sums ``|f|`` (the same for non-negative
  activations). Feature density: SAEBench counts ``f > 0``, ours ``f != 0``.
* ``relative_reconstruction_bias``: SAEBench averages one ratio per batch; ours is the ratio
  of means over all tokens (the same for one batch).
* defaults: ``n_eval_sparsity_variance_batches`` 10 here, 1 in SAEBench; ``frac_dead`` is
  saeravel's extra.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from saeravel.activations import (
    counted_mask,
    hook_activations,
    latents_and_reconstruction,
    special_token_ids,
)
from saeravel.errors import UserError
from saeravel.evals.api import EvalContext, EvalOutput, TextSourceConfig, register
from saeravel.saes.base import SAE
from saeravel.taskdata import data_source, token_batches

log = logging.getLogger(__name__)

# Tokens with |x| below this are left out of cossim and l2_ratio (sae_lens and SAEBench count
# such |x| as 1 in l2_ratio and take the cosine of a zero vector as NaN).
L2_NORM_FLOOR = 1e-4


@dataclass
class CoreEvalConfig(TextSourceConfig):
    """SAEBench's core eval (see the module docstring for the metric definitions)."""

    name: str = "core"
    version: str = "1.0"
    batch_size_prompts: int = 16
    n_eval_reconstruction_batches: int = 10
    n_eval_sparsity_variance_batches: int = 10
    prepend_bos: bool = True
    exclude_special_tokens: bool = True
    facts_per_sequence: int = 6
    compute_featurewise_weight_based_metrics: bool = True
    feature_details: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(self)


def check_config(cfg: Any) -> None:
    """One-line errors for values that cannot work (run when the config is built)."""
    n_rec, n_sp = cfg.n_eval_reconstruction_batches, cfg.n_eval_sparsity_variance_batches
    if n_rec < 0 or n_sp < 0 or max(n_rec, n_sp) == 0:
        raise UserError(
            "eval.n_eval_reconstruction_batches and eval.n_eval_sparsity_variance_batches must "
            f"be >= 0 and not both 0 (got {n_rec} and {n_sp})"
        )
    if cfg.batch_size_prompts < 1 or cfg.context_size < 2:
        raise UserError("eval.batch_size_prompts must be >= 1 and eval.context_size >= 2")
    if cfg.facts_per_sequence < 1:
        raise UserError(f"eval.facts_per_sequence must be >= 1 (got {cfg.facts_per_sequence})")


# ----------------------------------------------------------------------------- SAE helpers


def splice(act: torch.Tensor, replacement: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``replacement`` at counted positions (``mask`` True), ``act`` elsewhere."""
    return torch.where(mask[..., None], replacement.to(act.dtype), act)


def sae_splice_hook(
    sae: SAE, mask: torch.Tensor, captured: dict[str, torch.Tensor] | None = None
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Hook replacing the activation by its reconstruction at counted positions; stores
    ``x``, ``f`` and ``x_hat`` in ``captured``."""

    def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        f, x_hat = latents_and_reconstruction(sae, act)
        if captured is not None:
            captured.update(x=act, f=f, x_hat=x_hat)
        return splice(act, x_hat, mask)

    return hook_fn


def ablation_hook(mask: torch.Tensor) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Hook zeroing the activation at counted positions."""

    def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return splice(act, torch.zeros_like(act), mask)

    return hook_fn


def _safe_div(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


# ----------------------------------------------------------------------------- accumulators


@dataclass
class DownstreamStats:
    """Running sums of per-token CE and KL over counted positions."""

    n_kl: int = 0
    n_ce: int = 0
    sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("ce_clean", "ce_sae", "ce_abl", "kl_sae", "kl_abl"), 0.0
        )
    )

    @staticmethod
    def token_ce(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position next-token loss [batch, pos-1]."""
        return -logprobs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]

    @staticmethod
    def token_kl(clean_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        """Per-position ``KL(clean || patched)`` [batch, pos]."""
        p = clean_lp.exp()
        return torch.where(p > 0, p * (clean_lp - lp), torch.zeros_like(p)).sum(-1)

    def add_clean(self, tokens: torch.Tensor, mask: torch.Tensor, clean_lp: torch.Tensor) -> None:
        ce_mask = mask[:, :-1] & mask[:, 1:]
        self.n_kl += int(mask.sum())
        self.n_ce += int(ce_mask.sum())
        self.sums["ce_clean"] += self.token_ce(clean_lp, tokens)[ce_mask].double().sum().item()

    def add_patched(
        self,
        kind: str,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        clean_lp: torch.Tensor,
        lp: torch.Tensor,
    ) -> None:
        ce_mask = mask[:, :-1] & mask[:, 1:]
        self.sums[f"ce_{kind}"] += self.token_ce(lp, tokens)[ce_mask].double().sum().item()
        self.sums[f"kl_{kind}"] += self.token_kl(clean_lp, lp)[mask].double().sum().item()

    def metrics(self) -> tuple[dict[str, float], dict[str, float]]:
        """(model_behavior_preservation, model_performance_preservation)."""
        ce = {k: _safe_div(self.sums[f"ce_{k}"], self.n_ce) for k in ("clean", "sae", "abl")}
        kl = {k: _safe_div(self.sums[f"kl_{k}"], self.n_kl) for k in ("sae", "abl")}
        behaviour = {
            "kl_div_score": _safe_div(kl["abl"] - kl["sae"], kl["abl"]),
            "kl_div_with_ablation": kl["abl"],
            "kl_div_with_sae": kl["sae"],
        }
        performance = {
            "ce_loss_score": _safe_div(ce["abl"] - ce["sae"], ce["abl"] - ce["clean"]),
            "ce_loss_with_ablation": ce["abl"],
            "ce_loss_with_sae": ce["sae"],
            "ce_loss_without_sae": ce["clean"],
        }
        return behaviour, performance


class SparsityVarianceStats:
    """Running sums for reconstruction, shrinkage, sparsity and feature density."""

    KEYS = (
        "l0", "l1", "l2_in", "l2_out", "l2_ratio", "xhat_sq", "x_dot_xhat", "x_sq",
        "resid_sq", "ev_legacy", "cossim", "n_nonzero",
    )  # fmt: skip

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.n_tokens = 0
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64)
        self.prompt_count = torch.zeros(d_sae, dtype=torch.float64)

    def add(
        self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Add one batch: ``x``, ``x_hat`` [batch, pos, d_in], ``f`` [batch, pos, d_sae]."""
        fired = (f != 0) & mask[..., None]
        self.prompt_count += fired.any(dim=1).sum(0).double().cpu()
        xs = x[mask].double()
        xh = x_hat[mask].double()
        fs = f[mask]
        n = xs.shape[0]
        if n == 0:
            return
        self.n_tokens += n
        active = fs != 0
        self.fire_count += active.sum(0).double().cpu()
        resid = (xs - xh).pow(2).sum(-1)
        norm_in, norm_out = xs.norm(dim=-1), xh.norm(dim=-1)
        centred = (xs - xs.mean(0)).pow(2).sum(-1)
        # cossim and l2_ratio average over tokens whose activation is not (nearly) zero only
        nonzero = norm_in >= L2_NORM_FLOOR
        cos = torch.nn.functional.cosine_similarity(xs, xh, dim=-1, eps=1e-8)
        per_token = {
            "l0": active.sum(-1).double(),
            "l1": fs.abs().sum(-1).double(),
            "l2_in": norm_in,
            "l2_out": norm_out,
            "l2_ratio": torch.where(nonzero, norm_out / norm_in.clamp_min(L2_NORM_FLOOR), 0.0),
            "xhat_sq": norm_out.pow(2),
            "x_dot_xhat": (xs * xh).sum(-1),
            "x_sq": norm_in.pow(2),
            "resid_sq": resid,
            "ev_legacy": 1 - resid / centred,
            "cossim": torch.where(nonzero, cos, 0.0),
            "n_nonzero": nonzero.double(),
        }
        for key, vals in per_token.items():
            self.sums[key] += vals.sum().item()
        self.sum_x += xs.sum(0).cpu()

    def feature_density(self) -> torch.Tensor:
        """Per latent: fraction of counted tokens on which it is nonzero."""
        if self.n_tokens == 0:
            return torch.full_like(self.fire_count, math.nan)
        return self.fire_count / self.n_tokens

    def metrics(self) -> dict[str, dict[str, float]]:
        """reconstruction_quality, shrinkage, sparsity and misc_metrics groups."""
        n = self.n_tokens
        mean = {k: _safe_div(v, n) for k, v in self.sums.items()}
        for key in ("cossim", "l2_ratio"):  # over tokens with a non-zero activation
            mean[key] = _safe_div(self.sums[key], self.sums["n_nonzero"])
        if n:
            variance = mean["x_sq"] - (self.sum_x / n).pow(2).sum().item()
        else:
            variance = math.nan
        ev = 1 - mean["resid_sq"] / variance if variance > 0 else math.nan
        return {
            "reconstruction_quality": {
                "explained_variance": ev,
                "explained_variance_legacy": mean["ev_legacy"],
                "mse": mean["resid_sq"],
                "cossim": mean["cossim"],
            },
            "shrinkage": {
                "l2_norm_in": mean["l2_in"],
                "l2_norm_out": mean["l2_out"],
                "l2_ratio": mean["l2_ratio"],
                "relative_reconstruction_bias": _safe_div(mean["xhat_sq"], mean["x_dot_xhat"]),
            },
            "sparsity": {"l0": mean["l0"], "l1": mean["l1"]},
            "misc_metrics": density_metrics(self.feature_density()),
        }


def density_metrics(density: torch.Tensor) -> dict[str, float]:
    """Summary of per-latent feature densities (SAEBench's misc_metrics, plus frac_dead)."""
    if density.numel() == 0 or bool(density.isnan().any()):
        keys = ("frac_alive", "frac_dead", "freq_over_1_percent", "freq_over_10_percent")
        keys += ("normalized_freq_over_1_percent", "normalized_freq_over_10_percent")
        return dict.fromkeys(keys, math.nan)
    total = density.sum().item()
    return {
        "frac_alive": (density > 0).double().mean().item(),
        "frac_dead": (density == 0).double().mean().item(),
        "freq_over_1_percent": (density > 0.01).double().mean().item(),
        "freq_over_10_percent": (density > 0.1).double().mean().item(),
        "normalized_freq_over_1_percent": _safe_div(density[density > 0.01].sum().item(), total),
        "normalized_freq_over_10_percent": _safe_div(density[density > 0.1].sum().item(), total),
    }


def _max_cosine_to_others(vectors: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per row of ``vectors`` [n, d]: the largest cosine similarity with any other row."""
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    out = torch.empty(unit.shape[0], dtype=torch.float64)
    if unit.shape[0] < 2:
        return out.fill_(math.nan)
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start : start + chunk] @ unit.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + start] = -math.inf
        out[start : start + chunk] = sims.max(dim=1).values.double().cpu()
    return out


def weight_metrics(sae: SAE) -> dict[str, torch.Tensor]:
    """Per-latent weight statistics (empty for SAEs without explicit weights)."""
    if not all(hasattr(sae, name) for name in ("W_enc", "W_dec", "b_enc")):
        return {}
    enc = sae.W_enc.detach().T  # [d_sae, d_in]
    dec = sae.W_dec.detach()  # [d_sae, d_in]
    cos = torch.nn.functional.cosine_similarity(enc.double(), dec.double(), dim=-1)
    return {
        "encoder_bias": sae.b_enc.detach().double().cpu(),
        "encoder_norm": enc.double().norm(dim=-1).cpu(),
        "encoder_decoder_cosine_sim": cos.cpu(),
        "max_encoder_cosine_sim": _max_cosine_to_others(enc),
        "max_decoder_cosine_sim": _max_cosine_to_others(dec),
    }


# ----------------------------------------------------------------------------- the eval


@dataclass
class CoreResult:
    """Metric groups plus per-latent arrays of one core evaluation."""

    metrics: dict[str, dict[str, Any]]
    feature_density: torch.Tensor
    consistent_activation_heuristic: torch.Tensor
    weights: dict[str, torch.Tensor]
    n_ce_terms: int
    n_batches: tuple[int, int]

    def feature_details(self) -> list[dict[str, float]]:
        """One record per latent (SAEBench's eval_result_details layout)."""
        cols = {
            "feature_density": self.feature_density,
            "consistent_activation_heuristic": self.consistent_activation_heuristic,
            **self.weights,
        }
        lists = {k: v.tolist() for k, v in cols.items()}
        return [
            {"index": i, **{k: vals[i] for k, vals in lists.items()}}
            for i in range(len(self.feature_density))
        ]


@torch.no_grad()
def compute_core_metrics(
    model: Any,
    sae: SAE,
    hook_name: str,
    batches: Iterable[torch.Tensor],
    *,
    n_reconstruction_batches: int,
    n_sparsity_variance_batches: int,
    special_ids: Sequence[int] = (),
    compute_weight_metrics: bool = True,
    progress: bool = False,
) -> CoreResult:
    """Core metrics of ``sae`` spliced into ``model`` at ``hook_name`` on token ``batches``.

    Batch ``i`` feeds the CE/KL metrics if ``i < n_reconstruction_batches`` and the
    reconstruction/sparsity metrics if ``i < n_sparsity_variance_batches``.
    """
    total = max(n_reconstruction_batches, n_sparsity_variance_batches)
    device = model.cfg.device
    down = DownstreamStats()
    sv = SparsityVarianceStats(sae.d_in, sae.d_sae)
    done = [0, 0]
    bar = tqdm(total=total, desc="core eval", unit="batch", disable=not progress, leave=False)
    with bar:
        for i, tokens in enumerate(batches):
            if i >= total:
                break
            tokens = tokens.to(device)
            mask = counted_mask(tokens, special_ids)
            captured: dict[str, torch.Tensor] = {}
            if i < n_reconstruction_batches:
                clean_lp = torch.log_softmax(model(tokens).float(), dim=-1)
                down.add_clean(tokens, mask, clean_lp)
                hooks = (
                    ("sae", sae_splice_hook(sae, mask, captured)),
                    ("abl", ablation_hook(mask)),
                )
                for kind, fn in hooks:
                    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, fn)])
                    lp = torch.log_softmax(logits.float(), dim=-1)
                    del logits
                    down.add_patched(kind, tokens, mask, clean_lp, lp)
                    del lp
                del clean_lp
                done[0] += 1
            if i < n_sparsity_variance_batches:
                if not captured:
                    x = hook_activations(model, hook_name, tokens)
                    f, x_hat = latents_and_reconstruction(sae, x)
                    captured.update(x=x, f=f, x_hat=x_hat)
                sv.add(captured["x"], captured["f"], captured["x_hat"], mask)
                done[1] += 1
            bar.update(1)
    if done[0] < n_reconstruction_batches or done[1] < n_sparsity_variance_batches:
        log.warning(
            "text ran out: used %d reconstruction and %d sparsity/variance batches "
            "(asked for %d and %d)",
            done[0], done[1], n_reconstruction_batches, n_sparsity_variance_batches,
        )  # fmt: skip

    metrics: dict[str, dict[str, Any]] = {}
    if done[0]:
        behaviour, performance = down.metrics()
        metrics["model_behavior_preservation"] = behaviour
        metrics["model_performance_preservation"] = performance
    sv_metrics = sv.metrics() if done[1] else {}
    for group in ("reconstruction_quality", "shrinkage", "sparsity"):
        if group in sv_metrics:
            metrics[group] = sv_metrics[group]
    metrics["token_stats"] = {
        "total_tokens_eval_reconstruction": down.n_kl,
        "total_tokens_eval_sparsity_variance": sv.n_tokens,
    }
    weights = weight_metrics(sae) if compute_weight_metrics else {}
    misc = dict(sv_metrics.get("misc_metrics", {}))
    for key in ("encoder", "decoder"):
        if f"max_{key}_cosine_sim" in weights:
            misc[f"average_max_{key}_cosine_sim"] = weights[f"max_{key}_cosine_sim"].mean().item()
    if misc:
        metrics["misc_metrics"] = misc
    return CoreResult(
        metrics=metrics,
        feature_density=sv.feature_density(),
        consistent_activation_heuristic=sv.fire_count / sv.prompt_count,
        weights=weights,
        n_ce_terms=down.n_ce,
        n_batches=(done[0], done[1]),
    )


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""

    def get(group: str, key: str) -> float:
        return metrics.get(group, {}).get(key, math.nan)

    return (
        f"core: L0 {get('sparsity', 'l0'):.2f}, "
        f"CE score {get('model_performance_preservation', 'ce_loss_score'):.4f}, "
        f"KL score {get('model_behavior_preservation', 'kl_div_score'):.4f}, "
        f"explained variance {get('reconstruction_quality', 'explained_variance'):.4f}, "
        f"MSE {get('reconstruction_quality', 'mse'):.4g}, "
        f"alive {get('misc_metrics', 'frac_alive'):.3f}"
    )


@register(
    "core",
    schema=CoreEvalConfig,
    needs_sae=lambda cfg: True,
    summarize=summarize,
    headline_metrics=(
        "sparsity.l0",
        "model_performance_preservation.ce_loss_score",
        "model_performance_preservation.ce_loss_with_sae",
        "reconstruction_quality.explained_variance",
        "model_behavior_preservation.kl_div_score",
        "reconstruction_quality.mse",
        "reconstruction_quality.cossim",
        "misc_metrics.frac_alive",
    ),
    plotted=(
        ("model_performance_preservation.ce_loss_score", "CE loss score"),
        ("reconstruction_quality.explained_variance", "explained variance"),
    ),
    saebench_required={  # every category SAEBench 0.6.0's core schema requires
        "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
        "model_performance_preservation": (
            "ce_loss_score",
            "ce_loss_with_ablation",
            "ce_loss_with_sae",
            "ce_loss_without_sae",
        ),
        "reconstruction_quality": (
            "explained_variance",
            "explained_variance_legacy",
            "mse",
            "cossim",
        ),
        "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
        "sparsity": ("l0", "l1"),
        "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
        "misc_metrics": (
            "freq_over_1_percent",
            "freq_over_10_percent",
            "normalized_freq_over_1_percent",
            "normalized_freq_over_10_percent",
            "average_max_encoder_cosine_sim",
            "average_max_decoder_cosine_sim",
            "frac_alive",
        ),
    },  # fmt: skip
)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run the core eval on the job's model, SAE and layer."""
    if ctx.sae is None:
        raise UserError("eval=core needs an SAE; choose one with sae=... (not sae=none)")
    check_config(cfg)
    n_rec, n_sp = cfg.n_eval_reconstruction_batches, cfg.n_eval_sparsity_variance_batches
    source = data_source(cfg.text_source, ctx.model, key="eval.text_source")
    special = special_token_ids(ctx.model.tokenizer) if cfg.exclude_special_tokens else []
    log.info(
        "core eval on %s text: %d reconstruction + %d sparsity/variance batches of %d; "
        "special tokens %s excluded",
        source, n_rec, n_sp, cfg.batch_size_prompts, special or "not",
    )  # fmt: skip
    result = compute_core_metrics(
        ctx.model.model,
        ctx.sae,
        ctx.hook_name,
        token_batches(cfg, ctx.model, max(n_rec, n_sp)),
        n_reconstruction_batches=n_rec,
        n_sparsity_variance_batches=n_sp,
        special_ids=special,
        compute_weight_metrics=cfg.compute_featurewise_weight_based_metrics,
        progress=True,
    )
    unstructured = {
        "text_source": source,
        "special_token_ids": special,
        "n_ce_terms": result.n_ce_terms,
        "n_batches_reconstruction": result.n_batches[0],
        "n_batches_sparsity_variance": result.n_batches[1],
        "hook_name": ctx.hook_name,
    }
    details = result.feature_details() if cfg.feature_details else None
    return EvalOutput(
        metrics=result.metrics,
        details=details,
        unstructured=unstructured,
        summary=[summarize(result.metrics)],
    )
