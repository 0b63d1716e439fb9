"""Validity estimates (perturb.numeric.validity) against closed forms and exact recursions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import perturb
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.validity import (
    curvature_radius,
    hessian_ladder,
    ladder_loss,
    mean_square_excess,
    rms_displacement,
    truncation_estimates,
)
from perturb.reference.enumeration import expected_loss


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


def _moments(hess, grad, cov, lr, schedule):
    """E‖Δθ_T‖² of the quadratic model, exactly and independently of the closed form.

    ``θ_T − θ_0`` is linear in the training points' gradient noises ``ζ_i`` (iid,
    covariance ``C``): ``Δ_T = A G + Σ_i A_i ζ_i`` with ``A = −η Σ_t K^{T−1−t}`` and
    ``A_i = −(η/B) Σ_{t: i ∈ b_t} K^{T−1−t}``, so ``E‖Δ_T‖² = |A G|² + Σ_i tr(A_i C A_iᵀ)``.
    Online draws fresh points each step; epochs in a fixed order reuse batch ``t mod M``;
    reshuffled epochs average that over every permutation of every epoch.
    """
    m, b, e = int(schedule.batches), int(schedule.batch_size), int(schedule.epochs)
    n, steps = m * b, m * e
    p = hess.shape[0]
    eye = torch.eye(p, dtype=torch.float64)
    k = eye - lr * hess
    powers = [torch.linalg.matrix_power(k, steps - 1 - t) for t in range(steps)]
    mean = -lr * sum(powers) @ grad

    def noise(orders):  # orders[e]: the points in epoch e's order
        total = 0.0
        for i in range(n):
            a = sum(powers[ep * m + orders[ep].index(i) // b] for ep in range(e)) * (-lr / b)
            total += float(torch.trace(a @ cov @ a.T))
        return total

    if schedule.name == "online":  # every step fresh points: its own batch, no reuse
        var = sum(float(torch.trace(q @ cov @ q.T)) for q in powers) * lr**2 / b
    elif schedule.shuffle:
        perms = list(itertools.permutations(range(n)))
        var = np.mean([noise(list(o)) for o in itertools.product(perms, repeat=e)])
    else:
        var = noise([list(range(n))] * e)
    return float(mean @ mean) + var


@pytest.mark.parametrize(
    "schedule",
    [
        perturb.Online(steps=7, batch_size=1),
        perturb.Online(steps=40, batch_size=3),
        perturb.GD(train_size=5, steps=7),
        perturb.GD(train_size=5, steps=40),
        perturb.Epochs(train_size=4, batch_size=2, epochs=3),
        # reshuffled epochs of 2 batches: the twin of the fixed-order case above and of the
        # reshuffled case below (-m slow)
        pytest.param(
            perturb.Epochs(train_size=4, batch_size=2, epochs=3, shuffle=True),
            marks=pytest.mark.slow,
        ),
        perturb.Epochs(train_size=3, batch_size=1, epochs=4, shuffle=True),
        perturb.Epochs(train_size=6, batch_size=3, epochs=1, shuffle=True),
    ],
    ids=lambda s: f"{s.name}-M{s.batches}-B{s.batch_size}-E{s.epochs}{'-s' * s.shuffle}",
)
def test_rms_displacement_equals_the_exact_second_moment(schedule):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    hess = a @ a.T / 4 - 0.2 * torch.eye(4, dtype=torch.float64)  # one negative direction
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    cov, grad = b @ b.T / 6, torch.randn(4, generator=gen, dtype=torch.float64)
    for lr in (0.05, 0.3):
        got = rms_displacement(hess, grad, cov, lr=[lr], schedule=schedule)[0]
        assert got**2 == pytest.approx(_moments(hess, grad, cov, lr, schedule), rel=1e-10)


def test_reshuffling_changes_the_displacement():
    """Shuffled and fixed epochs differ (the check above could not pass by one formula)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    hess, cov, grad = a @ a.T / 3, torch.eye(3, dtype=torch.float64), torch.zeros(3)
    fixed, shuffled = (
        rms_displacement(hess, grad.double(), cov, lr=[0.2],
                         schedule=perturb.Epochs(train_size=4, batch_size=1, epochs=3,
                                                 shuffle=s))[0]
        for s in (False, True)
    )  # fmt: skip
    assert abs(fixed - shuffled) > 1e-3 * fixed


def test_rms_displacement_rejects_a_symbolic_schedule():
    one = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="numeric Schedule, got"):
        rms_displacement(one, one[0], one, lr=[0.1], schedule=perturb.Online())
    with pytest.raises(ValueError, match="numeric Schedule, got"):
        rms_displacement(one, one[0], one, lr=[0.1], schedule=10)


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


