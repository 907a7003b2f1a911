"""Training a featurizer's parameters with the model frozen (:func:`train_method`, checkpointed
and resumable; an SAE mask reads its inputs' latents from the job's ``LatentBank``, encoded once
per prompt), the first-token evaluation on training pairs, the convergence summary and the
greedy refinement of a trained mask (:func:`refine_mask`: rank-1 flips, candidates ranked by
gradient x delta, the top ``eval.mask.refine_budget`` verified exactly)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saeravel.evals.ravel.intervene import (
    Intervention,
    batches_by_prefix,
    job_site,
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
    ctx = job.ctx
    return naive_logits(ctx.model.model, bases, v, ctx.layer, n_last, site=job_site(ctx))


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
    log_live = getattr(ctx, "log_metrics", None)
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
    forced = None  # protocol saebench: SAEBench's loss reads the first token only
    if cfg.match == "prefix" and cfg.match_tokens > 1 and cfg.protocol != "saebench":
        forced = TeacherForced(cfg.match_tokens)
        if runner is not None:
            runner.prepare([forced.prompt(q) for q in pairs])
    codes = getattr(job, "latents", None) if method.uses_latents else None
    if codes is not None and getattr(method, "sae", None) is not codes.sae:
        codes = None  # the method wraps another SAE than the job's
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
            if hasattr(method, "route"):  # per-pair masks (mdas): each pair's attribute's
                method.route(batch)
            if codes is not None:  # the frozen SAE's latents, encoded once per prompt
                v = method.forward_latents(
                    b, codes([q.base for q in batch]), codes([q.source for q in batch])
                )
            else:
                v = method(b, bank([q.source for q in batch]))
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
            if log_live is not None:  # the job logger's live curve (wandb), a no-op by default
                log_live({f"{desc}/loss": loss.item(), f"{desc}/temperature": t}, step)
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


def _row_ce(
    job: RavelJob, bases: list[Prompt], v: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per pair, the cross-entropy of the target's first token with ``v`` patched in."""
    return F.cross_entropy(_logits(job, bases, v).float(), target, reduction="none")


