"""The engine's η-series against the brute-force oracle, exactly."""

from __future__ import annotations

from fractions import Fraction

import pytest
import sympy as sp

import perturb
from perturb.reference import oracle_series, polynomial_derivative_tensors
from perturb.symbolic.series import series

ORDER = 4

# (id, oracle keywords, engine schedule)
CASES = [
    (
        "online-T3-B1",
        dict(kind="online", steps=3, batch_size=1),
        perturb.Online(steps=3, batch_size=1),
    ),
    (
        "online-T2-B2",
        dict(kind="online", steps=2, batch_size=2),
        perturb.Online(steps=2, batch_size=2),
    ),
] + [
    (
        f"epochs-N{n}-B{b}-E{e}-{'shuffled' if sh else 'fixed'}",
        dict(kind="epochs", train_size=n, batch_size=b, epochs=e, shuffle=sh),
        perturb.Epochs(train_size=n, batch_size=b, epochs=e, shuffle=sh),
    )
    for n in (2, 3)
    for b in (1, n)
    for e in (1, 2)
    for sh in (False, True)
    if not (b == n and sh)  # one batch per epoch: shuffling changes nothing
]


@pytest.fixture(scope="module")
def exact_derivs(landscape):
    losses, params, theta0 = landscape
    return polynomial_derivative_tensors(losses, params, theta0, ORDER + 1)


def _rational(x):
    return sp.Rational(x.numerator, x.denominator) if isinstance(x, Fraction) else sp.Rational(x)


@pytest.mark.parametrize(("name", "kwargs", "schedule"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("quantity", ["test", "train"])
def test_series_equals_oracle_exactly(name, kwargs, schedule, quantity, landscape, exact_derivs):
    losses, params, theta0 = landscape
    expected = oracle_series(losses, params, theta0, order=ORDER, quantity=quantity, **kwargs)
    ours = series(ORDER, schedule, quantity).evaluate(exact_derivs)
    assert [_rational(v) for v in ours] == list(expected)


@pytest.mark.parametrize(
    ("name", "kwargs", "schedule"),
    [CASES[0], CASES[-1], CASES[7]],
    ids=[CASES[0][0], CASES[-1][0], CASES[7][0]],
)
@pytest.mark.parametrize("quantity", ["gap", "displacement"])
def test_gap_and_displacement_equal_oracle(
    name, kwargs, schedule, quantity, landscape, exact_derivs
):
    losses, params, theta0 = landscape
    expected = oracle_series(losses, params, theta0, order=3, quantity=quantity, **kwargs)
    ours = series(3, schedule, quantity).evaluate(exact_derivs)
    if quantity == "displacement":
        ours = [[0, 0], *([_rational(c) for c in v] for v in ours[1:])]
        expected = [[row[d] for row in expected] for d in range(4)]
        assert ours == expected
    else:
        assert [_rational(v) for v in ours] == list(expected)


# perturb.predict's float64 path is the same for every schedule (the schedule enters through
# the series, checked exactly on every case above): the default run keeps one case of each
# kind (online with B = 2, one batch per epoch, several epochs fixed and reshuffled), -m slow
# every case
FLOAT64_FAST = {
    "online-T2-B2", "epochs-N2-B2-E2-fixed", "epochs-N3-B1-E2-fixed", "epochs-N2-B1-E2-shuffled"
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kwargs", "schedule"),
    [c if c[0] in FLOAT64_FAST else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_predict_exact_matches_oracle_in_float64(
    name, kwargs, schedule, landscape, torch_landscape
):
    losses, params, theta0 = landscape
    loss_fn, data, theta = torch_landscape
    pop = perturb.Population(loss_fn, data)
    for quantity in ("test", "train"):
        expected = oracle_series(losses, params, theta0, order=ORDER, quantity=quantity, **kwargs)
        pred = perturb.predict(pop, theta, schedule, lr=1.0, order=ORDER, quantity=quantity)
        for ours, exact in zip(pred.by_order, expected, strict=True):
            assert ours == pytest.approx(float(exact), rel=1e-10, abs=1e-12)


def test_moment_form_equals_cumulant_form(exact_derivs):
    for schedule in (perturb.Online(steps=3, batch_size=2), CASES[-1][2]):
        for quantity in ("test", "train"):
            a = series(3, schedule, quantity).evaluate(exact_derivs)
            b = series(3, schedule, quantity, form="moment").evaluate(exact_derivs)
            assert a == b


def test_theory_notes_online_result():
    """E l(θ_T) = l − ηT G·G + η²[(T² − T/2) G·H·G + (T/2) tr(C H)] + O(η³)."""
    s = series(2, perturb.Online(batch_size=1))
    t = sp.Symbol("T", positive=True, integer=True)
    names = {term.contraction.text: term.coefficient for term in s.terms}
    assert set(names) == {"l", "G·G", "G·H·G", "tr(C H)"}
    assert sp.simplify(names["G·G"] + t) == 0
    assert sp.simplify(names["G·H·G"] - (t**2 - t / 2)) == 0
    assert sp.simplify(names["tr(C H)"] - t / 2) == 0


def test_theory_notes_gd_gap():
    """E[test − train] = ηT tr(C)/N + O(η²) for GD."""
    s = series(1, perturb.GD(), "gap")
    t, n = sp.symbols("T N", positive=True, integer=True)
    (term,) = [x for x in s.terms if x.power == 1]
    assert term.contraction.text == "tr(C)"
    assert sp.simplify(term.coefficient - t / n) == 0


def test_corollary5_skew_term():
    """SGD vs SDE at η³: −(T/6) S:J for B = 1 (Corollary 5), from the engine."""
    s = series(3, perturb.Online(batch_size=1))
    t = sp.Symbol("T", positive=True, integer=True)
    (term,) = [x for x in s.terms if x.contraction.text == "J:S"]
    assert sp.simplify(term.coefficient + t / 6) == 0


def test_symbolic_series_specialises(exact_derivs):
    t, b = sp.symbols("T B", positive=True, integer=True)
    sym = series(3, perturb.Online())
    num = series(3, perturb.Online(steps=3, batch_size=2))
    assert sp.simplify(sym.expr.subs({t: 3, b: 2}) - num.expr) == 0


def test_formats():
    s = series(2, perturb.Online(batch_size=1))
    assert "tr(C H)" in s.to_text()
    assert r"\operatorname{tr}(C H)" in s.to_latex()
    import json

    payload = json.loads(s.to_json())
    assert payload["order"] == 2 and len(payload["terms"]) == len(s.terms) == 4


def test_displacement_series():
    s = series(2, perturb.Online(batch_size=1), "displacement")
    names = [(t.power, t.contraction.text) for t in s.terms]
    assert names == [(1, "G"), (2, "H·G")]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: series(-1), ValueError, "order must be a non-negative integer"),
        (lambda: series(2, quantity="loss"), ValueError, "quantity must be one of"),
        (lambda: series(2, form="joint"), ValueError, "form must be one of"),
        (lambda: series(2, "online"), TypeError, "schedule must be a Schedule"),
        (lambda: series(1).evaluate({}), ValueError, "numeric sizes"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
