"""Time the symbolic online test-loss series per order, and brute-force unrolling.

Run: ``python benchmarks/bench_series.py --max-order 8``.  Prints a markdown table:
order, number of test-loss diagram classes, number of merged terms, seconds for
that order (symbolic in T and B), and the seconds the brute-force oracle needs to
give the same information on one 3-row landscape: the η^d coefficient is a
degree-d polynomial in T, so brute force needs T = 1, …, d+1 (B = 1) to pin it
down, and even then only for that one landscape, not symbolically in the tensors.
"""

from __future__ import annotations

import argparse
import time

import sympy as sp

import perturb
from perturb.reference import oracle_series
from perturb.symbolic.series import power_terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-order", type=int, default=6)
    parser.add_argument("--oracle-max-order", type=int, default=5)
    args = parser.parse_args()
    schedule = perturb.Online()
    x, y = sp.symbols("x y")
    losses = [x**2 / 2 + x * y - y + x**3 / 3, 2 * y**2 + x - x * y**2 / 2, x * y - x + y**4 / 4]
    print(
        "| order | diagrams (classes) | merged terms | engine s (this order) | cumulative s "
        "| oracle s (T = 1..d+1, B=1, one landscape) |"
    )
    print("|---|---|---|---|---|---|")
    cumulative = 0.0
    for d in range(args.max_order + 1):
        start = time.perf_counter()
        terms = power_terms(d, schedule, "test", "cumulant")
        spent = time.perf_counter() - start
        cumulative += spent
        classes = len(perturb.diagrams(d)) if d <= 5 else "-"
        oracle = "-"
        if d <= args.oracle_max_order:
            start = time.perf_counter()
            for steps in range(1, d + 2):
                oracle_series(
                    losses, [x, y], [sp.Rational(1, 2), -1], kind="online", steps=steps, order=d
                )
            oracle = f"{time.perf_counter() - start:.2f}"
        print(
            f"| {d} | {classes} | {len(terms)} | {spent:.2f} | {cumulative:.2f} | {oracle} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
