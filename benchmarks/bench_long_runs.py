"""Time long runs against short ones, and the fast answers the tests count instead of time.

Run: ``python benchmarks/bench_long_runs.py``.  The tests assert counted work (torch
operations, tree enumerations, imported modules: no wall clock in tests); this script
prints the seconds beside those counts, the fastest of ``--repeat`` runs each, so the
ratios can be read side by side on a quiet machine:

* re-summed predictions at ``T = 10²`` and ``T = 10⁵`` (online, fixed and shuffled
  epochs; closed forms take ``O(log T)`` products, a loop over steps would take 1000×),
  with the number of torch operations of each call;
* ``count_rooted_trees(30)`` and the order-20 work estimates (answered from formulas);
* ``perturb --help`` in a fresh process (no torch, no sympy).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

import perturb
from perturb.symbolic.cost import estimate_work, labellings
from perturb.symbolic.diagrams import count_rooted_trees


class _Count(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _best(fn, repeat: int) -> tuple[float, int]:
    """The fastest of ``repeat`` calls (after one warm-up) and the torch operations of one."""
    fn()
    with _Count() as count:
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, count.calls


def _landscape(p: int = 3, rows: int = 6, seed: int = 0):
    """``l_x(θ) = ½θᵀHθ + xᵀθ`` (the tests' linear-Gaussian landscape)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.2 * torch.eye(p, dtype=torch.float64)
    xs = torch.randn(rows, p, generator=gen, dtype=torch.float64) @ torch.randn(
        p, p, generator=gen, dtype=torch.float64
    ) + torch.randn(p, generator=gen, dtype=torch.float64)
    theta0 = torch.randn(p, generator=gen, dtype=torch.float64)

    def loss_fn(theta, x):
        return 0.5 * theta @ hess @ theta + x @ theta

    return perturb.Population(loss_fn, xs), theta0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pop, theta0 = _landscape()
    sizes = ((10, 10), (100, 1000))  # (M, E): T = 10² and 10⁵
    pairs = {
        "online": [perturb.Online(steps=t, batch_size=1) for t in (100, 100_000)],
        "epochs": [perturb.Epochs(train_size=n, batch_size=1, epochs=e) for n, e in sizes],
        "epochs, shuffled": [
            perturb.Epochs(train_size=n, batch_size=1, epochs=e, shuffle=True) for n, e in sizes
        ],
    }
    print("| re-summed order 3 | s at T = 10² | s at T = 10⁵ | ratio | torch ops | ops ratio |")
    print("|---|---|---|---|---|---|")
    for name, (short, long) in pairs.items():
        runs = [
            _best(
                lambda s=s: perturb.predict(pop, theta0, s, lr=0.1, order=3, resummed=True),
                args.repeat,
            )
            for s in (short, long)
        ]
        (a, ca), (b, cb) = runs
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} | {ca} / {cb} | {cb / ca:.2f} |")
    trees, _ = _best(lambda: count_rooted_trees.cache_clear() or count_rooted_trees(30), 3)
    order20, _ = _best(
        lambda: labellings.cache_clear() or estimate_work(20, perturb.Online(), quantity="gap"), 3
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "perturb", "--help"], capture_output=True, check=True)
    help_s = time.perf_counter() - start
    print()
    print(f"count_rooted_trees(30), from empty caches: {trees:.4f} s")
    print(f"estimate_work(20, online, gap), from empty caches: {order20:.4f} s")
    print(f"python -m perturb --help: {help_s:.2f} s")


if __name__ == "__main__":
    main()
