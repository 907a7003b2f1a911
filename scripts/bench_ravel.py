"""Benchmark: a RAVEL training step and whole jobs, saeravel beside the seed's algorithm, this
project's own ``eval.fast=false``, and pyvene and nnsight driven with their caching features.

A GPT-2-shaped model with random weights (12 layers, d_model 768, vocab 50257; no download),
built in transformers (``GPT2LMHeadModel``, what the peers drive) and converted to
transformer_lens (what saeravel drives), so every mode runs the same weights. Prompts of
``--ctx`` tokens share one template prefix, the entity ``--tail`` tokens from the end; batch
``--batch``; a mask over neurons (``b + sigmoid(m) * (s - b)`` at the entity's last token after
block L; ``--method das``: a DAS rotation with a mask) trained by Adam on the last token's
cross-entropy. Training-step modes:

- seed:       the seed's algorithm (SAE-Ravel): per step one nnsight trace of the source (the
              full model, to read the source vector) and one patched trace of the base (the
              full model, logits at every position), nothing cached; without nnsight the same
              two forwards through transformer_lens hooks;
- fast_false: this project's ``eval.fast=false``: base and source vectors read once per prompt
              (the job's vector bank), then one patched full forward of the base per step;
- saeravel:   ``SuffixRunner``: blocks after L on the entity and later tokens, one position
              unembedded (prefix keys/values per template, suffix residuals per prompt);
- pyvene:     tuned: ``IntervenableModel`` with its ``SigmoidMaskIntervention``, the source
              vector given once as ``source_representations``, the template prefix's
              ``past_key_values`` (a ``DynamicCache``) and ``logits_to_keep=1`` passed through,
              so each step runs the suffix through all blocks (``--method neurons`` only);
- nnsight:    tuned: one ``trace`` of the suffix with the same ``past_key_values`` and
              ``logits_to_keep=1``, the source vector read once.

FLOPs (analytic, per example): a block on n positions costs ``2n(4d^2 + 2 d d_mlp) + 4 d K``
(K: the keys its queries see), the unembedding ``2 d V`` per position; a backward pass is
counted as one forward of what follows the patch (gradients w.r.t. activations only: the
weights are frozen). The FLOP limit of a careful peer user: every block on the suffix (the
prefix cached), one position unembedded; saeravel skips blocks ``0..L`` on the suffix.

Whole job (``--job``): the real ``eval=ravel`` job (``saeravel.evals.ravel.main.run``: every
chosen method, refinement on, references, scoring, verdict) on synthetic pairs of two
attributes (``RavelJob.from_pairs``; the random model knows no facts, so the knowledge filter
is bypassed), ``--job-pairs`` training pairs per kind and attribute, ``--job-epochs`` epochs.
Job modes: saeravel (``eval.fast=true``), fast_false, and seed (``eval.fast=false`` with every
source vector recomputed by a full forward per call and the SAE re-encoding its inputs, as the
seed did). ``--job-configs``: ``all:<d_sae>`` (every method, a random top-k SAE), ``neurons``,
``das``, ``sae:<d_sae>``.

Timing is interleaved: every round runs each mode in turn, a ratio is taken per round and the
median over ``--rounds`` reported (sequential cells on a shared machine drift by 2x). Peers:
``pip install -e '.[bench]'`` (pyvene 0.1.8, nnsight 0.8.1); a missing one is skipped with that
line. Usage: ``python scripts/bench_ravel.py [--layers 1 5 9] [--rounds 3] [--small]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

log = logging.getLogger("bench_ravel")
PEERS = ("pyvene", "nnsight")
INSTALL = "pip install -e '.[bench]' (pyvene==0.1.8 nnsight==0.8.1)"
STEP_MODES = ("seed", "fast_false", "saeravel", "pyvene", "nnsight")
JOB_MODES = ("seed", "fast_false", "saeravel")


def shapes(small: bool) -> dict[str, int]:
    if small:
        return {"n_layers": 4, "d_model": 64, "n_heads": 4, "d_mlp": 256, "d_vocab": 1000}
    return {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072, "d_vocab": 50257}


def hf_model(s: dict[str, int], seed: int = 0) -> Any:
    """transformers' GPT-2 of shape ``s`` with random weights, frozen."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=s["n_layers"], n_embd=s["d_model"], n_head=s["n_heads"],
                     n_inner=s["d_mlp"], vocab_size=s["d_vocab"], n_positions=1024,
                     attn_implementation="eager")  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tl_model(s: dict[str, int], hf: Any = None) -> Any:
    """transformer_lens' GPT-2 of shape ``s``: ``hf``'s weights (unfolded), else random."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"],
        d_head=s["d_model"] // s["n_heads"], d_mlp=s["d_mlp"], d_vocab=s["d_vocab"], n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN",
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    if hf is not None:
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cache_kw() -> str:
    """transformers' name of the key/value cache argument (``cache`` from 5.x, before it
    ``past_key_values``, which 5.x still takes with a deprecation warning)."""
    import inspect

    from transformers import GPT2LMHeadModel

    params = inspect.signature(GPT2LMHeadModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def available(peer: str) -> bool:
    """Whether ``peer`` imports; if not, one line saying how to install it."""
    try:
        __import__(peer)
    except ImportError:
        log.warning("%s is not installed, its rows are skipped; install: %s", peer, INSTALL)
        return False
    return True


class Data:
    """Base and source prompts of one template (entity ``tail`` tokens from the end)."""

    def __init__(
        self, vocab: int, ctx: int, tail: int, batch: int, seed: int = 1, device: str = "cpu"
    ):
        from saeravel.evals.ravel.prompts import Prompt

        g = torch.Generator().manual_seed(seed)
        prefix = torch.randint(1, vocab, (ctx - tail,), generator=g).tolist()
        rest = torch.randint(1, vocab, (tail - 1,), generator=g).tolist()

        def prompt() -> Prompt:
            ent = int(torch.randint(1, vocab, (1,), generator=g))
            return Prompt("t", "e", "A", prefix + [ent] + rest, len(prefix), len(prefix))

        self.bases = [prompt() for _ in range(batch)]
        self.sources = [prompt() for _ in range(batch)]
        self.target = torch.randint(0, vocab, (batch,), generator=g).to(device)
        self.pos = len(prefix)
        self.prefix = torch.tensor([prefix], device=device)
        self.toks_b = torch.tensor([p.tokens for p in self.bases], device=device)
        self.toks_s = torch.tensor([p.tokens for p in self.sources], device=device)


def make_method(name: str, d: int) -> Any:
    from saeravel.evals.ravel.intervene import DAS, NeuronMask

    torch.manual_seed(0)
    return NeuronMask(d) if name == "neurons" else DAS(d)


class Cell:
    """One mode's training step (setup done in the constructor, outside timing): ``logits()``
    at the bases' last token with the mask patched in, ``step()`` one Adam step."""

    def __init__(self, mode: str, layer: int, tl: Any, hf: Any, data: Data, method: str):
        self.mode, self.data = mode, data
        self.method = make_method(method, tl.cfg.d_model).to(tl.cfg.device)
        self.params = list(self.method.parameters())
        self.logits: Callable[[], torch.Tensor] = getattr(self, f"_{mode}")(layer, tl, hf, data)
        self.opt = torch.optim.Adam(self.params, lr=1e-3)

    def set_mask(self, m: torch.Tensor) -> None:
        """Every mode's mask logits to ``m`` (pyvene's own intervention included)."""
        with torch.no_grad():
            for p in (self.method.mask.param, *getattr(self, "_peer_mask", ())):
                p.copy_(m)

    def loss(self) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits().float(), self.data.target)

    def step(self) -> float:
        loss = self.loss()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    # -- modes: each returns the logits closure
    def _seed(self, layer: int, tl: Any, hf: Any, d: Data) -> Callable[[], torch.Tensor]:
        rows = torch.arange(len(d.bases))
        if hf is not None and available("nnsight"):
            from nnsight import NNsight

            nm, self.mode = NNsight(hf), "seed (nnsight)"

            def logits() -> torch.Tensor:
                with nm.trace(d.toks_s):
                    src = nm.transformer.h[layer].output[rows, d.pos].save()
                with nm.trace(d.toks_b):
                    h = nm.transformer.h[layer].output
                    h[rows, d.pos] = self.method(h[rows, d.pos], src)
                    out = nm.lm_head.output[:, -1].save()
                return out

            return logits
        from saeravel.hooks import resid_post

        hook, self.mode = resid_post(layer), "seed (transformer_lens)"

        def logits_tl() -> torch.Tensor:
            _, cs = tl.run_with_cache(d.toks_s, names_filter=hook)  # the full model

            def patch(resid: torch.Tensor, hook: Any) -> torch.Tensor:
                resid = resid.clone()
                resid[rows, d.pos] = self.method(resid[rows, d.pos], cs[hook.name][rows, d.pos])
                return resid

            return tl.run_with_hooks(d.toks_b, fwd_hooks=[(hook, patch)])[:, -1]

        return logits_tl

    def _fast_false(self, layer: int, tl: Any, hf: Any, d: Data) -> Callable[[], torch.Tensor]:
        from saeravel.evals.ravel.intervene import naive_logits
        from saeravel.evals.ravel.pairs import VectorBank

        bank = VectorBank(tl, layer, d.bases + d.sources, 64)  # the job's, once per prompt
        vb, vs = bank(d.bases), bank(d.sources)
        return lambda: naive_logits(tl, d.bases, self.method(vb, vs), layer)

    def _saeravel(self, layer: int, tl: Any, hf: Any, d: Data) -> Callable[[], torch.Tensor]:
        from saeravel.evals.ravel.intervene import SuffixRunner

        runner = SuffixRunner(tl, layer)
        runner.prepare(d.bases + d.sources)
        vb = torch.stack([runner.suffix(p)[0] for p in d.bases])
        vs = torch.stack([runner.suffix(p)[0] for p in d.sources])
        return lambda: runner.logits(d.bases, self.method(vb, vs))

    def _hf_parts(self, layer: int, hf: Any, d: Data) -> tuple[Callable[[], Any], torch.Tensor]:
        """What a careful transformers user keeps: the template prefix's keys/values (a fresh
        batch-wide ``DynamicCache`` per call, since the forward appends to it) and each
        source's vector after block ``layer`` (read once: the model is frozen)."""
        from transformers import DynamicCache

        read: list[torch.Tensor] = []
        handle = hf.transformer.h[layer].register_forward_hook(lambda m, i, o: read.append(o))
        with torch.no_grad():
            pkv = hf(d.prefix, use_cache=True).past_key_values
            kv = [(lay.keys, lay.values) for lay in pkv.layers]
            hf(d.toks_s)
        handle.remove()
        n = len(d.bases)

        def cache() -> Any:
            return DynamicCache(
                [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv],
                config=hf.config,
            )

        return cache, read[-1][:, d.pos].clone()

    def _pyvene(self, layer: int, tl: Any, hf: Any, d: Data) -> Callable[[], torch.Tensor]:
        import pyvene as pv

        if not hasattr(self.method, "mask") or type(self.method).__name__ != "NeuronMask":
            raise ValueError("the pyvene row uses its own SigmoidMaskIntervention: neurons only")
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
        with torch.no_grad():
            iv.mask.zero_()  # NeuronMask's init
        self.params, self._peer_mask = [iv.mask], [iv.mask]
        cache, src = self._hf_parts(layer, hf, d)
        suffix = d.toks_b[:, d.pos :]
        kw = cache_kw()
        where = {"base": [[[0]] * len(d.bases)]}  # the entity: the suffix's first position
        src = src[:, None]

        def logits() -> torch.Tensor:
            base = {"input_ids": suffix, kw: cache(), "logits_to_keep": 1}
            _, out = im(base, unit_locations=where, source_representations=src)
            return out.logits[:, -1]

        return logits

    def _nnsight(self, layer: int, tl: Any, hf: Any, d: Data) -> Callable[[], torch.Tensor]:
        from nnsight import NNsight

        nm = NNsight(hf)
        cache, src = self._hf_parts(layer, hf, d)
        suffix = d.toks_b[:, d.pos :]
        rows, kw = torch.arange(len(d.bases)), cache_kw()

        def logits() -> torch.Tensor:
            with nm.trace(suffix, **{kw: cache()}, logits_to_keep=1):
                h = nm.transformer.h[layer].output
                h[rows, 0] = self.method(h[rows, 0], src)
                out = nm.lm_head.output[:, -1].save()
            return out

        return logits


