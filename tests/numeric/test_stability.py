"""Mean-square stability (perturb.numeric.stability) against closed forms, exact enumeration
of every sample sequence, an independent Kronecker construction of the second-moment map,
and a seeded simulation of SGD."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from perturb.numeric.adapters import flat_loss
from perturb.numeric.predictions import growth
from perturb.numeric.stability import (
    MAX_DIRECTIONS,
    mean_square_growth,
    mean_square_rate,
    mean_square_threshold,
    per_sample_curvatures,
    per_sample_top_curvatures,
)


def _psd_population(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` random PSD ``dim×dim`` per-sample Hessians of rank ``≤ 2``."""
    x = np.random.default_rng(seed).normal(size=(n, dim, 2))
    return x @ x.transpose(0, 2, 1) / dim


def _kron_map(hs: np.ndarray, lr: float, batch: int) -> np.ndarray:
    """The second-moment map on all ``m²`` entries of ``M`` (row-major ``vec``), written as
    the average of ``(I − ηH_B) ⊗ (I − ηH_B)`` over every batch of ``B`` rows drawn with
    replacement, without the variance formula."""
    n, m, _ = hs.shape
    out = np.zeros((m * m, m * m))
    batches = list(itertools.product(range(n), repeat=batch))
    for rows in batches:
        k = np.eye(m) - lr * hs[list(rows)].mean(axis=0)
        out += np.kron(k, k)
    return out / len(batches)


def _top(op: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(op).max())


# --- one dimension: closed forms --------------------------------------------------------


def test_one_dimension_closed_form():
    """l_i = ½x_i²θ²: ρ = 1 − 2ηE[x²] + η²E[x⁴] (B = 1), (1 − ηh)² + η²Var(x²)/B, and
    the threshold 2E[x²]/E[x⁴]; the curvatures measured from the loss with torch.func."""
    x = torch.tensor([0.3, -1.2, 0.8, 2.0, 1.1], dtype=torch.float64)
    h, hs = per_sample_curvatures(
        lambda p, row: 0.5 * row[0] ** 2 * (p**2).sum(),
        x[:, None],
        torch.tensor([0.7], dtype=torch.float64),
        basis=torch.ones(1, 1, dtype=torch.float64),
    )
    x2 = (x**2).numpy()
    np.testing.assert_allclose(hs.flatten().numpy(), x2, rtol=1e-14)
    e2, e4, var = x2.mean(), (x2**2).mean(), x2.var()
    etas = np.array([0.05, 0.3, 0.6, 0.9, 1.4])
    np.testing.assert_allclose(
        mean_square_rate(h, hs, lr=etas), 1 - 2 * etas * e2 + etas**2 * e4, rtol=1e-13
    )
    for batch in (2, 5, 8):
        expected = (1 - etas * e2) ** 2 + etas**2 * var / batch
        rates = mean_square_rate(h, hs, lr=etas, batch_size=batch)
        np.testing.assert_allclose(rates, expected, rtol=1e-13)
        threshold = mean_square_threshold(h, hs, batch_size=batch)
        assert threshold == pytest.approx(2 * e2 / (e2**2 + var / batch), rel=1e-13)
    assert mean_square_threshold(h, hs) == pytest.approx(2 * e2 / e4, rel=1e-13)
    assert 2 * e2 / e4 < 2 / e2  # GD would be stable further


# --- exact enumeration of every sample sequence -----------------------------------------


