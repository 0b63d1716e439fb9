"""Generic twins of the exactness tests whose populations hide terms (issue 25, item 2).

The re-summed exactness tests of ``test_resummation.py``, ``test_krylov.py`` and the
corollaries run on quadratic populations with one Hessian for every sample
(``linear_gaussian``, ``mean_estimation``): there every diagram holding a per-sample
Hessian fluctuation ``A_i = H_i − H`` vanishes, the mixed cumulant ``⟨∇l, ∇∇l⟩`` with it.
The twins here use random quadratic populations whose ``A_i`` and gradient noises
``ζ_i`` are correlated, and scale the fluctuations, ``H_i = H + εA_i``.

On a quadratic population every node below the root is a Hessian with one child or a
leaf, so a re-summed diagram holding ``k`` Hessian fluctuations has at most ``k + 2``
edges (two chains under a ``∇∇l`` root, each ending in a leaf) and exactly ``k + 1``
for the displacement (one chain under the open root).  So, for every schedule and
every ``T``, the ``ε^k`` coefficient of SGD's exact expected test and train loss is
held whole by the re-summed prediction with ``k + 2`` edges, and that of the expected
displacement by ``k + 1`` edges: "resummed 2" is exact at ``ε⁰`` and "resummed 3" at
``ε¹`` (the mixed cumulant), the displacement's at ``ε¹`` and ``ε²``.  The coefficients
of the exact answer come from references that share no code with the predictor: every
sample sequence enumerated (:func:`perturb.reference.expected_loss`, a polynomial of
degree ``2T + 1`` in ``ε``, interpolated), or, for long runs, the closed form of GD and
fixed-order epochs on each training set, differentiated in ``ε`` by autograd.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

import perturb
from perturb.reference import expected_loss, unroll_taylor

pytestmark = pytest.mark.usefixtures("one_thread")

P = 2
H = np.array([[1.0, 0.3], [0.3, 0.6]])
THETA0 = torch.tensor([0.4, -0.3], dtype=torch.float64)


def _generic_quadratic(seed: int, rows: int = 4):
    """Per-sample Hessian fluctuations ``A_i`` (random symmetric, mean zero) and gradients
    ``g_i = G + ζ_i`` at ``θ = 0`` with ``ζ_i`` a random linear function of ``A_i`` plus
    noise of its own (mean zero): ``E[A_i ⊗ ζ_i] ≠ 0``; no independence, product form,
    diagonal or isotropy."""
    gen = np.random.default_rng(seed)
    a = gen.normal(scale=0.5, size=(rows, P, P))
    a = (a + a.transpose(0, 2, 1)) / 2
    a -= a.mean(0)
    mix = gen.normal(size=(P, P * P))
    zeta = a.reshape(rows, -1) @ mix.T + gen.normal(scale=0.3, size=(rows, P))
    return a, 0.5 * gen.normal(size=P) + zeta - zeta.mean(0)


def _population(a, gs, eps: float):
    """``l_i(θ) = ½θᵀ(H + εA_i)θ + g_iᵀθ``: rows ``(vec H_i, g_i)`` and the per-row loss."""
    rows = torch.tensor(np.concatenate([(H + eps * a).reshape(len(a), -1), gs], 1))

    def loss(theta, row):
        return 0.5 * theta @ row[: P * P].reshape(P, P) @ theta + row[P * P :] @ theta

    return rows, loss


def _coefficients(values, degree: int) -> np.ndarray:
    """Power coefficients in ``ε`` of a polynomial of at most ``degree``, interpolated at
    ``degree + 1`` Chebyshev points of ``[−1, 1]`` (``values(ε)`` may be a vector)."""
    x = np.cos(np.pi * (np.arange(degree + 1) + 0.5) / (degree + 1))
    y = np.array([values(e) for e in x])
    flat = np.polynomial.polynomial.polyfit(x, y.reshape(len(x), -1), degree)
    return flat.reshape(degree + 1, *y.shape[1:])


def _edges(a, gs, schedule, lr, quantity, **kw):
    """The re-summed prediction with at most 2 and at most 3 edges, as functions of ``ε``:
    polynomials of degree at most 4 (a diagram with three edges has four nodes, each
    carrying at most one factor ``ε``), so 5 points give their coefficients exactly."""

    def values(eps):
        rows, loss = _population(a, gs, eps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", perturb.UnstableDirectionWarning)
            pred = perturb.predict(
                perturb.Population(loss, rows), THETA0, schedule, lr=lr, order=3,
                quantity=quantity, resummed=True, **kw,
            )  # fmt: skip
        by_order = [np.asarray(v, dtype=float) for v in pred.by_order]
        return np.stack([sum(by_order[:3]), sum(by_order)])

    return values


SHORT = {
    "online-T3-B1": perturb.Online(steps=3, batch_size=1),
    "online-T2-B2": perturb.Online(steps=2, batch_size=2),
    "gd-N3-T3": perturb.GD(train_size=3, steps=3),
    "epochs-N2-E2-fixed": perturb.Epochs(train_size=2, batch_size=1, epochs=2),
    "epochs-N2-E2-shuffled": perturb.Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
}


# online-T3-B1 (-m slow): the twin of online-T2-B2, the same online path at B = 1
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "online-T3-B1" else n for n in SHORT]
)
def test_resummed_3_holds_the_first_order_in_hessian_noise_exactly(name):
    """Twin of the ``linear_gaussian`` order-2 exactness tests (online, GD, epochs): on a
    generic quadratic population, the ``ε⁰`` coefficient of the exact expected test and
    train loss (every sample sequence enumerated) is "resummed 2"'s, the ``ε¹``
    coefficient (the mixed cumulant, which a constant Hessian sets to zero) is
    "resummed 3"'s and not "resummed 2"'s, and ``ε²`` lies beyond three edges."""
    schedule, lr = SHORT[name], 0.3
    a, gs = _generic_quadratic(0)
    steps = int(schedule.steps)
    for quantity in ("test", "train"):

        def exact(eps, quantity=quantity):
            rows, loss = _population(a, gs, eps)
            return expected_loss(loss, rows, THETA0, schedule, lr=lr, quantity=quantity)

        want = _coefficients(exact, 2 * steps + 1)
        coeffs = _coefficients(_edges(a, gs, schedule, lr, quantity), 4)
        two, three = coeffs[:, 0], coeffs[:, 1]
        scale = 1e-12 * np.abs(want).max()
        assert two[0] == pytest.approx(want[0], rel=1e-9, abs=scale)
        assert three[0] == pytest.approx(want[0], rel=1e-9, abs=scale)
        assert three[1] == pytest.approx(want[1], rel=1e-9, abs=scale), quantity
        assert abs(want[1]) > 1e-4 and abs(two[1] - want[1]) > 1e-4  # what it tests is there
        assert abs(three[2] - want[2]) > 1e-5  # the ladder and beyond: not three edges


def _fixed_order_reference(a, gs, eps, lr, *, train_size, batch_size, epochs):
    """Exact ``E l(θ_T)``, ``E (1/N)Σ_n l_{x_n}(θ_T)`` and ``E[θ_T − θ_0]`` of fixed-order
    epochs (GD: ``B = N``) on every ordered training set of rows, each with probability
    ``M^{−N}``: ``z = [θ; 1]`` moves by ``U_b = [[I − ηĤ_b, −ηĝ_b], [0, 1]]`` per batch
    (``Ĥ_b``, ``ĝ_b`` its means), an epoch is their product and ``E`` epochs its power.
    ``eps`` is a torch scalar, so the answer can be differentiated in it."""
    f64 = torch.float64
    hs = torch.as_tensor(H, dtype=f64) + eps * torch.as_tensor(a, dtype=f64)
    g = torch.as_tensor(gs, dtype=f64)
    sets = torch.tensor(list(itertools.product(range(len(a)), repeat=train_size)))
    epoch = torch.eye(P + 1, dtype=f64).expand(len(sets), P + 1, P + 1)
    for start in range(0, train_size, batch_size):
        batch = sets[:, start : start + batch_size]
        step = torch.zeros(len(sets), P + 1, P + 1, dtype=f64)
        step[:, :P, :P] = torch.eye(P, dtype=f64) - lr * hs[batch].mean(1)
        step[:, :P, P] = -lr * g[batch].mean(1)
        step[:, P, P] = 1.0
        epoch = step @ epoch
    z0 = torch.cat([THETA0, torch.ones(1, dtype=f64)])
    theta = (torch.linalg.matrix_power(epoch, epochs) @ z0)[:, :P]
    test = 0.5 * torch.einsum("sa,ab,sb->s", theta, hs.mean(0), theta) + theta @ g.mean(0)
    train = 0.5 * torch.einsum("sa,sab,sb->s", theta, hs[sets].mean(1), theta)
    train = train + (theta * g[sets].mean(1)).sum(1)
    return test.mean(), train.mean(), (theta - THETA0).mean(0)


def _derivatives(fn, order: int):
    """``[f(0), f'(0), …]`` of a torch function of one scalar, by autograd."""
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    value, out = fn(eps), []
    for k in range(order + 1):
        out.append(value.detach().numpy().copy())
        if k < order:
            if value.ndim:
                value = torch.stack([
                    torch.autograd.grad(v, eps, create_graph=True)[0] for v in value
                ])  # fmt: skip
            else:
                value = torch.autograd.grad(value, eps, create_graph=True)[0]
    return out


LONG = {
    "gd-N3-T10000": (perturb.GD(train_size=3, steps=10_000), dict(train_size=3, batch_size=3)),
    "epochs-N4-B2-E500-fixed": (
        perturb.Epochs(train_size=4, batch_size=2, epochs=500),
        dict(train_size=4, batch_size=2),
    ),
}


@pytest.mark.parametrize(
    "method", ["eigh", pytest.param("lanczos", marks=pytest.mark.slow)]
)  # the Krylov path: about 12 s a case on the shared machine
@pytest.mark.parametrize(
    "name",  # fixed-order epochs at long times: -m slow (short, exactly: the SHORT cases)
    [pytest.param(n, marks=pytest.mark.slow) if n.startswith("epochs") else n for n in LONG],
)
def test_resummed_3_holds_the_first_order_in_hessian_noise_at_long_times(name, method):
    """Twin of ``test_linear_gaussian_order2_is_exact_at_long_times`` (GD) and
    ``..._for_epochs`` (fixed order), of the Krylov path's
    ``test_krylov_full_rank_matches_linear_gaussian_recursion`` and of
    ``gd_test_loss_increase`` on ``mean_estimation``: 10⁴ GD steps and 1000 steps of
    fixed-order epochs on a generic quadratic population, ``η = 1.5/λ_max(H)``.  The exact
    answer's ``ε`` derivatives at 0 (autograd through the closed form on every training
    set) equal the re-summed ones order by order: test and train loss through ``ε¹`` with
    three edges, the displacement through ``ε²`` with three edges and ``ε¹`` with two;
    the exact-eigenbasis and the full-rank Krylov path alike."""
    schedule, sizes = LONG[name]
    lr = 1.5 / float(np.linalg.eigvalsh(H).max())
    a, gs = _generic_quadratic(1)
    epochs = int(schedule.epochs)
    kw = {"method": "lanczos", "rank": P, "probes": 2} if method == "lanczos" else {}

    def reference(eps):  # (test, train, displacement…) as one vector
        test, train, shift = _fixed_order_reference(a, gs, eps, lr, epochs=epochs, **sizes)
        return torch.cat([torch.stack([test, train]), shift])

    exact = np.array(_derivatives(reference, 2))
    exact[2] /= 2  # Taylor coefficients: f(0), f'(0), f''(0)/2
    for i, quantity in enumerate(("test", "train")):
        coeffs = _coefficients(_edges(a, gs, schedule, lr, quantity, **kw), 4)
        two, three = coeffs[:, 0], coeffs[:, 1]
        want = exact[:, i]
        assert two[0] == pytest.approx(want[0], rel=1e-9)
        assert three[0] == pytest.approx(want[0], rel=1e-9)
        assert three[1] == pytest.approx(want[1], rel=1e-8), quantity
        assert abs(two[1] - want[1]) > 1e-3 * abs(want[1])
    coeffs = _coefficients(_edges(a, gs, schedule, lr, "displacement", **kw), 4)
    two, three = coeffs[:, 0], coeffs[:, 1]
    np.testing.assert_allclose(two[:2], exact[:2, 2:], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(three[:3], exact[:, 2:], rtol=1e-8, atol=1e-12)
    assert np.abs(two[2] - exact[2, 2:]).max() > 1e-3 * np.abs(exact[2, 2:]).max()


def _generic_cubic(seed: int, rows: int = 4):
    """``l_i(θ) = g_iᵀθ + ½θᵀH_iθ + (1/6)J_i[θ, θ, θ]`` with random symmetric ``H_i``
    (mean Hessian not diagonal) and ``J_i``, gradients correlated with both: per-row
    data ``(g_i, vec H_i, vec J_i)`` and the loss."""
    gen = np.random.default_rng(seed)
    a = gen.normal(scale=0.4, size=(rows, P, P))
    a = (a + a.transpose(0, 2, 1)) / 2 + H
    j = gen.normal(scale=0.5, size=(rows, P, P, P))
    j = sum(j.transpose(0, *perm) for perm in itertools.permutations((1, 2, 3))) / 6
    mix = gen.normal(size=(P, P * P + P**3))
    g = np.concatenate([a.reshape(rows, -1), j.reshape(rows, -1)], 1) @ mix.T / 4
    g = g + gen.normal(scale=0.3, size=(rows, P))
    data = np.concatenate([g, a.reshape(rows, -1), j.reshape(rows, -1)], 1)

    def loss(theta, row):
        hess, third = row[P : P + P * P].reshape(P, P), row[P + P * P :].reshape(P, P, P)
        return (
            row[:P] @ theta + 0.5 * theta @ hess @ theta
            + torch.einsum("abc,a,b,c->", third, theta, theta, theta) / 6
        )  # fmt: skip

    return torch.tensor(data), loss


CUBIC = [
    ("online-T4-B1", perturb.Online(steps=4, batch_size=1), dict(kind="online", steps=4)),
    (
        "online-T3-B2",
        perturb.Online(steps=3, batch_size=2),
        dict(kind="online", steps=3, batch_size=2),
    ),
    (
        "gd-N3-T3",
        perturb.GD(train_size=3, steps=3),
        dict(kind="epochs", train_size=3, batch_size=3, epochs=3),
    ),
    (
        "epochs-N2-E2-shuffled",
        perturb.Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
        dict(kind="epochs", train_size=2, epochs=2, shuffle=True),
    ),
]


@pytest.mark.parametrize(("name", "schedule", "kwargs"), CUBIC, ids=[c[0] for c in CUBIC])
def test_resummed_displacement_agrees_with_the_oracle_on_a_generic_cubic(name, schedule, kwargs):
    """Twin of ``test_eta_expansion_reproduces_unresummed_coefficients`` (a diagonal mean
    Hessian: the eigenbasis is the identity, so rotating the open root back is never
    exercised) and of the ARCHIMEDES drift (diagonal ``H``, ``G = 0``, a sparse ``J``)
    for the displacement, which ``test_resummed_convergence`` leaves out: on a generic
    cubic population the re-summed displacement with ``d`` edges differs from the
    oracle's η-series through ``η^d`` (:func:`perturb.reference.unroll_taylor`, autodiff
    of every unrolled sample sequence) by ``O(η^{d+1})``, in every coordinate: the
    least-squares slope of ``log|error|`` over ``η = 0.05·2^{−j}`` is ``d + 1`` ± 0.25."""
    data, loss = _generic_cubic(2)
    pop = perturb.Population(loss, data)
    hess = pop.derivatives(THETA0, 2)[2].mean(0)
    assert abs(float(hess[0, 1])) > 0.1 and float(torch.linalg.eigvalsh(hess).min()) > 0.1
    series = np.array(
        unroll_taylor(loss, data, THETA0, order=3, quantity="displacement", **kwargs)
    )  # (P, 4)
    etas = 0.05 * 2.0 ** -np.arange(5)
    for order in (2, 3):
        errors = []
        for lr in etas:
            pred = perturb.predict(pop, THETA0, schedule, lr=lr, order=order,
                                   quantity="displacement", resummed=True)  # fmt: skip
            truth = series[:, : order + 1] @ lr ** np.arange(order + 1)
            errors.append(np.asarray(pred.total, dtype=float) - truth)
        errors = np.abs(np.array(errors))
        assert errors[-1].min() > 1e-13  # above rounding: the slope measures truncation
        for coordinate in errors.T:
            slope = np.polyfit(np.log(etas), np.log(coordinate), 1)[0]
            assert slope == pytest.approx(order + 1, abs=0.25), (order, errors)


def test_growth_along_an_unstable_direction_of_a_rotated_saddle():
    """Twin of ``test_unstable_directions_warn_on_every_path`` (a diagonal saddle, so the
    eigenbasis is the identity): the saddle ``diag(−0.5, 1)`` turned by a random rotation;
    the exact eigen path and the Krylov path report the growth ``T·log(1 + η|h_min|)``."""
    rot, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(2, 2)))
    hess = torch.tensor(rot @ np.diag([-0.5, 1.0]) @ rot.T)
    xs = torch.tensor([[1.0, -1.0], [-1.0, 2.0], [0.5, 0.0]], dtype=torch.float64)
    pop = perturb.Population(lambda p, x: 0.5 * p @ hess @ p + x @ p, xs)
    sched = perturb.Online(steps=100, batch_size=1)
    expected = 100 * np.log1p(0.1 * 0.5)
    with pytest.warns(perturb.UnstableDirectionWarning):
        eig = perturb.predict(pop, THETA0, sched, lr=0.1, order=2, resummed=True)
    with pytest.warns(perturb.UnstableDirectionWarning):
        kry = perturb.krylov_subspace(pop, None, THETA0, rank=2).predict(sched, lr=0.1)
    assert eig.growth == pytest.approx(expected, rel=1e-12)
    assert kry.growth == pytest.approx(expected, rel=1e-9)
    assert kry.total == pytest.approx(eig.total, rel=1e-9)
