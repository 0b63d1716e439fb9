"""Time the sampled estimators of perturb.measure on a real convnet.

Run: ``python benchmarks/bench_measure.py`` (options: ``--rows``, ``--naive-tuples``,
``--skip-groups``).  All order-3 test-loss contractions of ``Online(steps=100,
batch_size=1)`` on ``smooth_convnet((1, 28, 28), 10)`` (25,034 parameters) at random
inputs, float32, two threads.  Three ways:

* ``tuples``: ``measure(..., estimator="tuples")``, linear in the rows;
* ``groups``: ``measure(..., estimator="groups", groups=16)``, complete U-statistics within
  groups (quadratic in the group size for blocks that span two subtrees);
* ``naive``: the same per-tuple estimates as ``tuples`` (the same tuples, the same distinct
  moment networks, the same Möbius weights) with a Python loop over tuples and nodes and
  ``torch.autograd.grad(create_graph=True)`` for every nested directional derivative.  It
  runs on the first ``--naive-tuples`` tuples and is extrapolated linearly to all of them
  (its cost is exactly linear in the tuples); its values are checked against ``tuples``.

Prints a markdown table: method, single-row derivative evaluations, seconds, seconds per
evaluation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from perturb.measure import (
    _collect,
    _Engine,
    _objective,
    _tuple_networks,
    _tuple_size,
    measure,
)
from perturb.models import smooth_convnet
from perturb.schedules import Online


def _naive_network(fn, theta0, x, y, net, row_of_block):
    """One moment network on one tuple with nested autograd (double backward)."""
    children = [[] for _ in net.parents]
    for v, p in enumerate(net.parents):
        if p >= 0:
            children[p].append(v)
    block_of = {v: i for i, b in enumerate(net.blocks) for v in b}

    def node(v):
        us = [node(c) for c in children[v]]
        if v == 0 and net.open_root:
            return us[0]
        i = row_of_block[block_of[v]]
        theta = theta0.detach().requires_grad_(True)
        loss = fn(theta, x[i : i + 1], y[i : i + 1])[0]
        if v == 0 and not us:
            return loss.detach()
        vec = torch.autograd.grad(loss, theta, create_graph=True)[0]
        last = us[-1] if v == 0 else None
        for u in us[:-1] if v == 0 else us:
            vec = torch.autograd.grad(vec @ u, theta, create_graph=True)[0]
        return (vec @ last).detach() if v == 0 else vec.detach()

    return node(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--naive-tuples", type=int, default=16)
    parser.add_argument("--skip-groups", action="store_true")
    parser.add_argument(
        "--groups-rows", type=int, default=None, help="rows for groups (default: --rows)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = smooth_convnet((1, 28, 28), 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.rows,), generator=gen)
    schedule = Online(steps=100, batch_size=1)
    common = dict(order=3, schedules=schedule, quantities="test", dtype=torch.float32)
    contractions = _collect(3, (schedule,), ("test",))
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(contractions)} contractions, {params} parameters, {args.rows} rows\n")
    rows = []

    start = time.perf_counter()
    tup = measure(model, (x, y), estimator="tuples", progress=False, **common)
    spent = time.perf_counter() - start
    rows.append(("tuples", tup.meta["evaluations"], spent, f"R = {tup.groups} tuples"))

    if not args.skip_groups:
        n_g = args.rows if args.groups_rows is None else args.groups_rows
        start = time.perf_counter()
        grp = measure(
            model, (x[:n_g], y[:n_g]), estimator="groups", groups=16, progress=False, **common
        )
        spent = time.perf_counter() - start
        note = f"complete U in 16 groups of {n_g // 16} rows ({n_g} rows)"
        rows.append(("groups (K = 16)", grp.meta["evaluations"], spent, note))

    # naive: the same tuples (same seed and permutation as measure) and networks
    m = max(_tuple_size(c) for c in contractions.values())
    perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(0))
    tuples = perm[: (args.rows // m) * m].reshape(-1, m)
    obj = _objective(model, (x, y), None, loss=None, dtype=torch.float32, device=None)
    engine = _Engine(obj, tuples, chunk_size=None, budget=None)  # only for its network cache
    fn, theta0 = obj.batch, obj.theta0
    distinct = []  # (net, cache index) with isomorphic networks evaluated once, as measure does
    for c in contractions.values():
        for net, _ in _tuple_networks(c):
            bucket = engine.tuple_cache.setdefault(net.contraction.hash, [])
            if not any(other.is_isomorphic(net.contraction) for other, _ in bucket):
                bucket.append((net.contraction, None))
                distinct.append(net)
    count = min(args.naive_tuples, len(tuples))
    evaluations = 0
    start = time.perf_counter()
    naive_values = {}
    for net in distinct:
        vals = []
        for r in range(count):
            vals.append(_naive_network(fn, theta0, x, y, net, tuples[r].tolist()))
            evaluations += sum(1 for v in range(len(net.parents)) if not (v == 0 and net.open_root))
        naive_values[net] = torch.stack(vals)
    spent = (time.perf_counter() - start) * len(tuples) / count
    evaluations = evaluations * len(tuples) // count
    rows.append(
        (
            "naive autograd loop",
            evaluations,
            spent,
            f"{count} tuples timed, scaled ×{len(tuples) / count:g}",
        )
    )
    # the naive per-tuple values agree with the engine's (same tuples, same networks)
    from perturb.measure import _Engine as Eng

    check = Eng(obj, tuples[:count], chunk_size=None, budget=None)
    worst = 0.0
    for net, vals in naive_values.items():
        ref = check.tuple_values(net, tuples[:count], "check").float()
        worst = max(worst, float((vals - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    print(f"naive vs engine per-tuple values: max relative difference {worst:.2e}\n")

    print("| method | single-row derivatives | seconds | µs / derivative | notes |")
    print("|---|---|---|---|---|")
    for name, ev, sec, note in rows:
        print(f"| {name} | {ev:,} | {sec:.1f} | {1e6 * sec / max(ev, 1):.0f} | {note} |")
    if not args.skip_groups:
        keys = list(tup.contractions)
        z = [(tup.value(k) - grp.value(k)) / np.hypot(tup.se(k), grp.se(k)) for k in keys]
        print(f"\ntuples vs groups: max |difference| / combined SE = {np.max(np.abs(z)):.2f}")
        ratio = np.median([tup.se(k) / grp.se(k) for k in keys if grp.se(k) > 0])
        print(f"median SE ratio tuples / groups = {ratio:.2f}")


if __name__ == "__main__":
    main()
