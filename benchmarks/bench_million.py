"""A million parameters on the CPU: the order-3 re-summed prediction of online SGD (issue 28).

Run: ``python benchmarks/bench_million.py`` (options ``--model``, ``--hidden``,
``--width``, ``--rows``, ``--rank``, ``--higher-rank``, ``--target-se``, ``--steps``,
``--lrs``, ``--threads``, ``--dtype``).  Builds, for 3×32×32 inputs and 10 classes,

* ``--model stem`` (default): ``stem_mlp((3, 32, 32), 10, hidden=H)`` — 2×2 average
  pooling, a 3×3 tanh convolution of 16 channels, a dense tanh layer of ``H`` units and
  a linear classifier (``H = 244``: 1,002,566 parameters, ``H = 24``: 99,026), about
  2.2 MFLOP per row forward;
* ``--model convnet``: ``smooth_convnet((3, 32, 32), 10, width=W)`` (``W = 52``:
  1,028,466 parameters, about 240 MFLOP per row forward),

both analytic (tanh, no BatchNorm), on ``--rows`` synthetic CIFAR-shaped inputs (standard
normal, ``(n, 3, 32, 32)``) labelled by a fixed random teacher (``smooth_convnet`` at
``width=8``, seed 1: the argmax of its logits), then

1. ``perturb.measure(model, (x, y), order=3, resummed=True, rank=k, higher_rank=k_3,
   target_se=s, schedules=Online(T, B=1), lr=lrs)``: the default estimator (pilot and
   sketches) and the rank-``k`` Krylov subspace, the rows of every vectorized per-row
   call from :func:`perturb.numeric.derivatives.vmap_rows` (memory bounded by design: no
   ``P × n`` tensor).  ``target_se`` plans the un-resummed series' statistics (the
   sketches); the re-summed prediction and its error bar come from the Krylov build over
   all the rows;
2. ``stats.predict(Online(T, 1), lr=lrs, order=3, resummed=True)``: the re-summed test
   loss, its standard error and the Krylov error ``|total(k) − total(k/2)|``;
3. ``stats.trust(...)``: the error estimate, the verdict and the trusted horizon.

Defaults (the issue-28 run): ``H = 244``, 1,024 rows, rank 32, higher rank 8, target
standard error 0.2, ``T = 100``, ``η ∈ {0.0003, 0.001, 0.003}``, float32, 2 threads.
Prints the parameter count, each phase's seconds (inside ``measure``: the pilot, the
sketches, the Krylov build and its Lanczos part), the peak resident memory of the process
(``resource.getrusage``: ``ru_maxrss``, the high-water mark of the whole run) after each
phase, the load average before and after, and the results.  Progress bars (standard
error) show every phase of ``measure`` that lasts more than a few seconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import time
import warnings

import numpy as np
import torch

import perturb
import perturb.numeric.measuring as measuring
from perturb.experiments.models import smooth_convnet, stem_mlp
from perturb.numeric.derivatives import MAX_VMAP_ROWS, vmap_rows


def _peak_gib() -> float:
    """The process's peak resident set so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _timed(name: str, phases: dict[str, float]) -> None:
    """Time every call of ``measuring.<name>`` into ``phases[name]`` (the pilot, the
    Krylov build: the functions ``measure`` calls for them)."""
    fn = getattr(measuring, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
            print(f"  {name}: {phases[name]:.1f} s; peak RSS {_peak_gib():.2f} GiB", flush=True)

    setattr(measuring, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("stem", "convnet"), default="stem")
    parser.add_argument("--hidden", type=int, default=244, help="stem: dense units")
    parser.add_argument("--width", type=int, default=52, help="convnet: stem channels")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--higher-rank", type=int, default=8)
    parser.add_argument("--target-se", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.0003, 0.001, 0.003])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"load average before: {_load()}; torch {torch.__version__}, {args.threads} threads")

    start = time.perf_counter()
    if args.model == "stem":
        model = stem_mlp((3, 32, 32), 10, hidden=args.hidden, seed=0)
        label = f"stem_mlp, hidden {args.hidden}"
    else:
        model = smooth_convnet((3, 32, 32), 10, width=args.width, seed=0)
        label = f"smooth_convnet, width {args.width}"
    teacher = smooth_convnet((3, 32, 32), 10, width=8, seed=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 3, 32, 32, generator=gen)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    params = sum(p.numel() for p in model.parameters())
    phases = {"build": time.perf_counter() - start}
    print(
        f"P = {params:,} parameters ({label}), {args.rows} rows, rank {args.rank}, "
        f"higher_rank {args.higher_rank}, target_se {args.target_se:g}, {args.dtype}, "
        f"T = {args.steps}, lr {args.lrs}; peak RSS {_peak_gib():.2f} GiB"
    )

    size = torch.empty((), dtype=dtype).element_size()
    print(
        f"rows per vectorized call: per-row gradients and Hessian-vector products "
        f"{vmap_rows(params, itemsize=size, order=2)}, order-3 tuple nodes "
        f"{min(16, vmap_rows(params, itemsize=size, order=3))}, summed passes {MAX_VMAP_ROWS}"
    )
    inner: dict[str, float] = {}
    _timed("pilot_plan", inner)
    _timed("krylov_subspace", inner)
    schedule = perturb.Online(steps=args.steps, batch_size=1)
    start = time.perf_counter()
    stats = perturb.measure(
        model, (x, y), order=3, resummed=True, rank=args.rank, higher_rank=args.higher_rank,
        target_se=args.target_se, schedules=schedule, lr=args.lrs, dtype=dtype, force=True,
    )  # fmt: skip
    phases["measure"] = time.perf_counter() - start
    rest = phases["measure"] - sum(inner.values())
    print(f"measure: {phases['measure']:.1f} s; peak RSS {_peak_gib():.2f} GiB; load {_load()}")
    plan = stats.meta.get("plan") if isinstance(stats.meta, dict) else None
    if isinstance(plan, dict):
        print("plan:", {k: v for k, v in plan.items() if k not in ("estimator", "contractions")})
    sub = stats.subspace
    lanczos = sub.cost.get("lanczos_seconds", float("nan")) if sub is not None else float("nan")
    print(
        f"  pilot {inner.get('pilot_plan', 0.0):.1f} s, sketches (and set-up) {rest:.1f} s, "
        f"Krylov {inner.get('krylov_subspace', 0.0):.1f} s (gradients and Lanczos "
        f"{lanczos:.1f} s); {stats.rows} rows in {stats.groups} groups"
    )
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
