"""Contraction networks (perturb.numeric.networks): ``contraction_value`` with chunking and
tiny message budgets, moment-form networks, unbiased U-statistics, and tuple values
averaged over assignments against the complete U-statistic."""

from __future__ import annotations

import itertools

import pytest
import torch
from measure_models import (
    F64,
    POLY_DATA,
    POLY_TH,
    SCHEDULES,
    _assert_close,
    _case,
    _one_thread,  # noqa: F401
    poly_loss,
)

from perturb import QUANTITIES, Contraction, Epochs, Online, series
from perturb.numeric.adapters import objective
from perturb.numeric.engine import Engine
from perturb.numeric.measuring import measure
from perturb.numeric.networks import contraction_value, moment_network, tuple_size, tuple_values
from perturb.reference.tensors import derivative_tensors


def test_chunked_and_conditioned_paths_agree():
    # A tiny message budget forces the outer loop over chunks of samples for the open blocks,
    # and a small chunk_size splits every vmap; values must not change.  The networks with
    # most open blocks are the order-3 ones with several multi-node parts (torch.func costs
    # ~10 ms a call on these tiny functions, so only a few of them).
    model, data, theta0, per_row, rows = _case("poly")
    derivs = derivative_tensors(per_row, rows, theta0, 3)
    for schedule, quantity, budget in [
        (Epochs(train_size=4, batch_size=2, epochs=2), "train", 1),
        (Online(steps=2, batch_size=1), "displacement", 12),
    ]:
        terms = [t for t in series(3, schedule, quantity).terms if t.power == 3]
        terms.sort(key=lambda t: -sum(len(p) > 1 for p in t.contraction.parts))
        for term in terms[:3]:
            c = term.contraction
            got = contraction_value(
                c, model, data, theta0, chunk_size=3, max_message_elements=budget
            )
            _assert_close(got, c.value(derivs), 1e-10, c.text)


def test_moment_network_matches_moment_form():
    model, data, theta0, per_row, rows = _case("mlp")
    derivs = derivative_tensors(per_row, rows, theta0, 3)
    for parents, parts, open_root in [
        ((-1, 0, 1, 0), ((0, 2), (1, 3)), False),
        ((-1, 0, 1, 1), ((0,), (1, 2), (3,)), False),
        ((-1, 0, 1, 2), ((0,), (1, 3), (2,)), True),
    ]:
        net = Contraction(parents=parents, parts=parts, form="moment", open_root=open_root)
        _assert_close(moment_network(net, model, data, theta0), net.value(derivs), 1e-10, net.text)


def test_unbiased_value_is_distinct_tuple_average():
    # G·G and a train-root tr(C) by hand: U-statistics over distinct rows.
    rows = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 2.0, 0.0], [0.3, -0.4, 1.0]], dtype=F64)
    g = torch.func.vmap(torch.func.grad(poly_loss), in_dims=(None, 0))(POLY_TH, rows)
    n = len(rows)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    gg = sum(float(g[i] @ g[j]) for i, j in pairs) / len(pairs)
    c = Contraction(parents=(-1, 0), parts=((0,), (1,)))
    got = contraction_value(c, poly_loss, rows, POLY_TH, unbiased=True)
    assert abs(float(got) - gg) < 1e-12
    trc = Contraction(parents=(-1, 0), parts=((0, 1),))
    mean_sq = sum(float(g[i] @ g[i]) for i in range(n)) / n
    want = mean_sq - gg  # unbiased E|g|² − |E g|²
    got = contraction_value(trc, poly_loss, rows, POLY_TH, unbiased=True)
    assert abs(float(got) - want) < 1e-12


@pytest.mark.parametrize("name", ["poly", pytest.param("mlp", marks=pytest.mark.slow)])
def test_tuples_average_over_assignments_is_complete_u_statistic(name):
    # One tuple uses one assignment of its m rows to the blocks.  Averaged over all m!
    # orderings of the same m rows it is the complete U-statistic of those rows (every
    # injective map of a refinement's blocks into the rows occurs equally often), which the
    # group estimator computes (validated by hand in the test above).  Every order-3
    # contraction of every schedule and quantity, on the polynomial (-m slow: and the MLP,
    # the same networks on another model).
    perms = torch.tensor(list(itertools.permutations(range(4))))
    model, data, theta0, *_ = _case(name)
    sub = tuple(d[:4] for d in data) if isinstance(data, tuple) else data[:4]
    complete = measure(
        model,
        sub,
        theta0,
        order=3,
        schedules=SCHEDULES,
        quantities=QUANTITIES,
        groups=1,
        estimator="groups",
        progress=False,
    )
    obj = objective(model, sub, theta0, loss=None, dtype=F64, device=None)
    engine = Engine(obj, perms, chunk_size=64, budget=None)
    for key, c in complete.contractions.items():
        got = tuple_values(engine, c, perms).mean(dim=0)
        want = complete.group_values[key][0]
        _assert_close(got.numpy(), want, 1e-10, f"{name} {c.text} (m={tuple_size(c)})")
    # and explicitly from per-row gradients and Hessians: tr(C H) = E g_b·H_a g_b −
    # g_b·H_a g_c over distinct (a, b, c), with H at the (test) root
    rows = POLY_DATA
    g = torch.func.vmap(torch.func.grad(poly_loss), in_dims=(None, 0))(POLY_TH, rows)
    h = torch.func.vmap(torch.func.hessian(poly_loss), in_dims=(None, 0))(POLY_TH, rows)
    triples = list(itertools.permutations(range(4), 3))
    want = sum(float(g[b] @ h[a] @ g[b] - g[b] @ h[a] @ g[c]) for a, b, c in triples)
    want /= len(triples)
    obj = objective(poly_loss, rows, POLY_TH, loss=None, dtype=F64, device=None)
    engine = Engine(obj, perms, chunk_size=64, budget=None)
    trch = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))
    got = float(tuple_values(engine, trch, perms).mean())
    assert abs(got - want) < 1e-12 * max(1.0, abs(want))
