"""The learning curve's cost against the SGD trials it predicts (issue 26, item 4).

For each (T, n, L) the curve of :func:`perturb.learning_curve` is computed once for a grid
of learning rates and batch sizes, and its cost (full-batch-gradient equivalents: the
path, the SDE's gradient flow, the checkpoints' Krylov measurements; and seconds) is set
beside the cost of the ``trials`` SGD runs that check it, counted the same way
(``trials · T · B / n`` full-batch gradients a grid point) and timed with
:func:`perturb.simulate` in the same process.

    python benchmarks/bench_curve.py                       # digits smooth-convnet
    python benchmarks/bench_curve.py --steps 100 300 --population 128 256 --lrs 0.1
"""

from __future__ import annotations

import argparse
import time

import torch

from perturb.experiments.pipeline import load_population, start_point
from perturb.experiments.simulation import simulate
from perturb.numeric.curve import CurveSettings, learning_curve
from perturb.symbolic.schedules import Online


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smooth-convnet")
    parser.add_argument("--pretrain", type=int, default=700)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--population", type=int, nargs="+", default=[256])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--trials", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--no-sde", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads = ["T", "n", "L", "N_B", "curve (grads)", "of which ckpt", "trials (grads)"]
    print(" ".join([*heads, "ratio", "curve s", "trials s", "ratio s"]))
    for n in args.population:
        data = load_population("digits", population=n, seed=0)
        setup, _ = start_point(args.model, data, seed=0, pretrain_steps=args.pretrain)
        for steps in args.steps:
            settings = CurveSettings(rank=args.rank, sde=not args.no_sde)
            curve = learning_curve(
                setup.net, (setup.x, setup.y), setup.theta0, lr=args.lrs,
                steps=[0, steps], batch_sizes=args.batch_sizes, settings=settings,
            )  # fmt: skip
            counted = sum(args.trials * steps * b / n for b in args.batch_sizes for _ in args.lrs)
            started = time.perf_counter()
            for b in args.batch_sizes:
                simulate(
                    setup.loss_fn, setup.theta0, (setup.x, setup.y),
                    Online(steps=steps, batch_size=b), lr=args.lrs, trials=args.trials,
                )  # fmt: skip
            timed = time.perf_counter() - started
            c = curve.cost
            print(
                f"{steps:>6} {n:>5} {len(args.lrs):>3} {len(args.batch_sizes):>3} "
                f"{c['total']:>14.0f} {c['checkpoints']:>13.0f} {counted:>14.0f} "
                f"{c['total'] / counted:>6.2f} {c['seconds']:>8.1f} {timed:>8.1f} "
                f"{c['seconds'] / timed:>7.2f}"
            )


if __name__ == "__main__":
    main()
