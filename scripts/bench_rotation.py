"""One optimiser step of a DAS rotation (forward, backward, Adam) under each orthogonal map,
side by side in one run: ``python scripts/bench_rotation.py [--d 768] [--rounds 7]``.

Prints the median seconds per step of each map and their ratio, and the time of a
no-gradient call (scoring, refinement) with and without :func:`rotation`'s cache. Set
``OMP_NUM_THREADS`` to fix the thread count; the ratio is what to compare across machines."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saeravel.evals.ravel.intervene import ORTHOGONAL_MAPS, orthogonal_linear, rotation


def step_time(orthogonal_map: str, d: int, rounds: int) -> float:
    """Median seconds of one training step of a rotation under ``orthogonal_map``."""
    torch.manual_seed(0)
    lin = orthogonal_linear(d, orthogonal_map)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    x = torch.randn(64, d)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        loss = (x @ rotation(lin))[:, : d // 8].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    t = {m: step_time(m, a.d, a.rounds) for m in ORTHOGONAL_MAPS}
    for m in ORTHOGONAL_MAPS:
        print(
            f"{m:>10}: {t[m]:.4f} s per training step (d={a.d}, threads={torch.get_num_threads()})"
        )
    print(f"matrix_exp / cayley: {t['matrix_exp'] / t['cayley']:.1f}x")
    lin = orthogonal_linear(a.d, "matrix_exp")
    with torch.no_grad():
        rotation(lin)  # the one computation per parameter update
        t0 = time.perf_counter()
        for _ in range(a.rounds):
            lin.weight  # noqa: B018 (torch recomputes it on every access)
        plain = (time.perf_counter() - t0) / a.rounds
        t0 = time.perf_counter()
        for _ in range(a.rounds):
            rotation(lin)
        cached = (time.perf_counter() - t0) / a.rounds
    print(f"no-grad call, matrix_exp: {plain:.4f} s recomputed vs {cached:.6f} s cached")


if __name__ == "__main__":
    main()
