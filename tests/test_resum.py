"""Re-summation against exact recursions and against the un-resummed series."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import sympy as sp
import torch

import perturb
from perturb.reference import polynomial_derivative_tensors
from perturb.resum import (
    _open_network,
    complete_homogeneous,
    resummed_terms,
    time_sum,
    time_sum_exact,
)


def _linear_gaussian(p: int, rows: int, seed: int):
    """l_x(θ) = ½θᵀHθ + xᵀθ over a finite population of x; H and C do not commute."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.2 * torch.eye(p, dtype=torch.float64)
    xs = torch.randn(rows, p, generator=gen, dtype=torch.float64) @ torch.randn(
        p, p, generator=gen, dtype=torch.float64
    ) + torch.randn(p, generator=gen, dtype=torch.float64)
    theta0 = torch.randn(p, generator=gen, dtype=torch.float64)

    def loss_fn(theta, x):
        return 0.5 * theta @ hess @ theta + x @ theta

    return hess, xs, theta0, loss_fn


def _exact_test_loss(hess, xs, theta0, lr, steps, *, batch_size=None, train_size=None):
    """Exact E l(θ_T) from the first two moments (online: fresh batches; GD: fixed set)."""
    mu = xs.mean(0)
    cov = (xs - mu).T @ (xs - mu) / xs.shape[0]
    k = torch.eye(len(mu), dtype=torch.float64) - lr * hess
    mean = theta0.clone()
    sigma = torch.zeros_like(hess)
    if batch_size is not None:
        for _ in range(steps):
            mean = k @ mean - lr * mu
            sigma = k @ sigma @ k + lr**2 * cov / batch_size
    else:
        acc = torch.zeros_like(hess)  # Σ_s η K^s applied to the training-set mean
        power = torch.eye(len(mu), dtype=torch.float64)
        for _ in range(steps):
            acc = acc + lr * power
            power = k @ power
        mean = power @ theta0 - acc @ mu
        sigma = acc @ (cov / train_size) @ acc.T
    return float(0.5 * torch.trace(hess @ (sigma + torch.outer(mean, mean))) + mu @ mean)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eta_frac", [0.1, 1.0, 1.5])
@pytest.mark.parametrize(
    "schedule",
    [
        perturb.Online(steps=10_000, batch_size=1),
        perturb.Online(steps=10_000, batch_size=3),
        perturb.GD(train_size=4, steps=10_000),
    ],
    ids=["online-B1", "online-B3", "gd-N4"],
)
def test_linear_gaussian_order2_is_exact_at_long_times(seed, eta_frac, schedule):
    hess, xs, theta0, loss_fn = _linear_gaussian(3, 6, seed)
    lr = eta_frac / float(torch.linalg.eigvalsh(hess).max())
    pred = perturb.predict(
        perturb.Population(loss_fn, xs), theta0, schedule, lr=lr, order=2, resummed=True
    )
    if schedule.batches == 1:
        exact = _exact_test_loss(hess, xs, theta0, lr, 10_000, train_size=int(schedule.train_size))
    else:
        exact = _exact_test_loss(hess, xs, theta0, lr, 10_000, batch_size=int(schedule.batch_size))
    assert pred.total == pytest.approx(exact, rel=1e-9)


def _diagonal_landscape():
    """Three rows in 2-D whose mean Hessian at θ0 is diagonal (eigenbasis = identity)."""
    x, y = sp.symbols("x y")
    losses = [
        x**2 / 2 + x * y + y**3 / 3 - y,
        y**2 + x**3 / 6 - x * y + 2 * x,
        x**2 / 4 + x * y**2 / 2 + y / 3 + x**2 * y,
    ]
    theta0 = [0, 0]
    return losses, [x, y], theta0


