"""Directional derivatives (perturb.numeric.derivatives): the reverse-first path equals
the forward one; the rows per vectorized call stay within the memory budget."""

from __future__ import annotations

import pytest
import torch
from measure_models import (
    F64,
    _assert_close,
    _case,
    _one_thread,  # noqa: F401
)

from perturb.numeric.adapters import objective
from perturb.numeric.derivatives import (
    MAX_VMAP_ROWS,
    VMAP_BUDGET,
    auto_chunk,
    derivative,
    vmap_rows,
)


def test_reverse_first_derivative_equals_forward():
    # On CUDA vector nodes start from the reverse-over-reverse HVP; the number is the same
    model, data, theta0, *_ = _case("mlp")
    obj = objective(model, data, theta0, loss=None, dtype=F64, device=None)
    gen = torch.Generator().manual_seed(1)
    rows = obj.rows
    us = tuple(torch.randn(obj.n, obj.size, generator=gen, dtype=F64) for _ in range(2))
    for k in (0, 1, 2):
        fwd = torch.func.vmap(derivative(obj.single, True), in_dims=(None, 0, 0))
        rev = torch.func.vmap(
            derivative(obj.single, True, reverse_first=True), in_dims=(None, 0, 0)
        )
        want, got = fwd(obj.theta0, rows, us[:k]), rev(obj.theta0, rows, us[:k])
        _assert_close(got.numpy(), want.numpy(), 1e-12, f"k = {k}")
        assert want.abs().max() > 1e-3


def test_vmap_rows_keeps_every_call_under_the_budget():
    """``c · 2^{m+1} · P · s ≤ budget`` whenever one row fits, ``c`` is the largest such
    (or 256), and one row when even one does not fit."""
    for p in (1, 10, 999, 10**4, 98_666, 10**6, 1_028_466, 10**7, 10**9):
        for itemsize in (4, 8):
            for order in (1, 2, 3):
                for budget in (2**20, VMAP_BUDGET):
                    c = vmap_rows(p, itemsize=itemsize, order=order, budget=budget)
                    per_row = 2 ** (order + 1) * p * itemsize
                    assert 1 <= c <= MAX_VMAP_ROWS
                    if per_row <= budget:
                        assert c * per_row <= budget
                        assert c == MAX_VMAP_ROWS or (c + 1) * per_row > budget
                    else:
                        assert c == 1
    assert VMAP_BUDGET == 2**28 and vmap_rows(1_002_566, itemsize=4, order=2) == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parameters": 0, "itemsize": 4}, "parameters must be an integer ≥ 1, got 0"),
        ({"parameters": 10, "itemsize": 2.0}, "itemsize must be an integer ≥ 1, got 2.0"),
        ({"parameters": 10, "itemsize": 4, "order": 0}, "order must be an integer ≥ 1, got 0"),
        ({"parameters": 10, "itemsize": 4, "budget": -1}, "budget must be an integer ≥ 1, got -1"),
    ],
)
def test_vmap_rows_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vmap_rows(**kwargs)


def test_auto_chunk_on_the_cpu_is_capped_by_the_budget():
    """16 MB messages, at least 16 rows, unless an order-3 node of that many rows would
    exceed :data:`VMAP_BUDGET`: then :func:`vmap_rows` of it (float32: 2^28 / (16·4P))."""
    rows = torch.zeros(4, 1)
    for p, want in [(3, 1024), (10**5, 20), (10**6, 4), (2**23, 1)]:
        obj = objective(lambda t, x: (t * x).sum(), rows, torch.zeros(p), dtype=torch.float32)
        assert auto_chunk(obj) == want
