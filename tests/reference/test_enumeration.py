"""The exact enumerator (perturb.reference.expected_loss) against answers it does not produce.

* the exact rational oracle, where its truncated series is the whole polynomial: SGD on a
  quadratic landscape (row-dependent Hessians too) is linear in θ, so ``θ_T`` is a
  polynomial of degree ``T`` in η and the loss one of degree ``2T``; on a cubic landscape
  two steps give degree 9.  The oracle then gives the exact value at a rational η;
* a closed form for quadratic losses with a constant Hessian: for each batch order
  ``θ_T = K^T θ_0 − Σ_n A_n x_n`` with iid points ``x_n``, so its mean and covariance, and
  the train loss's correlation with the training points, are explicit;
* schedule identities, the vmap fallback, and the error paths.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import sympy
import torch
from sympy import Rational as R

from perturb.reference import count_sequences, expected_loss, oracle_series
from perturb.symbolic.schedules import GD, Epochs, Online

U, V = sympy.symbols("u v")
ROWS = [(1, 0, R(1, 2)), (-1, 2, 0), (0, -1, -1)]
THETA0 = [R(1, 2), R(-1, 3)]
DATA = torch.tensor([[float(v) for v in row] for row in ROWS], dtype=torch.float64)
START = torch.tensor([float(v) for v in THETA0], dtype=torch.float64)
QUANTITIES = ("test", "train", "gap")


pytestmark = pytest.mark.usefixtures("one_thread")


def _quadratic(a, b, c, u, v):
    """Row-dependent gradient and Hessian: SGD stays linear in θ."""
    return u**2 / 2 + v**2 + u * v / 3 + a * u + b * v + c * u * v + a * c * v**2 / 2


def _cubic(a, b, c, u, v):
    return u**2 / 2 + v**2 + u * v / 3 + a * u + b * v + c * u**2 * v


def _torch(landscape):
    return lambda p, x: landscape(x[0], x[1], x[2], p[0], p[1])


def _exact_value(landscape, kwargs: dict, degree: int, quantity: str, eta: Fraction) -> float:
    """The oracle's series through η^degree, checked to be the whole polynomial, at η."""
    losses = [landscape(a, b, c, U, V) for a, b, c in ROWS]
    coeffs = oracle_series(losses, [U, V], THETA0, order=degree + 1, quantity=quantity, **kwargs)
    assert coeffs[-1] == 0  # nothing beyond the degree: the value is exact
    return float(sum(Fraction(int(c.p), int(c.q)) * eta**k for k, c in enumerate(coeffs)))


ORACLE_CASES = {  # schedule, oracle keywords
    "online-T4-B1": (Online(steps=4, batch_size=1), dict(kind="online", steps=4)),
    "online-T2-B2": (Online(steps=2, batch_size=2), dict(kind="online", steps=2, batch_size=2)),
    "epochs-N2-E2-fixed": (
        Epochs(train_size=2, batch_size=1, epochs=2),
        dict(kind="epochs", train_size=2, epochs=2),
    ),
    "epochs-N2-E2-shuffled": (
        Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
        dict(kind="epochs", train_size=2, epochs=2, shuffle=True),
    ),
    "epochs-N4-B2-E2-shuffled": (
        Epochs(train_size=4, batch_size=2, epochs=2, shuffle=True),
        dict(kind="epochs", train_size=4, batch_size=2, epochs=2, shuffle=True),
    ),
    "gd-N2-T3": (
        GD(train_size=2, steps=3),
        dict(kind="epochs", train_size=2, batch_size=2, epochs=3),
    ),
}


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("name", list(ORACLE_CASES))
def test_equals_the_exact_oracle_on_a_quadratic_landscape(name, quantity):
    schedule, kwargs = ORACLE_CASES[name]
    eta = Fraction(1, 5)
    want = _exact_value(_quadratic, kwargs, 2 * int(schedule.steps), quantity, eta)
    got = expected_loss(_torch(_quadratic), DATA, START, schedule, lr=0.2, quantity=quantity)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)