@pytest.mark.parametrize(("dim", "batch"), [(2, 1), (3, 1), (2, 2), (3, 2)])
def test_enumeration_and_dense_operator(dim, batch):
    """E[δ_Tδ_Tᵀ] over every sequence of T batches equals 𝓛^T(δ_0δ_0ᵀ) (𝓛 built from
    Kronecker products over every batch), and the rate is its λ_max = spectral radius."""
    hs = _psd_population(3, dim, seed=dim + 10 * batch)
    h = hs.mean(axis=0)
    delta0 = np.random.default_rng(1).normal(size=dim)
    steps = 3
    batches = list(itertools.product(range(3), repeat=batch))
    for lr in (0.3, 1.1, 2.5):
        second = np.zeros((dim, dim))
        for sequence in itertools.product(batches, repeat=steps):
            delta = delta0
            for rows in sequence:
                delta = delta - lr * hs[list(rows)].mean(axis=0) @ delta
            second += np.outer(delta, delta)
        second /= len(batches) ** steps
        op = _kron_map(hs, lr, batch)
        mapped = np.linalg.matrix_power(op, steps) @ np.outer(delta0, delta0).reshape(-1)
        np.testing.assert_allclose(second.reshape(-1), mapped, rtol=1e-12, atol=1e-12)
        eigs = np.linalg.eigvals(op)
        rate = mean_square_rate(h, hs, lr=lr, batch_size=batch)[0]
        assert rate == pytest.approx(_top(op), rel=1e-12)
        assert rate == pytest.approx(float(np.abs(eigs).max()), rel=1e-10)


# --- compression to a subspace: a lower bound -------------------------------------------


def test_projection_is_a_lower_bound():
    """With orthonormal U (m < dim), the rate from UᵀHU, UᵀH_iU is at most the full rate,
    and the single-direction rate (1 − ηh_u)² + η²Var(uᵀH_iu)/B is at most that."""
    dim = 5
    hs = _psd_population(6, dim, seed=3)
    h = hs.mean(axis=0)
    rng = np.random.default_rng(4)
    etas = [0.2, 0.7, 1.5, 3.0]
    for m in (1, 2, 4):
        u, _ = np.linalg.qr(rng.normal(size=(dim, m)))
        for batch in (1, 3):
            full = mean_square_rate(h, hs, lr=etas, batch_size=batch)
            part = mean_square_rate(u.T @ h @ u, u.T @ hs @ u, lr=etas, batch_size=batch)
            assert np.all(part <= full + 1e-12)
            assert np.any(part < full - 1e-6)  # a strict bound here, not an equality
            v = u[:, 0]
            curv = np.einsum("a,iab,b->i", v, hs, v)
            one = (1 - np.array(etas) * curv.mean()) ** 2 + np.array(etas) ** 2 * curv.var() / batch
            assert np.all(one <= part + 1e-12)
            assert mean_square_threshold(u.T @ h @ u, u.T @ hs @ u, batch_size=batch) >= (
                mean_square_threshold(h, hs, batch_size=batch) - 1e-12
            )


# --- the threshold ----------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_threshold_is_where_the_dense_rate_crosses_one(batch):
    hs = _psd_population(3, 3, seed=7)
    threshold = mean_square_threshold(hs.mean(axis=0), hs, batch_size=batch)
    assert 0 < threshold <= 2 / np.linalg.eigvalsh(hs.mean(axis=0)).max()
    assert _top(_kron_map(hs, threshold, batch)) == pytest.approx(1.0, abs=1e-12)
    assert _top(_kron_map(hs, threshold * (1 - 1e-6), batch)) < 1
    assert _top(_kron_map(hs, threshold * (1 + 1e-6), batch)) > 1
    for lr in np.linspace(0.01, 0.99, 9) * threshold:  # the stable set is [0, η*]
        assert _top(_kron_map(hs, lr, batch)) < 1


def test_threshold_without_noise_is_gd():
    h = np.diag([0.5, 2.0, 4.0])
    assert mean_square_threshold(h, np.stack([h, h])) == pytest.approx(0.5, rel=1e-13)


