"""Benchmark: throughput of measure/simulate per device, and scaling over K processes.

Workload: ``smooth_convnet((1, S, S), 10, width=W)`` (``S = 28``, ``W = 16``: 98,442
parameters) on random images with random labels; ``measure`` of the order-``d`` online
test-loss series (estimator ``"tuples"``, ``R`` tuples, float32) and ``simulate`` of
``K`` online-SGD trials of ``T`` steps at two learning rates (float32; the final test
loss on the first ``--test-rows`` images, 1,024).

Two modes:

* **one process** (plain ``python``, or ``torchrun --nproc-per-node 1``): single-device
  throughput, then a projection for ``K`` devices.  For each ``K`` in ``--worlds`` it
  times exactly the work rank 0 of a ``K``-process job does (its tuples
  ``shard(R, 0, K)`` via ``measure(..., tuple_range=...)`` and its trials
  ``range(⌈K_trials/K⌉)``) on this device, and adds the communication time of the
  all-gathers, ``n·latency + (K−1)/K · bytes / bandwidth`` with ``bytes`` from
  :func:`perturb.numeric.distributed.communication_bytes` (ring all-gather; ``n`` collectives:
  one per contraction plus one layout check for ``measure``, five for ``simulate``).
  The projection assumes identical devices, no contention for host resources and the
  given interconnect (``--bandwidth-gbs``, default 25 GB/s: a conservative bus bandwidth
  for an all-gather over PCIe or 200 Gb/s InfiniBand; NVLink within one H100 node
  reaches several hundred GB/s) and latency (``--latency-us``, default 50 µs).
* **K > 1 processes** (``torchrun --nproc-per-node K``): a real strong-scaling run: the
  full ``measure`` and ``simulate`` split across the ranks (as every perturb call does
  under ``torchrun``); rank 0 prints the wall time between barriers.
* **the default path** (``--default-path``, any number of processes): ``measure`` with
  its defaults (estimator ``"auto"``: pilot and sketches; float64; online and epoch
  schedules) and ``resummed=True`` (rank ``--rank``, ``--higher-rank``) on ``--rows``
  random images, split across the ranks, then the re-summed online prediction; rank 0
  prints the wall time between barriers (slowest rank) and the prediction, so runs on
  different numbers of processes can be compared side by side.

Usage::

    python benchmarks/bench_distributed.py --device cuda
    torchrun --nproc-per-node 1 benchmarks/bench_distributed.py --device cuda --backend nccl
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/bench_distributed.py \\
        --side 8 --width 4 --tuples 512 --trials 64 --steps 10       # CPU, Gloo
    for k in 1 2; do OMP_NUM_THREADS=1 torchrun --nproc-per-node $k \\
        benchmarks/bench_distributed.py --default-path --threads 1; done  # 98k, default path
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from perturb import distributed as D
from perturb.experiments.models import smooth_convnet
from perturb.experiments.simulation import Trials, model_loss, simulate
from perturb.numeric.measuring import measure
from perturb.numeric.statistics import Statistics
from perturb.symbolic.schedules import Online


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if D.world()[1] > 1:
        dist.barrier()


def _timed(fn: Callable[[], object], device: torch.device, repeat: int) -> tuple[float, object]:
    """Best wall-clock seconds of ``repeat`` runs (between barriers), and the last result."""
    best, out = math.inf, None
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    if D.world()[1] > 1:  # every rank reports the slowest rank's time
        slowest = torch.tensor([best], dtype=torch.float64, device=_collective_device(device))
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        best = float(slowest.item())
    return best, out


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _comm_seconds(nbytes: int, world: int, collectives: int, gbs: float, us: float) -> float:
    """Ring all-gather time: latency per collective plus (W−1)/W of the bytes over the link."""
    if world == 1:
        return 0.0
    return collectives * us * 1e-6 + (world - 1) / world * nbytes / (gbs * 1e9)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print markdown tables (rank 0 only)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    parser.add_argument("--side", type=int, default=28, help="image side S")
    parser.add_argument("--width", type=int, default=16, help="convnet width W")
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--tuples", type=int, default=4096, help="R, tuples measured")
    parser.add_argument("--trials", type=int, default=1024, help="SGD trials per lr")
    parser.add_argument("--steps", type=int, default=20, help="T, SGD steps per trial")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--bandwidth-gbs", type=float, default=25.0)
    parser.add_argument("--latency-us", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs")
    parser.add_argument("--chunk-size", type=int, default=None, help="measure's chunk_size")
    parser.add_argument(
        "--test-rows", type=int, default=1024, help="rows of simulate's test-loss set"
    )
    parser.add_argument("--default-path", action="store_true", help="measure(resummed=True)")
    parser.add_argument("--rows", type=int, default=1024, help="--default-path: rows")
    parser.add_argument("--rank", type=int, default=32, help="--default-path: Krylov k")
    parser.add_argument("--higher-rank", type=int, default=8, help="--default-path: k_3")
    args = parser.parse_args(argv)

    rank, world = D.init_from_env(backend=args.backend, timeout_s=600)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    say = print if rank == 0 else (lambda *a, **k: None)

    model = smooth_convnet((1, args.side, args.side), 10, width=args.width).to(device)
    params = sum(p.numel() for p in model.parameters())
    if args.default_path:
        _default_path(args, model, params, device, say)
        D.shutdown()
        return
    schedule = Online(steps=args.steps, batch_size=1)
    lrs = [0.01, 0.02]
    common = dict(
        order=args.order,
        schedules=[schedule],
        dtype=torch.float32,
        progress=False,
        chunk_size=args.chunk_size,
        estimator="tuples",  # the estimator split across ranks
    )
    # tuple size m: measure once on a few rows to learn it (also the warm-up)
    probe = measure(model, _data(64, args.side, device), distributed=False, **common)
    m = int(probe.meta["tuple_size"])
    x, y = _data(args.tuples * m, args.side, device)
    loss_fn, theta0 = model_loss(model)
    sim = dict(
        lr=lrs, device=device, dtype=torch.float32, test=(x[: args.test_rows], y[: args.test_rows])
    )
    simulate(loss_fn, theta0, (x[:256], y[:256]), schedule, trials=4, distributed=False, **sim)

    group = dist.get_backend() if dist.is_initialized() else "no process group"
    say(
        f"device {_device_name(device)}, {world} process(es) ({group}); "
        f"convnet {args.side}×{args.side} width {args.width}: P = {params}; order {args.order}: "
        f"{len(probe.group_values)} contractions, tuples of m = {m} rows; "
        f"{args.trials} trials × {len(lrs)} lrs × T = {args.steps}; torch threads "
        f"{torch.get_num_threads()}\n"
    )
    if dist.is_initialized():  # the group works (NCCL or Gloo)
        check = torch.ones(1, device=_collective_device(device))
        dist.all_reduce(check)
        say(f"all_reduce check: {int(check.item())} == world size {world}\n")

    if world > 1:
        _scaling_row(args, model, (x, y), loss_fn, theta0, schedule, common, sim, device, say)
    else:
        _projection(args, model, (x, y), loss_fn, theta0, schedule, common, sim, device, say)
    D.shutdown()


def _default_path(args, model, params, device, say) -> None:
    """``measure(order, resummed=True)`` with its defaults, split over this job's ranks."""
    _, world = D.world()
    data = _data(args.rows, args.side, device)
    kw = dict(order=args.order, resummed=True, rank=args.rank, higher_rank=args.higher_rank)
    cpu = time.process_time()
    t, st = _timed(
        lambda: measure(model, data, progress=False, chunk_size=args.chunk_size, **kw),
        device,
        args.repeat,
    )
    cpu = time.process_time() - cpu  # this process's CPU seconds: the work, whatever the load
    if world > 1:
        cpus = torch.tensor([cpu], dtype=torch.float64, device=_collective_device(device))
        dist.all_reduce(cpus, op=dist.ReduceOp.MAX)
        cpu = float(cpus.item())
    pred = st.predict(Online(steps=args.steps, batch_size=1), lr=0.01, resummed=True)
    cost = st.subspace.cost
    say(
        f"device {_device_name(device)}, {world} process(es), torch threads "
        f"{torch.get_num_threads()}; convnet {args.side}×{args.side} width {args.width}: "
        f"P = {params}; measure(order={args.order}, resummed=True, rank={args.rank}, "
        f"higher_rank={args.higher_rank}) on {args.rows} rows, defaults otherwise\n"
    )
    say(
        "| processes | measure s | CPU s (slowest rank) | evaluations | Krylov rows per rank | "
        f"Krylov build s (rank 0) | resummed test loss, T = {args.steps}, η = 0.01 |"
    )
    say("|---|---|---|---|---|---|---|")
    say(
        f"| {world} | {t:.1f} | {cpu:.1f} | {st.meta['evaluations']:,} | "
        f"{int(cost['local_rows'])} | "
        f"{cost['seconds']:.1f} | {float(pred.total[0]):.12f} ± {float(pred.se[0]):.2g} |\n"
    )


