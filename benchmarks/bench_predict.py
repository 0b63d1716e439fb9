"""Time the re-summed predict phase of ``perturb validate`` (old vs new) and the Krylov path.

Run: ``python benchmarks/bench_predict.py`` (options: ``--population``, ``--ranks``,
``--threads``, ``--skip-old``).  On the digits ``smooth-convnet`` of ``perturb validate``
(1,418 parameters, ``--population`` images, seed 0) it builds the quadratic model once
(the materialized mean Hessian and per-sample gradients, as ``validate`` does) and times,
side by side in one process, the order-2 re-summed test loss of online SGD (``B = 1``)
for the 5 learning rates × 5 recorded steps of ``validate``'s default run:

* **old**: the implementation before the batched one (a frozen copy below): one call per
  ``(η, T)``, the inputs rotated into the eigenbasis and a ``P × P`` grid of weights per
  call;
* **new, per call**: :func:`perturb.numeric.resummation.resummed_values` called as the
  pipeline calls it, once per ``(η, T)``;
* **new, batched**: one call for the whole grid.

The three must agree to float rounding (the largest relative difference is printed).
Then ``measure(..., resummed=True, rank=k)`` builds a Krylov subspace of the largest rank
and ``Statistics.predict(..., resummed=True, rank=r)`` gives the prediction from its
first ``r`` vectors, ``r = 8, 16, …``, next to the exact (eigendecomposition) value: the
convergence in ``k``.  Prints markdown tables.
"""

from __future__ import annotations

import argparse
import resource
import string
import time
import warnings

import numpy as np
import torch

import perturb
from perturb.experiments.pipeline import build, load_population, quadratic_model
from perturb.numeric.resummation import open_network, resummed_values, time_sum
from perturb.symbolic.resummed import resummed_terms

LRS = (0.002, 0.005, 0.01, 0.02, 0.05)  # validate's defaults
STEPS = (20, 40, 60, 80, 100)  # its 5 recorded steps of T = 100


