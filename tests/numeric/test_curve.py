"""Learning curves (perturb.numeric.curve) against references that share no code with them:
an exact moment recursion on [θ; 1] for quadratic populations, exact enumeration of every
sample sequence on a nonlinear landscape, and closed forms."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import perturb
from perturb.numeric.adapters import objective
from perturb.numeric.curve import CurveSettings, checkpoint_steps, learning_curve
from perturb.reference.enumeration import expected_loss

P, N = 5, 7


def _quadratic_population(seed: int):
    """Random correlated per-sample Hessians and gradients: ``l_i = ½θᵀH_iθ + g_iᵀθ``."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(P, P)))[0]
    hess = q @ np.diag(np.linspace(0.5, 2.0, P)) @ q.T
    a = rng.normal(size=(N, P, P))
    a = 0.3 * (a + a.transpose(0, 2, 1)) / 2
    a -= a.mean(axis=0)
    grads = rng.normal(size=(N, P)) + 2.0 * a @ np.ones(P)  # correlated with A_i
    return hess + a, grads, rng.normal(size=P)


def _exact_moments(hs, gs, theta0, *, lr, batch_size, steps):
    """E l(θ_t) from E[zzᵀ], ``z = [θ; 1]``, ``z ← F_b z`` with ``B`` iid draws."""
    n = len(hs)
    f = np.zeros((n, P + 1, P + 1))
    f[:, :P, :P] = np.eye(P) - lr * hs
    f[:, :P, P] = -lr * gs
    f[:, P, P] = 1.0
    fbar = f.mean(axis=0)
    weights = np.zeros((P + 1, P + 1))
    weights[:P, :P] = hs.mean(axis=0) / 2
    weights[:P, P] = weights[P, :P] = gs.mean(axis=0) / 2
    z = np.append(theta0, 1.0)
    second = np.outer(z, z)
    out = {}
    for t in range(max(steps) + 1):
        out[t] = np.trace(weights @ second)
        second = (
            np.einsum("iab,bc,idc->ad", f, second, f) / (n * batch_size)
            + (1 - 1 / batch_size) * fbar @ second @ fbar.T
        )
    return np.array([out[t] for t in steps])


def _quadratic_objective(hs, gs, theta0):
    rows = torch.tensor(np.concatenate([hs.reshape(len(hs), -1), gs], axis=1))

    def single(p, r):
        return 0.5 * p @ r[: P * P].reshape(P, P) @ p + r[P * P :] @ p

    def batch(p, r):  # the same loss, vectorized over rows (no vmap: fast steps)
        h = r[:, : P * P].reshape(-1, P, P)
        return 0.5 * torch.einsum("a,nab,b->n", p, h, p) + r[:, P * P :] @ p

    obj = objective(single, rows, torch.tensor(theta0))
    return dataclasses.replace(obj, batch=batch)


def _check_quadratic(seed, lrs, steps, per_decade):
    hs, gs, theta0 = _quadratic_population(seed)
    obj = _quadratic_objective(hs, gs, theta0)
    settings = CurveSettings(rank=P, higher_rank=P, probes=2, sde=False, per_decade=per_decade)
    curve = learning_curve(obj, None, lr=lrs, steps=steps, batch_sizes=(1, 4), settings=settings)
    assert all(len(c) >= 4 for c in curve.checkpoints)  # the basis changed several times
    for i, eta in enumerate(lrs):
        for j, b in enumerate((1, 4)):
            exact = _exact_moments(hs, gs, theta0, lr=eta, batch_size=b, steps=steps)
            np.testing.assert_allclose(curve.curve[i, j], exact, rtol=1e-8, atol=0)
            # the subspace is the whole space, J = 0: nothing is estimated to be missing
            assert np.all(curve.error_estimate[i, j] < 1e-12)


