"""Convergence order of the re-summed series against SGD's exact expectation (issue 14).

On a tiny tanh network whose ``E[Q(θ_T)]`` is computed exactly by enumerating every sample
sequence and reshuffle (:func:`perturb.reference.expected_loss`), the error of the re-summed
prediction with ``d`` edges must shrink like ``η^{d+1}`` at fixed ``T``: the diagrams left
out all have more than ``d`` edges.  The un-resummed series through ``η^d`` is the control
(error ``η^{d+1}`` too).  The order is the least-squares slope of ``log|error|`` against
``log η`` over a geometric grid.

The network has a non-zero third derivative (tanh), per-row Hessians and gradients that
differ, and a positive definite mean Hessian (a small weight decay), so no term of the
series vanishes by accident and every re-summed direction is stable on the grid.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import perturb
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.validity import curvature_radius, rms_displacement
from perturb.reference import count_sequences, expected_loss

ROWS = torch.tensor(
    [[0.8, -0.4, 0.5], [-0.3, 0.9, -0.7], [0.5, 0.6, 0.2]], dtype=torch.float64
)  # (x1, x2, target)
THETA0 = torch.tensor([0.6, -0.5, 0.3, 0.8, 0.1, -0.2, 0.9, -0.7, 0.15], dtype=torch.float64)
DECAY = 0.3
ETAS = tuple(0.05 * 2.0**-j for j in range(5))
TOLERANCE = 0.25


def loss_fn(p: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """A 2-2-1 tanh regression net (9 parameters), squared loss plus ``DECAY/2·|θ|²``."""
    w1, b1, w2, b2 = p[:4].reshape(2, 2), p[4:6], p[6:8], p[8]
    out = w2 @ torch.tanh(w1 @ row[:2] + b1) + b2
    return 0.5 * (out - row[2]) ** 2 + 0.5 * DECAY * (p @ p)


POPULATION = perturb.Population(loss_fn, ROWS)

SCHEDULES = {
    "online-T4-B1": perturb.Online(steps=4, batch_size=1),
    "online-T3-B2": perturb.Online(steps=3, batch_size=2),
    "epochs-N2-E2-fixed": perturb.Epochs(train_size=2, batch_size=1, epochs=2),
    "epochs-N2-E2-shuffled": perturb.Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
    "gd-N2-T3": perturb.GD(train_size=2, steps=3),
}
SLOW = {("online-T3-B2", "train"), ("online-T3-B2", "gap")} | {
    ("epochs-N2-E2-shuffled", q) for q in ("train", "gap")
}  # and the gap (test − train) of fixed epochs and GD, whose test and train run by default
SLOW |= {("epochs-N2-E2-fixed", "gap"), ("gd-N2-T3", "gap")}
METHODS = [(True, 2), (True, 3), (False, 2), (False, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def exact(name: str, quantity: str) -> tuple[float, ...]:
    """``E[Q(θ_T)]`` at every η of the grid, by enumeration."""
    schedule = SCHEDULES[name]
    return tuple(
        expected_loss(loss_fn, ROWS, THETA0, schedule, lr=lr, quantity=quantity) for lr in ETAS
    )


def slope(errors: list[float]) -> float:
    """Least-squares slope of ``log|error|`` against ``log η`` over the grid."""
    return float(np.polyfit(np.log(ETAS), np.log(np.abs(errors)), 1)[0])


def errors(name: str, quantity: str, *, resummed: bool, order: int) -> list[float]:
    schedule = SCHEDULES[name]
    return [
        perturb.predict(
            POPULATION, THETA0, schedule, lr=lr, order=order, quantity=quantity, resummed=resummed
        ).total
        - want
        for lr, want in zip(ETAS, exact(name, quantity), strict=True)
    ]


def test_the_network_is_not_a_trivial_case():
    derivs = POPULATION.derivatives(THETA0, 3)
    evals = torch.linalg.eigvalsh(derivs[2].mean(0))
    assert float(evals.min()) > 0.1  # H positive definite, not degenerate
    assert float(evals.max()) * ETAS[0] < 0.2  # every K = I − ηH direction contracts
    assert float(derivs[3].mean(0).abs().max()) > 0.5  # J = E ∇³l ≠ 0
    centred = derivs[1] - derivs[1].mean(0)
    assert float(torch.linalg.matrix_norm(centred.T @ centred)) > 0.1  # C ≠ 0
    assert float((derivs[2] - derivs[2].mean(0)).abs().max()) > 0.1  # noisy Hessians
    assert float((derivs[3] - derivs[3].mean(0)).abs().max()) > 0.1  # noisy J
    for schedule in SCHEDULES.values():
        assert count_sequences(schedule, len(ROWS)) <= 1000


@pytest.mark.parametrize(
    ("name", "quantity"),
    [
        pytest.param(n, q, marks=pytest.mark.slow) if (n, q) in SLOW else (n, q)
        for n in SCHEDULES
        for q in ("test", "train", "gap")
    ],
)
@pytest.mark.parametrize(
    ("resummed", "order"),
    METHODS,
    ids=[f"{'resummed' if r else 'series'}-{d}" for r, d in METHODS],
)
def test_error_shrinks_like_eta_to_the_edges_plus_one(name, quantity, resummed, order):
    errs = errors(name, quantity, resummed=resummed, order=order)
    want = exact(name, quantity)
    # far above float64 rounding at the smallest η, so the slope measures truncation
    assert abs(errs[-1]) > 1e-10 * abs(want[-1])
    assert slope(errs) == pytest.approx(order + 1, abs=TOLERANCE), errs


def test_the_check_fails_on_a_wrong_schedule():
    """Predicting online SGD (no reuse) for two epochs over two points misses an η² term."""
    wrong = perturb.Online(steps=4, batch_size=1)
    errs = [
        perturb.predict(POPULATION, THETA0, wrong, lr=lr, order=3, resummed=True).total - want
        for lr, want in zip(ETAS, exact("epochs-N2-E2-fixed", "test"), strict=True)
    ]
    assert slope(errs) < 4 - 1.0


def _simulated_test_loss(lr: float, steps: tuple[int, ...], runs: int = 40_000):
    """Mean and standard error of the test loss of ``runs`` online SGD runs (batch 1) at
    each of ``steps``: a hand-written batched SGD, independent of perturb."""
    gen = torch.Generator().manual_seed(0)
    batched = torch.vmap(loss_fn)  # (runs, 9) parameters, (runs, 3) rows -> (runs,)
    p, out = THETA0.expand(runs, -1).clone(), {}
    for t in range(1, max(steps) + 1):
        p.requires_grad_(True)
        rows = ROWS[torch.randint(0, len(ROWS), (runs,), generator=gen)]
        (g,) = torch.autograd.grad(batched(p, rows).sum(), p)
        p = (p - lr * g).detach()
        if t in steps:
            loss = sum(batched(p, row.expand(runs, -1)) for row in ROWS) / len(ROWS)
            out[t] = (float(loss.mean()), float(loss.std()) / runs**0.5)
    return out


def test_three_edges_help_only_while_the_weights_move_less_than_rho():
    """Long runs (fixed ηT, issue 15): the 3-edge series adds the first correction in
    ``J`` to the quadratic model's path, which is an expansion in the displacement over
    ``ρ = ‖H‖/‖J‖``.  At ηT = 1 (RMS displacement 0.5 ρ) it beats 2 edges; at ηT = 10
    (1.5 ρ) it is more than 5× worse, against real SGD (40,000 runs, standard error
    < 1e-4; the nearest margin is 15 of them, so no seed fails this).  The validity estimate's
    displacement rule (trusted only within ρ) is what separates the two; the miss is the
    series' own, documented in docs/validation.md ("Why three edges do not last longest").
    """
    lr = 0.1
    sgd = _simulated_test_loss(lr, (10, 100))
    derivs = POPULATION.derivatives(THETA0, 3)
    hess, grad = derivs[2].mean(0), derivs[1].mean(0)
    cov = (derivs[1] - grad).T @ (derivs[1] - grad) / len(ROWS)
    sub = krylov_subspace(POPULATION, None, THETA0, rank=9, order=3)
    rho = curvature_radius(sub)
    errs = {}
    for steps in (10, 100):
        schedule = perturb.Online(steps=steps, batch_size=1)
        moved = rms_displacement(hess, grad, cov, lr=[lr], schedule=schedule)[0]
        mean, se = sgd[steps]
        assert se < 1e-4
        errs[steps] = {
            d: perturb.predict(POPULATION, THETA0, schedule, lr=lr, order=d, resummed=True).total
            - mean
            for d in (2, 3)
        }
        errs[steps]["over_rho"] = moved / rho
    assert errs[10]["over_rho"] < 0.6 and errs[100]["over_rho"] > 1.2, errs
    assert abs(errs[10][3]) < 0.7 * abs(errs[10][2]), errs  # 0.008 against 0.012
    assert abs(errs[100][3]) > 5 * abs(errs[100][2]), errs  # 0.155 against 0.012