CUBIC_CASES = {
    "online-T2-B1": (Online(steps=2, batch_size=1), dict(kind="online", steps=2)),
    "online-T2-B2": (Online(steps=2, batch_size=2), dict(kind="online", steps=2, batch_size=2)),
    "epochs-N2-E1-shuffled": (
        Epochs(train_size=2, batch_size=1, epochs=1, shuffle=True),
        dict(kind="epochs", train_size=2, shuffle=True),
    ),
    "gd-N2-T2": (
        GD(train_size=2, steps=2),
        dict(kind="epochs", train_size=2, batch_size=2, epochs=2),
    ),
}


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("name", list(CUBIC_CASES))
def test_equals_the_exact_oracle_on_a_cubic_landscape(name, quantity):
    """Two steps of a quadratic gradient: θ_2 has degree 3 in η, the cubic loss degree 9."""
    schedule, kwargs = CUBIC_CASES[name]
    want = _exact_value(_cubic, kwargs, 9, quantity, Fraction(1, 10))
    got = expected_loss(_torch(_cubic), DATA, START, schedule, lr=0.1, quantity=quantity)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)


# ----------------------------------------------------------------- closed form, constant Hessian

HESS = np.array([[1.5, 0.4], [0.4, 0.7]])
POINTS = np.array([[1.0, -0.5], [-0.3, 0.8], [0.6, 0.2]])


def _linear_loss(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * p @ torch.as_tensor(HESS) @ p + x @ p


def _walk_value(batches: list[list[int]], n_points: int, lr: float, theta0: np.ndarray) -> dict:
    """Test and train loss of one batch order over iid points ``0..n_points-1``.

    ``θ_T = K^T θ_0 − Σ_n A_n x_n`` with ``A_n = (η/B) Σ_{t: n ∈ batch_t} K^{T−1−t}``: mean
    ``m = K^T θ_0 − (Σ_n A_n) μ``, covariance ``Σ_n A_n C A_nᵀ``, and
    ``E[x_nᵀ θ_T] = μᵀm − tr(A_n C)``.
    """
    mu = POINTS.mean(0)
    cov = (POINTS - mu).T @ (POINTS - mu) / len(POINTS)
    k = np.eye(2) - lr * HESS
    steps = len(batches)
    coeff = [np.zeros((2, 2)) for _ in range(n_points)]
    for t, batch in enumerate(batches):
        for n in batch:
            coeff[n] += lr / len(batch) * np.linalg.matrix_power(k, steps - 1 - t)
    mean = np.linalg.matrix_power(k, steps) @ theta0 - sum(coeff) @ mu
    second = sum(a @ cov @ a.T for a in coeff) + np.outer(mean, mean)
    test = 0.5 * np.trace(HESS @ second) + mu @ mean
    train = test - sum(np.trace(a @ cov) for a in coeff) / n_points
    return {"test": test, "train": train, "gap": test - train}


def _closed_form(schedule, lr: float, theta0: np.ndarray, quantity: str) -> float:
    batches, b, epochs = int(schedule.batches), int(schedule.batch_size), int(schedule.epochs)
    n = batches * b
    if epochs == 1 and not schedule.shuffle:  # online: every step has fresh points
        walk = [list(range(t * b, (t + 1) * b)) for t in range(batches)]
        return _walk_value(walk, n, lr, theta0)[quantity]
    if not schedule.shuffle:
        walk = [list(range(s * b, (s + 1) * b)) for s in range(batches)] * epochs
        return _walk_value(walk, n, lr, theta0)[quantity]
    perms = list(itertools.permutations(range(n)))
    values = [
        _walk_value(
            [list(perm[s * b : (s + 1) * b]) for perm in walk for s in range(batches)],
            n,
            lr,
            theta0,
        )[quantity]
        for walk in itertools.product(perms, repeat=epochs)
    ]
    return float(np.mean(values))


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize(
    "schedule",
    [
        Online(steps=3, batch_size=1),
        Online(steps=2, batch_size=2),
        Epochs(train_size=3, batch_size=1, epochs=2),
        Epochs(train_size=3, batch_size=1, epochs=2, shuffle=True),
        Epochs(train_size=4, batch_size=2, epochs=2, shuffle=True),
        GD(train_size=3, steps=4),
    ],
    ids=["online-T3", "online-T2-B2", "fixed-N3-E2", "shuffled-N3-E2", "shuffled-N4-B2", "gd"],
)
def test_equals_the_closed_form_of_linear_sgd(schedule, quantity):
    theta0 = np.array([0.7, -1.1])
    lr = 0.3  # not small: the closed form holds at any η
    want = _closed_form(schedule, lr, theta0, quantity)
    points, start = torch.as_tensor(POINTS), torch.as_tensor(theta0)
    got = expected_loss(_linear_loss, points, start, schedule, lr=lr, quantity=quantity)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_gd_gap_at_first_order_is_theory_notes_eta_t_tr_c_over_n():
    """E[test − train] = ηT·tr(C)/N + O(η²) for GD (theory notes), C the gradient covariance."""
    mu = POINTS.mean(0)
    trace_c = float(np.trace((POINTS - mu).T @ (POINTS - mu) / len(POINTS)))
    n, steps, lr = 3, 4, 1e-4
    gd = GD(train_size=n, steps=steps)
    got = expected_loss(
        _linear_loss, torch.as_tensor(POINTS), torch.zeros(2), gd, lr=lr, quantity="gap"
    )
    assert got == pytest.approx(lr * steps * trace_c / n, rel=1e-3)


# ----------------------------------------------------------------- identities and plumbing


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_one_epoch_is_online_sgd_whether_shuffled_or_not(quantity):
    loss = _torch(_cubic)
    online = expected_loss(
        loss, DATA, START, Online(steps=3, batch_size=1), lr=0.1, quantity=quantity
    )
    for shuffle in (False, True):
        epochs = Epochs(train_size=3, batch_size=1, epochs=1, shuffle=shuffle)
        got = expected_loss(loss, DATA, START, epochs, lr=0.1, quantity=quantity)
        assert got == pytest.approx(online, rel=1e-13, abs=1e-15)


def test_a_loss_vmap_cannot_trace_gives_the_same_value():
    def branchy(p, x):  # data-dependent control flow: not vmap-able
        if float(x[2]) > 0:
            return _torch(_cubic)(p, x)
        return x[2] * 0 + _cubic(x[0], x[1], x[2], p[0], p[1])

    schedule = Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True)
    want = expected_loss(_torch(_cubic), DATA, START, schedule, lr=0.1, quantity="gap")
    got = expected_loss(branchy, DATA, START, schedule, lr=0.1, quantity="gap")
    assert got == pytest.approx(want, rel=1e-13)