@pytest.mark.parametrize(
    "schedule",
    [
        perturb.Online(steps=4, batch_size=1),
        perturb.Online(steps=3, batch_size=2),
        perturb.GD(train_size=3, steps=3),
    ],
    ids=["online-T4-B1", "online-T3-B2", "gd-N3-T3"],
)
@pytest.mark.parametrize("quantity", ["test", "train", "displacement"])
def test_eta_expansion_reproduces_unresummed_coefficients(schedule, quantity):
    """Exact: expand the re-summed order-3 prediction in η; compare through η³."""
    losses, params, theta0 = _diagonal_landscape()
    derivs = polynomial_derivative_tensors(losses, params, theta0, 4)
    hess = derivs[2].sum(0) / 3
    assert hess[0, 1] == 0 and hess[1, 0] == 0
    h = [sp.Rational(hess[i, i].numerator, hess[i, i].denominator) for i in range(2)]
    eta = sp.Symbol("eta")
    steps = int(schedule.steps)
    total = sp.Integer(0) if quantity != "displacement" else sp.zeros(2, 1)
    for term in resummed_terms(3, schedule, quantity):
        d = term.diagram.edges
        network = _open_network(term, derivs)
        for mu in itertools.product(range(2), repeat=d):
            w = network[mu] if d else network
            w = sp.Rational(w.numerator, w.denominator)
            s = time_sum_exact(term.orders, [1 - eta * h[m] for m in mu], steps)
            value = term.prefactor * eta**d * w * s
            if quantity == "displacement":
                total[mu[0], 0] += value
            else:
                total += value
    unresummed = perturb.series(3, schedule, quantity).evaluate(derivs)
    if quantity == "displacement":
        for i in range(2):
            poly = sp.Poly(sp.expand(total[i, 0]), eta)
            coeffs = [poly.coeff_monomial(eta**k) for k in range(4)]
            expected = [0] + [sp.Rational(v[i].numerator, v[i].denominator) for v in unresummed[1:]]
            assert coeffs == expected
    else:
        poly = sp.Poly(sp.expand(total), eta)
        coeffs = [poly.coeff_monomial(eta**k) for k in range(4)]
        assert coeffs == [sp.Rational(v.numerator, v.denominator) for v in unresummed]


