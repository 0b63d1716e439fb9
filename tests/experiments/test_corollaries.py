"""The corollaries: engine against closed forms, brute force and simulated SGD.

Statistical assertions compare a simulated mean with a prediction using the standard
error over independent chains (or training sets); each states its false-failure rate
under the normal approximation (the seeds are fixed, so a given run is deterministic).
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import sympy as sp
import torch

import perturb
from perturb.experiments.corollaries import (
    displacement,
    drift_velocity,
    gap_limit,
    gd_generalization_gap,
    gd_test_loss_increase,
    gdc_loss,
    non_gaussian_part,
    sgd_minus_ode,
    stic,
)
from perturb.experiments.landscapes import archimedes, gaussian_fit, mean_estimation
from perturb.reference import oracle_series, polynomial_derivative_tensors, population_statistics

ETAS = (0.01, 0.02, 0.05, 0.1)


# ============================================================ Corollary 1: ARCHIMEDES


def test_archimedes_predicted_velocity_tends_to_eta_squared_over_six():
    """Engine: v_z/(η²/6) = 1/(1 − 2η/3) exactly at order 3, → 1 as η → 0; v_u = v_v = 0."""
    pop, theta0 = archimedes()
    ratios = []
    for eta in ETAS:
        v = drift_velocity(pop, theta0, lr=eta)
        assert np.abs(v[:2]).max() < 1e-15
        ratio = v[2] / (eta**2 / 6)
        assert ratio == pytest.approx(1 / (1 - 2 * eta / 3), rel=1e-9)
        assert 0 < ratio - 1 < eta
        ratios.append(ratio)
    assert ratios == sorted(ratios)  # decreasing towards 1 as η decreases


def test_archimedes_velocity_from_displacement_and_batch_size():
    pop, theta0 = archimedes()
    eta = 0.05
    v = drift_velocity(pop, theta0, lr=eta)
    # the displacement grows linearly at long times; before that it lags
    t1 = 5_000
    d1 = displacement(pop, theta0, lr=eta, steps=t1)
    d2 = displacement(pop, theta0, lr=eta, steps=2 * t1)
    assert (d2[2] - d1[2]) / t1 == pytest.approx(v[2], rel=1e-12)
    assert 0 < d1[2] < v[2] * t1
    assert drift_velocity(pop, theta0, lr=eta, steps=t1)[2] == pytest.approx(v[2], rel=1e-12)
    # noise C/B: the order-3 velocity halves with B = 2; order 4 adds nothing
    assert drift_velocity(pop, theta0, lr=eta, batch_size=2)[2] == pytest.approx(v[2] / 2)
    assert drift_velocity(pop, theta0, lr=eta, order=4)[2] == pytest.approx(v[2], rel=1e-12)
    assert np.abs(drift_velocity(pop, theta0, lr=eta, order=2)).max() == 0


def _archimedes_grad(u, v, z, x):
    """∇l_x on arrays of chains (checked against autograd of the Population below)."""
    c, s = np.cos(z), np.sin(z)
    proj = c * u + s * v
    cs, ss = np.cos(z - math.pi / 4), np.sin(z - math.pi / 4)
    return (
        u + proj * c + x * cs,
        v + proj * s + x * ss,
        proj * (-s * u + c * v) + x * (-ss * u + cs * v),
    )


def test_simulation_gradient_is_the_populations():
    pop, _ = archimedes()
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        theta = torch.randn(3, generator=gen, dtype=torch.float64) * 2
        for x in pop.data:
            auto = torch.func.grad(pop.loss_fn)(theta, x).numpy()
            hand = _archimedes_grad(*theta.numpy(), float(x[0]))
            assert np.allclose(auto, hand, atol=1e-13)


def _simulate_archimedes(eta, *, chains, burn, window, seed):
    """Per-chain mean z-velocity over steps [burn, burn + window): online SGD, B = 1."""
    rng = np.random.default_rng(seed)
    xs = np.array([-1.0, 1.0])  # the population of archimedes(rows=2)
    u, v, z = np.zeros(chains), np.zeros(chains), np.zeros(chains)
    start = z
    for t in range(burn + window):
        if t == burn:
            start = z.copy()
        gu, gv, gz = _archimedes_grad(u, v, z, xs[rng.integers(0, 2, chains)])
        u, v, z = u - eta * gu, v - eta * gv, z - eta * gz
    return (z - start) / window


def _check_archimedes_simulation(chains, window, seed):
    """Measured velocity / prediction → 1 as η → 0.

    Per η: |measured − predicted| ≤ 4 s.e. + 0.1·η·predicted (the order-3 prediction has
    a relative error O(η); measured: about −0.04·η).  And measured/(η²/6) − 1 is larger
    at η = 0.1 than at 0.01 by more than 4 combined s.e.  False-failure rate (normal
    approximation, five 4σ tests) < 5 · 6.4e-5 ≈ 3e-4.
    """
    pop, theta0 = archimedes()
    rows = []
    for i, eta in enumerate(ETAS):
        vel = _simulate_archimedes(
            eta, chains=chains, burn=round(20 / eta), window=round(window / eta), seed=seed + i
        )
        measured, err = vel.mean(), vel.std(ddof=1) / math.sqrt(chains)
        predicted = drift_velocity(pop, theta0, lr=eta)[2]
        assert abs(measured - predicted) <= 4 * err + 0.1 * eta * predicted, (eta, measured)
        rows.append((measured / (eta**2 / 6), err / (eta**2 / 6)))
    (small, small_err), (large, large_err) = rows[0], rows[-1]
    assert large - small > 4 * math.hypot(small_err, large_err)
    return rows


def test_archimedes_simulation_matches_prediction_fast():
    rows = _check_archimedes_simulation(chains=600, window=100, seed=0)
    assert abs(rows[0][0] - 1) < 0.02  # η = 0.01: within 2% of η²/6


@pytest.mark.slow
def test_archimedes_simulation_matches_prediction_long():
    rows = _check_archimedes_simulation(chains=4000, window=400, seed=10)
    assert abs(rows[0][0] - 1) < 0.01


# ====================================================== Corollary 2: MEAN ESTIMATION


def _simulate_gd(h, *, noise, dim, rows, lr, steps, train_size, sets, seed):
    """Test-loss increase l(θ_T) − l(0) of full-batch GD on `sets` training sets."""
    pop, _ = mean_estimation(curvature=h, noise=noise, dim=dim, rows=rows)
    values = pop.data.numpy()
    rng = np.random.default_rng(seed)
    xs = values[rng.integers(0, len(values), (sets, train_size))]  # (sets, N, dim)
    xbar = xs.mean(axis=1)
    theta = np.zeros((sets, dim))
    for _ in range(steps):
        theta = theta - lr * (h * theta - xbar)
    return 0.5 * h * (theta**2).sum(axis=1) - theta @ values.mean(axis=0)


def _check_mean_estimation(*, noise, dim, rows, sets, points, seed):
    """Predicted and simulated increases agree, and both peak at an interior h.

    Per h: |simulated − predicted| ≤ 4 s.e.; the interior maximum exceeds both ends by
    more than 4 combined s.e.  False-failure rate (normal approximation) below
    (points + 2) · 6.4e-5.
    """
    lr, steps, n = 0.1, 100, 10
    hs = np.geomspace(1e-3, 10, points)
    sim, err, pred = [], [], []
    for i, h in enumerate(hs):
        inc = _simulate_gd(
            h,
            noise=noise,
            dim=dim,
            rows=rows,
            lr=lr,
            steps=steps,
            train_size=n,
            sets=sets,
            seed=seed + i,
        )
        pop, theta0 = mean_estimation(curvature=h, noise=noise, dim=dim, rows=rows)
        p = gd_test_loss_increase(pop, theta0, lr=lr, steps=steps, train_size=n)
        closed = dim * noise**2 * (1 - (1 - lr * h) ** steps) ** 2 / (2 * n * h)
        assert p == pytest.approx(closed, rel=1e-10)  # exact on this landscape
        sim.append(inc.mean())
        err.append(inc.std(ddof=1) / math.sqrt(sets))
        pred.append(p)
        assert abs(sim[-1] - p) <= 4 * err[-1], (h, sim[-1], p, err[-1])
    top = int(np.argmax(sim))
    assert 0 < top < points - 1
    assert 0 < int(np.argmax(pred)) < points - 1
    for end in (0, points - 1):
        assert sim[top] - sim[end] > 4 * math.hypot(err[top], err[end])
    return hs, sim, pred


def test_mean_estimation_flat_and_sharp_overfit_less_fast():
    _check_mean_estimation(noise=1.0, dim=1, rows=2, sets=4000, points=9, seed=0)


@pytest.mark.slow
def test_mean_estimation_flat_and_sharp_overfit_less_long():
    _check_mean_estimation(noise=2.0, dim=3, rows=4, sets=40_000, points=17, seed=100)


# ================================================= Corollary 2: gap, limit, AIC, STIC


def _polynomial_population(torch_landscape):
    loss_fn, data, theta = torch_landscape
    return perturb.Population(loss_fn, data), theta


def _np_stats(pop, theta0):
    s = population_statistics(pop.derivatives(theta0, 2))
    return s["C"].numpy(), s["H"].numpy()


@pytest.mark.parametrize("lr, steps", [(0.05, 1), (0.05, 7), (0.3, 40), (0.01, 1000)])
@pytest.mark.parametrize("train_size", [1, 5])
def test_gd_gap_is_the_discrete_corollary_2(torch_landscape, lr, steps, train_size):
    """Order-1 re-summed gap = tr(C (I − K^T) H^{-1})/N, K = I − ηH (C, H not commuting)."""
    pop, theta0 = _polynomial_population(torch_landscape)
    cov, hess = _np_stats(pop, theta0)
    assert abs(np.linalg.det(hess)) > 1e-3
    assert np.abs(cov @ hess - hess @ cov).max() > 1e-2
    k = np.eye(2) - lr * hess
    closed = np.trace(cov @ (np.eye(2) - np.linalg.matrix_power(k, steps)) @ np.linalg.inv(hess))
    gap = gd_generalization_gap(pop, theta0, lr=lr, steps=steps, train_size=train_size)
    assert gap == pytest.approx(closed / train_size, rel=1e-10)
    if steps == 1:
        assert gap == pytest.approx(lr * np.trace(cov) / train_size, rel=1e-12)


def _well_specified_regression():
    """l = ½(y − a·θ)², y = a·θ* + ε, ε = ±1 independent of a: at θ*, C = H = E[a aᵀ]."""
    theta_star = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    inputs = torch.tensor(
        [[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [2.0, -1.0, 1.0]],
        dtype=torch.float64,
    )
    rows = [torch.cat([a, (a @ theta_star + e).reshape(1)]) for a in inputs for e in (-1.0, 1.0)]

    def loss_fn(p, row):
        return 0.5 * (row[3] - row[:3] @ p) ** 2

    return perturb.Population(loss_fn, torch.stack(rows)), theta_star


def test_gap_tends_to_its_limit_and_to_aic_when_c_equals_h():
    pop, theta0 = _well_specified_regression()
    cov, hess = _np_stats(pop, theta0)
    assert np.allclose(cov, hess, atol=1e-13)
    assert np.abs(hess - np.diag(np.diag(hess))).max() > 0.1  # not diagonal
    n = 7
    limit = gap_limit(pop, theta0, train_size=n)
    assert limit == pytest.approx(3 / n, rel=1e-12)  # AIC: P/N
    lr = 1 / np.linalg.eigvalsh(hess).max()
    gaps = [gd_generalization_gap(pop, theta0, lr=lr, steps=t, train_size=n) for t in (1, 10, 100)]
    assert gaps[0] < gaps[1] < gaps[2] < limit
    far = gd_generalization_gap(pop, theta0, lr=lr, steps=100_000, train_size=n)
    assert far == pytest.approx(limit, rel=1e-10)
    # the limit does not depend on η (0 < ηh < 2)
    far = gd_generalization_gap(pop, theta0, lr=1.9 * lr, steps=100_000, train_size=n)
    assert far == pytest.approx(limit, rel=1e-10)


def test_gap_limit_on_mean_estimation_and_noncommuting_landscape(torch_landscape):
    pop, theta0 = mean_estimation(curvature=0.25, noise=0.5, dim=2)
    assert gap_limit(pop, theta0, train_size=4) == pytest.approx(2 * 0.25 / 0.25 / 4)
    # l_x = ½θᵀAθ + xᵀθ with A and Cov(x) not commuting
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    hess = a @ a.T + 0.3 * torch.eye(3, dtype=torch.float64)
    xs = torch.randn(7, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 3, generator=gen, dtype=torch.float64
    )
    quad = perturb.Population(lambda p, x: 0.5 * p @ hess @ p + x @ p, xs)
    cov = np.cov(xs.numpy().T, bias=True)
    assert np.abs(cov @ hess.numpy() - hess.numpy() @ cov).max() > 0.1
    expected = np.trace(np.linalg.solve(hess.numpy(), cov)) / 3
    assert gap_limit(quad, torch.zeros(3), train_size=3) == pytest.approx(expected, rel=1e-12)
    lr = 1 / float(torch.linalg.eigvalsh(hess).max())
    far = gd_generalization_gap(quad, torch.zeros(3), lr=lr, steps=10**7, train_size=3)
    assert far == pytest.approx(expected, rel=1e-9)
    # an indefinite Hessian has no limit
    pop, theta0 = _polynomial_population(torch_landscape)
    assert np.linalg.eigvalsh(_np_stats(pop, theta0)[1]).min() < 0
    with pytest.raises(ValueError, match="positive-definite mean Hessian"):
        gap_limit(pop, theta0, train_size=3)


def _logistic():
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    ys = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)

    def loss_fn(p, x, y):
        margin = y * (x @ p[:2] + p[2])
        return torch.nn.functional.softplus(-margin) + 0.05 * (p @ p)

    params = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    return loss_fn, params, xs, ys


def test_stic_is_differentiable_gradcheck():
    loss_fn, params, xs, ys = _logistic()
    assert torch.autograd.gradcheck(lambda p: stic(loss_fn, p, xs, ys, train_size=6), (params,))
    assert torch.autograd.gradcheck(
        lambda p: stic(loss_fn, p, xs, ys, train_size=6, lr=0.5, steps=9), (params,)
    )
    # usable in a training loop: the regularized loss has a finite gradient
    value = stic(loss_fn, params, xs, ys, train_size=6)
    (grad,) = torch.autograd.grad(value, params)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("lr, steps", [(None, None), (0.1, 1), (0.2, 13), (0.2, 4096)])
def test_stic_equals_the_engine_gap(lr, steps):
    """STIC on the whole population, rescaled to the population covariance, is the engine's gap."""
    pop, theta0 = _well_specified_regression()
    n_rows = len(pop)
    value = float(stic(pop.loss_fn, theta0, pop.data, train_size=5, lr=lr, steps=steps))
    value *= (n_rows - 1) / n_rows  # unbiased Ĉ → population C
    if lr is None:
        assert value == pytest.approx(gap_limit(pop, theta0, train_size=5), rel=1e-12)
        assert value == pytest.approx(3 / 5, rel=1e-12)  # AIC, since C = H here
    else:
        gap = gd_generalization_gap(pop, theta0, lr=lr, steps=steps, train_size=5)
        assert value == pytest.approx(gap, rel=1e-10)