def step_flops(mode: str, layer: int, s: dict[str, int], ctx: int, tail: int) -> float:
    """Analytic FLOPs of one training step per example (see the module docstring); ``peer``
    is the FLOP limit of a careful peer user."""
    d, f, V, n_layers = s["d_model"], s["d_mlp"], s["d_vocab"], s["n_layers"]

    def block(n: int, first: int) -> float:  # n positions from `first`, causal keys
        keys = sum(first + i + 1 for i in range(n))
        return 2 * n * (4 * d * d + 2 * d * f) + 4 * d * keys

    def unembed(n: int) -> float:
        return 2 * n * d * V

    full, suf = block(ctx, 0), block(tail, ctx - tail)
    after = n_layers - layer - 1
    if mode.startswith("seed"):
        return 2 * (n_layers * full + unembed(ctx)) + after * full + unembed(ctx)
    if mode == "fast_false":
        return n_layers * full + unembed(ctx) + after * full + unembed(ctx)
    if mode in ("peer", "pyvene", "nnsight"):
        return n_layers * suf + unembed(1) + after * suf + unembed(1)
    if mode == "saeravel":
        return 2 * (after * suf + unembed(1))
    raise ValueError(f"unknown mode {mode!r}")


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


def step_table(args: Any, s: dict[str, int], tl: Any, hf: Any, peers: list[str]) -> list[str]:
    data = Data(s["d_vocab"], args.ctx, args.tail, args.batch, device=args.device)
    lines = [
        f"Training step, method {args.method}: s/step and ratios are medians over "
        f"{args.rounds} interleaved rounds of {args.steps} step(s); FLOPs analytic per example",
        "",
        "| layer | mode | s/step | speed-up vs seed | saeravel ahead by | GFLOP/example | "
        "FLOP ratio seed/mode | measured / FLOP speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    modes = [m for m in args.modes if m not in PEERS or m in peers]
    if args.method != "neurons":
        modes = [m for m in modes if m != "pyvene"]
    for layer in args.layers:
        cells = {m: Cell(m, layer, tl, hf, data, args.method) for m in modes}
        t = interleaved({m: c.step for m, c in cells.items()}, args.rounds, args.steps)
        seed_flops = step_flops("seed", layer, s, args.ctx, args.tail)
        for m, c in cells.items():
            fl = step_flops(m, layer, s, args.ctx, args.tail)
            up = median_ratio(t, "seed", m) if "seed" in t else float("nan")
            ahead = "" if m in ("seed", "saeravel") else f"{median_ratio(t, m, 'saeravel'):.1f}x"
            lines.append(f"| {layer} | {c.mode} | {statistics.median(t[m]):.3f} | {up:.1f}x | "
                         f"{ahead} | {fl / 1e9:.2f} | {seed_flops / fl:.1f}x | "
                         f"{up / (seed_flops / fl):.0%} |")  # fmt: skip
        peer = step_flops("peer", layer, s, args.ctx, args.tail)
        sae = step_flops("saeravel", layer, s, args.ctx, args.tail)
        lines.append(f"| {layer} | FLOP limit of a careful peer (all blocks on the suffix) | | | "
                     f"{peer / sae:.2f}x (FLOPs) | {peer / 1e9:.2f} | {seed_flops / peer:.1f}x | |")  # fmt: skip
    return lines


# ----------------------------------------------------------------------------- whole jobs


def random_sae(d_in: int, d_sae: int, k: int, seed: int = 0) -> Any:
    """A random top-``k`` SAE of ``d_sae`` latents (unit decoder rows, tied encoder)."""
    from saeravel.saes.base import SAE, SAEIdentity

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return SAE(W_dec.T.clone(), torch.zeros(d_sae), W_dec, torch.zeros(d_in), activation="topk",
               k=k, hook_name="bench", identity=SAEIdentity("random"))  # fmt: skip


def synthetic_pairs(tl: Any, args: Any, n_values: int = 6) -> tuple[Any, dict[str, Any]]:
    """A world of entities with two attributes ``A``, ``B`` (one template each: a random
    prefix, the entity, a random tail) and RAVEL's pairs: per attribute intervened and split,
    ``--job-pairs`` cause pairs (base and source of that attribute, the source's value) and as
    many isolation pairs (base of the other attribute, its own value); the test split has
    ``--job-test`` of each."""
    from saeravel.evals.ravel.prompts import Pair, Prompt

    vocab = tl.cfg.d_vocab
    g = torch.Generator().manual_seed(3)

    def rand(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    attrs = ("A", "B")
    tpl = {a: (rand(args.ctx - args.tail), rand(args.tail - 1)) for a in attrs}
    value_tok = {a: rand(n_values) for a in attrs}
    n_ent = 60
    ents = {f"e{i}": {a: str(int(torch.randint(0, n_values, (1,), generator=g))) for a in attrs}
            for i in range(n_ent)}  # fmt: skip
    ent_tok = dict(zip(ents, rand(n_ent), strict=True))
    split_of = {e: ("train", "train", "val", "test", "train", "test")[i % 6]
                for i, e in enumerate(ents)}  # fmt: skip
    prompts: dict[tuple[str, str], Prompt] = {}

    def prompt(e: str, a: str) -> Prompt:
        if (e, a) not in prompts:
            pre, rest = tpl[a]
            prompts[e, a] = Prompt(a, e, a, pre + [ent_tok[e]] + rest, len(pre), len(pre))
        return prompts[e, a]

    def pair(b: str, src: str, a: str, kind: str) -> Pair:
        ask = a if kind == "cause" else next(x for x in attrs if x != a)
        val = ents[src if kind == "cause" else b][ask]
        tok = value_tok[ask][int(val)]
        return Pair(prompt(b, ask), prompt(src, a), a, kind, val, tok, [tok] * args.job_tokens)

    pairs: dict[str, dict[str, list[Any]]] = {}
    for a in attrs:
        pairs[a] = {}
        for split in ("train", "val", "test"):
            pool = [e for e in ents if split_of[e] == split]
            n = args.job_test if split == "test" else args.job_pairs
            if split == "val":
                n = max(2, n // 4)
            rows = []
            for kind in ("cause", "isolation"):
                for i in range(n):
                    b, src = pool[i % len(pool)], pool[(i * 7 + 1) % len(pool)]
                    rows.append(pair(b, src, a, kind))
            pairs[a][split] = rows
    world = SimpleNamespace(entities=ents)
    return world, pairs


class SeedBank:
    """The seed's vectors: a source's vector recomputed by a full forward at every call (the
    seed traced the whole model on the source each step), a base's from the job's bank."""

    def __init__(self, bank: Any, model: Any, layer: int, sources: set[int]) -> None:
        self.bank, self.model, self.layer, self.sources = bank, model, layer, sources

    def __call__(self, prompts: list[Any]) -> torch.Tensor:
        if not any(id(p) in self.sources for p in prompts):
            return self.bank(prompts)
        from saeravel.evals.ravel.prompts import pad
        from saeravel.hooks import resid_post

        hook = resid_post(self.layer)
        with torch.no_grad():
            toks, _ = pad(prompts, 0, self.model.cfg.device)
            _, cache = self.model.run_with_cache(toks, names_filter=hook)  # the full model
        pos = torch.tensor([p.entity_pos for p in prompts])
        return cache[hook][torch.arange(len(prompts)), pos].float()


def job_cell(mode: str, layer: int, tl: Any, spec: str, args: Any) -> Callable[[], dict]:
    """A closure running one whole job (``spec``: ``all:<d_sae>``, ``neurons``, ``das``,
    ``sae:<d_sae>``) in ``mode``, setup (caches, banks) included; returns the metrics."""
    from omegaconf import OmegaConf

    from saeravel.evals.ravel import main as ravel_main
    from saeravel.evals.ravel.config import RavelEvalConfig
    from saeravel.evals.ravel.pairs import RavelJob
    from saeravel.hooks import resid_post

    method, _, d_sae = spec.partition(":")
    sae = random_sae(tl.cfg.d_model, int(d_sae), args.sae_k).to(args.device) if d_sae else None
    world, pairs = synthetic_pairs(tl, args)
    cfg = OmegaConf.structured(RavelEvalConfig())
    cfg.method, cfg.attributes, cfg.isolation_attributes = method, ["A", "B"], []
    cfg.epochs, cfg.fast, cfg.bootstrap = args.job_epochs, mode == "saeravel", 100
    cfg.match_tokens, cfg.save_artifacts = args.job_tokens, False
    cfg.checkpoint_every_s, cfg.checkpoint_every_steps = 0, 0
    cfg.mask.refine_budget, cfg.mask.refine_pairs = args.job_refine_budget, 256
    out = tempfile.mkdtemp(prefix="bench_ravel_")
    ctx = SimpleNamespace(seed=0, layer=layer, sae=sae, device=args.device, output_dir=out,
                          hook_name=resid_post(layer), checkpoint=None,
                          model=SimpleNamespace(model=tl, d_model=tl.cfg.d_model, name="bench"))  # fmt: skip
    stats = {"split_note": "synthetic pairs (bench)"}

    def build(cls: Any, cfg: Any, ctx: Any, store: Any) -> Any:
        job = cls.from_pairs(cfg, ctx, world, pairs, dict(stats), store)
        if mode == "seed":
            srcs = {id(q.source) for d in pairs.values() for ps in d.values() for q in ps}
            job.bank, job.latents = SeedBank(job.bank, tl, layer, srcs), None
        return job

    def run() -> dict:
        with mock.patch.object(RavelJob, "build", classmethod(build)):
            return ravel_main.run(cfg, ctx).metrics

    return run


def job_table(args: Any, s: dict[str, int], tl: Any) -> list[str]:
    others = [m for m in args.job_modes if m != "saeravel"]
    if others and "saeravel" not in args.job_modes:
        raise SystemExit("--job-modes: the speed-ups are saeravel's; include saeravel")
    cols = [f"{m} s" for m in args.job_modes] + [f"saeravel's speed-up vs {m}" for m in others]
    lines = [
        "",
        f"Whole job (eval=ravel on synthetic pairs of 2 attributes: {args.job_pairs} cause + "
        f"{args.job_pairs} isolation training pairs and {args.job_test} + {args.job_test} test "
        f"pairs per attribute, {args.job_epochs} epochs, refinement budget "
        f"{args.job_refine_budget}, {args.job_tokens} tokens scored; seconds are medians of "
        f"{args.job_rounds} interleaved round(s))",
        "",
        "| layer | job | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]  # fmt: skip
    for layer in args.layers:
        for spec in args.job_configs:
            cells = {m: job_cell(m, layer, tl, spec, args) for m in args.job_modes}
            t = interleaved(cells, args.job_rounds, 1, warm=False)
            cells_out = [f"{statistics.median(t[m]):.1f}" for m in args.job_modes]
            cells_out += [f"{median_ratio(t, m, 'saeravel'):.1f}x" for m in others]
            lines.append(f"| {layer} | {spec} | " + " | ".join(cells_out) + " |")
            log.info("%s", lines[-1])  # each row as it is measured
    return lines


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 5, 9])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="training steps per timed cell")
    ap.add_argument("--method", choices=("neurons", "das"), default="neurons")
    ap.add_argument("--modes", nargs="+", choices=STEP_MODES, default=list(STEP_MODES))
    ap.add_argument("--ctx", type=int, default=60)
    ap.add_argument("--tail", type=int, default=8, help="entity position counted from the end")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-steps", action="store_true", help="skip the training-step table")
    ap.add_argument("--job", action="store_true", help="also time whole jobs")
    ap.add_argument("--job-configs", nargs="+", default=["all:24576", "neurons", "das",
                                                         "sae:24576", "sae:131072"])  # fmt: skip
    ap.add_argument("--job-modes", nargs="+", choices=JOB_MODES, default=["seed", "saeravel"])
    ap.add_argument("--job-pairs", type=int, default=16, help="training pairs per kind")
    ap.add_argument("--job-test", type=int, default=16, help="test pairs per kind")
    ap.add_argument("--job-epochs", type=int, default=2)
    ap.add_argument("--job-refine-budget", type=int, default=64)
    ap.add_argument("--job-tokens", type=int, default=3)
    ap.add_argument("--job-rounds", type=int, default=1)
    ap.add_argument("--sae-k", type=int, default=64, help="active latents of the random SAE")
    ap.add_argument("--small", action="store_true", help="a 4-layer d_model 64 model (smoke test)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (scripts/gpu_check.sh)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("saeravel").setLevel(logging.WARNING)  # the jobs' own progress lines
    s = shapes(args.small)
    if max(args.layers) >= s["n_layers"] - 1:
        raise SystemExit(f"--layers must be below {s['n_layers'] - 1} (a block must follow)")
    if args.small:
        args.sae_k = min(args.sae_k, 8)
        args.job_configs = [c if ":" not in c else f"{c.split(':')[0]}:512"
                            for c in args.job_configs]  # fmt: skip
    hf = hf_model(s)
    tl = tl_model(s, hf).to(args.device)
    hf.to(args.device)
    peers = [p for p in PEERS if p in args.modes and available(p)]
    where = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
             else f"CPU, torch threads {torch.get_num_threads()}")  # fmt: skip
    lines = [f"GPT-2 shape {s}, prompts of {args.ctx} tokens (entity {args.tail} from the end), "
             f"batch {args.batch}, float32, {where}", ""]  # fmt: skip
    if not args.no_steps:
        lines += step_table(args, s, tl, hf, peers)
    if args.job:
        lines += job_table(args, s, tl)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
