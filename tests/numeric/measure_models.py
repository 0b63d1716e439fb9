"""Landscapes and helpers shared by the tests of the matrix-free measure path (not a test file).

Imported by test_adapters, test_derivatives, test_engine, test_networks, test_measuring and
test_statistics (``from measure_models import ...``): a 3-parameter polynomial landscape with
rational data (sympy and torch), a small MLP and a tiny convnet, their materialized
reference tensors, the order-3 exact statistics of ``SCHEDULES`` (computed once per session
and shared by the files that use them) and the autouse single-thread fixture.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
import torch
from sympy import Rational as R
from torch import nn

from perturb import GD, QUANTITIES, Epochs, Online
from perturb.numeric.adapters import FlatLoss, flat_loss
from perturb.numeric.measuring import measure
from perturb.reference.tensors import derivative_tensors

F64 = torch.float64
SCHEDULES = (
    Online(steps=3, batch_size=2),
    Epochs(train_size=4, batch_size=2, epochs=2, shuffle=True),
    Epochs(train_size=4, batch_size=2, epochs=2, shuffle=False),
    GD(train_size=3, steps=2),
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The networks here are tiny: one intra-op thread avoids thread-pool overhead (and spin
    # waits on a shared 2-core machine) that would dominate the run time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ landscapes

U, V, W = sympy.symbols("u v w")
POLY_ROWS = [(1, 0, R(1, 2)), (-1, 2, 0), (0, -1, -1), (R(1, 2), R(1, 3), 1)]
POLY_THETA0 = [R(1, 2), R(-1, 3), R(1, 4)]


def _poly(a, b, c, u, v, w):
    """A 3-parameter polynomial with noisy gradient, Hessian and third derivatives."""
    return (
        u**2 / 2 + v**2 + u * v / 3 + a * u + b * v + c * u**2 * v + u**4 / 12
        + a * w**3 / 6 + b * u * w + w**2 / 2 + c * v * w**2
    )  # fmt: skip


def poly_loss(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _poly(x[0], x[1], x[2], p[0], p[1], p[2])


POLY_DATA = torch.tensor([[float(v) for v in row] for row in POLY_ROWS], dtype=F64)
POLY_TH = torch.tensor([float(v) for v in POLY_THETA0], dtype=F64)


def _mlp() -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.8)
    return net  # 53 parameters


def _convnet() -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(2, 2, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.6)
    return net  # 67 parameters


def _image_data(shape, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=gen, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def _packed(fn: FlatLoss, x: torch.Tensor, y: torch.Tensor):
    """A per-row loss and packed rows (x flattened, label last) for the materialized path."""
    shape = x.shape[1:]
    d = math.prod(shape)
    rows = torch.cat([x.reshape(len(x), d), y[:, None].to(F64)], dim=1)

    def per_row(p, row):
        return fn(p, row[:d].reshape(1, *shape), row[d:].long())[0]

    return per_row, rows


def _case(name: str):
    """(what measure takes, data, theta0, per-row loss, rows) for one landscape."""
    if name == "poly":
        return poly_loss, POLY_DATA, POLY_TH, poly_loss, POLY_DATA
    net = _mlp() if name == "mlp" else _convnet()
    x, y = _image_data((1, 2, 3) if name == "mlp" else (1, 4, 4), 5, seed=3)
    fn, theta0 = flat_loss(net)
    per_row, rows = _packed(fn, x, y)
    return net, (x, y), theta0, per_row, rows


_CACHE: dict = {}


def _exact(name: str):
    """Exact statistics of every order-3 contraction of SCHEDULES, and the reference tensors."""
    if name not in _CACHE:
        model, data, theta0, per_row, rows = _case(name)
        stats = measure(
            model,
            data,
            theta0,
            order=3,
            schedules=SCHEDULES,
            quantities=QUANTITIES,
            exact=True,
            progress=False,
        )
        derivs = derivative_tensors(per_row, rows, theta0, 3)
        _CACHE[name] = (stats, derivs, per_row, rows, theta0)
    return _CACHE[name]


def _assert_close(got, ref, rel: float, what: str) -> None:
    got = np.asarray(got, dtype=float)
    ref = np.asarray(ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else ref, float)
    scale = max(float(np.max(np.abs(ref))), 1e-300)
    err = float(np.max(np.abs(got - ref))) / scale
    assert err <= rel, f"{what}: relative error {err:.3g} (got {got}, want {ref})"
