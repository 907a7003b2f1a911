"""``eval=mdl``: SAEBench's minimum-description-length eval ("Interpretability as Compression:
Reconsidering SAE Explanations of Neural Activations with MDL-SAEs", Ayonrinde et al., 2024):
how many bits per token the SAE's latent code costs when each latent's value is quantised just
finely enough to reconstruct the input.

On ``n_batches`` batches of text rows (special tokens left out), for every number of bins
``b`` of ``eval.num_bins_values`` and every ``k`` of ``eval.k_values`` (null: no truncation):

* the code: the SAE's latents, each token keeping only its ``k`` largest (by absolute value);
* quantisation: latent ``j``'s range ``[min(0, lo_j), hi_j]`` (its smallest and largest
  value on these tokens, without truncation) cut into ``b`` equal bins; an active
  (nonzero) value is replaced by its bin's midpoint, an inactive one stays 0;
* ``mse_loss``: SAEBench's reconstruction error of the quantised code,
  ``sqrt(mean((decode(q) - x)^2)) / d_in`` over every token and dimension; ``fvu`` the
  fraction of the input's variance it leaves unexplained; ``within_threshold``:
  ``mse_loss < eval.mse_epsilon_threshold``;
* ``description_length`` (bits per token): ``sum_j [H(p_j) + p_j * H_j]`` with ``p_j`` the
  fraction of tokens on which latent ``j`` is active, ``H(p)`` the binary entropy and ``H_j``
  the entropy of its active values' histogram over the ``b`` bins.

The headline (``mdl.description_length`` and the ``num_bins``, ``k``, ``mse_loss`` and
``fvu`` it comes with) is the smallest description length among the settings within the
threshold, else the smallest overall (``within_threshold`` says which); every setting is a
record of ``eval_result_details``.

Text as for ``eval=core`` (``eval.text_source``: the embedded world's fact sequences on a
model with a world, else a Hugging Face dataset packed into rows; ``taskdata.token_batches``).

Differences from SAEBench (``sae_bench/evals/mdl``, v0.6.0):

* bin ranges: SAEBench starts every latent's bins at 0 and ends them at the larger of its
  maximum and 100 (its running maximum starts at 100), so a latent whose values stay below 100
  puts them all in the first bins; here the range is the latent's own ``[min(0, lo), hi]``
  (signed latents such as ``sae=identity`` and ``sae=pca`` are covered).
* inactive latents: SAEBench quantises every value, zeros included, to a bin midpoint (an
  inactive latent is decoded as half a bin width) and counts zeros in the histogram whose
  entropy it multiplies by ``p_j``; here zeros stay zero and ``H_j`` is the entropy of the
  active values only (the description length of the MDL-SAE paper: which latents fire, then
  their values).
* ``k``: SAEBench applies its top-``k`` (sae_lens' ``TopK``: largest values, then ReLU) only
  when checking the reconstruction, not in the description length; here the truncated code is
  both the one reconstructed and the one whose length is counted, by absolute value (the same
  for ReLU latents).
* active means nonzero (SAEBench: ``> 0``; the same for ReLU latents).
* tokens: SAEBench draws separate buffers of ``sae_batch_size`` store batches for the ranges,
  the reconstruction and the description length from sae_lens' ``ActivationsStore``
  (``HuggingFaceFW/fineweb``); here one set of ``n_batches * batch_size_prompts`` rows serves
  all three.
* the headline: SAEBench writes only the list of settings (its minimum-viable pick is
  commented out) and no ``eval_result_metrics``; here the pick is the ``mdl`` category.
  SAEBench ships no output schema for this eval, and its plotting reader has no branch for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from saeravel.activations import counted_mask, hook_activations, sae_dtype, special_token_ids
from saeravel.errors import UserError
from saeravel.evals.api import EvalContext, EvalOutput, TextSourceConfig, register
from saeravel.taskdata import token_batches

log = logging.getLogger(__name__)


@dataclass
class MDLEvalConfig(TextSourceConfig):
    """SAEBench's MDL eval (see the module docstring)."""

    name: str = "mdl"
    version: str = "1.0"
    dataset: str = "HuggingFaceFW/fineweb"
    k_values: list[int | None] = field(default_factory=lambda: [16, 24, 32])
    num_bins_values: list[int] = field(default_factory=lambda: [4, 6, 8, 12, 16, 32])
    mse_epsilon_threshold: float = 0.01
    batch_size_prompts: int = 16
    n_batches: int = 8
    prepend_bos: bool = True
    facts_per_sequence: int = 6
    encode_batch_tokens: int = 4096
    seed: int = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.k_values:
            raise UserError("eval.k_values is empty; give at least one k (null: no truncation)")
        bad_k = [k for k in self.k_values if k is not None and k < 1]
        if bad_k:
            raise UserError(f"eval.k_values has k={bad_k[0]}; every k must be >= 1 or null")
        if not self.num_bins_values:
            raise UserError("eval.num_bins_values is empty; give at least one number of bins")
        bad_b = [b for b in self.num_bins_values if b < 1]
        if bad_b:
            raise UserError(
                f"eval.num_bins_values has {bad_b[0]}; every number of bins must be >= 1"
            )
        if not self.mse_epsilon_threshold > 0:
            raise UserError(f"eval.mse_epsilon_threshold={self.mse_epsilon_threshold} must be > 0")
        for key in ("batch_size_prompts", "n_batches", "facts_per_sequence", "encode_batch_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"eval.{key} must be >= 1 (got {getattr(self, key)})")


# ----------------------------------------------------------------------------- the code


def truncate(f: torch.Tensor, k: int | None) -> torch.Tensor:
    """``f`` [n, d_sae] keeping each row's ``k`` largest entries by absolute value (None: all)."""
    if k is None or k >= f.shape[-1]:
        return f
    idx = f.abs().topk(k, dim=-1).indices
    return torch.zeros_like(f).scatter(-1, idx, f.gather(-1, idx))


def bin_index(f: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Index in ``[0, n_bins)`` of each value's bin (latent ``j``'s range ``[lo_j, hi_j]`` in
    ``n_bins`` equal bins, the last one closed; a latent with ``lo_j == hi_j`` has one value)."""
    width = (hi - lo).clamp_min(torch.finfo(f.dtype).tiny)
    return ((f - lo) / width * n_bins).floor().clamp(0, n_bins - 1).long()


def quantize(f: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Active (nonzero) values replaced by their bin's midpoint; zeros stay zero."""
    mid = lo + (bin_index(f, lo, hi, n_bins).to(f.dtype) + 0.5) * (hi - lo) / n_bins
    return torch.where(f != 0, mid, torch.zeros_like(f))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """``H(p)`` in bits (0 at p = 0 and p = 1)."""
    p = p.double()
    inside = (p > 0) & (p < 1)
    q = p.clamp(1e-300, 1 - 1e-16)
    h = -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))
    return torch.where(inside, h, torch.zeros_like(h))