def _data(rows: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, side, side, generator=gen)
    y = torch.randint(0, 10, (rows,), generator=gen)
    return x.to(device), y.to(device)


def _scaling_row(args, model, data, loss_fn, theta0, schedule, common, sim, device, say) -> None:
    """The full measure and simulate split over this job's ranks (real strong scaling)."""
    _, world = D.world()
    t_m, st = _timed(lambda: measure(model, data, **common), device, args.repeat)
    t_s, tr = _timed(
        lambda: simulate(loss_fn, theta0, data, schedule, trials=args.trials, **sim),
        device,
        args.repeat,
    )
    assert isinstance(st, Statistics) and isinstance(tr, Trials)
    _scaling_table(world, st, t_m, tr, t_s, args.steps, say)


def _scaling_table(world, st, t_m, tr, t_s, steps, say) -> None:
    trial_steps = tr.trials * len(tr.lrs) * steps
    say("| processes | measure s | tuples/s | simulate s | trial-steps/s | bytes gathered |")
    say("|---|---|---|---|---|---|")
    say(
        f"| {world} | {t_m:.2f} | {st.groups / t_m:.0f} | {t_s:.2f} | {trial_steps / t_s:.0f} | "
        f"{D.communication_bytes(st, world) + D.communication_bytes(tr, world):,} |\n"
    )


