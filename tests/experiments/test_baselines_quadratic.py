"""The quadratic model (perturb.experiments.baselines.quadratic): ODE and SDE predictors
against a numerical solver and exact SGD recursions, the discrete transient
``lyapunov_test_loss``, the ``η/B`` leftovers of the engine's series, and the mean Hessian
and per-sample derivatives against autograd."""

from __future__ import annotations

import numpy as np
import pytest
import sympy
import torch
from baseline_models import _linear_problem, _model
from scipy.integrate import solve_ivp

import perturb
from perturb.experiments.baselines import (
    QuadraticModel,
    ode_test_loss,
    sde_test_loss,
    stationary_excess_loss,
)


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


@pytest.mark.parametrize(("lr", "steps", "batch_size"), [(0.05, 40, 1), (0.3, 17, 3), (0.9, 9, 2)])
def test_lyapunov_test_loss_is_the_exact_sgd_recursion(lr, steps, batch_size):
    """The eigenbasis closed form equals the matrix recursion of the moments (_sgd_exact)."""
    from perturb.experiments.baselines import lyapunov_test_loss

    q = _model(seed=4)
    got = float(lyapunov_test_loss(q, lr=lr, steps=steps, batch_size=batch_size))
    assert got == pytest.approx(_sgd_exact(q, lr, steps, batch_size), rel=1e-10)


def test_lyapunov_test_loss_tends_to_the_stationary_loss():
    from perturb.experiments.baselines import lyapunov_test_loss

    h, c, _ = _linear_problem(p=4, seed=3)
    g = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    q = QuadraticModel(torch.tensor(1.0, dtype=torch.float64), g, h, c)
    floor = 1.0 - 0.5 * float(g @ torch.linalg.solve(h, g))
    want = floor + float(stationary_excess_loss(h, c, lr=0.2, batch_size=2))
    got = float(lyapunov_test_loss(q, lr=0.2, steps=2000, batch_size=2))
    assert got == pytest.approx(want, rel=1e-10)


def test_eta_over_b_leftovers_of_the_engines_series():
    """docs/baselines.md: at T = τ/η, B = η/n the series depends on η only through these."""
    tau, n, eta = sympy.symbols("tau n eta", positive=True)
    sched = perturb.Online()
    s = perturb.series(3, sched)
    t_sym, b_sym = sched.batches, sched.batch_size
    leftover = {}
    for term in s.terms:
        c = sympy.expand(
            (term.coefficient * eta**term.power).subs({t_sym: tau / eta, b_sym: eta / n})
        )
        rest = sympy.expand(c - c.subs(eta, 0))  # the part that does not collapse
        lead = sympy.expand(rest.coeff(eta, 1) * eta)
        if lead != 0:
            leftover[term.contraction.text] = sympy.factor(lead)
    assert leftover == {
        "G·H·G": -eta * tau / 2,
        "G·H·H·G": eta * tau**2,
        "G_a J_abc G_b G_c": eta * tau**2 / 4,
        "tr(C H H)": eta * tau * n / 2,
        "G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc": eta * tau * n / 2,
        "C_(a,b) J_abc G_c": eta * tau * n / 4,
    }


def test_mean_hessian_equals_materialized_hessian():
    # independent reference: torch.func.hessian of the mean loss, float64
    from perturb.experiments.baselines import mean_hessian
    from perturb.experiments.models import mlp
    from perturb.experiments.simulation import model_loss

    gen = torch.Generator().manual_seed(0)
    loss_fn, theta0 = model_loss(mlp((1, 2, 2), 3, hidden=(4,)).double())
    x = torch.randn(10, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    ref = torch.func.hessian(lambda t: loss_fn(t, x, y).mean())(theta0)
    for chunk in (1, 7, 1000):
        got = mean_hessian(loss_fn, theta0, x, y, chunk=chunk)
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="chunk must be an integer ≥ 1"):
        mean_hessian(loss_fn, theta0, x, y, chunk=0)
    with pytest.raises(ValueError, match="1-D parameter vector"):
        mean_hessian(loss_fn, theta0[None], x, y)


def test_per_sample_derivatives_equal_an_autograd_loop():
    # independent reference: one torch.autograd.grad per sample, float64
    from perturb.experiments.baselines import per_sample_derivatives
    from perturb.experiments.models import mlp
    from perturb.experiments.simulation import model_loss

    gen = torch.Generator().manual_seed(1)
    loss_fn, theta0 = model_loss(mlp((1, 2, 2), 3, hidden=(4,)).double())
    x = torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    got = per_sample_derivatives(loss_fn, theta0, x, y)
    for i in range(6):
        t = theta0.clone().requires_grad_(True)
        value = loss_fn(t, x[i : i + 1], y[i : i + 1])[0]
        (g,) = torch.autograd.grad(value, t)
        assert abs(float(got[0][i]) - value.detach().item()) < 1e-14
        assert torch.allclose(got[1][i], g, rtol=0, atol=1e-14)