def test_resummed_agrees_with_unresummed_to_next_order_on_tanh_net():
    """Float check on a tanh net: the difference scales as η⁴ (ratio 16 per halving)."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    theta = 0.7 * torch.randn(13, generator=gen, dtype=torch.float64)

    def loss_fn(p, row):
        w1, b1, w2, b2 = p[:6].reshape(3, 2), p[6:9], p[9:12], p[12]
        return 0.5 * (w2 @ torch.tanh(w1 @ row[:2] + b1) + b2 - row[2]) ** 2

    pop = perturb.Population(loss_fn, data)
    sched = perturb.Online(steps=5, batch_size=1)
    diffs = []
    for lr in (2e-3, 1e-3):
        r = perturb.predict(pop, theta, sched, lr=lr, order=3, resummed=True).total
        u = perturb.predict(pop, theta, sched, lr=lr, order=3).total
        diffs.append(r - u)
    assert diffs[0] / diffs[1] == pytest.approx(16, rel=0.02)


def test_long_runs_cost_no_more_than_short_ones():
    import time

    _hess, xs, theta0, loss_fn = _linear_gaussian(3, 6, 0)
    pop = perturb.Population(loss_fn, xs)
    times = []
    for steps in (100, 100_000):
        start = time.perf_counter()
        perturb.predict(
            pop, theta0, perturb.Online(steps=steps, batch_size=1), lr=0.1, order=3, resummed=True
        )
        times.append(time.perf_counter() - start)
    assert times[1] < 3 * times[0] + 0.5  # log T matrix products, never a loop over steps


def test_complete_homogeneous_matches_definition():
    z = torch.tensor([1.0, 0.9, 0.5, 0.9], dtype=torch.float64)  # repeated values are fine
    for n in range(6):
        brute = sum(
            float(np.prod([z[i] for i in combo]))
            for combo in itertools.combinations_with_replacement(range(4), n)
        )
        assert float(complete_homogeneous(z, n)) == pytest.approx(brute, rel=1e-13)
    assert float(complete_homogeneous(z, -1)) == 0.0


def test_time_sum_is_the_brute_force_sum_over_embeddings():
    """Chain root ← u ← v in online SGD: Σ_{s<t<T} x_a^{T−t−1} x_b^{t−s−1}."""
    chain = [
        t
        for t in resummed_terms(2, perturb.Online(steps=6, batch_size=1))
        if t.diagram.parents == (-1, 0, 1)
    ]
    assert len(chain) == 0  # a one-child singleton node is re-summed away
    cherry = next(
        t
        for t in resummed_terms(2, perturb.Online(steps=6, batch_size=1))
        if t.diagram.parents == (-1, 0, 0) and len(t.diagram.parts) == 3
    )
    xa, xb = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    brute = sum(0.7 ** (6 - s - 1) * 0.4 ** (6 - t - 1) for s in range(6) for t in range(6))
    assert float(time_sum(cherry.orders, [xa, xb], 6)) == pytest.approx(brute, rel=1e-13)


def test_bad_schedules():
    with pytest.raises(ValueError, match="re-summation supports online SGD"):
        resummed_terms(2, perturb.Epochs(train_size=4, batch_size=2, epochs=2))
    with pytest.raises(ValueError, match="quantity must be one of"):
        resummed_terms(2, perturb.Online(), "gap")
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        resummed_terms(2, "online")


def test_mean_tensors_replace_per_sample_tensors_for_lone_nodes():
    """Order-2 re-summed values need per-sample gradients only; H may be a mean."""
    from perturb.reference import derivative_tensors
    from perturb.resum import resummed_values

    _hess, xs, theta0, loss_fn = _linear_gaussian(4, 5, 3)
    derivs = derivative_tensors(loss_fn, xs, theta0, 2)
    schedule = perturb.Online(steps=50, batch_size=2)
    terms = resummed_terms(2, schedule)
    full = resummed_values(terms, derivs, lr=0.2, steps=50, schedule=schedule)
    lean = resummed_values(
        terms,
        {0: derivs[0], 1: derivs[1]},
        lr=0.2,
        steps=50,
        schedule=schedule,
        means={2: derivs[2].mean(0)},
    )
    for a, b in zip(full, lean, strict=True):
        assert float(b) == pytest.approx(float(a), rel=1e-12)


def test_cyclic_part_constraints_have_no_embedding():
    """Parts whose edges force each to precede the other are dropped (order 5)."""
    _hess, xs, theta0, loss_fn = _linear_gaussian(2, 3, 0)
    pop = perturb.Population(loss_fn, xs)
    sched = perturb.Online(steps=4, batch_size=1)
    for quantity in ("test", "displacement"):
        pred = perturb.predict(
            pop, theta0, sched, lr=0.1, order=5, quantity=quantity, resummed=True
        )
        assert len(pred.by_order) == 6
    disp = perturb.predict(
        pop, theta0, sched, lr=0.1, order=5, quantity="displacement", resummed=True
    )
    assert all(np.shape(v) == (2,) for v in disp.by_order)


def test_integral_form_of_example_1():
    """Remark 2: one level, three edges to the root: (1 − e^{−T Σr}) / Σr."""
    from perturb.resum import time_integral

    rates = [torch.tensor(v, dtype=torch.float64) for v in (0.01, 0.02, 0.005)]
    total = sum(float(r) for r in rates)
    got = float(time_integral(((1, ((1, 2), (1, 2), (1, 2))),), rates, 100.0))
    assert got == pytest.approx(-np.expm1(-100 * total) / total, rel=1e-13)


def test_integral_form_of_the_split_cherry():
    """Two lone leaves under the root: the three weak orders give the full square plus
    the diagonal, ∏ (1 − e^{−r_i T})/r_i + (1 − e^{−(r_1+r_2)T})/(r_1 + r_2)."""
    from perturb.resum import time_integral

    cherry = next(
        t
        for t in resummed_terms(2, perturb.Online(steps=7, batch_size=1))
        if t.diagram.parents == (-1, 0, 0) and len(t.diagram.parts) == 3
    )
    r1, r2 = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    t = 7.0
    square = (-np.expm1(-0.3 * t) / 0.3) * (-np.expm1(-0.05 * t) / 0.05)
    diagonal = -np.expm1(-0.35 * t) / 0.35
    assert float(time_integral(cherry.orders, [r1, r2], t)) == pytest.approx(
        square + diagonal, rel=1e-12
    )


def test_integral_form_is_exact_to_first_order_in_eta():
    """At fixed ηT the integral form differs from the exact sums by O(η)."""
    _, xs, theta0, loss_fn = _linear_gaussian(3, 6, 1)
    pop = perturb.Population(loss_fn, xs)
    gaps = []
    for lr, steps in ((0.02, 50), (0.01, 100), (0.005, 200)):
        sched = perturb.Online(steps=steps, batch_size=1)
        exact = perturb.predict(pop, theta0, sched, lr=lr, order=2, resummed=True).total
        approx = perturb.predict(
            pop, theta0, sched, lr=lr, order=2, resummed=True, integral=True
        ).total
        gaps.append(approx - exact)
    assert gaps[0] / gaps[1] == pytest.approx(2, rel=0.1)
    assert gaps[1] / gaps[2] == pytest.approx(2, rel=0.1)
    with pytest.raises(ValueError, match="integral=True applies to re-summed"):
        perturb.predict(pop, theta0, sched, lr=0.1, order=2, integral=True)