def histogram_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of bin ``counts`` [d_sae, n_bins] (0 for an empty row)."""
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    p = counts / total.clamp_min(1)
    logp = torch.where(p > 0, torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
    return -(p * logp).sum(-1)


@dataclass
class Setting:
    """One (number of bins, k) of the grid and its accumulated statistics."""

    num_bins: int
    k: int | None
    active: torch.Tensor  # [d_sae] tokens on which each latent is active
    hist: torch.Tensor  # [d_sae, num_bins] active values per bin
    sq_err: float = 0.0

    def record(self, n_tokens: int, d_in: int, total_var: float, threshold: float) -> dict:
        """The setting's SAEBench-named record."""
        p = self.active / n_tokens
        dl = float((binary_entropy(p) + p.double() * histogram_entropy(self.hist)).sum())
        mse_loss = math.sqrt(self.sq_err / (n_tokens * d_in)) / d_in
        return {
            "num_bins": self.num_bins,
            "k": self.k,
            "description_length": dl,
            "within_threshold": mse_loss < threshold,
            "mse_loss": mse_loss,
            "fvu": self.sq_err / total_var if total_var > 0 else math.nan,
            "l0": float(self.active.sum()) / n_tokens,
        }


@torch.no_grad()
def collect_inputs(cfg: Any, ctx: EvalContext) -> torch.Tensor:
    """The activations at the hook of every counted token of ``n_batches`` text batches
    [n_tokens, d_model] (float32, CPU)."""
    special = special_token_ids(ctx.model.tokenizer)
    device = ctx.model.model.cfg.device
    out = []
    batches = token_batches(cfg, ctx.model, cfg.n_batches)
    for tokens in tqdm(batches, total=cfg.n_batches, desc="mdl text", leave=False):
        tokens = tokens.to(device)
        x = hook_activations(ctx.model.model, ctx.hook_name, tokens)
        out.append(x[counted_mask(tokens, special)].float().cpu())
        if len(out) == cfg.n_batches:
            break
    if not out or not sum(len(x) for x in out):
        raise UserError("eval=mdl found no text tokens to encode (all special?)")
    return torch.cat(out)