def test_threshold_zero_at_negative_or_noisy_zero_curvature():
    hs = _psd_population(3, 2, seed=0) - np.diag([0.0, 0.8])  # a negative eigenvalue
    assert np.linalg.eigvalsh(hs.mean(axis=0))[0] < 0
    assert mean_square_threshold(hs.mean(axis=0), hs) == 0.0
    assert _top(_kron_map(hs, 1e-3, 1)) > 1
    # h = 0 along e₂ while H_i e₂ ≠ 0 (uᵀH_iu = 0 there: only the 2-D map sees it)
    hs = np.array([[[1.0, 1.0], [1.0, 0.0]], [[1.0, -1.0], [-1.0, 0.0]]])
    assert mean_square_threshold(hs.mean(axis=0), hs) == 0.0
    assert _top(_kron_map(hs, 1e-2, 1)) > 1 + 1e-8
    assert mean_square_rate(hs.mean(axis=0), hs, lr=1e-2)[0] > 1 + 1e-8


def test_flat_directions_are_neutral():
    """Directions where H and every H_i vanish have rate exactly one and do not move the
    threshold; all-flat Hessians never go unstable."""
    x2 = np.array([0.0, 2.0, 0.5])
    hs = np.zeros((3, 3, 3))
    hs[:, 0, 0] = x2
    rot, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
    hs = rot @ hs @ rot.T
    expected = 2 * x2.mean() / (x2**2).mean()
    assert mean_square_threshold(hs.mean(axis=0), hs) == pytest.approx(expected, rel=1e-12)
    assert mean_square_rate(hs.mean(axis=0), hs, lr=0.1 * expected)[0] == pytest.approx(1.0)
    assert mean_square_threshold(np.zeros((2, 2)), np.zeros((4, 2, 2))) == math.inf


# --- growth -----------------------------------------------------------------------------


def test_growth_matches_the_mean_dynamics_without_noise():
    """With H_i = H the RMS growth is predictions.growth (T·log max|1 − ηh|) at each η."""
    rot, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(3, 3)))
    evals = np.array([-0.05, 0.4, 2.0])
    h = rot @ np.diag(evals) @ rot.T
    for lr in (0.1, 0.5, 1.2):
        ours = mean_square_growth(h, np.stack([h] * 3), lr=lr, steps=50)
        assert ours[0] == pytest.approx(growth(torch.tensor(evals), lr, 50), rel=1e-10)
    hs = _psd_population(4, 3, seed=8)
    rates = mean_square_rate(hs.mean(axis=0), hs, lr=[0.1, 2.0], batch_size=2)
    grown = mean_square_growth(hs.mean(axis=0), hs, lr=[0.1, 2.0], steps=7, batch_size=2)
    np.testing.assert_allclose(grown, 3.5 * np.log(np.maximum(rates, 1)))
    assert grown[0] == 0 and grown[1] > 0


# --- GD stable, SGD mean-square unstable: a seeded simulation ---------------------------


def test_sgd_unstable_where_gd_is_stable_simulated():
    """Linear regression in 2-D (H_i = x_ix_iᵀ), B = 1: between η* and 2/h_max the mean
    contracts but E‖δ_T‖² grows; below η* it shrinks.  Simulated with R seeded runs.

    False-failure rates, from the exact E‖δ_T‖² and E‖δ_T‖⁴ (every one of the 3^T sample
    sequences enumerated): the lower tail of a mean of nonnegative iid variables obeys
    P(mean ≤ E − t) ≤ exp(−Rt²/(2E[X²])) (Maurer 2003), the upper tail Chebyshev's
    P(mean ≥ E + t) ≤ Var/(Rt²); both are asserted below 1e-6 before the simulation runs.
    """
    x = np.array([[2.0, 0.3], [0.2, 1.0], [-0.5, 0.6]])
    hs = np.einsum("ia,ib->iab", x, x)
    h = hs.mean(axis=0)
    evals = np.linalg.eigvalsh(h)
    threshold = mean_square_threshold(h, hs)
    assert threshold < 0.5 * 2 / evals.max()
    delta0 = np.array([1.0, 1.0]) / math.sqrt(2)
    steps, runs = 10, 20000

    def exact_moments(lr):
        deltas = delta0[None]
        for _ in range(steps):
            deltas = np.einsum("kab,sb->ksa", np.eye(2) - lr * hs, deltas).reshape(-1, 2)
        sq = (deltas**2).sum(axis=1)
        return sq.mean(), (sq**2).mean()

    rng = np.random.default_rng(0)

    def simulated(lr):
        deltas = np.tile(delta0, (runs, 1))
        for _ in range(steps):
            rows = rng.integers(0, 3, size=runs)
            deltas = deltas - lr * np.einsum("rab,rb->ra", hs[rows], deltas)
        return float((deltas**2).sum(axis=1).mean())

    unstable, stable = 1.25 * threshold, 0.7 * threshold
    assert np.abs(1 - unstable * evals).max() < 0.75  # GD contracts at both
    assert mean_square_rate(h, hs, lr=unstable)[0] > 1.4
    assert mean_square_rate(h, hs, lr=stable)[0] < 0.75
    e2, e4 = exact_moments(unstable)
    assert e2 > 30  # the exact second moment grew
    assert math.exp(-runs * (e2 - 1) ** 2 / (2 * e4)) < 1e-6
    assert simulated(unstable) > 1.0
    e2, e4 = exact_moments(stable)
    assert e2 < 0.05
    assert (e4 - e2**2) / (runs * (1 - e2) ** 2) < 1e-6
    assert simulated(stable) < 1.0