@torch.no_grad()
def refine_mask(
    job: RavelJob, method: Intervention, pairs: list[Pair], desc: str,
    live: Callable[[list[Pair]], list[int]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Greedy local search over the binarised mask's bits: flip one entry at a time and keep
    the flip when the hard-mask cross-entropy on (a fixed subset of) the training pairs falls.
    Tells "the method cannot" from "the optimiser did not": the refined mask is scored beside
    the trained one, never instead of it. Leaves ``method`` with the refined mask. ``live(subset)``:
    the only entries worth flipping (default: all; the featurizer says, e.g. an SAE's latents
    active on the subset).

    Cost: the patched vector is affine in the hard mask (``method.flip_terms``), so the subset's
    patched vectors are computed once and a flip is scored by adding its rank-1 term (no SAE
    re-encoding, no rotation recomputed); only the suffix forward of the pairs the term moves
    runs per verification (an SAE latent is active on few of them; the others' CE is kept).
    The refined mask's CE is recomputed by the method at the end. With
    more candidates than ``eval.mask.refine_budget``, one backward pass ranks them first by the
    first-order estimate of each flip's CE change (the gradient of the CE at the patched vectors
    dotted with the flip's delta, summed over pairs: attribution patching) and only the top
    ``refine_budget`` are verified exactly, most promising first; otherwise (or budget 0) every
    candidate is verified, least confident first. Methods without flip terms re-run the method
    per flip (exact, slower). The cost (candidates listed, evaluated, budget; seconds in the log
    only, so a rerun's result equals the first's) is logged
    and returned."""
    t0 = time.perf_counter()
    cfg = job.cfg
    mask = method.mask
    budget = int(cfg.mask.refine_budget)
    rng = random.Random(job.ctx.seed)
    subset = (
        pairs if len(pairs) <= cfg.mask.refine_pairs else rng.sample(pairs, cfg.mask.refine_pairs)
    )
    candidates = list(range(mask.param.numel())) if live is None else live(subset)
    mask.hard = True
    rows = []  # per batch: bases, target, base and source vectors, patched vectors, flip terms, CE per pair
    for batch in batches_by_prefix(subset, lambda q: q.base.prefix, 64, random.Random(0)):
        b = job.bank([q.base for q in batch])
        s = job.bank([q.source for q in batch])
        bases = [q.base for q in batch]
        target = torch.tensor([q.target_token for q in batch], device=b.device)
        v = method(b, s)
        rows.append(
            [bases, target, b, s, v, method.flip_terms(b, s), _row_ce(job, bases, v, target)]
        )
    rank1 = all(r[5] is not None for r in rows)
    n = max(1, len(subset))

    def sign(j: int) -> float:
        return -1.0 if float(mask.param[j]) > 0 else 1.0

    def trial(j: int) -> tuple[float, list[Any]]:
        """The summed CE change of flipping ``j`` (the bit already flipped unless rank1) and,
        per batch, the rows that change with their new vectors and CE. A rank-1 flip re-runs
        only the pairs its term moves (an SAE latent active in neither base nor source moves
        nothing)."""
        change, updates = 0.0, []
        for bases, target, b, s, v, terms, ce in rows:
            if rank1:
                c = terms[0][:, j]
                idx = torch.nonzero(c).flatten()
                if idx.numel() == 0:
                    updates.append(None)
                    continue
                new_v = v[idx] + sign(j) * c[idx, None] * terms[1][j]
            else:
                idx = torch.arange(len(bases), device=v.device)
                new_v = method(b, s)
            new_ce = _row_ce(job, [bases[i] for i in idx.tolist()], new_v, target[idx])
            change += float(new_ce.sum() - ce[idx].sum())
            updates.append((idx, new_v, new_ce))
        return change, updates

    start = sum(float(r[6].sum()) for r in rows) / n
    best = start
    flips, evals, ranked = 0, 0, False
    for _ in range(cfg.mask.refine_passes):
        if budget and len(candidates) > budget and rank1:
            order = _ranked(job, rows, candidates, sign)[:budget]
            ranked = True
        else:
            order = sorted(candidates, key=lambda j: abs(float(mask.param[j])))
            order = order[:budget] if budget else order
        changed = False
        for j in tqdm(order, desc=f"{desc} refine", leave=False):
            old = float(mask.param[j])
            if not rank1:
                mask.param[j] = -old if old != 0 else 1.0
            change, updates = trial(j)  # rank1: the term's sign reads the unflipped bit
            evals += 1
            if best + change / n < best - 1e-6:
                best, changed, flips = best + change / n, True, flips + 1
                mask.param[j] = -old if old != 0 else 1.0
                for r, u in zip(rows, updates, strict=True):
                    if u is not None:
                        idx, new_v, new_ce = u
                        r[4], r[6] = r[4].index_put((idx,), new_v), r[6].index_put((idx,), new_ce)
            else:
                mask.param[j] = old
        if not changed:
            break
    if flips:  # the refined mask's CE from the method itself (no accumulated rounding)
        best = sum(float(_row_ce(job, r[0], method(r[2], r[3]), r[1]).sum()) for r in rows) / n
    mask.hard = False
    seconds = time.perf_counter() - t0
    log.info("%s: refinement flipped %d entries; %d candidates listed, %d verified exactly "
             "(budget %s, %s), %.1f s; train CE %.4f -> %.4f", desc, flips, len(candidates), evals,
             budget or "unlimited", "ranked by gradient x delta" if ranked else "least confident first",
             seconds, start, best)  # fmt: skip
    return {"train_ce_hard_before": start, "train_ce_hard_after": best, "flips": flips,
            "candidates": len(candidates), "evaluations": evals, "budget": budget,
            "ranked": ranked, "rank1": rank1, "pairs": len(subset)}  # fmt: skip


def _ranked(
    job: RavelJob, rows: list[list[Any]], candidates: list[int], sign: Callable[[int], float]
) -> list[int]:
    """``candidates`` ordered by the first-order estimate of their flip's change of the summed
    hard-mask CE, most negative first: one backward pass per batch gives the gradient at the
    patched vectors, dotted with each flip's delta (``sign * coef[:, j] * dirs[j]``)."""
    idx = torch.tensor(candidates, dtype=torch.long)
    est = torch.zeros(len(candidates), dtype=torch.float64)
    for bases, target, _, _, v, (coef, dirs), _ in rows:
        with torch.enable_grad():
            x = v.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(_row_ce(job, bases, x, target).sum(), x)
        i = idx.to(coef.device)
        est += ((grad @ dirs[i].T) * coef[:, i]).sum(0).double().cpu()
    est *= torch.tensor([sign(j) for j in candidates], dtype=torch.float64)
    return [candidates[k] for k in torch.argsort(est, stable=True).tolist()]
