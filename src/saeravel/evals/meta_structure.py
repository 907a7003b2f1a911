"""``eval=meta_structure``: SAEBench's meta-structure eval (``eval_type_id``
``meta_structure_decoder_variance``): how much shared structure the SAE's decoder directions
have, measured by how well a small sparse "meta-SAE" compresses them (Bussmann et al., 2025,
"Learning multi-level features with Matryoshka SAEs", appendix D.1).

The decoder rows (``W_dec`` [d_sae, d_in], each scaled to unit norm) are the data. A BatchTopK
SAE (sae_lens' ``BatchTopKTrainingSAE``, trained by sae_lens' ``SAETrainer``) of width
``max(ceil(d_sae * width_ratio), k)`` with ``k`` active latents per row on average is trained
for ``train_steps`` batches of ``train_batch_size`` rows drawn with replacement (Adam, constant
``learning_rate``). Then, over all rows in batches of ``eval_batch_size``:

* ``decoder_fraction_variance_explained`` = ``1 - sum ||w - meta(w)||^2 / sum ||w - mean w||^2``
  (0 when the rows have no variance), higher = more shared structure;
* ``final_reconstruction_mse`` = ``sum ||w - meta(w)||^2 / (d_sae * d_in)``;
* ``train_time_seconds``: wall-clock seconds of the training (not reproducible; left out of
  the report's headline).

It reads no text and runs no model forward pass, so the embedded model, the planted model and
any pretrained one are the same to it (nothing to fetch offline).

Differences from SAEBench (``sae_bench/evals/meta_structure``, v0.6.0):

* the decoder's rows are scaled to unit norm here for every SAE; SAEBench folds the decoder
  norms of a pretrained SAE into its encoder (``fold_W_dec_norm``: unit rows too) and only
  checks (prints) the norms of a custom SAE, training on them as they are.
* seeding: SAEBench seeds python and torch in its command-line entry point only; here the
  torch generator is seeded with ``eval.seed`` around the meta-SAE's initialisation and the
  row sampling (its own generator), so the result does not depend on what ran before.
* an SAE without a decoder matrix (a custom object with only ``encode``/``decode``) is a
  one-line error; SAEBench reads ``sae.W_dec`` and fails with an AttributeError.
* ``eval.dtype`` and ``eval.autocast`` have SAEBench's defaults (float32, autocast on); on a
  CPU sae_lens' autocast is bfloat16, as it is for SAEBench on a CPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from saeravel.activations import require_decoder
from saeravel.errors import UserError, choose
from saeravel.evals.api import EvalConfig, EvalContext, EvalOutput, register
from saeravel.schema import StrEnum

log = logging.getLogger(__name__)


class MetaDType(StrEnum):
    """The dtype of the decoder rows and the meta-SAE (SAEBench's choices)."""

    float32 = "float32"
    float64 = "float64"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class MetaStructureEvalConfig(EvalConfig):
    """SAEBench's meta-structure decoder-variance eval (see the module docstring)."""

    name: str = "meta_structure"
    version: str = "1.0"
    width_ratio: float = 0.25
    k: int = 4
    train_steps: int = 1500
    train_batch_size: int = 1024
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    autocast: bool = True
    eval_batch_size: int = 4096
    dead_feature_window: int = 2000
    feature_sampling_window: int = 200
    dtype: MetaDType = MetaDType.float32
    seed: int = 42

    def __post_init__(self) -> None:
        choose("eval.dtype", str(self.dtype), [d.value for d in MetaDType])
        self.dtype = MetaDType(self.dtype)  # a plain string from Python callers too
        for key in ("k", "train_steps", "train_batch_size", "eval_batch_size",
                    "dead_feature_window", "feature_sampling_window"):  # fmt: skip
            if getattr(self, key) < 1:
                raise UserError(f"eval.{key} must be >= 1 (got {getattr(self, key)})")
        if not 0 < self.width_ratio <= 1:
            raise UserError(
                f"eval.width_ratio={self.width_ratio} must be in (0, 1]: the meta-SAE's width "
                "as a fraction of d_sae"
            )
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise UserError(f"eval.learning_rate={self.learning_rate} must be a finite number > 0")
        if not self.weight_decay >= 0:
            raise UserError(f"eval.weight_decay={self.weight_decay} must be >= 0")


def meta_width(d_sae: int, width_ratio: float, k: int) -> int:
    """The meta-SAE's width: ``max(ceil(d_sae * width_ratio), k)`` (SAEBench's)."""
    return max(math.ceil(d_sae * width_ratio), k)


def unit_rows(decoder: torch.Tensor) -> torch.Tensor:
    """``decoder`` with every nonzero row scaled to unit norm (zero rows stay zero)."""
    norms = decoder.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, decoder / norms.clamp_min(1e-12), decoder)