def _quadratic_rows(hs, gs):
    """Rows ``(vec H_i, g_i)`` of the population ``l_i(θ) = ½θᵀH_iθ + g_iᵀθ``, and its loss."""
    p = gs.shape[1]

    def loss(theta, row):
        return 0.5 * theta @ row[: p * p].reshape(p, p) @ theta + row[p * p :] @ theta

    return torch.cat([torch.as_tensor(hs).reshape(len(hs), -1), torch.as_tensor(gs)], 1), loss


def _independent_population():
    """Every pair of three per-sample Hessian fluctuations ``A_a`` (mean zero) and two
    gradient noises ``±ζ``: ``A_i`` and ``ζ_i`` independent, so the 3-edge mixed term
    ``E[A_i m ζ_iᵀ]`` is zero."""
    h = np.array([[1.0, 0.3], [0.3, 0.5]])
    a1, a2 = np.array([[0.6, -0.2], [-0.2, 0.1]]), np.array([[-0.1, 0.4], [0.4, -0.5]])
    g, zeta = np.array([0.7, -0.4]), np.array([0.5, 0.8])
    pairs = [(h + a, g + s * zeta) for a in (a1, a2, -a1 - a2) for s in (1.0, -1.0)]
    return h, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.mark.parametrize(("batch_size", "steps"), [(1, 5), (2, 3)])
def test_ladder_loss_is_the_exact_loss_the_per_sample_hessians_add(batch_size, steps):
    """On a quadratic population whose per-sample Hessians and gradients are independent,
    the exact expected loss (every sample sequence enumerated,
    :func:`perturb.reference.enumeration.expected_loss`) minus that of the same population
    with every ``H_i = H`` is the ladder, at every step; and :func:`hessian_ladder` on a
    full-rank Krylov subspace of that population gives the same numbers."""
    h, hs, gs = _independent_population()
    lr, zero = 0.4, torch.zeros(2, dtype=torch.float64)
    rows, loss = _quadratic_rows(hs, gs)
    flat, _ = _quadratic_rows(np.repeat(h[None], len(hs), 0), gs)
    exact = [0.0]
    for t in range(1, steps + 1):
        sched = perturb.Online(steps=t, batch_size=batch_size)
        with_a = expected_loss(loss, rows, zero, sched, lr=lr)
        exact.append(with_a - expected_loss(loss, flat, zero, sched, lr=lr))
    assert exact[-1] > 1e-3  # the ladder is there to be found
    t = torch.as_tensor
    got = ladder_loss(
        t(h), t(hs), t(gs.mean(0)), t(gs), lr=[lr], steps=list(range(steps + 1)),
        batch_size=batch_size,
    )[0]  # fmt: skip
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-14)
    sub = krylov_subspace(perturb.Population(loss, rows), None, zero, rank=2, order=3)
    via = hessian_ladder(sub, lr=[lr], steps=steps, batch_size=batch_size)
    assert via[0] == pytest.approx(exact[-1], rel=1e-10)
    with pytest.raises(ValueError, match=r"rank must be an integer in 1\.\.2"):
        hessian_ladder(sub, lr=[lr], steps=steps, rank=3)


def test_ladder_loss_inputs_and_limits():
    one = torch.ones(1, 1, dtype=torch.float64)
    same = torch.ones(3, 1, 1, dtype=torch.float64)  # every H_i = H: no ladder
    g = torch.ones(1, dtype=torch.float64)
    gs = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    assert ladder_loss(one, same, g, gs, lr=[0.1, 0.5], steps=[0, 10]).tolist() == [[0, 0]] * 2
    spread = torch.tensor([[[0.0]], [[2.0]]], dtype=torch.float64)
    assert np.isinf(ladder_loss(one, spread, g, gs[:2], lr=[5.0], steps=2000)).all()
    with pytest.raises(ValueError, match=r"per_sample_hessians \(n, m, m\), got \(1, 1\)"):
        ladder_loss(one, one, g, gs, lr=[0.1], steps=1)
    with pytest.raises(ValueError, match=r"grad must be \(1,\)"):
        ladder_loss(one, same, torch.ones(2, dtype=torch.float64), gs, lr=[0.1], steps=1)
    with pytest.raises(ValueError, match=r"per_sample_gradients \(3, 1\), got .* and \(2, 1\)"):
        ladder_loss(one, same, g, gs[:2], lr=[0.1], steps=1)
    with pytest.raises(ValueError, match="steps must be non-negative"):
        ladder_loss(one, same, g, gs, lr=[0.1], steps=[-1])


def test_hessian_ladder_is_nan_without_per_sample_hessians():
    pop = perturb.Population(
        lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(2, dtype=torch.float64)
    )
    sub = krylov_subspace(pop, None, torch.zeros(2, dtype=torch.float64), rank=2, order=2)
    assert 2 not in sub.derivs
    assert np.isnan(hessian_ladder(sub, lr=[0.1], steps=[1, 2])).all()
