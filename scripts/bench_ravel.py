"""Benchmark: RAVEL mask-training steps per second, naive vs cached forwards.

A GPT-2-shaped model with random weights (12 layers, d_model 768, vocab 50257), prompts of
``--ctx`` tokens sharing a template prefix with the entity ``--tail`` tokens from the end,
batch 16, a neuron mask trained by Adam. Three ways to compute a training step's logits:

- naive:  the full model on the base (patched at the entity) and on the source, every step;
- resid:  base and source residuals after block L cached once; run blocks L+1.. on all
          positions and unembed only the last one;
- suffix: saeravel's SuffixRunner: additionally the prefix keys/values per template are
          cached, so only the entity and the tokens after it run through blocks L+1...

Each (mode, layer) runs in its own subprocess so its peak memory (max RSS) is its own.
Usage: ``python scripts/bench_ravel.py [--layers 1 5 9] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(mode: str, layer: int, steps: int, ctx: int, tail: int, batch: int, small: bool) -> dict:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saeravel.ravel.intervene import NeuronMask, SuffixRunner, naive_logits
    from saeravel.ravel.prompts import Prompt

    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    if small:
        cfg = HookedTransformerConfig(n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                                      d_vocab=1000, n_ctx=128, act_fn="gelu", normalization_type="LN")  # fmt: skip
    else:
        cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072,
                                      d_vocab=50257, n_ctx=1024, act_fn="gelu_new", normalization_type="LN")  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, cfg.d_vocab, (ctx - tail,), generator=g).tolist()
    suffix_tail = torch.randint(1, cfg.d_vocab, (tail - 1,), generator=g).tolist()

    def prompt() -> Prompt:
        ent = int(torch.randint(1, cfg.d_vocab, (1,), generator=g))
        toks = prefix + [ent] + suffix_tail
        return Prompt("t", "e", "A", toks, len(prefix), len(prefix))

    bases = [prompt() for _ in range(batch)]
    sources = [prompt() for _ in range(batch)]
    method = NeuronMask(cfg.d_model)
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    target = torch.randint(0, cfg.d_vocab, (batch,), generator=g)
    hook = f"blocks.{layer}.hook_resid_post"
    ent = torch.tensor([p.entity_pos for p in bases])
    rows = torch.arange(batch)
    toks_b = torch.tensor([p.tokens for p in bases])
    toks_s = torch.tensor([p.tokens for p in sources])
    setup_start = time.perf_counter()
    if mode == "resid":
        with torch.no_grad():
            _, cb = model.run_with_cache(toks_b, names_filter=hook, stop_at_layer=layer + 1)
            _, cs = model.run_with_cache(toks_s, names_filter=hook, stop_at_layer=layer + 1)
        resid_b, vec_s = cb[hook], cs[hook][rows, ent]
    if mode == "suffix":
        runner = SuffixRunner(model, layer)
        runner.prepare(bases + sources)
        with torch.no_grad():
            vec_b = torch.stack([runner.suffix(p)[0] for p in bases])
            vec_s = torch.stack([runner.suffix(p)[0] for p in sources])
    setup = time.perf_counter() - setup_start

    def step() -> float:
        if mode == "naive":
            _, cs = model.run_with_cache(toks_s, names_filter=hook)
            src = cs[hook][rows, ent]
            _, cb = model.run_with_cache(toks_b, names_filter=hook, stop_at_layer=layer + 1)
            v = method(cb[hook][rows, ent], src)
            logits = naive_logits(model, bases, v, layer)
        elif mode == "resid":
            v = method(resid_b[rows, ent], vec_s)
            r = resid_b.index_put((rows, ent), v)
            for block in model.blocks[layer + 1 :]:
                r = block(r)
            logits = model.unembed(model.ln_final(r[:, -1:]))[:, 0]
        else:
            v = method(vec_b, vec_s)
            logits = runner.logits(bases, v)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "layer": layer,
        "steps_per_s": steps / dt,
        "setup_s": setup,
        "peak_rss_mb": rss_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 5, 9])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=60)
    ap.add_argument("--tail", type=int, default=8, help="entity position counted from the end")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--small", action="store_true", help="a 4-layer d_model 64 model (smoke test)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, layer = args.one.split(":")
        res = one(mode, int(layer), args.steps, args.ctx, args.tail, args.batch, args.small)
        sys.stdout.write(json.dumps(res) + "\n")
        return
    rows = []
    for layer in args.layers:
        for mode in ("naive", "resid", "suffix"):
            cmd = [sys.executable, __file__, "--one", f"{mode}:{layer}", "--steps", str(args.steps),
                   "--ctx", str(args.ctx), "--tail", str(args.tail), "--batch", str(args.batch)]  # fmt: skip
            if args.small:
                cmd.append("--small")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = {r["layer"]: r["steps_per_s"] for r in rows if r["mode"] == "naive"}
    lines = [
        "| layer | mode | steps/s | speed-up vs naive | setup s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['mode']} | {r['steps_per_s']:.2f} | {r['steps_per_s'] / base[r['layer']]:.1f}x "
            f"| {r['setup_s']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
