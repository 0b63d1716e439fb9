"""Directional derivatives (perturb.numeric.derivatives): the reverse-first path equals
the forward one."""

from __future__ import annotations

import torch
from measure_models import (
    F64,
    _assert_close,
    _case,
    _one_thread,  # noqa: F401
)

from perturb.numeric.adapters import objective
from perturb.numeric.derivatives import derivative


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
