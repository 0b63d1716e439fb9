"""Stationary laws (perturb.experiments.baselines.stationary): stationary covariance,
iterate averaging (two-point, EMA), Boltzmann ratio and SLQ.  Each formula is checked
against a seeded simulation (or exact computation) that does not use it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from baseline_models import Z_MAX, _linear_problem, _zscores
from scipy.linalg import solve_continuous_lyapunov, solve_discrete_lyapunov

from perturb.experiments.baselines import (
    boltzmann_ratio,
    ema_covariance,
    logdet_slq,
    slq_bias_bound,
    stationary_covariance,
    stationary_excess_loss,
    two_point_average_covariance,
)


def _simulate(h, xs, *, lr, batch_size, chains, burn, steps, decay, gaps, seed, block=100):
    """SGD chains on the finite population (indices with replacement), all at once.

    Plain numpy (torch's threading is slow for these small ops).  Returns per-chain time
    averages (``chains × P × P`` tensors) of ``θθᵀ``, of the EMA's ``θ̄θ̄ᵀ`` and of
    ``((θ_t + θ_{t+k})/2)(…)ᵀ`` for each gap ``k``.
    """
    rng = np.random.default_rng(seed)
    xs, h = xs.numpy(), h.numpy()
    n, p = xs.shape
    k_mat = np.eye(p) - lr * h  # symmetric
    theta, ema = np.zeros((chains, p)), np.zeros((chains, p))
    kmax = max(gaps)
    past = np.zeros((kmax, chains, p))  # the kmax iterates before the block
    acc = {"iterate": 0.0, "ema": 0.0} | {g: 0.0 for g in gaps}

    def outer_sum(a):  # Σ_t a_t a_tᵀ per chain, a: (T, chains, P)
        a = a.transpose(1, 0, 2)
        return a.transpose(0, 2, 1) @ a

    for b0 in range(0, burn + steps, block):
        nb = min(block, burn + steps - b0)
        noise = xs[rng.integers(0, n, (nb, chains, batch_size))].mean(2)
        thetas, emas = np.empty((nb, chains, p)), np.empty((nb, chains, p))
        for t in range(nb):
            theta = theta @ k_mat - lr * noise[t]
            ema = (1 - decay) * ema + decay * theta
            thetas[t], emas[t] = theta, ema
        keep = max(0, burn - b0)  # steps of this block still in the burn-in
        if keep < nb:
            acc["iterate"] = acc["iterate"] + outer_sum(thetas[keep:])
            acc["ema"] = acc["ema"] + outer_sum(emas[keep:])
            both = np.concatenate([past, thetas])
            for g in gaps:
                avg = (both[kmax + keep :] + both[kmax + keep - g : kmax + nb - g]) / 2
                acc[g] = acc[g] + outer_sum(avg)
        past = np.concatenate([past, thetas])[-kmax:]
    assert burn >= kmax
    return {key: torch.from_numpy(val / steps) for key, val in acc.items()}


@pytest.fixture(scope="module")
def linear_sim():
    h, c, xs = _linear_problem()
    kw = dict(lr=0.3, batch_size=2, decay=0.2, gaps=(1, 3))
    sims = _simulate(h, xs, chains=4000, burn=200, steps=2000, seed=1, **kw)
    return h, c, kw, sims


def test_discrete_lyapunov_closed_form_matches_scipy():
    h, c, _ = _linear_problem(p=6, seed=2)
    for lr, b in [(0.05, 1), (0.3, 4), (0.6, 2)]:
        k = (torch.eye(6, dtype=torch.float64) - lr * h).numpy()
        ref = solve_discrete_lyapunov(k, lr**2 / b * c.numpy())
        got = stationary_covariance(h, c, lr=lr, batch_size=b).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)
        ref_c = solve_continuous_lyapunov(h.numpy(), lr / b * c.numpy())
        got_c = stationary_covariance(h, c, lr=lr, batch_size=b, discrete=False).numpy()
        np.testing.assert_allclose(got_c, ref_c, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError):
        stationary_covariance(h, c, lr=1.0)  # η·3 > 2: SGD diverges


def test_stationary_covariance_matches_simulation(linear_sim):
    h, c, kw, sims = linear_sim
    sigma = stationary_covariance(h, c, lr=kw["lr"], batch_size=kw["batch_size"])
    z, _, _ = _zscores(sims["iterate"], sigma, h)
    assert z.abs().max() < Z_MAX, z


def test_continuous_lyapunov_is_off_at_order_lr(linear_sim):
    """The SDE's covariance misses SGD's by O(ηh): far outside the simulation's error."""
    h, c, kw, sims = linear_sim
    lr, b = kw["lr"], kw["batch_size"]
    cont = stationary_covariance(h, c, lr=lr, batch_size=b, discrete=False)
    z, mean, se = _zscores(sims["iterate"], cont, h)
    excess_sim, excess_se = float(mean[-1]), float(se[-1])
    excess_cont = float(stationary_excess_loss(h, c, lr=lr, batch_size=b, discrete=False))
    excess_disc = float(stationary_excess_loss(h, c, lr=lr, batch_size=b))
    assert z[-1] > 20  # the SDE underestimates the stationary loss
    assert abs(excess_sim - excess_disc) < Z_MAX * excess_se
    # ratio of excess losses: discrete/continuous = 1 + O(ηh), here ηh ∈ [0.09, 0.9]
    assert 1.05 < excess_disc / excess_cont < 1 / (1 - kw["lr"] * 3.0 / 2)


def test_discrete_over_continuous_is_one_plus_order_lr():
    h, c, _ = _linear_problem()
    rows = []
    for lr in (0.04, 0.02, 0.01):
        d = float(stationary_excess_loss(h, c, lr=lr))
        s = float(stationary_excess_loss(h, c, lr=lr, discrete=False))
        rows.append(d / s - 1)
    assert rows[0] / rows[1] == pytest.approx(2, rel=0.05)
    assert rows[1] / rows[2] == pytest.approx(2, rel=0.05)


def test_two_point_and_ema_match_simulation(linear_sim):
    h, c, kw, sims = linear_sim
    lr, b = kw["lr"], kw["batch_size"]
    for gap in kw["gaps"]:
        pred = two_point_average_covariance(h, c, lr=lr, batch_size=b, gap=gap)
        z, _, _ = _zscores(sims[gap], pred, h)
        assert z.abs().max() < Z_MAX, (gap, z)
    pred = ema_covariance(h, c, lr=lr, batch_size=b, decay=kw["decay"])
    z, mean, _ = _zscores(sims["ema"], pred, h)
    assert z.abs().max() < Z_MAX, z
    # averaging really helps: the EMA's excess loss is well below the iterate's
    assert float(mean[-1]) < 0.8 * float(stationary_excess_loss(h, c, lr=lr, batch_size=b))


def test_averaging_closed_forms_match_joint_lyapunov():
    """Closed forms against scipy's solver of the joint (θ, θ̄) / (θ_t, …, θ_{t+k}) systems."""
    h, c, _ = _linear_problem(p=5, seed=3)
    p, lr, b, d = 5, 0.25, 3, 0.15
    eye = np.eye(p)
    k = eye - lr * h.numpy()
    q = lr**2 / b * c.numpy()
    # EMA: z' = A z + (−η, −δη) ξ̄
    a = np.block([[k, 0 * eye], [d * k, (1 - d) * eye]])
    noise = np.block([[q, d * q], [d * q, d * d * q]])
    ref = solve_discrete_lyapunov(a, noise)
    got = ema_covariance(h, c, lr=lr, batch_size=b, decay=d, joint=True).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-14)
    # two-point with gap 2: state (θ_t, θ_{t−1}, θ_{t−2}), average of first and last
    a = np.block([[k, 0 * eye, 0 * eye], [eye, 0 * eye, 0 * eye], [0 * eye, eye, 0 * eye]])
    big = np.zeros((3 * p, 3 * p))
    big[:p, :p] = q
    s = solve_discrete_lyapunov(a, big)
    sel = np.hstack([eye, 0 * eye, eye]) / 2
    got = two_point_average_covariance(h, c, lr=lr, batch_size=b, gap=2).numpy()
    np.testing.assert_allclose(got, sel @ s @ sel.T, rtol=1e-9, atol=1e-14)
    # seed 002: far-apart points average to Σ/2
    far = two_point_average_covariance(h, c, lr=lr, batch_size=b, gap=400)
    full = stationary_covariance(h, c, lr=lr, batch_size=b)
    torch.testing.assert_close(far, full / 2, rtol=1e-10, atol=1e-14)


