"""Shared fixtures: small landscapes written both in sympy (exact) and torch.

The suite runs on every core with pytest-xdist (``-n auto`` in pyproject.toml), one
process per core; each worker keeps torch to one intra-op thread, so that the workers do
not oversubscribe the machine (tests that compare thread counts set them explicitly).
"""

from __future__ import annotations

import os

import pytest
import sympy as sp
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _landscape():
    """Three rows of a 2-D cubic landscape whose G, H, J, C, S all vary by row."""
    x, y = sp.symbols("x y")
    losses = [
        x**2 / 2 + x * y - y + sp.Rational(1, 3) * x**3,
        2 * y**2 + x - x * y**2 / 2 + y**3,
        x * y + sp.Rational(1, 2) * x**2 * y - x + sp.Rational(1, 4) * y**4,
    ]
    theta0 = [sp.Rational(1, 2), -1]
    return losses, [x, y], theta0


@pytest.fixture(scope="session")
def landscape():
    """(losses, params, theta0) of the sympy landscape."""
    return _landscape()


@pytest.fixture(scope="session")
def torch_landscape():
    """The same landscape as a Population-style ``loss_fn(params, row)`` and rows."""
    losses, params, theta0 = _landscape()
    fns = [sp.lambdify(params, loss, modules="math") for loss in losses]

    def loss_fn(p, row):
        # row is a one-hot of the population row; each fn is a polynomial, torch-friendly
        values = torch.stack([fn(p[0], p[1]) * torch.ones((), dtype=p.dtype) for fn in fns])
        return (row * values).sum()

    data = torch.eye(len(losses), dtype=torch.float64)
    theta = torch.tensor([float(v) for v in theta0], dtype=torch.float64)
    return loss_fn, data, theta


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: faster, and robust to a busy
    machine (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
