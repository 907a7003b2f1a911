"""``run(cfg)``: config in, one result JSON out.

Order matters for correctness: the SAE source is resolved before the model so the model is
loaded with the weight processing the SAE was trained on; the SAE's width and hook are
checked against the model and the layer before any compute.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from saeravel import __version__
from saeravel.checkpoint import CheckpointStore
from saeravel.errors import UserError
from saeravel.evals import get_eval
from saeravel.models import LoadedModel, resolve_device
from saeravel.results import atomic_write_json, build_record, git_commit, job_hash, load_complete
from saeravel.saes.base import SAE, resid_layer_of_hook, resid_post_hook
from saeravel.saes.loaders import build_sae_source, check_known_width

log = logging.getLogger("saeravel")


@dataclass
class EvalContext:
    """Everything an eval's ``run`` receives besides its own config."""

    model: LoadedModel
    sae: SAE | None
    layer: int
    hook_name: str
    device: str
    seed: int
    cache_dir: Path
    output_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    # This job's checkpoints (<results_dir>/<eval>/<hash>.ckpt/); a no-op store by default.
    checkpoint: CheckpointStore = field(default_factory=CheckpointStore.disabled)


@dataclass
class EvalOutput:
    """What an eval returns: metric groups, per-item details, and summary lines to print."""

    metrics: dict[str, Any]
    details: Any = None
    unstructured: Any = None
    summary: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output folder {folder} is not writable ({exc.strerror})") from None


def check_sae_fits(sae: SAE, model: LoadedModel, layer: int) -> None:
    """The SAE must read the residual after block ``layer`` of a model of its width."""
    if sae.d_in != model.d_model:
        raise UserError(
            f"SAE {sae.identity.family} has d_in={sae.d_in} but model {model.name} has "
            f"d_model={model.d_model}; pick an SAE trained on {model.name}"
        )
    got = resid_layer_of_hook(sae.hook_name, model.n_layers)
    if got != layer:
        raise UserError(
            f"SAE {sae.identity.family} reads {sae.hook_name}, which is not the residual after "
            f"block {layer} (layer={layer} means {resid_post_hook(layer)} or "
            f"blocks.{layer + 1}.hook_resid_pre)"
        )


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one job; return its result record (or the existing one when skipped)."""
    logging.getLogger("saeravel").setLevel(cfg.log_level)
    start = time.time()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    jid = job_hash(resolved)
    out_dir = Path(cfg.paths.output_dir)
    store = Path(cfg.paths.results_dir) / cfg.eval.name / f"{jid}.json"
    checkpoint = CheckpointStore(store.with_suffix(".ckpt"))
    if not cfg.force and (done := load_complete(store)) is not None:
        log.info("job %s already complete (%s); skipping (force=true reruns)", jid, store)
        atomic_write_json(out_dir / "result.json", done)  # this sweep's folder is complete too
        checkpoint.clear()  # left over if a job stopped between its result and this cleanup
        return done
    checkpoint.claim({"job_hash": jid, "saeravel": __version__, "git_commit": git_commit()})
    if checkpoint.names():
        log.info("job %s has checkpoints in %s; continuing from them", jid, checkpoint.folder)
    _check_writable(out_dir)
    _check_writable(store.parent)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    spec = get_eval(cfg.eval.name)
    n_layers = cfg.model.n_layers
    if not 0 <= cfg.layer < n_layers:
        raise UserError(
            f"layer={cfg.layer} is out of range for {cfg.model.name}: 0..{n_layers - 1}"
        )

    sae_source = build_sae_source(cfg.sae) if spec.needs_sae(cfg.eval) else None
    sae_kwargs = sae_source.required_model_kwargs() if sae_source is not None else {}
    if sae_source is not None:  # a width known from the SAE's file, before the model loads
        check_known_width(sae_source, cfg.model.name, cfg.model.d_model)
    model = instantiate(cfg.model).load(sae_kwargs)
    if model.n_layers != n_layers:
        raise UserError(f"model {model.name} has {model.n_layers} layers, config says {n_layers}")
    sae = None
    if sae_source is not None:
        sae = sae_source.load(model)
        if sae is not None:
            check_sae_fits(sae, model, cfg.layer)
            sae = sae.to(device)

    ctx = EvalContext(
        model=model,
        sae=sae,
        layer=cfg.layer,
        hook_name=resid_post_hook(cfg.layer),
        device=device,
        seed=cfg.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        output_dir=out_dir,
        checkpoint=checkpoint,
    )
    output: EvalOutput = spec.run(cfg.eval, ctx)
    record = build_record(
        eval_name=spec.name,
        eval_cfg=OmegaConf.to_container(cfg.eval, resolve=True),
        metrics=output.metrics,
        details=output.details,
        unstructured=output.unstructured,
        sae_identity=vars(sae.identity) if sae is not None else None,
        sae_cfg=sae.cfg_dict if sae is not None else None,
        model_name=model.name,
        model_info={"processing": model.processing, **model.info},
        layer=cfg.layer,
        hook_name=ctx.hook_name,
        resolved_config=resolved,
        job_id=jid,
        runtime_s=round(time.time() - start, 2),
    )
    path = atomic_write_json(out_dir / "result.json", record)
    atomic_write_json(store, record)
    checkpoint.clear()  # the result is complete: nothing left to resume
    for line in output.summary:
        log.info(line)
    log.info("result written to %s (%.0f s)", path, time.time() - start)
    return record


def main_guarded(cfg: DictConfig) -> dict[str, Any] | None:
    """``run`` for the command line: a :class:`UserError` becomes one line and exit code 2;
    anything else is logged with the job's output folder before it propagates."""
    try:
        return run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if _is_multirun():  # one bad job must not stop the others of a sweep
            log.error("job failed: %s", exc)
            return None
        sys.exit(2)
    except Exception:
        log.exception("job failed (output folder %s)", cfg.paths.get("output_dir", "?"))
        raise


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
