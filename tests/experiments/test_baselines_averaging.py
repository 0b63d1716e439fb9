"""Seed 002 (perturb.experiments.baselines.averaging): iterate averaging ↔ learning-rate
schedules, against exact rationals of the brute-force unroller and a seeded simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
import torch
from baseline_models import Z_MAX, _linear_problem, _model
from sympy import Rational as R

import perturb
from perturb.experiments.baselines import (
    QuadraticModel,
    averaging_gap_series,
    averaging_weights,
    equivalent_schedule,
    iterate_average_moments,
    iterate_average_test_loss,
    weighted_iterate_series,
)
from perturb.reference import (
    averaged_oracle_series,
    polynomial_derivative_tensors,
    population_statistics,
)

U, V = sympy.symbols("u v")


def test_equivalent_schedules_are_seed_002_table_1():
    """Table 1 written out by hand: SWA (k+1−i)/k, two-point ½, EMA 1 − (1−δ)^{k−i}."""
    k = 6
    assert equivalent_schedule(averaging_weights("swa", steps=k)) == [
        R(k + 1 - i, k) for i in range(1, k + 1)
    ]
    assert equivalent_schedule(averaging_weights("two_point", steps=k)) == [R(1, 2)] * k
    d = R(1, 3)
    got = equivalent_schedule(averaging_weights("ema", steps=k, decay=d))
    assert got == [1 - (1 - d) ** (k - i) for i in range(k)]
    for kind, decay in [("swa", None), ("two_point", None), ("ema", d)]:
        assert sum(averaging_weights(kind, steps=k, decay=decay)) == 1


# Non-quadratic 2-D landscape with noisy gradient, Hessian and third derivative (as in
# tests/reference/test_oracle.py), so every η³ contraction is non-zero.
_ROWS = [(1, 0, R(1, 2)), (-1, 2, 0), (0, -1, -1)]


_THETA0 = [R(1, 2), R(-1, 3)]


_LOSSES = [
    u**2 / 2 + v**2 + u * v / 3 + a * u + b * v + c * u**2 * v + u**4 / 12
    for a, b, c in _ROWS
    for u, v in [(U, V)]
]


def _cases():
    k = 3
    for kind, decay in [("two_point", None), ("swa", None), ("ema", R(1, 3))]:
        w = averaging_weights(kind, steps=k, decay=decay)
        yield kind, w, [1] * k
        yield f"{kind} schedule", [0] * k + [1], equivalent_schedule(w)


@pytest.mark.parametrize(("name", "weights", "rates"), list(_cases()))
def test_weighted_iterate_series_equals_the_exact_unroller(name, weights, rates):
    """Exact rationals: the hand-derived η³ weights against enumeration of all 27 paths."""
    derivs = polynomial_derivative_tensors(_LOSSES, [U, V], _THETA0, 3)
    ours = weighted_iterate_series(weights=weights, rates=rates).evaluate(derivs)
    truth = averaged_oracle_series(_LOSSES, [U, V], _THETA0, rates=rates, weights=weights, order=3)
    assert [sympy.Rational(x) for x in ours] == truth, name


def test_weighted_iterate_series_with_batches_equals_the_exact_unroller():
    derivs = polynomial_derivative_tensors(_LOSSES, [U, V], _THETA0, 3)
    w = averaging_weights("ema", steps=2, decay=R(1, 2))
    for weights, rates in [(w, [1, 1]), ([0, 0, 1], equivalent_schedule(w))]:
        ours = weighted_iterate_series(weights=weights, rates=rates, batch_size=2).evaluate(derivs)
        truth = averaged_oracle_series(
            _LOSSES, [U, V], _THETA0, rates=rates, weights=weights, order=3, batch_size=2
        )
        assert [sympy.Rational(x) for x in ours] == truth


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_weighted_iterate_series_of_the_last_iterate_is_the_engines(steps, batch):
    """α = 1, w = (0, …, 0, 1): the diagram engine's online coefficients, term by term."""
    ours = weighted_iterate_series(weights=[0] * steps + [1], batch_size=batch)
    engine = perturb.series(3, perturb.Online(steps=steps, batch_size=batch))
    mine = {(t.power, t.contraction.text): sympy.nsimplify(t.coefficient) for t in ours.terms}
    theirs = {(t.power, t.contraction.text): sympy.nsimplify(t.coefficient) for t in engine.terms}
    assert mine == theirs


