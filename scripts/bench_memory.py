"""Benchmark: peak memory of RAVEL's ``sae_probe`` selection and of one scoring decode, before
and after the probe read sparse latents and the decoder sized its passes by
``eval.decode_mem_gb``.

Each measurement runs in its own process on the CPU: the inputs are built, the kernel's peak
resident set (``VmHWM``) is reset (``/proc/self/clear_refs``), the step runs, and the peak
minus the resident set before the step is reported (what the step itself held at its peak).
"Before" is the code at ``--before`` (a git revision: the last commit without these changes),
loaded from git into a module of its own; "after" is this tree's.

- ``probe``: a random top-k SAE (``--latents`` latents, k ``--k``, d_model 768) encodes
  ``--prompts`` random vectors, and the value probe (``--values`` values, ``--steps`` Adam
  steps: its memory does not grow with the steps) ranks the latents. Before: every prompt's
  latents dense, the probe on the dense standardised matrix. After: the latents sparse
  (encoded 256 rows at a time), the probe on them.
- ``decode``: a GPT-2-shaped model with random weights (``bench_ravel.py``'s), ``--bases``
  prompts of one template (``--prefix`` tokens before the entity, ``--suffix`` from it on),
  ``--sets`` vector sets patched after block ``--layer``, ``--tokens`` generated. Before: the
  decoder's passes of 256 rows and its clean cache of every base. After: passes within
  ``--mem-gb`` GB, the clean cache dropped after each. Both include the unembedding's
  transposed copy (``intervene.unembed``, 154 MB at GPT-2), made on the first call and kept.

Usage: ``python scripts/bench_memory.py [probe|decode|all] [--small]`` (a table per part).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("probe", "decode", "all")
BEFORE = "eec896f"  # main before eval.decode_mem_gb and the sparse probe


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(step: Any) -> dict[str, float]:
    """Run ``step()``; the peak resident set it added (MB) and its seconds."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    t = time.perf_counter()
    step()
    return {"peak_mb": (_rss_kb("VmHWM") - before) / 1024, "s": time.perf_counter() - t}


def _old_module(rev: str, rel: str, name: str) -> Any:
    """``rel`` (a module of this package) as it was at git revision ``rev``."""
    text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def probe(args: Any) -> dict[str, float]:
    from saeravel.saes.base import SAE, SAEIdentity

    g = torch.Generator().manual_seed(0)
    d, n = 768, args.prompts
    W = torch.randn(d, args.latents, generator=g) / d**0.5
    sae = SAE(W, torch.zeros(args.latents), W.T.contiguous(), torch.zeros(d), activation="topk",
              k=args.k, hook_name="blocks.5.hook_resid_post", identity=SAEIdentity("bench"))  # fmt: skip
    x = torch.randn(n, d, generator=g)
    labels = [str(i % args.values) for i in torch.randperm(n, generator=g).tolist()]
    out: dict[str, Any] = {}
    if args.path == "before":
        old = _old_module(args.before, "src/saeravel/evals/ravel/featurizers.py", "old_feat")

        def step() -> None:
            lat = old.sae_latents(sae, x).float().cpu()
            out["ranked"] = old.rank_latents_by_probe(lat, labels, args.steps)[0][:8]
    else:
        from saeravel.evals.ravel.featurizers import rank_latents_by_probe, sparse_sae_latents

        def step() -> None:
            lat = sparse_sae_latents(sae, x)
            out["nnz"] = lat._nnz()
            out["ranked"] = rank_latents_by_probe(lat, labels, args.steps)[0][:8]

    return {**_measure(step), **out}


def decode(args: Any) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_ravel import shapes, tl_model

    from saeravel.evals.ravel.prompts import Prompt

    torch.manual_seed(0)
    model = tl_model(shapes(args.small))
    g = torch.Generator().manual_seed(1)
    vocab, d = model.cfg.d_vocab, model.cfg.d_model
    prefix = torch.randint(10, vocab, (args.prefix,), generator=g).tolist()
    prompts = []
    for _ in range(args.bases):
        rest = torch.randint(10, vocab, (args.suffix,), generator=g).tolist()
        prompts.append(Prompt("t", "e", "A", prefix + rest, args.prefix, args.prefix))
    sets = [torch.randn(args.bases, d, generator=g) for _ in range(args.sets)]
    out: dict[str, Any] = {}
    if args.path == "before":
        old = _old_module(args.before, "src/saeravel/evals/ravel/decode.py", "old_decode")
        dec = old.CachedDecoder(model, args.layer)
    else:
        from saeravel.evals.ravel.decode import CachedDecoder

        dec = CachedDecoder(model, args.layer, args.mem_gb)
        per = dec.pass_size(args.sets, args.prefix, args.prefix + args.suffix, args.tokens)
        out["rows_per_pass"] = per * args.sets
        est = dec.pass_bytes(per, args.sets, args.prefix, args.prefix + args.suffix, args.tokens)
        out["estimate_mb"] = est / 2**20

    def step() -> None:
        out["gens"] = dec.generate(prompts, args.tokens, sets)[0][:2]

    return {**_measure(step), **out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", default="all", choices=["probe", "decode", "all"])
    p.add_argument("--path", choices=["before", "after"], help="one measurement (internal)")
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' code")
    p.add_argument("--latents", type=int, default=131072)
    p.add_argument("--prompts", type=int, default=5000)
    p.add_argument("--values", type=int, default=158)  # RAVEL's city countries
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bases", type=int, default=128)
    p.add_argument("--prefix", type=int, default=80)
    p.add_argument("--suffix", type=int, default=3)
    p.add_argument("--sets", type=int, default=2)
    p.add_argument("--tokens", type=int, default=3)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--mem-gb", type=float, default=1.0)
    p.add_argument("--small", action="store_true", help="tiny shapes (a quick check)")
    args = p.parse_args(argv)
    if args.small:
        args.latents, args.prompts, args.bases, args.prefix, args.layer = 4096, 500, 16, 20, 2
    torch.set_num_threads(1)
    if args.path:  # one measurement in this process
        print(json.dumps((probe if args.part == "probe" else decode)(args)))
        return
    parts = ["probe", "decode"] if args.part == "all" else [args.part]
    rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in PARTS]
    for part in parts:
        print(f"## {part}")
        for path in ("before", "after"):
            cmd = [sys.executable, __file__, part, "--path", path, *rest]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            print(path, res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
