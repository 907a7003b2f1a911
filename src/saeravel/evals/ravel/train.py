"""Training a featurizer's parameters with the model frozen (:func:`train_method`, checkpointed
and resumable), the first-token evaluation on training pairs, the convergence summary and the
greedy refinement of a trained mask (:func:`refine_mask`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saeravel.evals.ravel.intervene import (
    Intervention,
    batches_by_prefix,
    naive_logits,
    temperature,
)
from saeravel.evals.ravel.pairs import RavelJob
from saeravel.evals.ravel.prompts import Pair, Prompt

log = logging.getLogger(__name__)


def _logits(
    job: RavelJob, bases: list[Prompt], v: torch.Tensor, n_last: list[int] | None = None
) -> torch.Tensor:
    if job.runner is not None:
        return job.runner.logits(bases, v, n_last)
    return naive_logits(job.ctx.model.model, bases, v, job.ctx.layer, n_last)


class TeacherForced:
    """For a rule that reads several label tokens (``prefix``), training sees them all (RAVEL's
    loss): each pair's base prompt extended by its label's tokens but the last, whose logits at
    the last ``len(label)`` positions predict the label token by token. Extended prompts are
    made once per (base, label) and share the base's prefix (so the runner's prefix cache)."""

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens
        self.ext: dict[tuple[int, tuple[int, ...]], Prompt] = {}

    def labels(self, q: Pair) -> list[int]:
        return list(q.target_tokens[: self.n_tokens]) or [q.target_token]

    def prompt(self, q: Pair) -> Prompt:
        lab = tuple(self.labels(q)[:-1])
        key = (id(q.base), lab)
        if key not in self.ext:
            b = q.base
            self.ext[key] = Prompt(b.template, b.entity, b.attribute, list(b.tokens) + list(lab),
                                   b.entity_start, b.entity_pos)  # fmt: skip
        return self.ext[key]


def train_method(
    job: RavelJob, method: Intervention, pairs: list[Pair], desc: str, ckpt_name: str | None = None
) -> list[float]:
    """Train the method's parameters (the model stays frozen); returns per-epoch mean losses.

    With ``ckpt_name``, the training state (parameters, optimizer, step, the batch-order RNG
    at the start of the epoch, torch's RNG) goes to ``job.store`` every
    ``cfg.checkpoint_every_s`` seconds / ``cfg.checkpoint_every_steps`` steps, and a saved state
    is continued from: the result equals that of an uninterrupted run."""
    from saeravel.checkpoint import rng_state, set_rng_state

    cfg, ctx, bank, runner = job.cfg, job.ctx, job.bank, job.runner
    params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        return []
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[
        str(cfg.optimizer)
    ]
    groups = method.param_groups(cfg.lr) if hasattr(method, "param_groups") else params
    opt = opt_cls(groups, lr=cfg.lr)
    rng = random.Random(ctx.seed)
    steps_per_epoch = len(
        batches_by_prefix(pairs, lambda q: q.base.prefix, cfg.batch_size, random.Random(0))
    )
    total = cfg.epochs * steps_per_epoch
    step, curve = 0, []
    store, timer = None, None
    if ckpt_name is not None:
        store = job.store
        timer = store.timer(cfg.checkpoint_every_s, cfg.checkpoint_every_steps)
    own = method.own_state()
    first_epoch, skip, resumed_loss = 0, 0, 0.0
    saved = store.load(ckpt_name) if store is not None else None
    if saved is not None and not (
        isinstance(saved, dict)
        and (saved.get("total"), saved.get("n_pairs")) == (total, len(pairs))
        and {k: tuple(v.shape) for k, v in saved.get("method", {}).items()}
        == {k: tuple(v.shape) for k, v in own.items()}
    ):
        log.warning("%s: checkpoint %s is of another training run; starting over", desc, ckpt_name)
        saved = None
    if saved is not None:
        method.load_state_dict(saved["method"], strict=False)  # all but the frozen SAE (checked)
        opt.load_state_dict(saved["optimizer"])
        rng.setstate(saved["epoch_rng"])
        set_rng_state(saved["torch_rng"])
        step, curve = saved["step"], list(saved["curve"])
        first_epoch, skip, resumed_loss = saved["epoch"], saved["batch"], saved["epoch_loss"]
        log.info("%s: resuming from checkpoint at step %d of %d", desc, step, total)
    else:
        log.info("%s: training %d steps (%d pairs, batch %d, lr %g, T %s %g -> %g over %.0f%%, %s mask)",
                 desc, total, len(pairs), cfg.batch_size, cfg.lr, cfg.mask.schedule, cfg.mask.t_start,
                 cfg.mask.t_end, 100 * cfg.mask.anneal_fraction, cfg.mask.estimator)  # fmt: skip
    forced = None
    if cfg.match == "prefix" and cfg.match_tokens > 1:
        forced = TeacherForced(cfg.match_tokens)
        if runner is not None:
            runner.prepare([forced.prompt(q) for q in pairs])
    method.train()
    bar = tqdm(total=total, initial=step, desc=desc, leave=False)
    for epoch in range(first_epoch, cfg.epochs):
        epoch_rng = rng.getstate()  # this epoch's batch order is drawn from here
        epoch_loss = resumed_loss if epoch == first_epoch else 0.0
        batches = batches_by_prefix(pairs, lambda q: q.base.prefix, cfg.batch_size, rng)
        for i, batch in enumerate(batches):
            if epoch == first_epoch and i < skip:
                continue  # done before the checkpoint
            t = temperature(step, total, cfg.mask.t_start, cfg.mask.t_end,
                            str(cfg.mask.schedule), cfg.mask.anneal_fraction)  # fmt: skip
            if hasattr(method, "set_temperature"):  # several masks (mdas)
                method.set_temperature(t)
            elif method.mask is not None:
                method.mask.temperature = t
            b = bank([q.base for q in batch])
            s = bank([q.source for q in batch])
            if hasattr(method, "route"):  # per-pair masks (mdas): each pair's attribute's
                method.route(batch)
            v = method(b, s)
            if forced is None:
                logits = _logits(job, [q.base for q in batch], v)
                target = torch.tensor([q.target_token for q in batch], device=logits.device)
            else:
                labs = [forced.labels(q) for q in batch]
                ext = [forced.prompt(q) for q in batch]
                logits = _logits(job, ext, v, [len(x) for x in labs])
                target = torch.tensor([t for x in labs for t in x], device=logits.device)
            loss = F.cross_entropy(logits.float(), target)
            weight = cfg.mask.l1 if method.penalty_weight is None else method.penalty_weight
            if weight > 0:
                loss = loss + weight * method.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.item() * len(batch)
            step += 1
            bar.update()
            if timer is not None and timer.due(step):
                store.save(ckpt_name, {
                    "total": total, "n_pairs": len(pairs), "step": step, "epoch": epoch, "batch": i + 1,
                    "epoch_loss": epoch_loss, "curve": curve, "epoch_rng": epoch_rng, "torch_rng": rng_state(),
                    "method": method.own_state(),
                    "optimizer": opt.state_dict(),
                })  # fmt: skip
        curve.append(epoch_loss / max(1, len(pairs)))
    bar.close()
    method.eval()
    return curve


def convergence(curve: list[float], tol: float = 0.01) -> dict[str, Any]:
    """Did the training loss flatten? The SIGNED relative change of the mean loss over the last
    epoch (last epoch vs the one before): flattened when it fell by less than ``tol`` or
    stayed put (``-tol < change <= 0``); a loss that rose is ``rising`` and never flat, one
    that still falls by ``tol`` or more has not flattened either."""
    if len(curve) < 2:
        return {"final_loss": curve[-1] if curve else None, "last_epoch_change": None,
                "flattened": None, "rising": None, "epochs": len(curve)}  # fmt: skip
    change = (curve[-1] - curve[-2]) / max(abs(curve[-2]), 1e-12)
    return {"final_loss": curve[-1], "last_epoch_change": change,
            "flattened": -tol < change <= 0, "rising": change > 0, "epochs": len(curve)}  # fmt: skip


@torch.no_grad()
def first_token_eval(
    job: RavelJob, method: Intervention, pairs: list[Pair], hard: bool = True, batch_size: int = 64
) -> tuple[float, list[bool]]:
    """Mean cross-entropy on the target's first token and, per pair, whether the patched model's
    next token is the target's first token; the mask binarised when ``hard``."""
    if method.mask is not None:
        method.mask.hard = hard
    ok: dict[int, bool] = {}
    ce = 0.0
    for batch in batches_by_prefix(pairs, lambda q: q.base.prefix, batch_size, random.Random(0)):
        v = method(job.bank([q.base for q in batch]), job.bank([q.source for q in batch]))
        logits = _logits(job, [q.base for q in batch], v).float()
        target = torch.tensor([q.target_token for q in batch], device=logits.device)
        ce += F.cross_entropy(logits, target, reduction="sum").item()
        for q, hit in zip(batch, (logits.argmax(-1) == target).tolist(), strict=True):
            ok[id(q)] = bool(hit)
    if method.mask is not None:
        method.mask.hard = False
    return ce / max(1, len(pairs)), [ok[id(q)] for q in pairs]


def _rates(ok: list[bool], pairs: list[Pair]) -> dict[str, float]:
    """Cause, isolation (the trained attributes'), disentangle; with held-out pairs also
    ``isolation_heldout`` (pooled over the held-out attributes' pairs), ``isolation_all`` (the
    mean over every other attribute, trained or held out, of its isolation accuracy: RAVEL's
    isolation) and ``disentangle_all`` (cause and ``isolation_all`` averaged)."""
    cause = [o for o, q in zip(ok, pairs, strict=True) if q.kind == "cause"]
    iso = [o for o, q in zip(ok, pairs, strict=True) if q.kind == "isolation"]
    c = sum(cause) / len(cause) if cause else float("nan")
    i = sum(iso) / len(iso) if iso else float("nan")
    out = {"cause": c, "isolation": i, "disentangle": (c + i) / 2}
    held = [o for o, q in zip(ok, pairs, strict=True) if q.kind == "heldout"]
    if held:
        per: dict[str, list[bool]] = {}
        for o, q in zip(ok, pairs, strict=True):
            if q.kind != "cause":
                per.setdefault(q.base.attribute, []).append(o)
        iso_all = sum(sum(v) / len(v) for v in per.values()) / len(per)
        out.update({"isolation_heldout": sum(held) / len(held), "isolation_all": iso_all,
                    "disentangle_all": (c + iso_all) / 2})  # fmt: skip
    return out


@torch.no_grad()
def refine_mask(
    job: RavelJob, method: Intervention, pairs: list[Pair], desc: str,
    live: Callable[[list[Pair]], list[int]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Greedy local search over the binarised mask's bits: flip one entry at a time (least
    confident first) and keep the flip when the hard-mask cross-entropy on (a fixed subset of)
    the training pairs falls. Tells "the method cannot" from "the optimiser did not": the
    refined mask is scored beside the trained one, never instead of it. Leaves ``method``
    with the refined mask. ``live(subset)``: the only entries worth flipping (default: all;
    the featurizer says, e.g. an SAE's latents active on the subset)."""
    cfg = job.cfg
    mask = method.mask
    rng = random.Random(job.ctx.seed)
    subset = (
        pairs if len(pairs) <= cfg.mask.refine_pairs else rng.sample(pairs, cfg.mask.refine_pairs)
    )
    start, _ = first_token_eval(job, method, subset)
    best = start
    candidates = list(range(mask.param.numel())) if live is None else live(subset)
    order = sorted(candidates, key=lambda j: abs(float(mask.param[j])))
    flips, evals = 0, 0
    for _ in range(cfg.mask.refine_passes):
        changed = False
        for j in tqdm(order, desc=f"{desc} refine", leave=False):
            old = float(mask.param[j])
            mask.param[j] = -old if old != 0 else 1.0
            ce, _ = first_token_eval(job, method, subset)
            evals += 1
            if ce < best - 1e-6:
                best, changed, flips = ce, True, flips + 1
            else:
                mask.param[j] = old
        if not changed:
            break
    log.info("%s: refinement flipped %d of %d candidate entries; train CE %.4f -> %.4f",
             desc, flips, len(order), start, best)  # fmt: skip
    return {"train_ce_hard_before": start, "train_ce_hard_after": best, "flips": flips,
            "candidates": len(order), "evaluations": evals, "pairs": len(subset)}  # fmt: skip
