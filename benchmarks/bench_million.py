"""A million parameters on the CPU: the order-3 re-summed prediction of online SGD (issue 28).

Run: ``python benchmarks/bench_million.py`` (options ``--width``, ``--rows``, ``--rank``,
``--higher-rank``, ``--target-se``, ``--steps``, ``--lrs``, ``--threads``, ``--dtype``).
Builds ``smooth_convnet((3, 32, 32), 10, width=W)`` (tanh, no BatchNorm; ``W = 52``:
1,028,466 parameters, ``W = 12``: 55,906) on ``--rows`` synthetic CIFAR-shaped inputs
(standard normal, ``(n, 3, 32, 32)``) labelled by a fixed random teacher (the same
layout at ``width=8``, another seed: the argmax of its logits), then

1. ``perturb.measure(model, (x, y), order=3, resummed=True, rank=k, higher_rank=k_3,
   target_se=s, schedules=Online(T, B=1), lr=lrs)``: the default estimator (pilot and
   sketches) and the rank-``k`` Krylov subspace;
2. ``stats.predict(Online(T, 1), lr=lrs, order=3, resummed=True)``: the re-summed test
   loss, its standard error and the Krylov error ``|total(k) − total(k/2)|``;
3. ``stats.trust(...)``: the error estimate, the verdict and the trusted horizon.

Prints the parameter count, each phase's seconds, the peak resident memory of the process
(``resource.getrusage``: ``ru_maxrss``, the high-water mark of the whole run) after each
phase, the load average before and after, and the results.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import numpy as np
import torch

import perturb
from perturb.experiments.models import smooth_convnet


def _peak_gib() -> float:
    """The process's peak resident set so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=52)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--higher-rank", type=int, default=8)
    parser.add_argument("--target-se", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"load average before: {_load()}; torch {torch.__version__}, {args.threads} threads")

    start = time.perf_counter()
    model = smooth_convnet((3, 32, 32), 10, width=args.width, seed=0)
    teacher = smooth_convnet((3, 32, 32), 10, width=8, seed=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 3, 32, 32, generator=gen)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    params = sum(p.numel() for p in model.parameters())
    phases = {"build": time.perf_counter() - start}
    print(
        f"P = {params:,} parameters (width {args.width}), {args.rows} rows, rank {args.rank}, "
        f"higher_rank {args.higher_rank}, target_se {args.target_se:g}, {args.dtype}, "
        f"T = {args.steps}, lr {args.lrs}; peak RSS {_peak_gib():.2f} GiB"
    )

    schedule = perturb.Online(steps=args.steps, batch_size=1)
    start = time.perf_counter()
    stats = perturb.measure(
        model, (x, y), order=3, resummed=True, rank=args.rank, higher_rank=args.higher_rank,
        target_se=args.target_se, schedules=schedule, lr=args.lrs, dtype=dtype, force=True,
    )  # fmt: skip
    phases["measure"] = time.perf_counter() - start
    print(f"measure: {phases['measure']:.1f} s; peak RSS {_peak_gib():.2f} GiB; load {_load()}")
    plan = stats.meta.get("plan") if isinstance(stats.meta, dict) else None
    if isinstance(plan, dict):
        print("plan:", {k: v for k, v in plan.items() if k != "estimator"})
    sub = stats.subspace
    if sub is not None:
        print("Krylov cost:", {k: v for k, v in sub.cost.items() if v})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
        start = time.perf_counter()
        pred = stats.predict(schedule, lr=args.lrs, order=3, resummed=True)
        phases["predict"] = time.perf_counter() - start
        print(f"predict: {phases['predict']:.1f} s; peak RSS {_peak_gib():.2f} GiB")
        start = time.perf_counter()
        trust = stats.trust(schedule, lr=args.lrs, order=3, resummed=True)
        phases["trust"] = time.perf_counter() - start
        print(f"trust: {phases['trust']:.1f} s; peak RSS {_peak_gib():.2f} GiB")

    start_loss = float(pred.by_order[0, 0]) if pred.by_order.ndim == 2 else float("nan")
    print(f"\nl(θ_0) ≈ {start_loss:.6f}; unstable {pred.unstable}, growth {pred.growth:.3g}")
    print("| η | predicted E[l(θ_T)] | se | Krylov error | error_estimate | trusted "
          "| trusted steps |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---|---:|")
    error = pred.error if pred.error is not None else np.full(len(args.lrs), np.nan)
    for i, lr in enumerate(args.lrs):
        print(
            f"| {lr:g} | {float(pred.total[i]):.6f} | {float(pred.se[i]):.2g} "
            f"| {float(error[i]):.2g} | {float(trust.error_estimate[i]):.2g} "
            f"| {bool(trust.trusted[i])} | {int(trust.trusted_steps[i])} of {trust.steps} |"
        )
    total = sum(phases.values())
    cells = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    print(f"\nphases: {cells}; total {total:.1f} s")
    print(f"peak RSS {_peak_gib():.2f} GiB; load average after: {_load()}")


if __name__ == "__main__":
    main()