def test_averaging_gap_series_is_the_difference_of_the_oracles():
    """avg − schedule: zero through η¹, the chain G·H·G alone at η² (checked exactly)."""
    derivs = polynomial_derivative_tensors(_LOSSES, [U, V], _THETA0, 3)
    stats = population_statistics(derivs)
    ghg = sympy.Rational(stats["G"] @ stats["H"] @ stats["G"])
    for kind, decay in [("two_point", None), ("swa", None), ("ema", R(1, 3))]:
        w = averaging_weights(kind, steps=3, decay=decay)
        c = equivalent_schedule(w)
        avg = averaged_oracle_series(_LOSSES, [U, V], _THETA0, rates=[1] * 3, weights=w, order=3)
        sch = averaged_oracle_series(
            _LOSSES, [U, V], _THETA0, rates=c, weights=[0] * 3 + [1], order=3
        )
        gap = [a - b for a, b in zip(avg, sch, strict=True)]
        assert gap[0] == gap[1] == 0
        s2 = sum(c[s] * (1 - c[r]) for s in range(3) for r in range(s))
        assert s2 > 0 and gap[2] == s2 * ghg != 0
        ours = averaging_gap_series(w).evaluate(derivs)
        assert [sympy.Rational(x) for x in ours] == gap
        assert [t.contraction.text for t in averaging_gap_series(w).terms if t.power == 2] == [
            "G·H·G"
        ]


def test_averaging_is_a_schedule_through_eta2_at_a_stationary_point():
    """G = 0 (θ_0 = 0, centred x): η² agrees, η³ differs by −Σ_{r<s}c_sc_r(1−c_r)·tr(CHH).

    1-D rows ``½θ² + θ³/3 + xθ``, ``x ∈ {−2, 1, 1}``: a third derivative and skewed noise;
    the J terms need ``G ≠ 0`` and do not appear.
    """
    th = sympy.Symbol("theta")
    rows = [th**2 / 2 + th**3 / 3 + x * th for x in (-2, 1, 1)]
    w = averaging_weights("swa", steps=3)
    c = equivalent_schedule(w)
    avg = averaged_oracle_series(rows, [th], [0], rates=[1] * 3, weights=w, order=4)
    sch = averaged_oracle_series(rows, [th], [0], rates=c, weights=[0] * 3 + [1], order=4)
    assert avg[:3] == sch[:3] and avg[2] != 0
    cov, hess = R(2), R(1)  # C = mean x² = 2, H = 1
    want = -sum(c[s] * c[r] * (1 - c[r]) for s in range(3) for r in range(s)) * cov * hess**2
    assert avg[3] - sch[3] == want != 0


def _quadratic_rows():
    """2-D quadratic rows ``½θᵀHθ + xᵀθ`` with non-commuting H and C, and their model."""
    h = sympy.Matrix([[2, R(1, 2)], [R(1, 2), 1]])
    xs = [(1, 0), (R(-1, 2), 1), (R(-1, 2), -1)]  # centred, C not ∝ I
    theta = sympy.Matrix([U, V])
    rows = [(theta.T * h * theta)[0] / 2 + a * U + b * V for a, b in xs]
    theta0 = [1, R(-1, 2)]
    derivs = polynomial_derivative_tensors(rows, [U, V], theta0, 2)
    st = population_statistics(derivs)
    f = lambda a: torch.tensor(np.array(a, dtype=float), dtype=torch.float64)  # noqa: E731
    return rows, theta0, QuadraticModel(f(st["l"]), f(st["G"]), f(st["H"]), f(st["C"]))


@pytest.mark.parametrize(("batch", "k"), [(1, 3), (2, 2)])
def test_iterate_average_test_loss_equals_the_exact_unroller(batch, k):
    """On a quadratic the loss is a polynomial of degree 2k in η: the oracle gives all of it."""
    rows, theta0, q = _quadratic_rows()
    lr = 0.4
    eta = sympy.Symbol("eta")
    for kind, decay in [("two_point", None), ("swa", None), ("ema", R(1, 4))]:
        w = averaging_weights(kind, steps=k, decay=decay)
        c = equivalent_schedule(w)
        for weights, rates in [(w, [1] * k), ([0] * k + [1], c)]:
            coeffs = averaged_oracle_series(
                rows, [U, V], theta0, rates=rates, weights=weights, order=2 * k, batch_size=batch
            )
            exact = float(sum(ck * eta**i for i, ck in enumerate(coeffs)).subs(eta, R(2, 5)))
            lrs = [lr * float(a) for a in rates]
            got = iterate_average_test_loss(q, lrs=lrs, weights=weights, batch_size=batch)
            assert float(got) == pytest.approx(exact, rel=1e-12, abs=1e-14)


def _side_trips(h, xs, theta0, *, lr, batch_size, rates, weights, chains, seed):
    """Constant-η side-trips from θ_0 and their averages, and the schedule on the same batches."""
    rng = np.random.default_rng(seed)
    h, xs, th0 = h.numpy(), xs.numpy(), theta0.numpy()
    n = xs.shape[0]
    k = len(rates)
    noise = xs[rng.integers(0, n, (k, chains, batch_size))].mean(2)
    theta = np.tile(th0, (chains, 1))
    sched = theta.copy()
    avg = weights[0] * theta
    for t in range(k):
        theta = theta - lr * (theta @ h + noise[t])
        sched = sched - lr * rates[t] * (sched @ h + noise[t])
        avg = avg + weights[t + 1] * theta
    return avg, sched


