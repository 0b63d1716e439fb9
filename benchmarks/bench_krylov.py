"""Time the Krylov (Lanczos) re-summed prediction on a ~100k-parameter convnet.

Run: ``python benchmarks/bench_krylov.py --device cpu|cuda --params 100000`` (options:
``--samples``, ``--rank``, ``--probes``, ``--dtype``, ``--weight-decay``, ``--chunk-size``,
``--seed``, ``--threads``, ``--lr-fractions``, ``--steps``).  Builds
``smooth_convnet((1, 28, 28), 10, width=W)``, ``W`` chosen so that the parameter count is
closest to ``--params`` (``W = 16``: 98,442), on random Gaussian images with random
labels (``--samples`` rows, the population), loss cross-entropy ``+ (wd/2)‖θ‖²``
(default ``wd = 0.2``: at a random initialization the cross-entropy Hessian has negative
eigenvalues, along which every re-summed prediction grows like ``(1 + η|λ|)^{2T}``; the
weight decay makes the point a stable one).  It builds one rank-``k`` Krylov subspace
(:func:`perturb.numeric.krylov.krylov_subspace`: ``k`` Hessian-vector products, ``1 + m``
gradients, ``n`` per-sample gradients) and times the order-2 re-summed test-loss
prediction of online SGD (``B = 1``) on a grid of ``η = f/λ_max`` (``λ_max`` the largest
Ritz value) and ``T ∈ {10², 10⁵}``, each with its ``k`` vs ``k/2`` error estimate, plus
the prediction from the first ``b, 2b, 4b, …, k`` basis vectors (``b = 1 + m``, the
block size) at one point.

Prints markdown tables: the build (parameters, rows, HVPs, gradients, per-sample
gradients, wall and process-CPU seconds, peak memory: ``torch.cuda.max_memory_allocated``
on CUDA, the process's peak resident set on the CPU), the extreme Ritz values, and the
predictions.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import perturb
from perturb.experiments.models import smooth_convnet
from perturb.numeric.adapters import cross_entropy_per_sample, flat_loss
from perturb.numeric.krylov import krylov_subspace


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _width_for(params: int) -> tuple[int, int]:
    best = None
    for width in range(1, 129):
        count = sum(p.numel() for p in smooth_convnet((1, 28, 28), 10, width=width).parameters())
        if best is None or abs(count - params) < abs(best[1] - params):
            best = (width, count)
        if count > params:
            break
    return best


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (peak RSS)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--probes", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--weight-decay", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--lr-fractions", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 100_000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    chunk = args.chunk_size or (args.samples if device.type == "cuda" else 128)

    width, count = _width_for(args.params)
    net = smooth_convnet((1, 28, 28), 10, width=width, seed=args.seed).to(device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.samples, 1, 28, 28, generator=gen).to(device, dtype)
    y = torch.randint(0, 10, (args.samples,), generator=gen).to(device)
    fn, theta0 = flat_loss(net, cross_entropy_per_sample)
    wd = args.weight_decay

    def loss_fn(p, xi, yi):  # one row; vectorized over rows by vmap
        return fn(p, xi[None], yi[None])[0] + 0.5 * wd * (p @ p)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    sub = krylov_subspace(
        loss_fn,
        (x, y),
        theta0,
        rank=args.rank,
        probes=args.probes,
        seed=args.seed,
        chunk_size=chunk,
        device=device,
        dtype=dtype,
    )
    _sync(device)
    build, build_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ritz = torch.linalg.eigvalsh(sub.hessian)
    cost = sub.cost
    print(
        f"## Krylov build: smooth_convnet width {width}, P = {count:,}, n = {args.samples}, "
        f"k = {args.rank}, m = {args.probes} probes, {args.dtype}, {args.device}\n"
    )
    print(
        "| HVPs | gradients | per-sample gradients | Lanczos s | build s | build CPU s "
        "| peak memory |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {cost['hvps']} | {cost['gradients']} | {cost['per_sample_gradients']} | "
        f"{cost['lanczos_seconds']:.1f} | {build:.1f} | {build_cpu:.1f} | "
        f"{_peak_memory(device)} |"
    )
    print(
        f"\nRitz values (wd = {wd}): min {float(ritz.min()):.4g}, "
        f"max {float(ritz.max()):.4g}; residual ‖HQ − QT‖_F = {sub.residual:.3g}\n"
    )
    lam = float(ritz.max())
    print("| η·λ_max | T | E[test loss] (order 2) | k vs k/2 error | predict s |")
    print("|---:|---:|---:|---:|---:|")
    for frac in args.lr_fractions:
        for steps in args.steps:
            sched = perturb.Online(steps=steps, batch_size=1)
            start = time.perf_counter()
            pred = sub.predict(sched, lr=frac / lam)
            seconds = time.perf_counter() - start
            print(
                f"| {frac:g} | {steps:,} | {pred.total:.8g} | {pred.total_error:.2g} | "
                f"{seconds:.3f} |"
            )
    frac, steps = args.lr_fractions[len(args.lr_fractions) // 2], max(args.steps)
    print(f"\nConvergence in the rank at η·λ_max = {frac:g}, T = {steps:,}:\n")
    print("| rank | E[test loss] (order 2) | vs rank k |")
    print("|---:|---:|---:|")
    sched = perturb.Online(steps=steps, batch_size=1)
    full = sub.predict(sched, lr=frac / lam).total
    ranks = [sub.block_size * 2**j for j in range(20) if sub.block_size * 2**j < args.rank]
    for rank in [*ranks, args.rank]:
        value = sub.predict(sched, lr=frac / lam, rank=rank).total
        print(f"| {rank} | {value:.8g} | {value - full:.2g} |")


if __name__ == "__main__":
    main()
