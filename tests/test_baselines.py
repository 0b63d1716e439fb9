"""ODE and SDE predictors against a numerical solver and exact SGD recursions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from perturb.baselines import QuadraticModel, ode_test_loss, sde_test_loss


def _model(p=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    b = torch.randn(p, p, generator=gen, dtype=torch.float64)
    cov = b @ b.T / p  # does not commute with hess
    grad = torch.randn(p, generator=gen, dtype=torch.float64)
    return QuadraticModel(torch.tensor(2.0, dtype=torch.float64), grad, hess, cov)


def _solve_moments(q: QuadraticModel, lr, steps, batch_size):
    """Integrate dm/dt = −(G + Hm), dΣ/dt = −HΣ − ΣH + (η/B)C with scipy."""
    p = len(q.grad)
    h, c, g = q.hess.numpy(), q.cov.numpy(), q.grad.numpy()

    def rhs(_, y):
        m, s = y[:p], y[p:].reshape(p, p)
        ds = -h @ s - s @ h + (lr / batch_size) * c
        return np.concatenate([-(g + h @ m), ds.ravel()])

    sol = solve_ivp(rhs, (0, lr * steps), np.zeros(p + p * p), rtol=1e-11, atol=1e-13)
    m, s = sol.y[:p, -1], sol.y[p:, -1].reshape(p, p)
    ode = float(q.loss) + g @ m + 0.5 * m @ h @ m
    return ode, ode + 0.5 * np.trace(h @ s)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("lr", "steps", "batch_size"), [(0.01, 100, 1), (0.05, 200, 4)])
def test_closed_forms_match_numerical_integration(seed, lr, steps, batch_size):
    q = _model(seed=seed)
    ode, sde = _solve_moments(q, lr, steps, batch_size)
    assert float(ode_test_loss(q, lr=lr, steps=steps)) == pytest.approx(ode, rel=1e-8)
    got = float(sde_test_loss(q, lr=lr, steps=steps, batch_size=batch_size))
    assert got == pytest.approx(sde, rel=1e-8)


def _sgd_exact(q: QuadraticModel, lr, steps, batch_size):
    """Exact E l(θ_T) of online SGD on l_x = l + (G + ξ)·Δ + ½ΔᵀHΔ, Cov ξ = C."""
    p = len(q.grad)
    k = torch.eye(p, dtype=torch.float64) - lr * q.hess
    m = torch.zeros(p, dtype=torch.float64)
    s = torch.zeros(p, p, dtype=torch.float64)
    for _ in range(steps):
        m = k @ m - lr * q.grad
        s = k @ s @ k + lr**2 * q.cov / batch_size
    return float(q.loss + q.grad @ m + 0.5 * m @ q.hess @ m + 0.5 * torch.trace(q.hess @ s))


def test_sde_is_the_small_lr_limit_of_sgd_at_fixed_time():
    """At fixed ηT = 2 the SGD − SDE gap shrinks linearly in η (discretization error)."""
    q = _model(seed=3)
    gaps = []
    for lr in (0.02, 0.01, 0.005):
        steps = round(2 / lr)
        gaps.append(_sgd_exact(q, lr, steps, 1) - float(sde_test_loss(q, lr=lr, steps=steps)))
    assert abs(gaps[0] / gaps[1] - 2) < 0.1 and abs(gaps[1] / gaps[2] - 2) < 0.1


def test_flat_directions_are_handled():
    q = QuadraticModel(
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64)),
        torch.eye(2, dtype=torch.float64),
    )
    # flat direction: the loss decreases linearly, −|G|² t; noise there does not count (h = 0)
    assert float(ode_test_loss(q, lr=0.1, steps=10)) == pytest.approx(-1.0, rel=1e-12)
    extra = float(sde_test_loss(q, lr=0.1, steps=10) - ode_test_loss(q, lr=0.1, steps=10))
    assert extra == pytest.approx(0.5 * 0.1 * (1 - np.exp(-2)) / 2, rel=1e-12)