def test_count_sequences():
    assert count_sequences(Online(steps=4, batch_size=1), 3) == 3**4
    assert count_sequences(Online(steps=2, batch_size=2), 3) == math.comb(4, 2) ** 2
    assert count_sequences(Epochs(train_size=3, batch_size=1, epochs=2), 3) == 3**3
    shuffled = Epochs(train_size=4, batch_size=2, epochs=3, shuffle=True)
    assert count_sequences(shuffled, 2) == 2**4 * 6**3  # 4!/(2!·2!) batch orders per epoch
    assert count_sequences(GD(train_size=3, steps=5), 2) == 2**3


def test_refuses_too_many_sequences_before_enumerating():
    with pytest.raises(ValueError, match=r"3486784401 sample sequences .* max_sequences=1000000"):
        expected_loss(_torch(_cubic), DATA, START, Online(steps=20, batch_size=1), lr=0.1)
    with pytest.raises(ValueError, match="81 sample sequences"):
        expected_loss(
            _torch(_cubic), DATA, START, Online(steps=4, batch_size=1), lr=0.1, max_sequences=80
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(quantity="displacement"), ValueError, "quantity must be one of"),
        (dict(lr=-0.1), ValueError, "lr must be a positive finite number"),
        (dict(lr=True), ValueError, "lr must be a positive finite number"),
        (dict(max_sequences=0), ValueError, "max_sequences must be an integer"),
        (dict(schedule=Online()), ValueError, "needs a numeric schedule"),
        (dict(schedule="online"), TypeError, "schedule must be a perturb Schedule"),
        (dict(rows=torch.zeros(0, 3)), ValueError, "rows must have at least one row"),
        (dict(theta0=torch.zeros(2, 1)), ValueError, "theta0 must be a non-empty 1-D"),
        (dict(loss_fn=3), TypeError, "loss_fn must be callable"),
        (dict(loss_fn=lambda p, x: p * x[0]), ValueError, "loss_fn must return a scalar"),
    ],
)
def test_bad_inputs_are_refused_with_a_message(kwargs, error, match):
    args = dict(
        loss_fn=_torch(_cubic), rows=DATA, theta0=START, schedule=Online(steps=2, batch_size=1)
    )
    options = dict(lr=0.1)
    for key, value in kwargs.items():
        (args if key in args else options)[key] = value
    with pytest.raises(error, match=match):
        expected_loss(args["loss_fn"], args["rows"], args["theta0"], args["schedule"], **options)