def train_meta_sae(decoder: torch.Tensor, cfg: Any, device: str) -> tuple[Any, float]:
    """A BatchTopK meta-SAE trained on the rows of ``decoder`` by sae_lens' trainer; returns
    it and the training's wall-clock seconds."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    n_rows, d_in = decoder.shape
    width = meta_width(n_rows, cfg.width_ratio, cfg.k)
    rng_devices = [decoder.device] if decoder.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        meta = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=width, k=cfg.k, device=device, dtype=str(cfg.dtype),
                rescale_acts_by_decoder_norm=True,
            )
        )  # fmt: skip
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.train_steps * cfg.train_batch_size,
        train_batch_size_samples=cfg.train_batch_size,
        lr=cfg.learning_rate, lr_end=cfg.learning_rate, lr_scheduler_name="constant",
        lr_warm_up_steps=0, lr_decay_steps=0, n_restart_cycles=0, adam_beta1=0.9,
        adam_beta2=0.999, device=device, autocast=cfg.autocast,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window, n_checkpoints=0,
        checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    gen = torch.Generator(device=decoder.device).manual_seed(cfg.seed)

    def rows() -> Any:
        while True:
            idx = torch.randint(0, n_rows, (cfg.train_batch_size,), generator=gen,
                                device=decoder.device)  # fmt: skip
            yield decoder[idx]

    trainer = SAETrainer(cfg=trainer_cfg, sae=meta, data_provider=rows())
    if cfg.weight_decay:
        for group in trainer.optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay
    start = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        trained = trainer.fit()
    return trained, time.perf_counter() - start


@torch.no_grad()
def decoder_variance(meta: Any, decoder: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """``(fraction of variance explained, mse)`` of ``meta``'s reconstruction of the rows of
    ``decoder``, in batches of ``batch_size`` rows (the variance is about the rows' mean)."""
    meta.eval()
    mean = decoder.mean(0, keepdim=True)
    residual = total = 0.0
    for start in range(0, len(decoder), batch_size):
        batch = decoder[start : start + batch_size]
        residual += float(((batch - meta(batch)) ** 2).sum())
        total += float(((batch - mean) ** 2).sum())
    mse = residual / decoder.numel()
    return (0.0 if total == 0 else 1 - residual / total), mse


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    m = metrics.get("meta_structure", {})
    return (
        f"meta_structure: decoder variance explained by the meta-SAE "
        f"{m.get('decoder_fraction_variance_explained', math.nan):.3f} "
        f"(mse {m.get('final_reconstruction_mse', math.nan):.3g})"
    )


def offline_needs(cfg: Any, ctx: Any) -> list:
    """Nothing: the eval reads the SAE's decoder only."""
    from saeravel.offline import Skip

    return [Skip(f"eval={cfg.name} data", "reads only the SAE's decoder, nothing to fetch")]


@register(
    "meta_structure",
    schema=MetaStructureEvalConfig,
    summarize=summarize,
    saebench_type_id="meta_structure_decoder_variance",
    headline_metrics=(
        "meta_structure.decoder_fraction_variance_explained",
        "meta_structure.final_reconstruction_mse",
    ),
    plotted=(
        (
            "meta_structure.decoder_fraction_variance_explained",
            "decoder variance explained (meta-SAE)",
        ),
    ),  # fmt: skip
    non_result_paths={"eval_batch_size": "rows per forward pass when scoring the meta-SAE"},
    saebench_required={
        "meta_structure": (
            "decoder_fraction_variance_explained",
            "train_time_seconds",
            "final_reconstruction_mse",
        )
    },
    saebench_headline="meta_structure",
    offline_needs=offline_needs,
)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Train the meta-SAE on the job's SAE decoder and score it."""
    decoder = torch.from_numpy(require_decoder(ctx.sae, "meta_structure"))
    dtype = getattr(torch, str(cfg.dtype))
    decoder = unit_rows(decoder).to(device=ctx.device, dtype=dtype).contiguous()
    width = meta_width(len(decoder), cfg.width_ratio, cfg.k)
    log.info("meta_structure: a BatchTopK meta-SAE (width %d, k %d) on %d decoder rows",
             width, cfg.k, len(decoder))  # fmt: skip
    meta, seconds = train_meta_sae(decoder, cfg, ctx.device)
    explained, mse = decoder_variance(meta, decoder, cfg.eval_batch_size)
    metrics = {
        "meta_structure": {
            "decoder_fraction_variance_explained": explained,
            "train_time_seconds": seconds,
            "final_reconstruction_mse": mse,
        }
    }
    unstructured = {"meta_width": width, "n_decoder_rows": len(decoder), "d_in": decoder.shape[1]}
    return EvalOutput(metrics, None, unstructured, summary=[summarize(metrics)])
