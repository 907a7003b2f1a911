"""Benchmark: RAVEL mask training and whole jobs, naive vs saeravel, beside pyvene and nnsight.

A GPT-2-shaped model with random weights (12 layers, d_model 768, vocab 50257; no download),
prompts of ``--ctx`` tokens sharing a template prefix with the entity ``--tail`` tokens from
the end, batch ``--batch``, a neuron mask (``b + sigmoid(m) * (s - b)`` at the entity's last
token after block L) trained by Adam on the last token's cross-entropy. Modes:

- naive:    transformer_lens, the full model on the source and on the patched base, every step;
- saeravel: ``SuffixRunner`` (prefix keys/values per template, suffix residuals per prompt);
- pyvene:   ``IntervenableModel`` with its ``SigmoidMaskIntervention`` on transformers'
            ``GPT2LMHeadModel`` (same shape, random weights), base and source each step;
- nnsight:  ``NNsight`` traces of the same ``GPT2LMHeadModel``: source trace, patched base trace.

Whole job (naive vs saeravel): ``--job-steps`` training steps, then scoring ``--job-pairs``
test pairs x ``--job-sets`` interventions x ``--job-tokens`` greedy tokens (one full forward
per token and intervention, vs ``CachedDecoder`` with the interventions stacked).

Timing is interleaved: every round runs each mode in turn, a ratio is taken per round and the
median over ``--rounds`` is reported (sequential cells on a shared machine drift by 2x).
Peers: ``pip install -e '.[bench]'`` (pyvene 0.1.8, nnsight 0.8.1); missing ones are skipped.
Usage: ``python scripts/bench_ravel.py [--layers 1 5 9] [--rounds 3] [--small]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("bench_ravel")
PEERS = ("pyvene", "nnsight")


def shapes(small: bool) -> dict[str, int]:
    if small:
        return {"n_layers": 4, "d_model": 64, "n_heads": 4, "d_mlp": 256, "d_vocab": 1000}
    return {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072, "d_vocab": 50257}


def tl_model(s: dict[str, int]) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"],
        d_head=s["d_model"] // s["n_heads"], d_mlp=s["d_mlp"], d_vocab=s["d_vocab"], n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN",
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hf_model(s: dict[str, int]) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=s["n_layers"], n_embd=s["d_model"], n_head=s["n_heads"],
                     n_inner=s["d_mlp"], vocab_size=s["d_vocab"], n_positions=1024)  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Data:
    """Base and source prompts of one template (entity ``tail`` tokens from the end)."""

    def __init__(self, vocab: int, ctx: int, tail: int, batch: int, pool: int, seed: int = 1):
        from saeravel.evals.ravel.prompts import Prompt

        g = torch.Generator().manual_seed(seed)
        prefix = torch.randint(1, vocab, (ctx - tail,), generator=g).tolist()
        rest = torch.randint(1, vocab, (tail - 1,), generator=g).tolist()

        def prompt() -> Prompt:
            ent = int(torch.randint(1, vocab, (1,), generator=g))
            return Prompt("t", "e", "A", prefix + [ent] + rest, len(prefix), len(prefix))

        self.bases = [prompt() for _ in range(batch)]
        self.sources = [prompt() for _ in range(batch)]
        self.pool = [prompt() for _ in range(pool)]  # scoring: bases recur across pairs
        self.target = torch.randint(0, vocab, (batch,), generator=g)
        self.pos = len(prefix)
        self.toks_b = torch.tensor([p.tokens for p in self.bases])
        self.toks_s = torch.tensor([p.tokens for p in self.sources])


def trainer(mode: str, layer: int, tl: Any, hf: Any, data: Data) -> Callable[[], float]:
    """A closure running one training step of ``mode`` (setup done here, outside timing)."""
    from saeravel.evals.ravel.intervene import NeuronMask, SuffixRunner, naive_logits
    from saeravel.hooks import resid_post

    d = tl.cfg.d_model
    rows = torch.arange(len(data.bases))
    ent = torch.full_like(rows, data.pos)
    hook = resid_post(layer)
    ce = torch.nn.functional.cross_entropy
    method = NeuronMask(d)
    params = list(method.parameters())
    if mode == "naive":

        def logits() -> torch.Tensor:
            _, cs = tl.run_with_cache(data.toks_s, names_filter=hook)
            _, cb = tl.run_with_cache(data.toks_b, names_filter=hook, stop_at_layer=layer + 1)
            v = method(cb[hook][rows, ent], cs[hook][rows, ent])
            return naive_logits(tl, data.bases, v, layer)

    elif mode == "saeravel":
        runner = SuffixRunner(tl, layer)
        runner.prepare(data.bases + data.sources)
        vb = torch.stack([runner.suffix(p)[0] for p in data.bases])
        vs = torch.stack([runner.suffix(p)[0] for p in data.sources])

        def logits() -> torch.Tensor:
            return runner.logits(data.bases, method(vb, vs))

    elif mode == "pyvene":
        import pyvene as pv

        ic = pv.IntervenableConfig(
            representations=[pv.RepresentationConfig(layer, "block_output", "pos", 1)],
            intervention_types=pv.SigmoidMaskIntervention,
        )
        im = pv.IntervenableModel(ic, hf)
        im.disable_model_gradients()
        iv = next(iter(im.interventions.values()))
        iv = iv[0] if isinstance(iv, (list, tuple)) else iv
        iv.temperature.data.fill_(1.0)
        iv.temperature.requires_grad_(False)
        params = [iv.mask]
        where = [[[data.pos]] * len(rows)]
        locs = {"sources->base": (where, where)}

        def logits() -> torch.Tensor:
            _, out = im({"input_ids": data.toks_b}, [{"input_ids": data.toks_s}], locs)
            return out.logits[:, -1]

    elif mode == "nnsight":
        from nnsight import NNsight

        nm = NNsight(hf)

        def logits() -> torch.Tensor:
            with nm.trace(data.toks_s):
                src = nm.transformer.h[layer].output[rows, data.pos].save()
            with nm.trace(data.toks_b):
                h = nm.transformer.h[layer].output
                h[rows, data.pos] = method(h[rows, data.pos], src)
                out = nm.lm_head.output[:, -1].save()
            return out

    else:
        raise ValueError(f"unknown mode {mode!r}")
    opt = torch.optim.Adam(params, lr=1e-3)

    def step() -> float:
        loss = ce(logits(), data.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def job(mode: str, layer: int, tl: Any, data: Data, args: Any) -> Callable[[], None]:
    """A closure running a whole (small) job: training then scoring, setup included."""
    from saeravel.evals.ravel.config import RavelEvalConfig
    from saeravel.evals.ravel.decode import CachedDecoder, naive_generate

    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, len(data.pool), (args.job_pairs,), generator=g).tolist()
    bases = [data.pool[i] for i in idx]
    sets = [torch.randn(len(bases), tl.cfg.d_model, generator=g) for _ in range(args.job_sets)]

    def run() -> None:
        step = trainer(mode, layer, tl, None, data)
        for _ in range(args.job_steps):
            step()
        if mode == "naive":
            for v in sets:
                naive_generate(tl, bases, args.job_tokens, layer, v)
        else:
            CachedDecoder(tl, layer, RavelEvalConfig().decode_mem_gb).generate(
                bases, args.job_tokens, sets
            )

    return run


def interleaved(
    cells: dict[str, Callable[[], Any]], rounds: int, reps: int, warm: bool = True
) -> dict[str, list[float]]:
    """Seconds per call of each cell, every round running each cell in turn."""
    times: dict[str, list[float]] = {k: [] for k in cells}
    for f in cells.values() if warm else ():
        f()  # warm-up
    for r in range(rounds):
        for name, f in cells.items():
            t = time.perf_counter()
            for _ in range(reps):
                f()
            times[name].append((time.perf_counter() - t) / reps)
        log.info("round %d: %s", r + 1, {k: f"{v[-1]:.3f}s" for k, v in times.items()})
    return times


def median_ratio(times: dict[str, list[float]], ref: str, name: str) -> float:
    return statistics.median(a / b for a, b in zip(times[ref], times[name], strict=True))


def available(peer: str) -> bool:
    try:
        __import__(peer)
    except ImportError:
        log.warning("%s is not installed: pip install -e '.[bench]' (pyvene==0.1.8 "
                    "nnsight==0.8.1); its rows are skipped", peer)  # fmt: skip
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 5, 9])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed cell")
    ap.add_argument("--ctx", type=int, default=60)
    ap.add_argument("--tail", type=int, default=8, help="entity position counted from the end")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--job-steps", type=int, default=10)
    ap.add_argument("--job-pairs", type=int, default=64)
    ap.add_argument("--job-sets", type=int, default=7, help="interventions scored per job")
    ap.add_argument("--job-tokens", type=int, default=3)
    ap.add_argument("--job-rounds", type=int, default=2)
    ap.add_argument("--no-job", action="store_true", help="only the training-step table")
    ap.add_argument("--small", action="store_true", help="a 4-layer d_model 64 model (smoke test)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    s = shapes(args.small)
    if max(args.layers) >= s["n_layers"] - 1:
        raise SystemExit(f"--layers must be below {s['n_layers'] - 1} (a block must follow)")
    tl = tl_model(s)
    peers = [p for p in PEERS if available(p)]
    hf = hf_model(s) if peers else None
    data = Data(s["d_vocab"], args.ctx, args.tail, args.batch, pool=32)
    lines = ["| layer | mode | s/step | speed-up vs naive (median of rounds) | saeravel ahead by |",
             "|---|---|---|---|---|"]  # fmt: skip
    for layer in args.layers:
        cells = {m: trainer(m, layer, tl, hf, data) for m in ("naive", "saeravel", *peers)}
        t = interleaved(cells, args.rounds, args.steps)
        for m in cells:
            ahead = "" if m in ("naive", "saeravel") else f"{median_ratio(t, m, 'saeravel'):.1f}x"
            lines.append(f"| {layer} | {m} | {statistics.median(t[m]):.3f} | "
                         f"{median_ratio(t, 'naive', m):.1f}x | {ahead} |")  # fmt: skip
    if not args.no_job:
        lines += ["", f"Whole job: {args.job_steps} training steps + scoring {args.job_pairs} "
                  f"pairs x {args.job_sets} interventions x {args.job_tokens} tokens", "",
                  "| layer | naive s | saeravel s | speed-up (median of rounds) |",
                  "|---|---|---|---|"]  # fmt: skip
        for layer in args.layers:
            cells = {m: job(m, layer, tl, data, args) for m in ("naive", "saeravel")}
            t = interleaved(cells, args.job_rounds, 1, warm=False)
            lines.append(f"| {layer} | {statistics.median(t['naive']):.1f} | "
                         f"{statistics.median(t['saeravel']):.1f} | "
                         f"{median_ratio(t, 'naive', 'saeravel'):.1f}x |")  # fmt: skip
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