def test_exact_on_a_correlated_quadratic_population():
    """To T = 300, B = 1 and 4, η up to 0.3 (ηλ_max(H) = 0.6, mean-square stable); the
    slow twin runs to T = 10⁴ with four checkpoints a decade."""
    _check_quadratic(0, (0.1, 0.3), [0, 1, 3, 10, 100, 300], per_decade=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_on_a_correlated_quadratic_population_to_ten_thousand_steps(seed):
    _check_quadratic(seed, (0.02, 0.1, 0.3), [0, 1, 10, 100, 1000, 10_000], per_decade=4)


def _landscape(p, x):
    """Two rows, per-sample curvature and gradient both depending on the row: many basins."""
    return (
        1
        - torch.cos(p[0] + 0.4 * x[0])
        + 0.3 * x[0] * p[0]
        + 0.2 * (1 - torch.cos(p[1] - 0.5 * x[0])) * (1 + 0.5 * torch.sin(p[0]))
    )


STARTS = ((2.5, 1.0), (1.0, -2.0))
RATES = (0.2, 0.5)
ROWS = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
EVEN = list(range(2, 15, 2))


@pytest.fixture(scope="module")
def nonlinear():
    """``(start, η) -> (curve, exact)`` on the landscape, every sequence enumerated."""
    pop = perturb.Population(_landscape, ROWS)
    out = {}
    for start in STARTS:
        theta0 = torch.tensor(start, dtype=torch.float64)
        curve = learning_curve(
            pop, None, theta0, lr=RATES, steps=EVEN,
            settings=CurveSettings(rank=2, higher_rank=2, sde=False),
        )  # fmt: skip
        for i, lr in enumerate(RATES):
            schedules = [perturb.Online(steps=t, batch_size=1) for t in EVEN]
            exact = np.array([expected_loss(_landscape, ROWS, theta0, s, lr=lr) for s in schedules])
            out[start, lr] = (curve.curve[i, 0], curve.path[i], curve.error_estimate[i, 0], exact)
    return out


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("lr", RATES)
def test_explains_the_noise_on_a_nonlinear_landscape(nonlinear, start, lr):
    """Against every sample sequence enumerated: the curve accounts for at least 2/3 of
    SGD − GD at every step where they differ by more than 1e-3 (no tolerance: the exact
    values are float64 sums)."""
    curve, path, _, exact = nonlinear[start, lr]
    noise = exact - path
    error = np.abs(curve - exact)
    big = np.abs(noise) > 1e-3
    assert big.sum() >= 3
    assert np.all(error[big] <= np.abs(noise[big]) / 3)


def test_error_estimate_on_the_nonlinear_landscape(nonlinear):
    """Calibrated (at least 90% of the 28 points within their error estimate, the issue's
    bar; 27 when this was written, the miss at T = 4 by 9%) and sharp: in the median at
    most half of SGD − GD (what a prediction without the noise would miss)."""
    inside, ratios = 0, []
    for curve, path, estimate, exact in nonlinear.values():
        inside += int(np.sum(np.abs(curve - exact) <= estimate))
        ratios += list(estimate / np.abs(exact - path))
    assert inside >= 0.9 * len(ratios) and len(ratios) == 28
    assert np.median(ratios) <= 0.5


def test_one_dimensional_closed_forms():
    """``l_x = hθ²/2 + xθ``, ``x = ±s``: the path, the curve and the SDE's covariance in
    closed form (the SDE's flow by Heun's method: a factor ``1 − ηh + (ηh)²/2`` a step)."""
    h, s, eta, theta0 = 1.5, 0.7, 0.2, 1.3
    rows = torch.tensor([[s], [-s]], dtype=torch.float64)
    pop = perturb.Population(lambda p, x: 0.5 * h * (p * p).sum() + (x * p).sum(), rows)
    steps = [0, 1, 5, 40]
    curve = learning_curve(
        pop, None, torch.tensor([theta0], dtype=torch.float64), lr=[eta], steps=steps,
        batch_sizes=(1, 3), settings=CurveSettings(rank=1, per_decade=1),
    )  # fmt: skip
    t = np.array(steps, dtype=float)
    k = 1 - eta * h
    path = 0.5 * h * (theta0 * k**t) ** 2
    np.testing.assert_allclose(curve.path[0], path, rtol=1e-10)
    heun = 1 - eta * h + (eta * h) ** 2 / 2
    np.testing.assert_allclose(curve.flow[0], 0.5 * h * (theta0 * heun**t) ** 2, rtol=1e-10)
    for j, b in enumerate((1, 3)):
        var = eta**2 * s**2 / b * (1 - k ** (2 * t)) / (1 - k**2)
        np.testing.assert_allclose(curve.curve[0, j], path + 0.5 * h * var, rtol=1e-10)
        lyapunov = eta / b * s**2 * (1 - np.exp(-2 * h * eta * t)) / (2 * h)
        sde = 0.5 * h * (theta0 * heun**t) ** 2 + 0.5 * h * lyapunov
        np.testing.assert_allclose(curve.sde[0, j], sde, rtol=1e-10)
        # the loss across runs: Var = b² M + ½ (h M)², b = h θ̄
        sigma = np.sqrt((h * theta0 * k**t) ** 2 * var + 0.5 * (h * var) ** 2)
        np.testing.assert_allclose(curve.spread[0, j], sigma, rtol=1e-10)
    assert curve.cost["path"] == 41 and curve.cost["flow"] == 80


def test_trusted_and_json():
    rows = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    pop = perturb.Population(_landscape, rows)
    curve = learning_curve(
        pop, None, torch.tensor((2.5, 1.0), dtype=torch.float64), lr=[0.2, 0.5],
        steps=[0, 4, 8], settings=CurveSettings(rank=2, higher_rank=2, per_decade=1),
    )  # fmt: skip
    ok = curve.trusted(64)
    assert ok.shape == (2, 1, 3) and ok.dtype == bool
    assert np.all(ok[:, :, 0])  # t = 0: nothing to get wrong
    # more trials resolve finer: never more trusted
    assert np.all(curve.trusted(10_000) <= curve.trusted(2))
    steps = curve.trusted_steps(64)
    assert steps.shape == (2, 1)
    data = json.loads(json.dumps(curve.to_dict(64), allow_nan=False))
    assert data["steps"] == [0, 4, 8] and len(data["curve"][0][0]) == 3
    assert data["settings"]["rank"] == 2


def test_checkpoints():
    assert checkpoint_steps(0.01, 1000, first=0.1, per_decade=2) == [0, 10, 32, 100, 316]
    assert checkpoint_steps(1.0, 1, first=0.1, per_decade=4) == [0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": []}, ValueError, "at least one learning rate"),
        ({"lr": [-0.1]}, ValueError, "lr"),
        ({"batch_sizes": []}, ValueError, "at least one batch size"),
        ({"batch_sizes": [0]}, ValueError, "batch_size"),
        ({"steps": []}, ValueError, "at least one step"),
        ({"steps": [-1]}, ValueError, "step"),
        ({"settings": {"rank": 2}}, TypeError, "CurveSettings"),
    ],
)
def test_errors(kwargs, error, match):
    pop = perturb.Population(_landscape, torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
    args = {"lr": [0.1], "steps": [0, 1]} | kwargs
    with pytest.raises(error, match=match):
        learning_curve(pop, None, torch.zeros(2, dtype=torch.float64), **args)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rank": 0}, ValueError),
        ({"higher_rank": 0}, ValueError),
        ({"probes": -1}, ValueError),
        ({"first": 0.0}, ValueError),
        ({"per_decade": 0}, ValueError),
        ({"chunk_size": 0}, ValueError),
        ({"sde": "yes"}, TypeError),
    ],
)
def test_settings_errors(kwargs, error):
    with pytest.raises(error):
        CurveSettings(**kwargs)