def test_stic_finite_t_works_for_singular_hessian():
    pop, theta0 = archimedes()  # H = diag(2, 1, 0): finite-T STIC is defined
    value = float(stic(pop.loss_fn, theta0, pop.data, train_size=3, lr=0.1, steps=50))
    gap = gd_generalization_gap(pop, theta0, lr=0.1, steps=50, train_size=3)
    assert value / 2 == pytest.approx(gap, rel=1e-12)  # two rows: Ĉ = 2C


@pytest.mark.parametrize(("lr", "steps"), [(None, None), (0.2, 13)])
def test_stic_equals_the_closed_form_when_c_and_h_differ(lr, steps):
    """Generic twin of test_stic_equals_the_engine_gap, whose ``C = H`` makes the limit
    ``P/N`` whatever the roles of ``C`` and ``H``: random ``H`` and a gradient covariance
    that does not commute with it; STIC (rescaled to the population ``C``) is
    ``tr(C (I − K^T) H^{-1})/N`` (``tr(H^{-1}C)/N`` in the limit), written here with
    numpy, and the engine's gap."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    hess = a @ a.T / 3 + 0.3 * torch.eye(3, dtype=torch.float64)
    xs = torch.randn(6, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 3, generator=gen, dtype=torch.float64
    )
    pop = perturb.Population(lambda p, x: 0.5 * p @ hess @ p + x @ p, xs)
    theta0 = torch.randn(3, generator=gen, dtype=torch.float64)
    h, cov = hess.numpy(), np.cov(xs.numpy().T, bias=True)
    assert np.abs(cov @ h - h @ cov).max() > 0.1
    inverse = np.linalg.inv(h)
    if lr is not None:
        inverse = (np.eye(3) - np.linalg.matrix_power(np.eye(3) - lr * h, steps)) @ inverse
    value = float(stic(pop.loss_fn, theta0, xs, train_size=4, lr=lr, steps=steps)) * 5 / 6
    assert value == pytest.approx(np.trace(cov @ inverse) / 4, rel=1e-12)
    assert abs(value - np.trace(h @ np.linalg.inv(cov)) / 4) > 0.1 * value  # roles matter
    if lr is None:
        assert value == pytest.approx(gap_limit(pop, theta0, train_size=4), rel=1e-12)
    else:
        gap = gd_generalization_gap(pop, theta0, lr=lr, steps=steps, train_size=4)
        assert value == pytest.approx(gap, rel=1e-10)


# ============================================================== Corollary 4: GDC

ETA = sp.Symbol("eta")
X, Y = sp.symbols("x y")
THETA0 = (sp.Rational(1, 2), sp.Integer(-1))


def _random_landscape(rows, seed):
    """Random cubic polynomials in two dimensions with rational coefficients."""
    rng = random.Random(seed)
    monomials = [X, Y, X**2, X * Y, Y**2, X**3, X**2 * Y, X * Y**2, Y**3]
    return [
        sum(sp.Rational(rng.randint(-4, 4), rng.randint(1, 3)) * m for m in monomials)
        for _ in range(rows)
    ]


def _modified_loss(losses, idx, *, correction):
    """(1/N) Σ_n l_n + (N−1)/(4N) · η · tr Ĉ, Ĉ = (1/(N−1)) Σ_n (g_n − ḡ)(g_n − ḡ)ᵀ."""
    n = len(idx)
    loss = sum(losses[i] for i in idx) / n
    if not correction:
        return loss
    grads = [[sp.diff(losses[i], p) for p in (X, Y)] for i in idx]
    gbar = [sum(g[a] for g in grads) / n for a in range(2)]
    trc = sum((g[a] - gbar[a]) ** 2 for g in grads for a in range(2)) / (n - 1)
    return loss + sp.Rational(n - 1, 4 * n) * ETA * trc


def _truncate(expr, order):
    poly = sp.Poly(sp.expand(expr), ETA)
    return sum((c * ETA**k for (k,), c in poly.terms() if k <= order), sp.Integer(0))


def _gd_series(losses, n, *, correction, order=2):
    """Exact E l(θ_N) of N GD steps at symbolic η, every training set enumerated.

    GD depends on the training set only through its multiset of rows, so multisets are
    enumerated with their multinomial probabilities.
    """
    m = len(losses)
    total = sp.Integer(0)
    for counts in itertools.product(range(n + 1), repeat=m):
        if sum(counts) != n:
            continue
        prob = sp.Rational(math.factorial(n), math.prod(map(math.factorial, counts)) * m**n)
        idx = [i for i, c in enumerate(counts) for _ in range(c)]
        loss = _modified_loss(losses, idx, correction=correction)
        grad = [sp.expand(sp.diff(loss, p)) for p in (X, Y)]
        theta = list(THETA0)
        for _ in range(n):
            at = {X: theta[0], Y: theta[1]}
            theta = [
                _truncate(t - ETA * g.subs(at, simultaneous=True), order)
                for t, g in zip(theta, grad, strict=True)
            ]
        test = sum(losses) / m
        total += prob * _truncate(test.subs({X: theta[0], Y: theta[1]}, simultaneous=True), order)
    poly = sp.Poly(sp.expand(total), ETA)
    return [poly.coeff_monomial(ETA**k) for k in range(order + 1)]


@pytest.mark.parametrize(
    "n, rows",  # N = 3 (-m slow): between the N = 2 and N = 4 twins
    [(2, 3), pytest.param(3, 3, marks=pytest.mark.slow), (4, 2)],
)
def test_gdc_matches_sgd_through_eta_squared_exactly(n, rows):
    losses = _random_landscape(rows, seed=n)
    sgd = oracle_series(
        losses, [X, Y], THETA0, kind="epochs", train_size=n, batch_size=1, epochs=1, order=2
    )
    gdc = _gd_series(losses, n, correction=True)
    assert gdc == sgd
    # teeth: plain GD differs at η² (and the brute force agrees with the oracle's GD)
    gd = _gd_series(losses, n, correction=False)
    gd_oracle = oracle_series(
        losses, [X, Y], THETA0, kind="epochs", train_size=n, batch_size=n, epochs=n, order=2
    )
    assert gd == gd_oracle
    assert gd[:2] == sgd[:2] and gd[2] != sgd[2]
    # the η² difference is the engine's η²(N−1)/2 · G_b ⟨∇l,∇∇l⟩_(a,ab) = η²(N−1)/4 G·∇tr C
    derivs = polynomial_derivative_tensors(losses, [X, Y], THETA0, 2)
    g = derivs[1].mean(axis=0)
    centred = derivs[1] - g
    grad_trc = 2 * np.einsum("ia,iab->b", centred, derivs[2]) / len(losses)
    expected = sp.Rational(n - 1, 4) * sp.nsimplify(sum(g * grad_trc))
    assert gd[2] - sgd[2] == expected


def test_engine_derivation_of_gdc():
    """SGD (one epoch, B = 1) − GD (T = N) at η² is one term: −(N−1)/2 ⟨∇l,∇∇l⟩ G."""
    n = sp.Symbol("N", positive=True, integer=True)
    sgd = perturb.series(2, perturb.Epochs(batch_size=1, epochs=1))
    gd = perturb.series(2, perturb.GD(steps=n))
    diff = sp.expand(sgd.expr - gd.expr)
    mixed = [t for t in gd.terms if t.contraction.text == "⟨∇l,∇∇l⟩_(a,ab) G_b"]
    assert len(mixed) == 1
    assert sp.simplify(diff + perturb.eta**2 * (n - 1) / 2 * mixed[0].symbol) == 0


def test_gdc_loss_value_equals_the_sympy_modified_loss():
    losses = _random_landscape(3, seed=7)
    fns = [sp.lambdify((X, Y), loss, modules="math") for loss in losses]

    def loss_fn(p, row):
        values = torch.stack([fn(p[0], p[1]) * torch.ones((), dtype=p.dtype) for fn in fns])
        return (row * values).sum()

    eye = torch.eye(3, dtype=torch.float64)
    point = {X: sp.Rational(3, 10), Y: sp.Rational(-7, 10)}
    params = torch.tensor([0.3, -0.7], dtype=torch.float64)
    for idx in [(0, 1), (2, 2, 0), (0, 1, 2, 1)]:
        n = len(idx)
        modified = gdc_loss(loss_fn, lr=0.1, train_size=n)
        value = float(modified(params, eye[list(idx)]))
        exact = _modified_loss(losses, idx, correction=True).subs(
            {**point, ETA: sp.Rational(1, 10)}
        )
        assert value == pytest.approx(float(exact), abs=1e-12, rel=1e-12)
    one = gdc_loss(loss_fn, lr=0.1, train_size=1)
    assert float(one(params, eye[:1])) == pytest.approx(float(losses[0].subs(point)), abs=1e-12)
    # differentiable: ∇ of the modified loss is finite and matches sympy's
    p = params.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gdc_loss(loss_fn, lr=0.1, train_size=3)(p, eye), p)
    sym = _modified_loss(losses, (0, 1, 2), correction=True)
    exact = [float(sp.diff(sym, v).subs({**point, ETA: sp.Rational(1, 10)})) for v in (X, Y)]
    assert np.allclose(grad.numpy(), exact, atol=1e-12)


# ========================================================= Corollary 5: filters


def test_sgd_minus_ode_and_non_gaussian_part():
    full = perturb.series(3, perturb.Online(batch_size=1))
    noise = sgd_minus_ode(full)
    assert isinstance(noise, perturb.Series)
    assert noise.schedule == full.schedule and noise.order == 3
    texts = {(t.power, t.contraction.text) for t in noise.terms}
    assert (2, "tr(C H)") in texts and (3, "J:S") in texts
    assert all(t.power >= 2 for t in noise.terms)
    assert all(any(len(p) > 1 for p in t.contraction.parts) for t in noise.terms)
    ode = [t for t in full.terms if t not in noise.terms]
    assert all(all(len(p) == 1 for p in t.contraction.parts) for t in ode)
    t_sym = sp.Symbol("T", positive=True, integer=True)
    assert sp.simplify(noise.coefficient(2) - t_sym / 2 * sp.Symbol("tr(C H)")) == 0
    skew = non_gaussian_part(full)
    assert [(t.power, t.contraction.text) for t in skew.terms] == [(3, "J:S")]
    assert sp.simplify(skew.terms[0].coefficient + t_sym / 6) == 0
    # any batch size: −T/(6B²) J:S
    b = sp.Symbol("B", positive=True, integer=True)
    skew_b = non_gaussian_part(perturb.series(3, perturb.Online()))
    assert sp.simplify(skew_b.terms[0].coefficient + t_sym / (6 * b**2)) == 0
    # Gaussian-only noise up to η²: nothing non-Gaussian
    assert non_gaussian_part(perturb.series(2, perturb.Online(batch_size=1))).terms == ()


def test_non_gaussian_part_on_gaussian_fit():
    """The SGD − SDE term of the log-variance fit: −(T/6) η³ J:S, non-zero."""
    pop, theta0 = gaussian_fit(rows=8, h0=0.5)
    derivs = pop.derivatives(theta0, 3)
    stats = population_statistics(derivs)
    steps, lr = 20, 0.05
    skew = non_gaussian_part(perturb.series(3, perturb.Online(steps=steps, batch_size=1)))
    values = skew.evaluate(derivs, lr=lr)
    expected = -steps / 6 * lr**3 * float((stats["J"] * stats["S"]).sum())
    assert float(values[3]) == pytest.approx(expected, rel=1e-12)
    assert abs(expected) > 1e-7


# ================================================================== bad inputs


def test_bad_inputs(torch_landscape):
    pop, theta0 = archimedes()
    with pytest.raises(TypeError, match="population must be a Population"):
        displacement("pop", theta0, lr=0.1, steps=3)
    with pytest.raises(ValueError, match="theta0 must be a non-empty 1-D tensor"):
        displacement(pop, torch.zeros(1, 3), lr=0.1, steps=3)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        displacement(pop, theta0, lr=0.0, steps=3)
    with pytest.raises(TypeError, match="lr must be a positive real number"):
        drift_velocity(pop, theta0, lr="fast")
    with pytest.raises(ValueError, match="steps must be an integer ≥ 1"):
        displacement(pop, theta0, lr=0.1, steps=0)
    with pytest.raises(TypeError, match="batch_size must be an integer ≥ 1"):
        drift_velocity(pop, theta0, lr=0.1, batch_size=1.5)
    with pytest.raises(ValueError, match=">= 2: GD on the mean loss diverges"):
        drift_velocity(pop, theta0, lr=1.0)
    concave = perturb.Population(lambda p, x: -0.5 * p @ p + x[0] * p[0], torch.eye(2))
    with pytest.raises(ValueError, match="near a minimum"):
        drift_velocity(concave, torch.zeros(2), lr=0.1)
    flat = perturb.Population(lambda p, x: x[0] * p[0], torch.eye(2))
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        drift_velocity(flat, torch.zeros(2), lr=0.1)
    with pytest.raises(ValueError, match="train_size must be an integer ≥ 1"):
        gd_generalization_gap(pop, theta0, lr=0.1, steps=3, train_size=0)
    with pytest.raises(ValueError, match="steps must be an integer ≥ 1"):
        gd_test_loss_increase(pop, theta0, lr=0.1, steps=-1, train_size=3)
    with pytest.raises(ValueError, match="positive-definite mean Hessian"):
        gap_limit(pop, theta0, train_size=3)
    with pytest.raises(TypeError, match="train_size must be an integer ≥ 1"):
        gap_limit(pop, theta0, train_size=2.0)

    loss_fn, params, xs, ys = _logistic()
    with pytest.raises(ValueError, match="at least 2 rows"):
        stic(loss_fn, params, xs[:1], ys[:1], train_size=6)
    with pytest.raises(ValueError, match="pass both lr and steps"):
        stic(loss_fn, params, xs, ys, train_size=6, lr=0.1)
    with pytest.raises(ValueError, match="params must be a non-empty 1-D floating tensor"):
        stic(loss_fn, params.reshape(1, 3), xs, ys, train_size=6)
    with pytest.raises(TypeError, match=r"params must be a torch\.Tensor"):
        stic(loss_fn, [0.0, 0.0, 0.0], xs, ys, train_size=6)
    with pytest.raises(ValueError, match="batch_y must have one row per row"):
        stic(loss_fn, params, xs, ys[:4], train_size=6)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        stic(None, params, xs, ys, train_size=6)
    with pytest.raises(ValueError, match="positive-definite Hessian"):
        stic(pop.loss_fn, theta0, pop.data, train_size=3)

    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gdc_loss("loss", lr=0.1, train_size=3)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        gdc_loss(loss_fn, lr=-0.1, train_size=3)
    with pytest.raises(ValueError, match="train_size must be an integer ≥ 1"):
        gdc_loss(loss_fn, lr=0.1, train_size=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        gdc_loss(loss_fn, lr=0.1, train_size=3)(params, xs[:1], ys[:1])

    with pytest.raises(TypeError, match="series must be a perturb Series"):
        sgd_minus_ode("series")
    with pytest.raises(ValueError, match="cumulant form"):
        non_gaussian_part(perturb.series(2, perturb.Online(batch_size=1), form="moment"))