def _projection(args, model, data, loss_fn, theta0, schedule, common, sim, device, say) -> None:
    """Time rank 0's share for each K on this device and add the all-gather time."""
    rows = []
    full_st = full_tr = None
    for k in sorted(set(args.worlds) | {1}):

        def rank0_measure(k: int = k) -> Statistics:
            part = functools.partial(D.shard, rank=0, world=k)
            return measure(model, data, tuple_range=part, distributed=False, **common)

        def rank0_simulate(mine: int = math.ceil(args.trials / k)) -> Trials:
            trials = range(mine)
            return simulate(
                loss_fn, theta0, data, schedule, trials=trials, distributed=False, **sim
            )

        t_m, st = _timed(rank0_measure, device, args.repeat)
        t_s, tr = _timed(rank0_simulate, device, args.repeat)
        mine = tr.trials
        if k == 1:
            full_st, full_tr = st, tr
        rows.append((k, st.groups, t_m, mine, t_s))
    n_m = len(full_st.group_values) + 1
    say("Single device (the whole job in this process):\n")
    _scaling_table(1, full_st, rows[0][2], full_tr, rows[0][4], args.steps, say)
    say(
        f"Projection for K devices ({args.bandwidth_gbs:g} GB/s all-gather bus bandwidth, "
        f"{args.latency_us:g} µs per collective):\n"
    )
    say(
        "| K | rank-0 tuples | measure compute s | gathered bytes | comm s | measure s | "
        "speed-up | rank-0 trials | simulate compute s | gathered bytes | comm s | "
        "simulate s | speed-up |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base_m = base_s = None
    for k, tuples, t_m, mine, t_s in rows:
        b_m = D.communication_bytes(full_st, k)
        b_s = D.communication_bytes(full_tr, k)
        c_m = _comm_seconds(b_m, k, n_m, args.bandwidth_gbs, args.latency_us)
        c_s = _comm_seconds(b_s, k, 5, args.bandwidth_gbs, args.latency_us)
        total_m, total_s = t_m + c_m, t_s + c_s
        base_m = base_m or total_m
        base_s = base_s or total_s
        say(
            f"| {k} | {tuples} | {t_m:.3f} | {b_m:,} | {c_m:.4f} | {total_m:.3f} | "
            f"{base_m / total_m:.2f}× | {mine} | {t_s:.3f} | {b_s:,} | {c_s:.4f} | "
            f"{total_s:.3f} | {base_s / total_s:.2f}× |"
        )


if __name__ == "__main__":
    main()