def _spd(dim=50, lo=0.5, hi=5.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    lam = lo * (hi / lo) ** torch.rand(dim, generator=gen, dtype=torch.float64)
    lam[0], lam[1] = lo, hi
    return q @ torch.diag(lam) @ q.T, lam


def test_slq_matches_exact_logdet():
    """|SLQ − slogdet| < 4 SE + bias bound.  Mean of 40 probes is ≈ t_39: false-failure ≈ 3e-4."""
    h, lam = _spd()
    exact = float(torch.linalg.slogdet(h).logabsdet)
    est = logdet_slq(lambda u: h @ u, 50, probes=40, steps=12, seed=0)
    bias = slq_bias_bound(float(lam.min()), float(lam.max()), 50, steps=12)
    assert bias < 1e-4
    assert 0 < est.stderr < 2.0
    assert abs(est.value - exact) < 4 * est.stderr + bias, (est.value, exact, est.stderr)


def test_slq_quadrature_error_within_bias_bound():
    """Per probe, m-step quadrature vs the exact vᵀlog(H)v (full Lanczos = exact quadratic form)."""
    h, _ = _spd(dim=40, lo=0.1, hi=10.0, seed=4)  # κ = 100: the bound is not negligible
    lam_v, vec = torch.linalg.eigh(h)
    log_h = vec @ torch.diag(torch.log(lam_v)) @ vec.T
    full = logdet_slq(lambda u: h @ u, 40, probes=5, steps=40, seed=3)
    gen = torch.Generator().manual_seed(3)
    for i in range(5):  # the same Rademacher probes as logdet_slq draws
        v = torch.randint(0, 2, (40,), generator=gen).to(torch.float64) * 2 - 1
        assert float(full.samples[i]) == pytest.approx(float(v @ log_h @ v), rel=1e-8)
    for m in (4, 8, 12):
        bound = slq_bias_bound(0.1, 10.0, 40, steps=m)
        short = logdet_slq(lambda u: h @ u, 40, probes=5, steps=m, seed=3)
        err = (short.samples - full.samples).abs().max()
        assert float(err) <= bound, (m, float(err), bound)


class _TiltedWell:
    """1-D double well ``L = ¼(θ²−1)²(1 + a·tanh θ) + εθ``: minima of different curvature."""

    a, eps = 0.6, 0.02

    def loss(self, t):
        return 0.25 * (t * t - 1) ** 2 * (1 + self.a * np.tanh(t)) + self.eps * t

    def grad(self, t):
        th = np.tanh(t)
        return (
            (t * t - 1) * t * (1 + self.a * th)
            + 0.25 * (t * t - 1) ** 2 * self.a * (1 - th * th)
            + self.eps
        )

    def hess(self, t, d=1e-5):
        return (self.grad(t + d) - self.grad(t - d)) / (2 * d)

    def critical_points(self):
        from scipy.optimize import brentq

        return tuple(
            brentq(self.grad, lo, hi) for lo, hi in [(-1.5, -0.5), (-0.5, 0.5), (0.5, 1.5)]
        )

    def gibbs_ratio(self, temp):
        """Exact ``p_A/p_B`` of the density ``∝ exp(−L/T)`` by quadrature (no Laplace)."""
        from scipy.integrate import quad

        ta, top, tb = self.critical_points()
        f0 = self.loss(ta)

        def f(t):
            return math.exp(-(self.loss(t) - f0) / temp)

        left = quad(f, -4, top, points=[ta], limit=200)[0]
        return left / quad(f, top, 4, points=[tb], limit=200)[0]

    def formula(self, *, lr, batch_size, sigma2, **kw):
        ta, _, tb = self.critical_points()
        return boltzmann_ratio(
            self.loss(ta),
            self.loss(tb),
            math.log(self.hess(ta)),
            math.log(self.hess(tb)),
            lr=lr,
            batch_size=batch_size,
            sigma2=sigma2,
            **kw,
        )


def test_boltzmann_ratio_is_laplace_of_gibbs():
    """Seed 001's formula vs the exact Gibbs integral: relative error O(nσ²) → 0 linearly."""
    well = _TiltedWell()
    errs = []
    for temp in (0.08, 0.04, 0.02, 0.01):  # T = nσ²/2, here η = 0.01, B = 1
        sigma2 = 2 * temp / 0.01
        errs.append(well.formula(lr=0.01, batch_size=1, sigma2=sigma2) / well.gibbs_ratio(temp) - 1)
    assert 0 < errs[0] < 0.08
    for i in range(len(errs) - 1):
        assert errs[i] / errs[i + 1] == pytest.approx(2, rel=0.25)
    assert well.formula(lr=0.01, batch_size=1, sigma2=16.0, log=True) == pytest.approx(
        math.log(well.formula(lr=0.01, batch_size=1, sigma2=16.0)), rel=1e-12
    )


def test_boltzmann_ratio_against_sgd_simulation():
    """SGD with isotropic Gaussian gradient noise (variance σ²) in the tilted double well.

    2000 chains, half started in each minimum, 10⁴ burn-in + 3·10⁴ steps at η = 0.01,
    σ² = 16 (T = ησ²/2 = 0.08, barrier/T ≈ 3.5).  The occupation ratio matches the Gibbs
    integral within its SE; the formula differs from both by its Laplace error (≈ 6%).
    """
    well = _TiltedWell()
    lr, sigma2, chains, burn, steps = 0.01, 16.0, 2000, 10_000, 30_000
    ta, top, tb = well.critical_points()
    rng = np.random.default_rng(0)
    theta = np.where(rng.random(chains) < 0.5, ta, tb)
    in_a = np.zeros(chains)
    for s in range(burn + steps):
        theta = theta - lr * (well.grad(theta) + math.sqrt(sigma2) * rng.standard_normal(chains))
        if s >= burn:
            in_a += theta < top
    frac = in_a / steps  # per chain: chains are independent
    fbar, fse = frac.mean(), frac.std() / math.sqrt(chains)
    ratio, se = fbar / (1 - fbar), fse / (1 - fbar) ** 2  # delta method
    gibbs = well.gibbs_ratio(lr * sigma2 / 2)
    formula = well.formula(lr=lr, batch_size=1, sigma2=sigma2)
    assert abs(ratio - gibbs) < Z_MAX * se, (ratio, se, gibbs)
    assert abs(ratio - formula) < Z_MAX * se + abs(formula - gibbs), (ratio, se, formula)
    assert 1.5 < formula < 4  # the flatter minimum A (h ≈ 1.1 vs 2.8) wins despite L_A < L_B


def test_adjacent_two_point_average_has_the_sdes_stationary_loss():
    """Exact identity: ½tr(H Cov((θ_t+θ_{t+1})/2)) = (η/4B) tr C = the SDE's ½tr(HΣ_c)."""
    h, c, _ = _linear_problem(p=6, seed=5)
    for lr, b in [(0.1, 1), (0.5, 3)]:
        avg = two_point_average_covariance(h, c, lr=lr, batch_size=b)
        sde = float(stationary_excess_loss(h, c, lr=lr, batch_size=b, discrete=False))
        assert float(0.5 * torch.trace(h @ avg)) == pytest.approx(sde, rel=1e-10)
        assert sde == pytest.approx(lr / (4 * b) * float(torch.trace(c)), rel=1e-10)


def test_two_point_average_is_half_the_learning_rate_to_first_order_only():
    """Seed 002 A.3: far-apart two-point average at η vs SGD at η/2, stationary.

    ``Σ_η = ηΣ₁ + η²Σ₂ + …`` with ``HΣ₁ + Σ₁H = C/B``, ``HΣ₂ + Σ₂H = HΣ₁H`` (scipy), so
    ``Σ_η/2 − Σ_{η/2} = η²Σ₂/4 + O(η³)``: equal at order η, not at η².
    """
    h, c, _ = _linear_problem(seed=0)
    s1 = solve_continuous_lyapunov(h.numpy(), c.numpy() / 2)
    s2 = solve_continuous_lyapunov(h.numpy(), h.numpy() @ s1 @ h.numpy())
    errs = []
    for lr in (4e-3, 2e-3, 1e-3):
        avg = two_point_average_covariance(h, c, lr=lr, batch_size=2, gap=200_000)
        half = stationary_covariance(h, c, lr=lr / 2, batch_size=2)
        assert np.abs((avg - half).numpy()).max() < 3 * lr * np.abs(s1).max() * lr
        errs.append(np.abs((avg - half).numpy() / lr**2 - s2 / 4).max())
    assert errs[0] / errs[1] == pytest.approx(2, rel=0.05)  # the rest is O(η³)
    assert errs[1] / errs[2] == pytest.approx(2, rel=0.05)