def old_resummed_values(terms, derivs, *, lr, steps, means, eigh):
    """The implementation before the batched one (one ``lr`` and ``T``; frozen copy)."""

    def rotate(tensor, evecs, first):
        for axis in range(first, tensor.ndim):
            tensor = torch.tensordot(tensor, evecs, dims=([axis], [0])).movedim(-1, axis)
        return tensor

    hess = means[2]
    evals, evecs = eigh
    rotated = {k: rotate(t, evecs, 1) for k, t in derivs.items()}
    rotated_means = {k: rotate(t, evecs, 0) for k, t in means.items()}
    x = 1 - lr * evals
    order = max(t.diagram.edges for t in terms)
    out = [torch.zeros((), dtype=hess.dtype)] * (order + 1)
    for term in terms:
        d = term.diagram.edges
        network = open_network(term, rotated, rotated_means)
        xs = [x.reshape((-1,) + (1,) * (d - 1 - i)) for i in range(d)]
        weights = time_sum(term.orders, xs, steps) if d else torch.ones((), dtype=hess.dtype)
        if term.open_root:
            letters = string.ascii_lowercase[:d]
            value = evecs @ torch.einsum(f"{letters},{letters}->a", network, weights)
        else:
            value = (network * weights).sum()
        out[d] = out[d] + float(term.prefactor) * lr**d * value
    return out


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-old", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)

    data = load_population("digits", population=args.population, seed=0)
    setup = build("smooth-convnet", data, seed=0)
    start = time.perf_counter()
    quad = quadratic_model(setup)
    eigh = quad.model.eig
    setup_s = time.perf_counter() - start
    evals = eigh[0]
    print(
        f"## Re-summed predict phase: digits smooth-convnet, P = {setup.parameters:,}, "
        f"n = {setup.x.shape[0]}, order 2, online B = 1, {len(LRS)} lrs × {len(STEPS)} steps\n"
    )
    print(
        f"quadratic model (H materialized, eigendecomposed) {setup_s:.1f} s; eigenvalues of H "
        f"in [{float(evals.min()):.4g}, {float(evals.max()):.4g}]\n"
    )
    means = {2: quad.hess}
    rows = []

    start = time.perf_counter()
    batched = np.zeros((len(LRS), len(STEPS)))
    sched = perturb.Online(steps=max(STEPS), batch_size=1)
    parts = resummed_values(
        resummed_terms(2, sched), quad.derivs, lr=LRS, steps=STEPS, schedule=sched,
        means=means, eigh=eigh,
    )  # fmt: skip
    batched = sum(parts).numpy()
    rows.append(("new, one batched call", time.perf_counter() - start, _peak()))

    start = time.perf_counter()
    per_call = np.zeros((len(LRS), len(STEPS)))
    for j, t in enumerate(STEPS):
        s = perturb.Online(steps=t, batch_size=1)
        terms = resummed_terms(2, s)
        for i, lr in enumerate(LRS):
            parts = resummed_values(
                terms, quad.derivs, lr=lr, steps=t, schedule=s, means=means, eigh=eigh
            )
            per_call[i, j] = float(sum(parts))
    rows.append(("new, one call per (η, T)", time.perf_counter() - start, _peak()))
    diffs = {"per call vs batched": np.abs(per_call - batched).max() / np.abs(batched).max()}

    if not args.skip_old:
        start = time.perf_counter()
        old = np.zeros((len(LRS), len(STEPS)))
        for j, t in enumerate(STEPS):
            terms = resummed_terms(2, perturb.Online(steps=t, batch_size=1))
            for i, lr in enumerate(LRS):
                parts = old_resummed_values(
                    terms, quad.derivs, lr=lr, steps=t, means=means, eigh=eigh
                )
                old[i, j] = float(sum(parts))
        rows.append(("old, one call per (η, T)", time.perf_counter() - start, _peak()))
        diffs["old vs batched"] = np.abs(old - batched).max() / np.abs(old).max()

    base = rows[-1][1]
    print("| implementation | s | vs last row | peak RSS after (MiB) |")
    print("|---|---:|---:|---:|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / base:.3g}× | {peak:.0f} |")
    print()
    for name, d in diffs.items():
        print(f"largest relative difference, {name}: {d:.2g}")
    print(f"\nE[test loss] at T = 100: {np.round(batched[:, -1], 8).tolist()}\n")

    top = max(args.ranks)
    start = time.perf_counter()
    stats = perturb.measure(
        setup.net, (setup.x, setup.y), order=2, schedules=[sched], exact=True, resummed=True,
        rank=top, progress=False,
    )  # fmt: skip
    build_s = time.perf_counter() - start
    sub = stats.subspace
    print(
        f"### Convergence in k: measure(..., resummed=True, rank={top}) {build_s:.1f} s "
        f"({sub.cost['hvps']} HVPs, {sub.cost['per_sample_gradients']} per-sample gradients), "
        f"Lanczos residual {sub.residual:.3g}\n"
    )
    print("| k | " + " | ".join(f"η = {lr:g}" for lr in LRS) + " | max rel. error | "
          "max k vs k/2 | predict s |")  # fmt: skip
    print("|---:|" + "---:|" * (len(LRS) + 3))
    exact = batched[:, -1]
    for r in args.ranks:
        start = time.perf_counter()
        pred = stats.predict(sched, lr=LRS, resummed=True, rank=r)
        seconds = time.perf_counter() - start
        err = np.abs(pred.total - exact).max() / np.abs(exact).max()
        values = " | ".join(f"{v:.6f}" for v in pred.total)
        print(f"| {r} | {values} | {err:.2g} | {np.max(pred.error):.2g} | {seconds:.2f} |")
    print("| exact (eigh) | " + " | ".join(f"{v:.6f}" for v in exact) + " | | | |")


if __name__ == "__main__":
    main()
