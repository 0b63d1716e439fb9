"""Every way to evaluate each kind of tuple-network node, timed: per-row directions, vmapped.

Run: ``python benchmarks/bench_nodes.py --device cuda --rows 4096 --chunk 1024 --repeat 5``
(CPU: ``--device cpu --rows 256 --chunk 64 --repeat 2 [--threads T]``).

``smooth_convnet((1, 28, 28), 10, width=W)`` (``W = 16``: 98,442 parameters), random
inputs, cross-entropy, float32.  Each row ``i`` has its own directions ``u_i, v_i, w_i`` (as
in the tuple estimator, where directions are messages from other rows).  A *vector* node
with ``k`` directions returns ``∇^{k+1} l_i[u, …, ·]`` (``grad``; HVP; ``J[u, v, ·]``), a
*scalar* root with ``k`` directions ``∇^k l_i[u, …]``.  Variants: forward-over-reverse
(``jvp`` of ``grad``), reverse-over-reverse (``grad`` of ``∇l·u``), mixed (``jvp`` of the
reverse HVP), nested ``jvp`` of the loss, and a vector node dotted with the last direction.
Prints the median time per row and the relative difference to the first variant of its
kind.  perturb's choices (:func:`perturb.numeric.derivatives.derivative` and the cost
tables ``_VECTOR_COST``, ``_SCALAR_COST`` of :mod:`perturb.numeric.engine`) come from this table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from perturb.experiments.models import smooth_convnet
from perturb.numeric.adapters import objective


def _along(f: Callable, u: torch.Tensor) -> Callable:
    def g(t):
        return jvp(f, (t,), (u,))[1]

    return g


def _dotted(f: Callable, u: torch.Tensor) -> Callable:
    def g(t):
        return grad(f)(t) @ u

    return g


def variants(single: Callable) -> list[tuple[str, bool, int, Callable]]:
    """``(name, vector, k, fn(θ, x, y, u, v, w))`` for every way to evaluate a node."""

    def forward(k: int, vector: bool) -> Callable:
        def fn(t, x, y, *us):
            def f(s):
                return grad(single)(s, x, y) if vector else single(s, x, y)

            for u in us[:k]:
                f = _along(f, u)
            return f(t)

        return fn

    def reverse(k: int) -> Callable:  # grad of (… grad·u …)·v: reverse^(k+1)
        def fn(t, x, y, *us):
            def f(s):
                return single(s, x, y)

            for u in us[:k]:
                f = _dotted(f, u)
            return grad(f)(t)

        return fn

    def mixed(t, x, y, u, v, *_):  # jvp along v of the reverse-over-reverse HVP along u
        def loss(s):
            return single(s, x, y)

        return _along(grad(_dotted(loss, u)), v)(t)

    def dot(inner: Callable, k: int) -> Callable:  # a vector with k - 1 directions · u_k
        def fn(t, x, y, *us):
            return inner(t, x, y, *us) @ us[k - 1]

        return fn

    return [
        ("grad", True, 0, forward(0, True)),
        ("hvp fwd", True, 1, forward(1, True)),
        ("hvp rev", True, 1, reverse(1)),
        ("J fwd-fwd-rev", True, 2, forward(2, True)),
        ("J fwd-rev-rev", True, 2, mixed),
        ("J rev^3", True, 2, reverse(2)),
        ("s1 jvp", False, 1, forward(1, False)),
        ("s1 grad.u", False, 1, dot(forward(0, True), 1)),
        ("s2 jvp^2", False, 2, forward(2, False)),
        ("s2 hvpfwd.u", False, 2, dot(forward(1, True), 2)),
        ("s2 hvprev.u", False, 2, dot(reverse(1), 2)),
        ("s3 jvp^3", False, 3, forward(3, False)),
        ("s3 Jfwd.u", False, 3, dot(forward(2, True), 3)),
        ("s3 Jrev.u", False, 3, dot(reverse(2), 3)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = smooth_convnet((1, 28, 28), 10, width=a.width).to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, 1, 28, 28, generator=g).to(dev)
    y = torch.randint(0, 10, (a.rows,), generator=g).to(dev)
    obj = objective(model, (x, y), None, loss=None, dtype=torch.float32, device=dev)
    us = [torch.randn(a.rows, obj.size, generator=g).to(dev) * 1e-2 for _ in range(3)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"{obj.size} params, {a.rows} rows, chunk {a.chunk}, {dev}, threads {a.threads}")
    ref = {}
    for name, vector, k, fn in variants(obj.single):
        vf = vmap(fn, in_dims=(None, 0, 0, 0, 0, 0))

        def run(vf=vf):
            outs = []
            for s in range(0, a.rows, a.chunk):
                sl = slice(s, s + a.chunk)
                outs.append(vf(obj.theta0, x[sl], y[sl], us[0][sl], us[1][sl], us[2][sl]))
            return torch.cat(outs)

        out = run()
        times = []
        for _ in range(a.repeat):
            sync()
            start = time.perf_counter()
            out = run()
            sync()
            times.append(time.perf_counter() - start)
        first = ref.setdefault((vector, k), out)
        diff = float((out - first).abs().max() / first.abs().max())
        median = statistics.median(times)
        print(
            f"{name:16s} {1e3 * median:9.1f} ms  {1e6 * median / a.rows:8.1f} us/row  "
            f"rel.diff {diff:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
