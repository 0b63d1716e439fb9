"""Time the sampled estimators of perturb.measure on a real convnet.

Run: ``python benchmarks/bench_measure.py`` (options: ``--rows``, ``--naive-tuples``,
``--skip-groups``, ``--device``, ``--width``, ``--quantities``, ``--all``, ``--threads``).
All order-3 test-loss contractions of ``Online(steps=100, batch_size=1)`` (with
``--quantities Q …``: every order-3 contraction of every schedule for those quantities;
``--all``: for all four) on ``smooth_convnet((1, 28, 28), 10, width=W)`` (``W = 8``:
25,034 parameters; ``W = 16``: 98,442) at random inputs, float32, ``--threads`` (2) torch
threads on the CPU.  Three ways:

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

from perturb.experiments.models import smooth_convnet
from perturb.numeric.adapters import objective
from perturb.numeric.engine import Engine
from perturb.numeric.measuring import measure, requested_contractions
from perturb.numeric.networks import tuple_networks, tuple_size
from perturb.symbolic.schedules import Epochs, Online


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def _full_gradient_seconds(model, x, y, device: torch.device, repeat: int = 5) -> float:
    """Median seconds of one gradient of the summed loss over all rows (the floor)."""
    params = dict(model.named_parameters())

    def total(p):
        logits = torch.func.functional_call(model, p, (x,))
        return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

    g = torch.func.grad(total)
    g(params)
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        g(params)
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--naive-tuples", type=int, default=16)
    parser.add_argument("--skip-groups", action="store_true")
    parser.add_argument(
        "--groups-rows", type=int, default=None, help="rows for groups (default: --rows)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument(
        "--quantities",
        nargs="+",
        choices=("test", "train", "gap", "displacement"),
        help="every schedule, these quantities (default: online test loss)",
    )
    parser.add_argument(
        "--all", action="store_true", help="every schedule and quantity, not online test loss"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = smooth_convnet((1, 28, 28), 10, width=args.width).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.rows,), generator=gen).to(device)
    if args.all:
        args.quantities = ("test", "train", "gap", "displacement")
    if args.quantities:
        schedules, quantities = None, tuple(args.quantities)
        contractions = requested_contractions(3, (Online(), Epochs()), quantities)
    else:
        schedules, quantities = Online(steps=100, batch_size=1), ("test",)
        contractions = requested_contractions(3, (schedules,), quantities)
    common = dict(
        order=3,
        schedules=schedules,
        quantities=quantities,
        dtype=torch.float32,
        chunk_size=args.chunk_size,
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{len(contractions)} contractions ({', '.join(quantities)}), {params} parameters, "
        f"{args.rows} rows, device {device}, {torch.get_num_threads()} threads\n"
    )
    rows = []

    # warm-up on a few rows (kernel selection, allocator), not timed
    measure(model, (x[:64], y[:64]), estimator="tuples", progress=False, **common)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    tup = measure(model, (x, y), estimator="tuples", progress=False, **common)
    _sync(device)
    spent = time.perf_counter() - start
    tuple_seconds = spent
    rows.append(("tuples", tup.meta["evaluations"], spent, f"R = {tup.groups} tuples"))
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"tuples: peak extra GPU memory {peak:.0f} MiB")
    floor = _full_gradient_seconds(model, x, y, device)
    passes = tup.meta["evaluations"] / tup.groups
    print(
        f"tuples: {passes:.0f} node passes over the {tup.groups} tuples; one full-batch "
        f"gradient over all {args.rows} rows takes {1e3 * floor:.2f} ms; a node pass costs "
        f"{spent / passes / floor:.2f} full-batch gradients, the whole measurement "
        f"{spent / floor:.0f}\n"
    )

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
    m = max(tuple_size(c) for c in contractions.values())
    perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(0))
    tuples = perm[: (args.rows // m) * m].reshape(-1, m).to(device)
    obj = objective(model, (x, y), None, loss=None, dtype=torch.float32, device=device)
    engine = Engine(obj, tuples, chunk_size=None, budget=None)  # only for its network cache
    fn, theta0 = obj.batch, obj.theta0
    distinct = []  # (net, cache index) with isomorphic networks evaluated once, as measure does
    for c in contractions.values():
        for net, _ in tuple_networks(c):
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
    _sync(device)
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
    check = Engine(obj, tuples[:count], chunk_size=None, budget=None)
    worst = 0.0
    for net, vals in naive_values.items():
        ref = check.tuple_values(net, tuples[:count], "check").float()
        worst = max(worst, float((vals - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    print(f"naive vs engine per-tuple values: max relative difference {worst:.2e}\n")

    print("| method | single-row derivatives | seconds | µs / derivative | × tuples | notes |")
    print("|---|---|---|---|---|---|")
    for name, ev, sec, note in rows:
        print(
            f"| {name} | {ev:,} | {sec:.2f} | {1e6 * sec / max(ev, 1):.1f} "
            f"| {sec / tuple_seconds:.1f} | {note} |"
        )
    if not args.skip_groups:
        keys = list(tup.contractions)
        z = [(tup.value(k) - grp.value(k)) / np.hypot(tup.se(k), grp.se(k)) for k in keys]
        print(f"\ntuples vs groups: max |difference| / combined SE = {np.max(np.abs(z)):.2f}")
        ratio = np.median([tup.se(k) / grp.se(k) for k in keys if grp.se(k) > 0])
        print(f"median SE ratio tuples / groups = {ratio:.2f}")


if __name__ == "__main__":
    main()