def chunks(x: torch.Tensor, size: int) -> Any:
    """``x`` in consecutive row blocks of ``size``."""
    return (x[i : i + size] for i in range(0, len(x), size))


@torch.no_grad()
def description_lengths(sae: Any, x: torch.Tensor, cfg: Any, device: str) -> list[dict]:
    """One record per (number of bins, k) of the grid, on the inputs ``x`` [n, d_in]."""
    dtype = sae_dtype(sae, torch.float32)

    def code(block: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        xn, stats = sae.normalize(block.to(device=device, dtype=dtype))
        return sae.encode_normalized(xn).float(), stats

    lo = hi = None
    for block in chunks(x, cfg.encode_batch_tokens):  # each latent's range, no truncation
        f, _ = code(block)
        b_lo, b_hi = f.min(0).values, f.max(0).values
        lo = b_lo if lo is None else torch.minimum(lo, b_lo)
        hi = b_hi if hi is None else torch.maximum(hi, b_hi)
    assert lo is not None and hi is not None
    lo = lo.clamp_max(0)
    d_sae = len(hi)
    total_var = float(((x - x.mean(0)) ** 2).sum())
    records = []
    for k in cfg.k_values:
        settings = [
            Setting(
                b,
                k,
                torch.zeros(d_sae, dtype=torch.float64, device=device),
                torch.zeros(d_sae, b, dtype=torch.float64, device=device),
            )  # fmt: skip
            for b in cfg.num_bins_values
        ]
        for block in chunks(x, cfg.encode_batch_tokens):
            f, stats = code(block)
            f = truncate(f, k)
            active = f != 0
            target = block.to(device=device, dtype=torch.float32)
            rows, cols = active.nonzero(as_tuple=True)
            for s in settings:
                s.active += active.sum(0).double()
                idx = bin_index(f[rows, cols], lo[cols], hi[cols], s.num_bins)
                flat = s.hist.view(-1)
                flat.index_add_(0, cols * s.num_bins + idx, torch.ones_like(idx, dtype=flat.dtype))
                q = quantize(f, lo, hi, s.num_bins).to(dtype)
                x_hat = sae.denormalize(sae.decode_normalized(q), stats).float()
                s.sq_err += float(((x_hat - target) ** 2).sum())
        records += [
            s.record(len(x), x.shape[1], total_var, cfg.mse_epsilon_threshold) for s in settings
        ]
    return records


def minimum_viable(records: list[dict]) -> dict:
    """The smallest description length within the threshold, else the smallest overall."""
    viable = [r for r in records if r["within_threshold"]] or records
    return min(viable, key=lambda r: r["description_length"])


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    m = metrics.get("mdl", {})
    within = "within" if m.get("within_threshold") else "NOT within"
    return (
        f"mdl: {m.get('description_length', math.nan):.1f} bits/token at {m.get('num_bins')} bins, "
        f"k={m.get('k')} (mse_loss {m.get('mse_loss', math.nan):.3g}, {within} the threshold)"
    )


@register(
    "mdl",
    schema=MDLEvalConfig,
    summarize=summarize,
    headline_metrics=(
        "mdl.description_length",
        "mdl.mse_loss",
        "mdl.fvu",
        "mdl.num_bins",
    ),
    plotted=(("mdl.description_length", "description length (bits/token)"),),
    non_result_paths={"encode_batch_tokens": "tokens per SAE encoding block (memory only)"},
    saebench_required={"mdl": ()},
    saebench_headline="mdl",
)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Description lengths of the job's SAE code over the grid of bins and k."""
    if ctx.sae is None:
        raise UserError("eval=mdl needs an SAE; choose one with sae=... (not sae=none)")
    too_big = [k for k in cfg.k_values if k is not None and k > ctx.sae.d_sae]
    if too_big:
        raise UserError(f"eval.k_values has k={too_big[0]}, but the SAE has d_sae={ctx.sae.d_sae}")
    x = collect_inputs(cfg, ctx)
    log.info("mdl: %d tokens, %d settings", len(x), len(cfg.k_values) * len(cfg.num_bins_values))
    records = description_lengths(ctx.sae, x, cfg, ctx.device)
    best = minimum_viable(records)
    metrics = {
        "mdl": {
            **{key: best[key] for key in ("description_length", "num_bins", "mse_loss", "fvu")},
            "k": best["k"],  # null: no truncation
            "within_threshold": best["within_threshold"],
            "n_tokens": len(x),
        }
    }
    return EvalOutput(metrics, records, {"n_tokens": len(x)}, summary=[summarize(metrics)])
