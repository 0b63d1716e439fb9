"""Convergence in the Krylov rank k of the measure path's re-summed predictions, 25k parameters.

Run: ``python benchmarks/bench_krylov_rank.py`` (options ``--rows``, ``--width``,
``--ranks``, ``--higher-rank``, ``--steps``, ``--lrs``, ``--threads``).  Builds
``smooth_convnet((1, 28, 28), 10, width=W)`` (``W = 8``: 25,034 parameters),
on the built-in digits upsampled bilinearly to 28×28 (``--rows`` of them: the population),
builds once the Krylov subspace that ``perturb.measure(..., resummed=True, rank=max(ranks),
higher_rank=...)`` builds (:func:`perturb.krylov_subspace` with ``order=3``, float32
network evaluations; the diagram statistics of the un-resummed series are not needed
here) and prints, for online SGD (``B = 1``, ``T`` steps)
on a grid of learning rates, the re-summed test loss with two and three edges from the
first ``k`` basis vectors for every ``k`` in ``--ranks`` (``KrylovSubspace`` is nested,
so one build serves every ``k``), its difference to the largest ``k`` (no eigendecomposition
of a ``P×P`` Hessian is possible here: the largest rank is the reference) and the
``k`` vs ``k/2`` error estimate, as a markdown table, with the build's cost.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import perturb
from perturb.experiments.data import load_dataset
from perturb.experiments.models import smooth_convnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--higher-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.02, 0.05])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("digits", split="train").subset(args.rows, seed=0)
    x = torch.nn.functional.interpolate(data.x, size=(28, 28), mode="bilinear")
    net = smooth_convnet((1, 28, 28), 10, width=args.width, seed=0)
    p = sum(t.numel() for t in net.parameters())
    top = max(args.ranks)
    schedule = perturb.Online(steps=args.steps, batch_size=1)
    start = time.perf_counter()
    sub = perturb.krylov_subspace(
        net, (x, data.y), rank=top, order=3, schedules=[schedule], dtype=torch.float32,
        higher_rank=args.higher_rank,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    cost = {k: v for k, v in sub.cost.items() if v}
    print(f"P = {p}, rows = {args.rows}, T = {args.steps}, build {seconds:.1f} s; cost {cost}")
    ritz = sub.ritz_values()
    print(f"Ritz values in [{float(ritz.min()):.4g}, {float(ritz.max()):.4g}]\n")
    lrs = list(args.lrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        rows = {}
        for k in args.ranks:
            t0 = time.perf_counter()
            fine = np.cumsum(sub.values(schedule, lr=lrs, rank=k), axis=1)
            coarse = np.cumsum(sub.values(schedule, lr=lrs, rank=k // 2), axis=1)
            rows[k] = (fine, np.abs(fine - coarse), time.perf_counter() - t0,
                       sub.ranks(schedule, "test", 3, rank=k))  # fmt: skip
    ref = rows[top][0]
    head = " | ".join(f"η = {lr:g}" for lr in lrs)
    print(f"| k (3-edge k_3) | edges | {head} | max diff to k = {top} | max k vs k/2 | s |")
    print("|---|---:|" + "---:|" * len(lrs) + "---:|---:|---:|")
    for k, (values, error, secs, ranks) in rows.items():
        for d in (2, 3):
            cells = " | ".join(f"{v:.6f}" for v in values[:, d])
            diff = np.max(np.abs(values[:, d] - ref[:, d]))
            print(
                f"| {k} ({ranks[3]}) | {d} | {cells} | {diff:.2g} | {np.max(error[:, d]):.2g} "
                f"| {secs:.2f} |"
            )


if __name__ == "__main__":
    main()
