"""Benchmark: K SGD trials vectorized with vmap vs the same trials one after another.

The digits smooth convnet (``smooth_convnet((1, 8, 8), 10)``, 1,418 parameters),
online SGD with batch 1 for 50 steps, float32, ``torch.set_num_threads(2)``.  Both
paths run the identical trials (same per-trial seeds) and include the final test
and train loss evaluation on the 1,297-image digits population.

With ``--side 28`` the model is ``smooth_convnet((1, 28, 28), 10, width=W)`` on 4,096 random
28×28 images instead (``W = 12``: 55,690 parameters), the size of the Fashion-MNIST runs;
``--device cuda`` runs both paths on the GPU (times there are wall-clock after a
synchronize; process CPU time is then not a measure of the work).

Usage::

    python benchmarks/bench_simulate.py [--ks 16 64 256] [--steps 50] [--device cpu]
        [--side 8|28] [--width W] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from perturb.experiments.data import load_dataset
from perturb.experiments.models import smooth_convnet
from perturb.experiments.simulation import model_loss, simulate, simulate_loop
from perturb.symbolic.schedules import Online


def _time(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall-clock and process CPU seconds over ``repeat`` runs, and the last result."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = min(wall, time.perf_counter() - w)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu, out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def main() -> None:
    """Run the benchmark, print a table and write a markdown snippet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_simulate.md"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, choices=(8, 28), default=8)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument(
        "--test-rows",
        type=int,
        default=None,
        help="measure the final test loss on the first N rows only (default: all), to time "
        "the SGD steps rather than the evaluation",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.side == 8:
        data = load_dataset("digits")
        population = (data.x, data.y)
        what = "the 1,297-image digits population"
    else:
        gen = torch.Generator().manual_seed(0)
        population = (
            torch.randn(4096, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (4096,), generator=gen),
        )
        what = "4,096 random 28×28 images"
    side = args.side
    model = smooth_convnet((1, side, side), 10, width=args.width)
    loss_fn, theta0 = model_loss(model)
    schedule = Online(steps=args.steps, batch_size=1)
    common = dict(lr=args.lr, dtype=torch.float32, seed=0, device=device)
    if args.test_rows is not None:
        common["test"] = (population[0][: args.test_rows], population[1][: args.test_rows])
        what = f"the first {args.test_rows} rows"
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
        f"`smooth_convnet((1, {side}, {side}), 10, width={args.width})` "
        f"({theta0.numel()} parameters), online SGD, "
        f"batch 1, {args.steps} steps, float32, `torch.set_num_threads({args.threads})`, "
        f"torch {torch.__version__}, device {_device_name(device)}; "
        f"times include the final test/train loss on {what}; "
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