# --- per-sample curvatures of a network -------------------------------------------------


def test_per_sample_curvatures_of_a_network():
    """UᵀH_iU, matrix-free, equals the projection of each row's full Hessian."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    net = net.double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    fn, theta = flat_loss(net)
    u, _ = torch.linalg.qr(torch.randn(theta.numel(), 4, dtype=torch.float64))
    h, hs = per_sample_curvatures(net, (x, y), basis=u, chunk_size=2)
    for i in range(5):
        full = torch.func.hessian(lambda p, i=i: fn(p, x[i : i + 1], y[i : i + 1])[0])(theta)
        torch.testing.assert_close(hs[i], u.T @ full @ u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, hs.mean(dim=0))
    assert mean_square_rate(h, hs, lr=0.1).shape == (1,)


# --- errors -----------------------------------------------------------------------------

_H = np.eye(2)
_HS = np.stack([np.eye(2), 2 * np.eye(2)])


@pytest.mark.parametrize(
    ("hessian", "per_sample", "match"),
    [
        (np.ones(2), _HS, r"square \(m, m\) matrix, m ≥ 1, got shape \(2,\)"),
        (np.ones((2, 3)), _HS, r"square .* got shape \(2, 3\)"),
        (np.ones((0, 0)), _HS, r"square .* got shape \(0, 0\)"),
        (_H, np.ones((2, 2)), r"shape \(n, 2, 2\), n ≥ 1, matching hessian \(2, 2\), got"),
        (_H, np.ones((3, 3, 3)), r"shape \(n, 2, 2\).* got shape \(3, 3, 3\)"),
        (_H, np.ones((0, 2, 2)), r"got shape \(0, 2, 2\)"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), _HS, "hessian must be finite, got 2 nan/inf"),
        (_H, np.full((2, 2, 2), np.inf), "per_sample_hessians must be finite"),
        (np.array([[1.0, 1.0], [0.0, 1.0]]), _HS, r"hessian must be symmetric: ‖X − Xᵀ‖/‖X‖"),
        (_H, _HS + np.array([[0, 1e-3], [0, 0]]), "per_sample_hessians must be symmetric"),
        (
            np.eye(MAX_DIRECTIONS + 1),
            _HS,
            rf"at most {MAX_DIRECTIONS} directions .* got m = {MAX_DIRECTIONS + 1}",
        ),
    ],
)
def test_bad_hessians(hessian, per_sample, match):
    for call in (
        lambda: mean_square_rate(hessian, per_sample, lr=0.1),
        lambda: mean_square_threshold(hessian, per_sample),
        lambda: mean_square_growth(hessian, per_sample, lr=0.1, steps=3),
    ):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize(
    ("hessian", "match"),
    [
        ("abc", "hessian must be an array of real numbers, got dtype <U3"),
        (np.eye(2) * 1j, "hessian must be an array of real numbers, got dtype complex128"),
        (torch.eye(2, dtype=torch.complex128), "real numbers, got a torch.complex128 tensor"),
        (torch.eye(2, dtype=torch.bool), "real numbers, got a torch.bool tensor"),
        ([[1.0, 2.0], [3.0]], "hessian must be an array of real numbers, got"),
    ],
)
def test_hessians_of_the_wrong_type(hessian, match):
    with pytest.raises(TypeError, match=match):
        mean_square_rate(hessian, _HS, lr=0.1)


def test_torch_and_integer_inputs_are_accepted():
    rate = mean_square_rate(torch.eye(2), torch.tensor(_HS, dtype=torch.float32), lr=0.5)
    assert rate == pytest.approx(mean_square_rate(np.eye(2, dtype=int), _HS, lr=0.5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"lr must be positive finite numbers, got \(0.0,\)"),
        ({"lr": [0.1, -1]}, r"lr must be positive finite numbers, got \(0.1, -1\)"),
        ({"lr": math.nan}, "lr must be positive finite numbers"),
        ({"lr": True}, "lr must be positive finite numbers, got True"),
        ({"lr": []}, r"lr must be positive finite numbers, got \(\)"),
        ({"lr": 0.1, "batch_size": 0}, "batch_size must be an integer ≥ 1, got 0"),
        ({"lr": 0.1, "batch_size": 2.0}, "batch_size must be an integer ≥ 1, got 2.0"),
        ({"lr": 0.1, "batch_size": True}, "batch_size must be an integer ≥ 1, got True"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mean_square_rate(_H, _HS, **kwargs)
    with pytest.raises(ValueError, match=match):
        mean_square_growth(_H, _HS, steps=4, **kwargs)
    if "batch_size" in kwargs:
        with pytest.raises(ValueError, match=match):
            mean_square_threshold(_H, _HS, batch_size=kwargs["batch_size"])


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, None])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match=f"steps must be an integer ≥ 1, got {steps!r}"):
        mean_square_growth(_H, _HS, lr=0.1, steps=steps)


def _quadratic():
    return (lambda p, row: 0.5 * (row @ p) ** 2), torch.eye(3, dtype=torch.float64)


@pytest.mark.parametrize(
    ("basis", "match"),
    [
        (torch.eye(3)[:, 0], r"basis must be a real \(P, m\) matrix with P = 3 .* shape \(3,\)"),
        (torch.eye(4)[:, :2], r"P = 3 parameters .* got torch.float32 of shape \(4, 2\)"),
        (torch.zeros(3, 0), r"m ≥ 1 columns, got torch.float32 of shape \(3, 0\)"),
        (torch.ones(3, 2, dtype=torch.long), r"real \(P, m\) matrix .* got torch.int64"),
        (
            torch.ones(3, 2),
            r"basis columns must be orthonormal: max \|UᵀU − I\| = 3 \(at most 1.49e-08\)",
        ),
    ],
)
def test_bad_basis(basis, match):
    loss_fn, rows = _quadratic()
    with pytest.raises(ValueError, match=match):
        per_sample_curvatures(loss_fn, rows, torch.zeros(3), basis=basis)


def test_bad_chunk_size_and_objective_errors():
    loss_fn, rows = _quadratic()
    with pytest.raises(ValueError, match="chunk_size must be an integer ≥ 1, got 0"):
        per_sample_curvatures(loss_fn, rows, torch.zeros(3), basis=torch.eye(3), chunk_size=0)
    with pytest.raises(ValueError, match="theta0 is required with a loss function"):
        per_sample_curvatures(loss_fn, rows, basis=torch.eye(3))


# --- per-sample top curvatures: batched power iteration -------------------------------


def _tanh_mlp(p, x, y):
    """Squared error of a 3-4-1 tanh network, 21 parameters ``p``, one row ``(x, y)``."""
    w1, b1, w2, b2 = p[:12].reshape(4, 3), p[12:16], p[16:20], p[20]
    return 0.5 * (torch.tanh(w1 @ x + b1) @ w2 + b2 - y) ** 2


def _mlp_problem():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(21, generator=gen, dtype=torch.float64)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(12, generator=gen, dtype=torch.float64)
    return theta, x, y


def _top_by_magnitude(hessians: list[torch.Tensor], max_ratio: float) -> np.ndarray:
    """The eigenvalue of largest magnitude of each Hessian, after checking that the
    second largest magnitude is at most ``max_ratio`` of it (power iteration converges
    like that ratio to the power ``2T``)."""
    out = []
    for h in hessians:
        evals = torch.linalg.eigvalsh(h)
        order = torch.argsort(evals.abs(), descending=True)
        assert float(evals[order[1]].abs() / evals[order[0]].abs()) < max_ratio
        out.append(float(evals[order[0]]))
    return np.array(out)


def test_top_curvatures_of_every_row_match_dense_hessians():
    """By default every row is examined; each estimate is the eigenvalue of largest
    magnitude of the materialized per-sample Hessian (torch.func.hessian)."""
    theta, x, y = _mlp_problem()
    dense = [torch.func.hessian(_tanh_mlp)(theta, x[i], y[i]) for i in range(12)]
    expected = _top_by_magnitude(dense, max_ratio=0.75)
    rows, lam = per_sample_top_curvatures(_tanh_mlp, (x, y), theta, iterations=200)
    assert rows.dtype.kind == "i" and lam.dtype == np.float64
    assert rows.tolist() == list(range(12))
    np.testing.assert_allclose(lam, expected, rtol=1e-6)
    assert np.all(np.abs(lam) <= np.abs(expected) * (1 + 1e-12))  # a Rayleigh quotient


def test_top_curvatures_do_not_depend_on_chunk_size():
    """The starts are drawn for all rows up front: the same numbers in any chunking."""
    theta, x, y = _mlp_problem()
    _, ref = per_sample_top_curvatures(_tanh_mlp, (x, y), theta, iterations=40, seed=3)
    for chunk in (1, 3, 12, 100):
        _, lam = per_sample_top_curvatures(
            _tanh_mlp, (x, y), theta, iterations=40, seed=3, chunk_size=chunk
        )
        np.testing.assert_allclose(lam, ref, rtol=1e-12, atol=1e-12)
    _, other = per_sample_top_curvatures(_tanh_mlp, (x, y), theta, iterations=2, seed=4)
    _, few = per_sample_top_curvatures(_tanh_mlp, (x, y), theta, iterations=2, seed=3)
    assert not np.allclose(other, few)  # two iterations: the start still shows


def test_top_curvatures_of_chosen_rows():
    """``count=k``: the k rows of largest loss, largest first; ``rows``: those, in that
    order; ``H_i = x_i x_iᵀ`` has ``λ_max = |x_i|²``; a row with ``H_i = 0`` gives 0."""
    x = torch.tensor(
        [[1.0, 2.0], [0.5, 0.0], [3.0, -1.0], [0.0, 0.0], [-2.0, -1.0]], dtype=torch.float64
    )

    def loss_fn(p, row):
        return 0.5 * (row @ p) ** 2

    theta = torch.ones(2, dtype=torch.float64)
    norms = (x**2).sum(dim=1).numpy()
    rows, lam = per_sample_top_curvatures(loss_fn, x, theta, count=3)
    assert rows.tolist() == [0, 4, 2]  # losses 4.5, 0.125, 2.0, 0, 4.5 (a tie: 0 first)
    np.testing.assert_allclose(lam, norms[[0, 4, 2]], rtol=1e-12)
    rows, lam = per_sample_top_curvatures(loss_fn, x, theta, count=99)
    assert sorted(rows.tolist()) == list(range(5))
    rows, lam = per_sample_top_curvatures(loss_fn, x, theta, rows=[3, 1, 1, 2])
    assert rows.tolist() == [3, 1, 1, 2]
    np.testing.assert_allclose(lam, norms[[3, 1, 1, 2]], rtol=1e-12)
    assert lam[0] == 0.0  # H_3 = 0: stopped at the first product, no NaN
    rows, lam = per_sample_top_curvatures(loss_fn, x, theta, rows=np.array([4]), chunk_size=1)
    assert rows.tolist() == [4] and lam[0] == pytest.approx(5.0, rel=1e-12)
    _, lam = per_sample_top_curvatures(loss_fn, x, theta, rows=torch.tensor([3, 0]))
    np.testing.assert_allclose(lam, [0.0, 5.0], rtol=1e-12)
    _, every = per_sample_top_curvatures(loss_fn, x, theta)
    np.testing.assert_allclose(every, norms, rtol=1e-12)


def test_top_curvatures_of_a_module():
    """An ``nn.Module`` with ``data = (x, y)`` (cross-entropy): each row's estimate is the
    eigenvalue of largest magnitude of its full Hessian."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net = net.double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    fn, theta = flat_loss(net)
    dense = [
        torch.func.hessian(lambda p, i=i: fn(p, x[i : i + 1], y[i : i + 1])[0])(theta)
        for i in range(10)
    ]
    expected = _top_by_magnitude(dense, max_ratio=0.9)
    rows, lam = per_sample_top_curvatures(net, (x, y), iterations=100)
    assert rows.tolist() == list(range(10))
    np.testing.assert_allclose(lam, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, "count must be an integer ≥ 1, got 0"),
        ({"count": -2}, "count must be an integer ≥ 1, got -2"),
        ({"count": 2.0}, "count must be an integer ≥ 1, got 2.0"),
        ({"count": True}, "count must be an integer ≥ 1, got True"),
        ({"chunk_size": 0}, "chunk_size must be an integer ≥ 1, got 0"),
        ({"chunk_size": 1.5}, "chunk_size must be an integer ≥ 1, got 1.5"),
        ({"chunk_size": "4"}, "chunk_size must be an integer ≥ 1, got '4'"),
        ({"iterations": 0}, "iterations must be an integer ≥ 1, got 0"),
        ({"rows": [3]}, r"rows must be a non-empty sequence of integers in 0..2, got \(3,\)"),
        ({"rows": [0, -1]}, r"integers in 0..2, got \(0, -1\)"),
        ({"rows": [1.0]}, r"integers in 0..2, got \(1.0,\)"),
        ({"rows": []}, r"non-empty sequence of integers in 0..2, got \(\)"),
        ({"rows": 1}, "rows must be a sequence of integers, got 1"),
        ({"rows": [0], "count": 1}, r"give rows or count, not both: got rows=\[0\] and count=1"),
    ],
)
def test_bad_top_curvature_options(kwargs, match):
    loss_fn, rows = _quadratic()
    with pytest.raises(ValueError, match=match):
        per_sample_top_curvatures(loss_fn, rows, torch.zeros(3), **kwargs)


def test_top_curvatures_progress_bar_and_the_same_numbers(capsys):
    """``progress=True``: a bar over chunks × iterations on standard error (a row that
    stops early still completes it: 5 chunks of one row × 30 = 150), nothing on standard
    output; ``progress=False``: nothing; the same curvatures, ``|x_i|²``, either way."""
    x = torch.tensor(
        [[1.0, 2.0], [0.5, 0.0], [3.0, -1.0], [0.0, 0.0], [-2.0, -1.0]], dtype=torch.float64
    )

    def loss_fn(p, row):
        return 0.5 * (row @ p) ** 2

    theta = torch.ones(2, dtype=torch.float64)
    _, quiet = per_sample_top_curvatures(loss_fn, x, theta, chunk_size=1)
    assert capsys.readouterr() == ("", "")
    _, loud = per_sample_top_curvatures(loss_fn, x, theta, chunk_size=1, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "sample curvature" in err and "150/150" in err
    np.testing.assert_array_equal(quiet, loud)
    np.testing.assert_allclose(quiet, (x**2).sum(dim=1).numpy(), rtol=1e-12)