def _z(samples, target):
    return (samples.mean(0) - target) / (samples.std(0, ddof=1) / math.sqrt(len(samples)))


@pytest.mark.parametrize(("kind", "decay"), [("two_point", None), ("swa", None), ("ema", 0.25)])
def test_averaged_and_schedule_moments_match_simulation(kind, decay):
    """Non-commuting H, C (P = 4): mean, covariance and loss of the average and of the
    schedule against 40000 simulated side-trips (numpy seed 7), and the paired difference of
    their losses (same batches) against the exact recursion's difference.  15 + 15 + 1 z's
    per case, 93 in all: false-failure rate ≤ 93·6.8e-6 ≈ 6e-4 at |z| < 4.5."""
    h, c, xs = _linear_problem(seed=0)
    theta0 = torch.tensor([1.0, -0.5, 0.8, 0.3], dtype=torch.float64)
    q = QuadraticModel(0.5 * theta0 @ h @ theta0, h @ theta0, h, c)
    lr, k, b = 0.25, 8, 2
    w = [float(x) for x in averaging_weights(kind, steps=k, decay=decay)]
    rates = [float(x) for x in equivalent_schedule(w)]
    avg, sched = _side_trips(
        h, xs, theta0, lr=lr, batch_size=b, rates=rates, weights=w, chains=40000, seed=7
    )
    hn, th0 = h.numpy(), theta0.numpy()
    losses = {}
    for name, x, weights, lrs in [
        ("avg", avg, w, [lr] * k),
        ("sched", sched, None, [lr * a for a in rates]),
    ]:
        mean, cov = iterate_average_moments(q, lrs=lrs, weights=weights, batch_size=b)
        d = x - th0
        iu = np.triu_indices(4)
        centred = d - mean.numpy()
        outer = (centred[:, :, None] * centred[:, None, :])[:, iu[0], iu[1]]
        loss = 0.5 * np.einsum("ci,ij,cj->c", x, hn, x)
        want = float(iterate_average_test_loss(q, lrs=lrs, weights=weights, batch_size=b))
        z = np.concatenate([_z(d, mean.numpy()), _z(outer, cov.numpy()[iu]), [_z(loss, want)]])
        assert np.abs(z).max() < Z_MAX, (name, z)
        losses[name] = (loss, want)
    diff = losses["avg"][0] - losses["sched"][0]
    want = losses["avg"][1] - losses["sched"][1]
    assert abs(_z(diff, want)) < Z_MAX


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: averaging_weights("median", steps=2), "kind must be"),
        (lambda: averaging_weights("swa", steps=0), "steps must be"),
        (lambda: averaging_weights("ema", steps=2), "decay is required"),
        (lambda: averaging_weights("swa", steps=2, decay=0.5), "decay is required"),
        (lambda: averaging_weights("ema", steps=2, decay=1.5), r"decay must be in \(0, 1\]"),
        (lambda: equivalent_schedule([0.5, 0.6]), "must sum to 1"),
        (lambda: equivalent_schedule([1]), "one entry per iterate"),
        (lambda: weighted_iterate_series(weights=[0, 1], order=4), "order must be"),
        (lambda: weighted_iterate_series(weights=[0, 1], rates=[1, 1]), "rates needs"),
        (lambda: weighted_iterate_series(weights=[0, 1], batch_size=0), "batch_size"),
        (lambda: averaging_gap_series([0.5, 0.5], batch_size=0), "batch_size"),
        (
            lambda: iterate_average_moments(_model(), lrs=[0.1], weights=[1, 0, 0]),
            "weights needs",
        ),
        (lambda: iterate_average_moments(_model(), lrs=[]), "non-empty"),
        (lambda: iterate_average_moments(_model(), lrs=[0.1], batch_size=0), "batch_size"),
    ],
)
def test_averaging_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: weighted_iterate_series(weights="ab"),
        lambda: weighted_iterate_series(weights=[0, "x"]),
        lambda: equivalent_schedule(3),
        lambda: averaged_oracle_series([U], [U], [0], rates=[0.5], weights=[0, 1], order=1),
    ],
)
def test_averaging_type_errors(call):
    with pytest.raises(TypeError):
        call()


def test_averaged_oracle_series_errors():
    with pytest.raises(ValueError, match="len\\(rates\\) \\+ 1"):
        averaged_oracle_series([U**2], [U], [0], rates=[1], weights=[1], order=1)
    with pytest.raises(ValueError, match="one multiplier per step"):
        averaged_oracle_series([U**2], [U], [0], rates=[], weights=[1], order=1)
    with pytest.raises(ValueError, match="at least one row"):
        averaged_oracle_series([], [U], [0], rates=[1], weights=[0, 1], order=1)
    with pytest.raises(ValueError, match="theta0 has"):
        averaged_oracle_series([U**2], [U], [0, 1], rates=[1], weights=[0, 1], order=1)
