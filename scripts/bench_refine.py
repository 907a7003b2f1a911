"""Benchmark: RAVEL mask refinement before and after rank-1 flips and the budget, and the SAE
mask's training step with and without the per-prompt latent cache, at GPT-2 shape.

A GPT-2-shaped model with random weights (``bench_ravel.py``'s: 12 layers, d_model 768, vocab
50257; no download), a random top-k SAE of ``--d-sae`` latents (k ``--sae-k``) at the entity's
last token after block ``--layer``, ``--pairs`` training pairs of one template (prompts of
``--ctx`` tokens, the entity ``--tail`` from the end), the job's default recipe
(``RavelEvalConfig``: 30 epochs, batch 16, refine 256 pairs, budget 256). Measured in one run:

- before: the greedy search as it was (each candidate flip verified by re-running the SAE
  mask on the subset, re-encoding every base and source, then the first-token eval), timed
  on ``--sample`` candidates and projected to all the listed candidates;
- after: ``refine_mask`` (flip terms computed once, candidates ranked by gradient x delta,
  the top ``eval.mask.refine_budget`` verified), timed whole;
- a training step re-encoding bases and sources vs reading the job's ``LatentBank``.

A job's time is taken as one attribute's SAE-mask training (epochs x steps per epoch, from the
measured step) plus its refinement; scoring (~1% of a real job) is left out. Usage:
``python scripts/bench_refine.py [--d-sae 24576] [--layer 5] [--small]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ravel import random_sae, shapes, tl_model  # noqa: E402

log = logging.getLogger("bench_refine")


def make_job(tl: Any, sae: Any, layer: int, args: Any) -> tuple[Any, list[Any]]:
    """A RavelJob over random pairs of one template, with the fast forward and the banks."""
    from saeravel.evals.ravel.config import RavelEvalConfig
    from saeravel.evals.ravel.intervene import SuffixRunner
    from saeravel.evals.ravel.pairs import LatentBank, RavelJob, VectorBank
    from saeravel.evals.ravel.prompts import Pair, Prompt

    vocab = tl.cfg.d_vocab
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, vocab, (args.ctx - args.tail,), generator=g).tolist()
    rest = torch.randint(1, vocab, (args.tail - 1,), generator=g).tolist()

    def prompt(i: int, attr: str) -> Prompt:
        ent = int(torch.randint(1, vocab, (1,), generator=g))
        return Prompt("t", f"e{i}", attr, prefix + [ent] + rest, len(prefix), len(prefix))

    pairs = []
    for i in range(args.pairs):
        kind = "cause" if i % 2 == 0 else "isolation"
        tgt = int(torch.randint(0, vocab, (1,), generator=g))
        pairs.append(Pair(prompt(i, "A" if kind == "cause" else "B"), prompt(i, "A"), "A", kind,
                          "x", tgt, [tgt]))  # fmt: skip
    prompts = [p for q in pairs for p in (q.base, q.source)]
    bank = VectorBank(tl, layer, prompts, 64)
    runner = SuffixRunner(tl, layer)
    runner.prepare([q.base for q in pairs])
    cfg = OmegaConf.structured(RavelEvalConfig())
    ctx = SimpleNamespace(seed=0, layer=layer, model=SimpleNamespace(model=tl), sae=sae)
    job = RavelJob(cfg, ctx, pairs={"A": {"train": pairs}}, bank=bank, runner=runner,
                   latents=LatentBank(sae, bank))  # fmt: skip
    return job, pairs


def legacy_refine_seconds(
    job: Any, method: Any, pairs: list[Any], live: list[int], n: int
) -> float:
    """Seconds per candidate of the search as it was: flip, re-run the method and the
    first-token eval on the subset (every base and source re-encoded), undo."""
    from saeravel.evals.ravel.train import first_token_eval

    rng = random.Random(job.ctx.seed)
    refine_pairs = job.cfg.mask.refine_pairs
    subset = pairs if len(pairs) <= refine_pairs else rng.sample(pairs, refine_pairs)
    sample = random.Random(1).sample(live, min(n, len(live)))
    t = time.perf_counter()
    with torch.no_grad():
        for j in sample:
            old = float(method.mask.param[j])
            method.mask.param[j] = -old if old != 0 else 1.0
            first_token_eval(job, method, subset)
            method.mask.param[j] = old
    return (time.perf_counter() - t) / len(sample)


def step_seconds(job: Any, method: Any, pairs: list[Any], steps: int, cached: bool) -> float:
    """Seconds per training step of ``method`` (``train_method``, ``steps`` steps)."""
    from saeravel.evals.ravel.train import train_method

    latents = job.latents
    job.latents = latents if cached else None
    cfg = job.cfg
    epochs = cfg.epochs
    cfg.epochs = 1
    sub = pairs[: steps * cfg.batch_size]
    t = time.perf_counter()
    train_method(job, method, sub, "bench")
    seconds = (time.perf_counter() - t) / math.ceil(len(sub) / cfg.batch_size)
    cfg.epochs, job.latents = epochs, latents
    return seconds


def main() -> None:
    from saeravel.evals.ravel.intervene import SAEMask
    from saeravel.evals.ravel.train import refine_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--sae-k", type=int, default=64, help="latents active per vector (top-k)")
    ap.add_argument("--pairs", type=int, default=500, help="training pairs (a default job's)")
    ap.add_argument("--ctx", type=int, default=60)
    ap.add_argument("--tail", type=int, default=8, help="entity position counted from the end")
    ap.add_argument("--sample", type=int, default=8, help="candidates timed the old way")
    ap.add_argument("--steps", type=int, default=6, help="training steps timed per variant")
    ap.add_argument("--budget", type=int, default=None, help="eval.mask.refine_budget")
    ap.add_argument("--small", action="store_true", help="a 4-layer d_model 64 model (smoke)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    s = shapes(args.small)
    if args.small:
        args.d_sae, args.sae_k, args.layer = min(args.d_sae, 512), min(args.sae_k, 8), 1
    tl = tl_model(s)
    sae = random_sae(s["d_model"], args.d_sae, args.sae_k)
    job, pairs = make_job(tl, sae, args.layer, args)
    if args.budget is not None:
        job.cfg.mask.refine_budget = args.budget
    torch.manual_seed(0)
    method = SAEMask(sae)
    with torch.no_grad():  # a trained-looking mask: a few hundred latents kept, the rest off
        method.mask.param.normal_(-1.0, 1.0)
    step_plain = step_seconds(job, method, pairs, args.steps, cached=False)
    step_cached = step_seconds(job, method, pairs, args.steps, cached=True)
    steps = job.cfg.epochs * math.ceil(len(pairs) / job.cfg.batch_size)

    def live(subset: list[Any]) -> list[int]:
        vecs = torch.cat([job.bank([q.base for q in subset]), job.bank([q.source for q in subset])])
        with torch.no_grad():
            acts = sae.encode(vecs)
        return torch.nonzero((acts != 0).any(0)).flatten().tolist()

    rng = random.Random(job.ctx.seed)
    n_ref = job.cfg.mask.refine_pairs
    cands = live(pairs if len(pairs) <= n_ref else rng.sample(pairs, n_ref))
    per_old = legacy_refine_seconds(job, method, pairs, cands, args.sample)
    old = per_old * len(cands)
    info = refine_mask(job, method, pairs, "bench", live)
    new = info["seconds"]
    train_old, train_new = step_plain * steps, step_cached * steps
    rows = [
        ("training step (s)", f"{step_plain:.3f}", f"{step_cached:.3f}",
         f"{step_plain / step_cached:.2f}x"),
        (f"training, {steps} steps (s)", f"{train_old:.0f}", f"{train_new:.0f}", ""),
        (f"refinement, {len(cands)} candidates (s)", f"{old:.0f} (projected: {per_old:.2f} s x "
         f"{len(cands)})", f"{new:.1f} ({info['evaluations']} verified, budget "
         f"{info['budget'] or 'none'})", f"{old / new:.0f}x"),
        ("refinement / (training + refinement)", f"{old / (old + train_old):.0%}",
         f"{new / (new + train_new):.0%}", ""),
    ]  # fmt: skip
    lines = [f"GPT-2 shape ({s['n_layers']} layers, d_model {s['d_model']}), layer {args.layer}, "
             f"random top-{args.sae_k} SAE of {args.d_sae} latents, {len(pairs)} training pairs, "
             f"torch threads {torch.get_num_threads()}", "",
             "| | before | after | ratio |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
