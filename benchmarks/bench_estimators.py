"""Certainty per unit of work: the tuple estimator against the sketches and the auto plan.

Run: ``python benchmarks/bench_estimators.py`` (25,034 parameters, 2,048 rows) and
``python benchmarks/bench_estimators.py --width 16 --rows 4096 --target`` (98,442
parameters).  The order-3 test-loss statistics of ``Online(steps=T, batch_size=1)``
(``T = --steps``, 100) on ``smooth_convnet((1, 28, 28), 10, width=W)`` at random inputs
and labels (seed 0), float32, ``--threads`` torch threads; the prediction at
``η = --lr`` (0.01).  Side by side in one process:

* ``tuples``: ``measure(..., estimator="tuples")`` (the default before the sketches);
* ``auto``: ``measure(...)``, the default (a pilot on ``n/8`` rows, then per contraction
  the estimator of least work-normalized variance), ``--seeds`` seeds;
* ``auto, lr``: the same with ``lr=η`` (the plan also models the prediction);
* ``sketch``: ``measure(..., estimator="sketch")``;
* with ``--target``: ``auto`` with ``target_se`` = the tuple estimator's standard error.

Work is in full-batch gradients: the measurement's seconds over the median seconds of one
gradient of the summed loss over all the rows (timed in the same run).  The
work-normalized variance of an estimate is ``work × se²``; a ratio of two of them says how
much more certainty per unit of work one estimator buys, independent of the machine.
Prints markdown tables: the prediction per method, and per contraction.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from perturb.experiments.models import smooth_convnet
from perturb.numeric.adapters import objective
from perturb.numeric.allocation import full_gradient_seconds
from perturb.numeric.measuring import measure
from perturb.symbolic.schedules import Online


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each new estimator")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", action="store_true", help="auto at the tuples' se")
    parser.add_argument("--skip-sketch", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = smooth_convnet((1, 28, 28), 10, width=args.width)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.rows,), generator=gen)
    schedule = Online(steps=args.steps, batch_size=1)
    common = dict(order=3, schedules=schedule, quantities="test", dtype=torch.float32)
    common["progress"] = False
    params = sum(p.numel() for p in model.parameters())
    measure(model, (x[:256], y[:256]), estimator="sketch", **common)  # warm-up
    measure(model, (x[:256], y[:256]), estimator="tuples", **common)
    floor = full_gradient_seconds(objective(model, (x, y), None, dtype=torch.float32), repeat=5)
    print(
        f"{params} parameters, {args.rows} rows, {torch.get_num_threads()} threads; one "
        f"full-batch gradient {1e3 * floor:.1f} ms; prediction at lr {args.lr}, "
        f"T {args.steps}\n"
    )
    runs = [("tuples", {"estimator": "tuples"}, 1)]
    runs.append(("auto", {}, args.seeds))
    runs.append(("auto, lr", {"lr": args.lr}, args.seeds))
    if not args.skip_sketch:
        runs.append(("sketch", {"estimator": "sketch"}, args.seeds))
    results = []
    for name, kw, seeds in runs:
        results.append(_run(name, kw, seeds, model, x, y, schedule, common, floor, args.lr))
    if args.target:
        target = float(results[0]["se"])
        kw = {"lr": args.lr, "target_se": target}
        results.append(
            _run(f"auto, target {target:.3g}", kw, args.seeds, model, x, y, schedule, common,
                 floor, args.lr)
        )  # fmt: skip
    base = results[0]
    print("| method | seeds | rows | s | work (full-batch gradients) | prediction | se | "
          "work × se² | ratio to tuples | time / tuples |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['name']} | {r['seeds']} | {r['rows']} | {r['seconds']:.1f} | {r['work']:.1f} "
            f"| {r['value']:.5f} | {r['se']:.5f} | {r['wnv']:.3g} | "
            f"{base['wnv'] / r['wnv']:.1f}× | {r['seconds'] / base['seconds']:.2f} |"
        )
    print("\nPer contraction (work × se², first seed of each method; estimator of auto):\n")
    names = [r["name"] for r in results]
    print("| contraction | " + " | ".join(names) + " | auto chose |")
    print("|---|" + "---:|" * len(names) + "---|")
    for key, text in base["texts"].items():
        cells = [f"{r['work'] * r['ses'][key] ** 2:.3g}" for r in results]
        chose = results[1]["chosen"].get(key, "")
        print(f"| {text} | " + " | ".join(cells) + f" | {chose} |")


def _run(name, kw, seeds, model, x, y, schedule, common, floor, lr):
    """``seeds`` measurements; the work and se² are means over them."""
    seconds, ses, values, first = [], [], [], None
    for seed in range(seeds):
        start = time.perf_counter()
        st = measure(model, (x, y), seed=seed, **common, **kw)
        seconds.append(time.perf_counter() - start)
        pred = st.predict(schedule, lr=lr)
        ses.append(float(pred.se[0]))
        values.append(float(pred.total[0]))
        if first is None:
            first = st
    work = float(np.mean(seconds)) / floor
    se = float(np.sqrt(np.mean(np.square(ses))))
    plan = first.meta.get("plan", {}).get("contractions", {})
    return {
        "name": name,
        "seeds": seeds,
        "rows": first.rows,
        "seconds": float(np.mean(seconds)),
        "work": work,
        "value": float(np.mean(values)),
        "se": se,
        "wnv": work * se**2,
        "ses": {k: float(first.se(k)) for k in first.contractions},
        "texts": {k: c.text for k, c in first.contractions.items()},
        "chosen": {k: e["estimator"] for k, e in plan.items()},
    }


if __name__ == "__main__":
    main()
