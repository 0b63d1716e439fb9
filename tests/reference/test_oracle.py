"""Checks of the brute-force oracles against results they do not produce themselves.

* closed forms derived by hand for a linear (quadratic-loss) SGD,
* the theory-notes order-η² result for online SGD and the η¹ gen. gap of GD,
* schedule identities (E = 1 epochs = online; shuffling one epoch changes nothing),
* the float64 autodiff oracle against the exact rational one, and against plain SGD runs.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import sympy
import torch
from sympy import Rational as R

from perturb.reference.oracle import oracle_series, unroll_taylor

ETA = sympy.Symbol("eta")
U, V = sympy.symbols("u v")

# A 2-D non-quadratic landscape with 3 rows (a, b, c): noisy gradient, noisy Hessian and a
# noisy third derivative, so every kind of cumulant is present.
ROWS = [(1, 0, R(1, 2)), (-1, 2, 0), (0, -1, -1)]
THETA0 = [R(1, 2), R(-1, 3)]


def _row_loss(a, b, c, u, v):
    return u**2 / 2 + v**2 + u * v / 3 + a * u + b * v + c * u**2 * v + u**4 / 12


LOSSES = [_row_loss(a, b, c, U, V) for a, b, c in ROWS]


def _torch_loss(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _row_loss(x[0], x[1], x[2], p[0], p[1])


TORCH_DATA = torch.tensor([[float(v) for v in row] for row in ROWS], dtype=torch.float64)
TORCH_THETA0 = torch.tensor([float(v) for v in THETA0], dtype=torch.float64)


def _coeffs(expr, order):
    """Coefficients of ETA^0 … ETA^order of a polynomial in ETA."""
    poly = sympy.Poly(sympy.expand(expr), ETA)
    return [poly.coeff_monomial(ETA**k) for k in range(order + 1)]


def _stats(losses, params, theta0):
    """Mean loss l, mean gradient G, mean Hessian H and gradient covariance C at theta0."""
    at = dict(zip(params, theta0, strict=True))
    m = len(losses)
    grads = [sympy.Matrix([sympy.diff(f, p) for p in params]).subs(at) for f in losses]
    hessians = [sympy.hessian(f, params).subs(at) for f in losses]
    loss = sum(f.subs(at) for f in losses) / m
    g = sum(grads, sympy.zeros(len(params), 1)) / m
    h = sum(hessians, sympy.zeros(len(params))) / m
    c = sum(((gi - g) * (gi - g).T for gi in grads), sympy.zeros(len(params))) / m
    return loss, g, h, c


# ----------------------------------------------------------------------------------------------
# 1. Linear SGD: closed forms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    ("h", "a", "b", "theta0"),
    [(R(3, 2), 1, R(-2, 3), R(1, 2)), (R(-1, 3), R(5, 4), 2, -3)],
)
def test_quadratic_online_closed_form(steps, batch, h, a, b, theta0):
    # l_x(θ) = ½hθ² + xθ, x ∈ {a, b} uniform. With k = 1 − ηh and x̄_t the batch mean:
    #   θ_{t+1} = k θ_t − η x̄_t,   E x̄ = μ = (a+b)/2,   Var x̄ = v/B,  v = ((a−b)/2)².
    # x̄_t is independent of θ_t, so
    #   E θ_T   = k^T θ_0 − μ (1 − k^T)/h,
    #   Var θ_T = (η² v / B) Σ_{j<T} k^{2j},
    # and the test loss is E[½hθ_T² + μθ_T] = ½h((Eθ_T)² + Var θ_T) + μ Eθ_T.
    th = sympy.Symbol("theta")
    losses = [h * th**2 / 2 + a * th, h * th**2 / 2 + b * th]
    k = 1 - ETA * h
    mu, var = R(a + b, 2), (R(a - b, 2)) ** 2
    mean = k**steps * theta0 - mu * sympy.cancel((1 - k**steps) / h)
    spread = ETA**2 * var / batch * sum(k ** (2 * j) for j in range(steps))
    test = h / 2 * (mean**2 + spread) + mu * mean
    order = 2 * steps + 1  # the exact answer is a polynomial of degree 2T: check all of it
    kw = {"kind": "online", "steps": steps, "batch_size": batch, "order": order}
    assert oracle_series(losses, [th], [theta0], **kw) == _coeffs(test, order)
    disp = oracle_series(losses, [th], [theta0], quantity="displacement", **kw)
    assert disp == [_coeffs(mean - theta0, order)]


# ----------------------------------------------------------------------------------------------
# 2. Theory notes: online SGD, B = 1, through η²; and the GD gen. gap at η¹
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_online_order_two_matches_theory_notes(steps):
    # E l(θ_T) = l − ηT·G·G + η²[(T² − T/2)·G·H·G + (T/2)·tr(C H)] + O(η³)
    loss, g, h, c = _stats(LOSSES, [U, V], THETA0)
    t = steps
    expected = [
        loss,
        -t * (g.T * g)[0],
        (R(t * t) - R(t, 2)) * (g.T * h * g)[0] + R(t, 2) * (c * h).trace(),
    ]
    got = oracle_series(LOSSES, [U, V], THETA0, kind="online", steps=t, order=2)
    assert got == expected
    # and the leading displacement is plain gradient flow, −ηT·G
    disp = oracle_series(
        LOSSES, [U, V], THETA0, kind="online", steps=t, order=1, quantity="displacement"
    )
    assert disp == [[0, -t * g[0]], [0, -t * g[1]]]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("n_epochs", [1, 2])
def test_gd_gap_first_order(n, n_epochs):
    # GD (B = N) for T = E steps: E[test − train] = ηT·tr(C)/N + O(η²).
    _, _, _, c = _stats(LOSSES, [U, V], THETA0)
    got = oracle_series(
        LOSSES,
        [U, V],
        THETA0,
        kind="epochs",
        train_size=n,
        batch_size=n,
        epochs=n_epochs,
        order=1,
        quantity="gap",
    )
    assert got == [0, n_epochs * c.trace() / n]


# ----------------------------------------------------------------------------------------------
# 3. Schedule identities
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", ["test", "train", "gap", "displacement"])
@pytest.mark.parametrize(("n", "batch"), [(2, 1), (3, 1), (2, 2)])
def test_one_epoch_is_online(quantity, n, batch):
    # One pass over N iid points in batches of B is online SGD with T = N/B steps of B fresh
    # draws, and its training set is exactly the samples drawn.
    kw = {"order": 3, "quantity": quantity, "batch_size": batch}
    online = oracle_series(LOSSES, [U, V], THETA0, kind="online", steps=n // batch, **kw)
    for shuffle in (False, True):
        ep = oracle_series(
            LOSSES, [U, V], THETA0, kind="epochs", train_size=n, shuffle=shuffle, **kw
        )
        assert ep == online


@pytest.mark.parametrize("quantity", ["test", "train", "gap", "displacement"])
@pytest.mark.parametrize("n", [2, 3])
def test_shuffle_irrelevant_for_one_epoch(quantity, n):
    # The training set is iid, hence exchangeable: one uniformly shuffled pass has the same
    # law as the fixed-order pass.
    kw = {"kind": "epochs", "train_size": n, "order": 4, "quantity": quantity}
    fixed = oracle_series(LOSSES, [U, V], THETA0, shuffle=False, **kw)
    shuffled = oracle_series(LOSSES, [U, V], THETA0, shuffle=True, **kw)
    assert fixed == shuffled


@pytest.mark.parametrize("n", [2, 3])
def test_shuffle_matters_from_order_four_with_two_epochs(n):
    # Why not before η⁴ (B = 1, E = 2): a diagram's embedding count only feels the order
    # through which of its nodes sit on the same training point. Up to η³ at most three
    # non-root nodes exist, so at most one point is used twice (once per epoch); the count
    # is then a sum over points of (function of its epoch-1 position) + (function of its
    # epoch-2 position), which is the same for every permutation. At η⁴ a chain can visit
    # points a, b, a, b, which needs a before b in both epochs: C(N, 2) pairs in fixed order,
    # half of that on average when shuffled.
    kw = {"kind": "epochs", "train_size": n, "epochs": 2, "order": 4}
    fixed = oracle_series(LOSSES, [U, V], THETA0, shuffle=False, **kw)
    shuffled = oracle_series(LOSSES, [U, V], THETA0, shuffle=True, **kw)
    assert fixed[:4] == shuffled[:4]
    assert fixed[4] != shuffled[4]
    # The exact oracle draws shuffled batches without replacement from what is left of the
    # epoch; the autodiff oracle walks every explicit permutation. They agree at η⁴ too.
    for shuffle, exact in ((False, fixed), (True, shuffled)):
        approx = unroll_taylor(_torch_loss, TORCH_DATA, TORCH_THETA0, shuffle=shuffle, **kw)
        assert approx == pytest.approx([float(e) for e in exact], rel=1e-10, abs=1e-10)
    # With B = N (GD) the single batch is the whole set and shuffling is irrelevant.
    gd_kw = {**kw, "batch_size": n}
    assert oracle_series(LOSSES, [U, V], THETA0, shuffle=False, **gd_kw) == oracle_series(
        LOSSES, [U, V], THETA0, shuffle=True, **gd_kw
    )


# ----------------------------------------------------------------------------------------------
# 4. The autodiff oracle
# ----------------------------------------------------------------------------------------------

SCHEDULES = [
    {"kind": "online", "steps": 2},
    {"kind": "online", "steps": 3},
    {"kind": "online", "steps": 2, "batch_size": 2},
    {"kind": "epochs", "train_size": 2, "epochs": 2},
    {"kind": "epochs", "train_size": 2, "epochs": 2, "shuffle": True},
    {"kind": "epochs", "train_size": 3, "epochs": 2, "shuffle": True},
    {"kind": "epochs", "train_size": 3, "epochs": 2, "batch_size": 3},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("quantity", ["test", "train", "gap", "displacement"])
def test_unroll_taylor_matches_exact_oracle(schedule, quantity):
    order = 3
    exact = oracle_series(LOSSES, [U, V], THETA0, order=order, quantity=quantity, **schedule)
    approx = unroll_taylor(
        _torch_loss, TORCH_DATA, TORCH_THETA0, order=order, quantity=quantity, **schedule
    )
    if quantity != "displacement":
        exact, approx = [exact], [approx]
    assert len(approx) == len(exact)
    for e_list, a_list in zip(exact, approx, strict=True):
        assert len(a_list) == order + 1
        for e, a in zip(e_list, a_list, strict=True):
            assert a == pytest.approx(float(e), rel=1e-10, abs=1e-10)


def test_unroll_taylor_order_zero_and_low_degree():
    # order 0 is the loss at θ0; a quadratic has no η³ term after one step.
    data = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)

    def loss(p, x):
        return 0.5 * p[0] ** 2 + x[0] * p[0]

    th0 = torch.tensor([1.0])
    assert unroll_taylor(loss, data, th0, kind="online", steps=1, order=0) == [0.5]
    c = unroll_taylor(loss, data, th0, kind="online", steps=1, order=4)
    assert c == pytest.approx([0.5, -1.0, 1.0, 0.0, 0.0], abs=1e-14)


def test_unroll_taylor_row_loop_fallback_and_no_grad_context():
    # A loss that torch.func.vmap cannot batch (.item() on the data) runs row by row, and a
    # caller's no_grad context does not break the unrolling.
    def branchy(p, x):
        scale = 2.0 if x[2].item() < 0 else 1.0
        return scale * _torch_loss(p, x) / scale

    kw = {"kind": "epochs", "train_size": 2, "epochs": 2, "order": 3, "quantity": "gap"}
    expected = unroll_taylor(_torch_loss, TORCH_DATA, TORCH_THETA0, **kw)
    with torch.no_grad():
        got = unroll_taylor(branchy, TORCH_DATA, TORCH_THETA0, **kw)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_unroll_taylor_constant_and_partly_flat_losses():
    data = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    th0 = torch.tensor([0.5, 0.25], dtype=torch.float64)
    kw = {"kind": "online", "steps": 2, "order": 3}
    # a loss that ignores θ: nothing moves
    assert unroll_taylor(lambda p, x: 3.0 * x[0], data, th0, **kw) == [4.5, 0.0, 0.0, 0.0]
    # l_x = x·u²: u_T = u_0 Π_t (1 − 2ηx_t), v never moves; E(1 − 2ηx)² = 1 − 6η + 10η²
    disp = unroll_taylor(lambda p, x: x[0] * p[0] ** 2, data, th0, quantity="displacement", **kw)
    assert disp[0] == pytest.approx([0.0, -3.0, 4.5, 0.0], abs=1e-14)
    assert disp[1] == [0.0] * 4
    test = unroll_taylor(lambda p, x: x[0] * p[0] ** 2, data, th0, **kw)
    assert test == pytest.approx([0.375, -4.5, 21.0, -45.0], abs=1e-12)  # ⅜(1 − 6η + 10η²)²


def test_unroll_taylor_tanh_network_matches_small_eta_runs():
    # A non-polynomial loss: a 1-hidden-unit tanh net on 2 points. The Taylor polynomial must
    # agree with the exact SGD average at small η up to O(η^(order+1)).
    data = torch.tensor([[0.5, 1.0], [-1.0, 0.2]], dtype=torch.float64)
    th0 = torch.tensor([0.3, -0.7, 0.4], dtype=torch.float64)

    def loss(p, x):
        return 0.5 * (p[2] * torch.tanh(p[0] * x[0] + p[1]) - x[1]) ** 2

    order, steps = 3, 2
    c = unroll_taylor(loss, data, th0, kind="online", steps=steps, order=order)

    def sgd_test_loss(eta):
        total = 0.0
        for seq in itertools.product(range(2), repeat=steps):
            p = th0.clone()
            for i in seq:
                q = p.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(loss(q, data[i]), q)
                p = p - eta * g
            total += sum(loss(p, x).item() for x in data) / 2
        return total / 2**steps

    for eta in (1e-2, 2e-2):
        series = sum(ck * eta**k for k, ck in enumerate(c))
        assert abs(series - sgd_test_loss(eta)) < 50 * eta ** (order + 1)


# ----------------------------------------------------------------------------------------------
# 5. Input errors
# ----------------------------------------------------------------------------------------------

_GOOD = {"kind": "online", "steps": 1, "order": 1}


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"kind": "batch"}, ValueError, r"kind must be one of \('online', 'epochs'\); got 'batch'"),
        ({"quantity": "loss"}, ValueError, r"quantity must be one of .*'gap'.*; got 'loss'"),
        ({"order": -1}, ValueError, r"order must be >= 0; got -1"),
        ({"order": 1.5}, TypeError, r"order must be an int >= 0; got 1.5 \(float\)"),
        ({"order": True}, TypeError, r"order must be an int >= 0; got True \(bool\)"),
        ({"steps": None}, ValueError, r"kind='online' needs steps=T"),
        ({"steps": 0}, ValueError, r"steps must be >= 1; got 0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be >= 1; got 0"),
        ({"train_size": 2}, ValueError, r"train_size is only for kind='epochs'"),
        ({"epochs": 2}, ValueError, r"epochs is only for kind='epochs'; got epochs=2"),
        ({"shuffle": True}, ValueError, r"shuffle is only for kind='epochs'"),
        ({"shuffle": 1}, TypeError, r"shuffle must be a bool; got 1 \(int\)"),
        (
            {"kind": "epochs", "steps": None},
            ValueError,
            r"kind='epochs' needs train_size=N",
        ),
        (
            {"kind": "epochs", "steps": None, "train_size": 3, "batch_size": 2},
            ValueError,
            r"batch_size must divide train_size; got batch_size=2, train_size=3",
        ),
        (
            {"kind": "epochs", "steps": 5, "train_size": 2, "epochs": 2},
            ValueError,
            r"epochs\*train_size/batch_size = 4; got steps=5",
        ),
        (
            {"kind": "epochs", "steps": None, "train_size": 2, "epochs": 0},
            ValueError,
            r"epochs must be >= 1; got 0",
        ),
    ],
)
def test_schedule_errors(overrides, error, match):
    kw = {**_GOOD, **overrides}
    with pytest.raises(error, match=match):
        oracle_series(LOSSES, [U, V], THETA0, **kw)
    with pytest.raises(error, match=match):
        unroll_taylor(_torch_loss, TORCH_DATA, TORCH_THETA0, **kw)


def test_oracle_series_input_errors():
    with pytest.raises(ValueError, match="losses must hold at least one row"):
        oracle_series([], [U, V], THETA0, **_GOOD)
    with pytest.raises(ValueError, match="params must hold at least one sympy Symbol"):
        oracle_series(LOSSES, [], [], **_GOOD)
    with pytest.raises(ValueError, match="params must be distinct sympy Symbols"):
        oracle_series(LOSSES, [U, U], THETA0, **_GOOD)
    with pytest.raises(ValueError, match="theta0 needs one value per parameter: 2 parameters"):
        oracle_series(LOSSES, [U, V], [1], **_GOOD)
    with pytest.raises(TypeError, match=r"theta0\[1\] must be rational .* got the float 0.5"):
        oracle_series(LOSSES, [U, V], [1, 0.5], **_GOOD)
    with pytest.raises(TypeError, match=r"theta0\[0\] must be rational"):
        oracle_series(LOSSES, [U, V], [sympy.sqrt(2), 1], **_GOOD)
    with pytest.raises(ValueError, match=r"losses\[1\] = sin\(u\) is not a polynomial"):
        oracle_series([U**2, sympy.sin(U)], [U, V], THETA0, **_GOOD)
    with pytest.raises(ValueError, match=r"losses\[0\] has the non-rational coefficient 0.5"):
        oracle_series([0.5 * U**2], [U, V], THETA0, **_GOOD)
    a = sympy.Symbol("a")
    with pytest.raises(ValueError, match=r"losses\[0\] has the non-rational coefficient a"):
        oracle_series([a * U**2], [U, V], THETA0, **_GOOD)
    # Fractions and sympy Rationals are both fine and agree
    frac = [Fraction(v.p, v.q) for v in THETA0]
    assert oracle_series(LOSSES, [U, V], frac, **_GOOD) == oracle_series(
        LOSSES, [U, V], THETA0, **_GOOD
    )


def test_unroll_taylor_input_errors():
    with pytest.raises(ValueError, match="data must be a tensor with at least one row"):
        unroll_taylor(_torch_loss, TORCH_DATA[:0], TORCH_THETA0, **_GOOD)
    with pytest.raises(ValueError, match="theta0 must be a non-empty 1-D tensor; got shape"):
        unroll_taylor(_torch_loss, TORCH_DATA, TORCH_THETA0[None], **_GOOD)
    with pytest.raises(ValueError, match="729 sample sequences to enumerate, more than"):
        unroll_taylor(
            _torch_loss,
            TORCH_DATA,
            TORCH_THETA0,
            kind="online",
            steps=6,
            order=1,
            max_sequences=500,
        )
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        unroll_taylor(lambda p, x: p * x[0], TORCH_DATA, TORCH_THETA0, **_GOOD)


def test_sequence_counts_are_what_the_schedule_says():
    # guard for the enumeration size used by max_sequences: M^N · (N!)^E when shuffled
    n_seq = 3**3 * math.factorial(3) ** 2
    with pytest.raises(ValueError, match=f"{n_seq} sample sequences"):
        unroll_taylor(
            _torch_loss,
            TORCH_DATA,
            TORCH_THETA0,
            kind="epochs",
            train_size=3,
            epochs=2,
            shuffle=True,
            order=1,
            max_sequences=n_seq - 1,
        )
