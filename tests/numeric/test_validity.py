"""Validity estimates (perturb.numeric.validity) against closed forms and exact recursions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import perturb
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.validity import (
    curvature_radius,
    mean_square_excess,
    rms_displacement,
    truncation_estimates,
)


@pytest.mark.parametrize("ratio", [0.5, 0.1, -0.3])
def test_truncation_estimates_are_exact_on_geometric_series(ratio):
    """For ``c_d = r^d`` the tail after ``d`` is ``r^{d+1}/(1 − r)``; the estimate uses
    the terms measured up to ``D`` and the geometric continuation of the last one, so the
    estimate of the last partial sum is the next term, ``|r|^{D+1}``."""
    c = ratio ** np.arange(4.0)
    est = truncation_estimates(c[None, :])[0]
    assert est[-1] == pytest.approx(abs(ratio) ** 4, rel=1e-12)
    for d in range(3):
        assert est[d] == pytest.approx(np.abs(c[d + 1 :]).sum() + abs(ratio) ** 4, rel=1e-12)


def test_truncation_estimates_edge_cases():
    assert np.isinf(truncation_estimates(np.array([[1.0]]))).all()  # nothing to continue
    got = truncation_estimates(np.array([[1.0, np.inf, 0.1], [1.0, 0.0, 0.0]]))
    assert np.isinf(got[0, :2]).all() and got[1].tolist() == [0.0, 0.0, 0.0]
    extra = truncation_estimates(np.array([[1.0, 0.1]]), extra=np.array([[0.5, -0.5]]))
    np.testing.assert_allclose(extra, [[0.01 + 0.5 + 0.1, 0.01 + 0.5]])
    with pytest.raises(ValueError, match="at least one order"):
        truncation_estimates(np.zeros((2, 0)))


def _moments(hess, grad, cov, lr, steps, batch_size=1, train_size=None):
    """E‖Δθ_T‖² by the exact recursions of the quadratic model (independent of the
    closed form): online, ``m ← m − η(G + Hm)``, ``S ← KSK + η²C/B``; GD, ``Δ_T = A G_N``
    with ``A ← KA − ηI`` and ``Cov G_N = C/N``."""
    p = hess.shape[0]
    eye = torch.eye(p, dtype=torch.float64)
    k = eye - lr * hess
    if train_size is None:
        m, s = torch.zeros(p, dtype=torch.float64), torch.zeros(p, p, dtype=torch.float64)
        for _ in range(steps):
            m, s = k @ m - lr * grad, k @ s @ k + lr**2 / batch_size * cov
        return float(m @ m + torch.trace(s))
    a = torch.zeros(p, p, dtype=torch.float64)
    for _ in range(steps):
        a = k @ a - lr * eye
    return float((a @ grad) @ (a @ grad) + torch.trace(a @ cov @ a.T) / train_size)


@pytest.mark.parametrize("kind", ["online-B1", "online-B3", "gd-N5"])
def test_rms_displacement_equals_the_moment_recursion(kind):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    hess = a @ a.T / 4 - 0.2 * torch.eye(4, dtype=torch.float64)  # one negative direction
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    cov, grad = b @ b.T / 6, torch.randn(4, generator=gen, dtype=torch.float64)
    kw = {"batch_size": 3} if kind == "online-B3" else {}
    kw |= {"train_size": 5} if kind == "gd-N5" else {}
    for lr, steps in ((0.05, 7), (0.3, 40)):
        got = rms_displacement(hess, grad, cov, lr=[lr], steps=steps, **kw)[0]
        assert got**2 == pytest.approx(_moments(hess, grad, cov, lr, steps, **kw), rel=1e-10)


def test_curvature_radius_of_a_known_cubic():
    """``l = ½|p|² + (c/6)(u·p)³`` at ``p = 0``: ``H = I``, ``J = c u⊗u⊗u``, ``ρ = 1/c``."""
    u = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    c = 2.5
    pop = perturb.Population(
        lambda p, x: 0.5 * (p * p).sum() + c / 6 * (u @ p) ** 3 + x @ p,
        torch.eye(3, dtype=torch.float64),
    )
    sub = krylov_subspace(pop, None, torch.zeros(3, dtype=torch.float64), rank=3, order=3)
    assert curvature_radius(sub) == pytest.approx(1 / c, rel=1e-9)
    second = krylov_subspace(pop, None, torch.zeros(3, dtype=torch.float64), rank=3, order=2)
    assert math.isinf(curvature_radius(second))  # no J projected: no limit known


def test_mean_square_excess_in_one_dimension():
    """``H_i = x_i`` (two rows): the second-moment rate ``(1 − ηh)² + η²Var(x)/B``, its
    growth ``(T/2)·log`` of it, minus the mean dynamics' ``T·log|1 − ηh|`` where that is
    positive; ``nan`` without per-sample Hessians."""
    xs = torch.tensor([[0.2], [1.8]], dtype=torch.float64)
    pop = perturb.Population(lambda p, x: (x * p * p).sum() / 2, xs)
    sub = krylov_subspace(pop, None, torch.ones(1, dtype=torch.float64), rank=1,
                          order=2, schedules=[perturb.GD()])  # fmt: skip
    h, var = 1.0, 0.64
    for lr, batch in ((0.5, 1), (1.5, 1), (1.5, 4), (2.2, 1)):
        rate = (1 - lr * h) ** 2 + lr**2 * var / batch
        mean = max(0.0, 20 * math.log(abs(1 - lr * h)))
        want = max(0.0, 10 * math.log(rate) - mean) if rate > 1 else 0.0
        got = mean_square_excess(sub, lr=[lr], steps=20, batch_size=batch)[0]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (lr, batch)
    grid = mean_square_excess(sub, lr=[0.5, 1.5, 2.2], steps=[1, 20, 300])
    for j, steps in enumerate((1, 20, 300)):
        one = mean_square_excess(sub, lr=[0.5, 1.5, 2.2], steps=steps)
        np.testing.assert_allclose(grid[:, j], one, rtol=1e-12)
    online = krylov_subspace(pop, None, torch.ones(1, dtype=torch.float64), rank=1, order=1)
    assert np.isnan(mean_square_excess(online, lr=[0.1], steps=5)).all()


def test_overshoot_counts_expected_draws_of_the_samples_that_overshoot():
    """``ηλ/B``: with B = 2 a sample's curvature counts half; the expected number of
    draws of the overshooting samples after T steps is ``T·B·count/n``."""
    from perturb.numeric.validity import overshoot

    out = overshoot([10.0, 6.0, 1.0], lr=[0.1, 0.5, 1.0], steps=50, batch_size=2, population=100)
    np.testing.assert_allclose(out["overshoot"], [0.5, 2.5, 5.0])
    np.testing.assert_allclose(out["overshoot_draws"], [0.0, 1.0, 2.0])  # 0, 1, 2 samples > 2
