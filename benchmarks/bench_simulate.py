"""Benchmark: K SGD trials vectorized with vmap vs the same trials one after another.

The digits smooth convnet (``smooth_convnet((1, 8, 8), 10)``, 1,418 parameters),
online SGD with batch 1 for 50 steps, float32, ``torch.set_num_threads(2)``.  Both
paths run the identical trials (same per-trial seeds) and include the final test
and train loss evaluation on the 1,297-image digits population.

Usage::

    python benchmarks/bench_simulate.py [--ks 16 64 256] [--steps 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from perturb.data import load_dataset
from perturb.models import smooth_convnet
from perturb.schedules import Online
from perturb.simulate import model_loss, simulate, simulate_loop


def _time(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall-clock and process CPU seconds over ``repeat`` runs, and the last result."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - w)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu, out


def main() -> None:
    """Run the benchmark, print a table and write a markdown snippet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_simulate.md"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_dataset("digits")
    loss_fn, theta0 = model_loss(smooth_convnet((1, 8, 8), 10))
    schedule = Online(steps=args.steps, batch_size=1)
    common = dict(lr=args.lr, dtype=torch.float32, seed=0)
    population = (data.x, data.y)
    # warm-up (vmap tracing, allocator)
    simulate(loss_fn, theta0, population, schedule, trials=2, **common)
    simulate_loop(loss_fn, theta0, population, schedule, trials=2, **common)

    rows = []
    header = (
        f"{'K':>5} {'loop (s)':>10} {'vmap (s)':>10} {'ratio':>7}"
        f" {'loop CPU':>10} {'vmap CPU':>10} {'CPU ratio':>9} {'max |Δ test|':>13}"
    )
    print(header)
    print("-" * len(header))
    for k in args.ks:
        w_loop, c_loop, r_loop = _time(
            lambda k=k: simulate_loop(loss_fn, theta0, population, schedule, trials=k, **common),
            args.repeat,
        )
        w_vmap, c_vmap, r_vmap = _time(
            lambda k=k: simulate(loss_fn, theta0, population, schedule, trials=k, **common),
            args.repeat,
        )
        diff = float(np.nanmax(np.abs(r_loop.test_loss - r_vmap.test_loss)))
        rows.append((k, w_loop, w_vmap, c_loop, c_vmap, diff))
        print(
            f"{k:>5} {w_loop:>10.2f} {w_vmap:>10.2f} {w_loop / w_vmap:>6.1f}x"
            f" {c_loop:>10.2f} {c_vmap:>10.2f} {c_loop / c_vmap:>8.1f}x {diff:>13.1e}"
        )

    lines = [
        "### `simulate`: vmapped trials vs a Python loop",
        "",
        f"digits `smooth_convnet((1, 8, 8), 10)` ({theta0.numel()} parameters), online SGD, "
        f"batch 1, {args.steps} steps, float32, `torch.set_num_threads({args.threads})`, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}; "
        "times include the final test/train loss on the 1,297-image population; "
        f"best of {args.repeat}; CPU = process CPU time (both threads), less sensitive "
        "to other load on the machine.",
        "",
        "| K | loop (s) | vmap (s) | speed-up | loop CPU (s) | vmap CPU (s) | CPU speed-up "
        "| max abs. diff. of test loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {k} | {wl:.2f} | {wv:.2f} | {wl / wv:.1f}× | {cl:.2f} | {cv:.2f} "
            f"| {cl / cv:.1f}× | {d:.1e} |"
            for k, wl, wv, cl, cv, d in rows
        ),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
