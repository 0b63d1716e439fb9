"""Re-summed diagrams (perturb.symbolic.resummed): their η-expansion is the un-resummed series."""

from __future__ import annotations

import itertools

import pytest
import sympy as sp

import perturb
from perturb.numeric.resummation import open_network
from perturb.reference import polynomial_derivative_tensors
from perturb.symbolic.resummed import resummed_terms, time_sum_exact


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
    sums = {}  # the exact time sum of each (orders, μ): terms share most of them
    for term in resummed_terms(3, schedule, quantity):
        d = term.diagram.edges
        network = open_network(term, derivs)
        for mu in itertools.product(range(2), repeat=d):
            w = network[mu] if d else network
            w = sp.Rational(w.numerator, w.denominator)
            if (term.orders, mu) not in sums:
                xs = [1 - eta * h[m] for m in mu]
                sums[term.orders, mu] = time_sum_exact(term.orders, xs, steps)
            s = sums[term.orders, mu]
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


def test_bad_schedules():
    for shuffle in (False, True):  # several epochs of several batches are re-summed now
        assert resummed_terms(
            2, perturb.Epochs(train_size=4, batch_size=2, epochs=2, shuffle=shuffle)
        )
    with pytest.raises(ValueError, match="quantity must be one of"):
        resummed_terms(2, perturb.Online(), "gap")
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        resummed_terms(2, "online")
