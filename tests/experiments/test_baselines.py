"""ODE and SDE predictors against a numerical solver and exact SGD recursions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from perturb.experiments.baselines import QuadraticModel, ode_test_loss, sde_test_loss


def _model(p=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    hess = a @ a.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    b = torch.randn(p, p, generator=gen, dtype=torch.float64)
    cov = b @ b.T / p  # does not commute with hess
    grad = torch.randn(p, generator=gen, dtype=torch.float64)
    return QuadraticModel(torch.tensor(2.0, dtype=torch.float64), grad, hess, cov)


def _solve_moments(q: QuadraticModel, lr, steps, batch_size):
    """Integrate dm/dt = −(G + Hm), dΣ/dt = −HΣ − ΣH + (η/B)C with scipy."""
    p = len(q.grad)
    h, c, g = q.hess.numpy(), q.cov.numpy(), q.grad.numpy()

    def rhs(_, y):
        m, s = y[:p], y[p:].reshape(p, p)
        ds = -h @ s - s @ h + (lr / batch_size) * c
        return np.concatenate([-(g + h @ m), ds.ravel()])

    sol = solve_ivp(rhs, (0, lr * steps), np.zeros(p + p * p), rtol=1e-11, atol=1e-13)
    m, s = sol.y[:p, -1], sol.y[p:, -1].reshape(p, p)
    ode = float(q.loss) + g @ m + 0.5 * m @ h @ m
    return ode, ode + 0.5 * np.trace(h @ s)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("lr", "steps", "batch_size"), [(0.01, 100, 1), (0.05, 200, 4)])
def test_closed_forms_match_numerical_integration(seed, lr, steps, batch_size):
    q = _model(seed=seed)
    ode, sde = _solve_moments(q, lr, steps, batch_size)
    assert float(ode_test_loss(q, lr=lr, steps=steps)) == pytest.approx(ode, rel=1e-8)
    got = float(sde_test_loss(q, lr=lr, steps=steps, batch_size=batch_size))
    assert got == pytest.approx(sde, rel=1e-8)


def _sgd_exact(q: QuadraticModel, lr, steps, batch_size):
    """Exact E l(θ_T) of online SGD on l_x = l + (G + ξ)·Δ + ½ΔᵀHΔ, Cov ξ = C."""
    p = len(q.grad)
    k = torch.eye(p, dtype=torch.float64) - lr * q.hess
    m = torch.zeros(p, dtype=torch.float64)
    s = torch.zeros(p, p, dtype=torch.float64)
    for _ in range(steps):
        m = k @ m - lr * q.grad
        s = k @ s @ k + lr**2 * q.cov / batch_size
    return float(q.loss + q.grad @ m + 0.5 * m @ q.hess @ m + 0.5 * torch.trace(q.hess @ s))


def test_sde_is_the_small_lr_limit_of_sgd_at_fixed_time():
    """At fixed ηT = 2 the SGD − SDE gap shrinks linearly in η (discretization error)."""
    q = _model(seed=3)
    gaps = []
    for lr in (0.02, 0.01, 0.005):
        steps = round(2 / lr)
        gaps.append(_sgd_exact(q, lr, steps, 1) - float(sde_test_loss(q, lr=lr, steps=steps)))
    assert abs(gaps[0] / gaps[1] - 2) < 0.1 and abs(gaps[1] / gaps[2] - 2) < 0.1


def test_flat_directions_are_handled():
    q = QuadraticModel(
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64)),
        torch.eye(2, dtype=torch.float64),
    )
    # flat direction: the loss decreases linearly, −|G|² t; noise there does not count (h = 0)
    assert float(ode_test_loss(q, lr=0.1, steps=10)) == pytest.approx(-1.0, rel=1e-12)
    extra = float(sde_test_loss(q, lr=0.1, steps=10) - ode_test_loss(q, lr=0.1, steps=10))
    assert extra == pytest.approx(0.5 * 0.1 * (1 - np.exp(-2)) / 2, rel=1e-12)


# ---------------------------------------------------------------------------
# Stationary covariance, iterate averaging, Boltzmann ratio and SLQ: each formula is
# checked against a seeded simulation (or exact computation) that does not use it.
# ---------------------------------------------------------------------------

import math  # noqa: E402
import time  # noqa: E402

from scipy.linalg import solve_continuous_lyapunov, solve_discrete_lyapunov  # noqa: E402

from perturb.experiments.baselines import (  # noqa: E402
    boltzmann_ratio,
    ema_covariance,
    logdet_slq,
    slq_bias_bound,
    stationary_covariance,
    stationary_excess_loss,
    two_point_average_covariance,
)

# Each simulation test compares n_cmp statistics with |z| < Z_MAX; for Gaussian z the
# false-failure rate is ≤ n_cmp · P(|z| > 4.5) = n_cmp · 6.8e-6 (Bonferroni), e.g. ≤ 3e-4
# for the 44 comparisons below.  The seeds are fixed, so the outcome is reproducible.
Z_MAX = 4.5


def _linear_problem(p=4, n=64, seed=0):
    """Non-commuting ``H`` (eigenvalues in [0.3, 3]) and a finite population of ``x``.

    Per-sample loss ``l_x(θ) = ½θᵀHθ + xᵀθ``; the ``x`` are centred, so the minimum is
    ``θ* = 0`` and ``C = Σ_x xxᵀ/n`` is the exact per-sample gradient covariance.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.linspace(0.3, 3.0, p, dtype=torch.float64)) @ q.T
    mix = torch.randn(p, p, generator=gen, dtype=torch.float64)
    xs = torch.randn(n, p, generator=gen, dtype=torch.float64) @ mix
    xs = xs - xs.mean(0)
    c = xs.T @ xs / n
    assert torch.linalg.norm(h @ c - c @ h) > 0.1 * torch.linalg.norm(h) * torch.linalg.norm(c)
    return h, c, xs


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


def _zscores(per_chain, predicted, h):
    """z of each unique entry and of ``½tr(H·)``: chains independent ⇒ SE = sd/sqrt(chains)."""
    m = per_chain.shape[0]
    iu = torch.triu_indices(*predicted.shape)
    ent = per_chain[:, iu[0], iu[1]]
    loss = 0.5 * torch.einsum("ij,cji->c", h, per_chain)
    samples = torch.cat([ent, loss[:, None]], 1)
    target = torch.cat([predicted[iu[0], iu[1]], (0.5 * torch.trace(h @ predicted))[None]])
    se = samples.std(0) / math.sqrt(m)
    return (samples.mean(0) - target) / se, samples.mean(0), se


@pytest.fixture(scope="module")
def linear_sim():
    h, c, xs = _linear_problem()
    kw = dict(lr=0.3, batch_size=2, decay=0.2, gaps=(1, 3))
    start = time.perf_counter()
    sims = _simulate(h, xs, chains=4000, burn=200, steps=2000, seed=1, **kw)
    sims["seconds"] = time.perf_counter() - start
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


# ---------------------------------------------------------------------------
# Seed 004: Laplace evidence (against closed forms, sklearn and quadrature), the
# logistic-regression evidence experiment, and the noise scale (against the exact
# stationary law of momentum SGD with batches drawn without replacement).
# ---------------------------------------------------------------------------

from scipy import integrate  # noqa: E402
from scipy.stats import multivariate_normal  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from perturb.experiments.baselines import (  # noqa: E402
    batch_size_for_noise_scale,
    laplace_evidence,
    logistic_map,
    noise_scale,
)


@pytest.mark.parametrize(("n", "p", "lam", "noise"), [(30, 3, 0.5, 0.7), (12, 8, 2.0, 1.3)])
def test_laplace_is_exact_for_bayesian_linear_regression(n, p, lam, noise):
    """Gaussian likelihood and prior: the Laplace evidence is the marginal likelihood
    ``y ~ N(0, σ²I + XXᵀ/λ)`` exactly (scipy's multivariate normal density)."""
    rng = np.random.default_rng(p)
    x = rng.normal(size=(n, p))
    y = x @ rng.normal(size=p) + noise * rng.normal(size=n)
    hess = x.T @ x / noise**2 + lam * np.eye(p)
    w0 = np.linalg.solve(hess, x.T @ y / noise**2)
    r = y - x @ w0
    cost = r @ r / (2 * noise**2) + n / 2 * math.log(2 * math.pi * noise**2) + lam / 2 * w0 @ w0
    ev = laplace_evidence(cost, torch.tensor(hess), l2=lam, num_samples=n, num_classes=3)
    exact = multivariate_normal(np.zeros(n), noise**2 * np.eye(n) + x @ x.T / lam).logpdf(y)
    assert ev.log_evidence == pytest.approx(exact, rel=1e-10)
    assert ev.log_null == pytest.approx(-n * math.log(3), rel=1e-14)
    assert ev.log_ratio == pytest.approx(-n * math.log(3) - exact, rel=1e-10)
    # the eigenvalue path and the matrix path agree
    spectrum = torch.tensor(np.linalg.eigvalsh(hess))
    again = laplace_evidence(cost, spectrum, l2=lam, num_samples=n, num_classes=3)
    assert again.log_evidence == pytest.approx(ev.log_evidence, rel=1e-12)


def _digit_pair(a=1, b=8):
    d = load_digits()
    keep = np.isin(d.target, (a, b))
    return torch.tensor(d.data[keep] / 16.0), torch.tensor((d.target[keep] == b).astype(float))


def test_logistic_map_matches_sklearn_and_slogdet():
    """The Newton MAP is sklearn's L2 logistic regression (C = 1/λ, bias as a feature
    under the prior); the log Occam factor equals ``−½(slogdet ∇∇C − p log λ)``."""
    x, y = _digit_pair()
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    for lam in (0.05, 3.0):
        fit = logistic_map(x, y, l2=lam)
        ref = LogisticRegression(C=1 / lam, fit_intercept=False, tol=1e-12, max_iter=10_000)
        ref.fit(xb.numpy(), y.numpy())
        np.testing.assert_allclose(fit.weights.numpy(), ref.coef_[0], atol=2e-5)
        sign, logdet = torch.linalg.slogdet(fit.hessian)
        assert float(sign) == 1.0
        occam = -0.5 * (float(logdet) - xb.shape[1] * math.log(lam))
        assert fit.evidence.log_occam == pytest.approx(occam, rel=1e-10)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(xb @ fit.weights, y)
        assert fit.train_ce == pytest.approx(float(ce), rel=1e-12)
        assert fit.cost == pytest.approx(
            float(ce) * len(y) + lam / 2 * float(fit.weights @ fit.weights), rel=1e-12
        )


@pytest.mark.parametrize("bias", [False, True])
def test_laplace_evidence_against_quadrature(bias):
    """1- and 2-parameter logistic models: the exact evidence by adaptive quadrature.

    The Laplace error is small and shrinks as N grows (measured: 0.0099, 0.0054, 0.0031
    nats without bias; 0.033, 0.018, 0.0081 with bias, for N = 10, 40, 160).
    """
    lam, errors = 1.0, []
    for n in (10, 40, 160):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, 1))
        y = (rng.random(n) < 1 / (1 + np.exp(-1.5 * x[:, 0]))).astype(float)
        fit = logistic_map(torch.tensor(x), torch.tensor(y), l2=lam, bias=bias)
        xb = np.hstack([x, np.ones((n, 1))]) if bias else x
        w0 = fit.weights.numpy()
        half = 12 / math.sqrt(float(torch.linalg.eigvalsh(fit.hessian).min()))

        def integrand(*w, xb=xb, y=y, c0=fit.cost):
            z = xb @ np.array(w)
            c = np.sum(np.logaddexp(0, z) - y * z) + lam / 2 * np.dot(w, w)
            return math.exp(-(c - c0))

        if bias:
            val, _ = integrate.dblquad(
                lambda b, a: integrand(a, b),
                w0[0] - half,
                w0[0] + half,
                w0[1] - half,
                w0[1] + half,
                epsabs=0,
                epsrel=1e-10,
            )
        else:
            val, _ = integrate.quad(integrand, w0[0] - half, w0[0] + half, epsabs=0, epsrel=1e-12)
        exact = -fit.cost + math.log(val) + len(w0) / 2 * math.log(lam / (2 * math.pi))
        errors.append(abs(fit.evidence.log_evidence - exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01  # vs ~0.9 nats for a wrong ½ log 2π per parameter


def test_evidence_and_test_cross_entropy_share_their_optimum():
    """Seed 004's experiment in shape, digits 1 vs 8 (0 vs 1 is separable: its test
    cross-entropy keeps falling as λ → 0).  Mean over 3 half/half splits on a 13-point
    grid 1e-3 … 1e3: the λ of the best evidence and of the lowest test cross-entropy are
    the same grid point (measured; the full run is examples/evidence.py)."""
    x, y = _digit_pair()
    lams = np.logspace(3, -3, 13)
    rng = np.random.default_rng(0)
    ratio, test_ce = np.zeros(len(lams)), np.zeros(len(lams))
    for _ in range(3):
        perm = torch.as_tensor(rng.permutation(len(y)))
        tr, te = perm[: len(y) // 2], perm[len(y) // 2 :]
        init = None
        for i, lam in enumerate(lams):
            fit = logistic_map(x[tr], y[tr], l2=float(lam), init=init)
            init = fit.weights
            ratio[i] += fit.evidence.log_ratio
            test_ce[i] += fit.cross_entropy(x[te], y[te])
    assert ratio.argmin() == test_ce.argmin(), (lams[ratio.argmin()], lams[test_ce.argmin()])
    assert ratio.min() < 0  # the model beats the null model there


def _heavy_ball_lyapunov(h, f, *, lr, n, batch_size, momentum):
    """Exact stationary Cov(ω) of ``v' = mv − ε(Hω + ξ)``, ``ω' = ω + v'`` by scipy, with
    ``Cov ξ = F(N − B)/(NB)`` (a batch of B distinct samples; F has divisor N − 1)."""
    p = h.shape[0]
    eye = np.eye(p)
    a = np.block([[eye - lr * h, momentum * eye], [-lr * h, momentum * eye]])
    s = f * (n - batch_size) / (n * batch_size)
    q = lr**2 * np.block([[s, s], [s, s]])
    return solve_discrete_lyapunov(a, q)[:p, :p]


def test_heavy_ball_without_replacement_matches_simulation():
    """The exact model behind the noise scale: momentum SGD, batches of B distinct samples
    of a finite population, 3000 chains × 2000 steps (after 400) vs the Lyapunov solution."""
    h, _, xs = _linear_problem(p=3, n=32, seed=4)
    h, xs = h.numpy(), xs.numpy()
    n, p, lr, b, m = 32, 3, 0.1, 8, 0.5
    f = xs.T @ xs / (n - 1)
    rng = np.random.default_rng(2)
    chains, burn, steps = 3000, 400, 2000
    w, v = np.zeros((chains, p)), np.zeros((chains, p))
    acc = np.zeros((chains, p, p))
    for t in range(burn + steps):
        idx = np.argpartition(rng.random((chains, n)), b, axis=1)[:, :b]
        v = m * v - lr * (w @ h + xs[idx].mean(1))
        w = w + v
        if t >= burn:
            acc += w[:, :, None] * w[:, None, :]
    per_chain = torch.from_numpy(acc / steps)
    want = torch.from_numpy(_heavy_ball_lyapunov(h, f, lr=lr, n=n, batch_size=b, momentum=m))
    z, _, _ = _zscores(per_chain, want, torch.from_numpy(h))
    assert z.abs().max() < Z_MAX, z


def test_noise_scale_predicts_the_stationary_covariance():
    """At equal g = ε(N/B − 1)/(1 − m) momentum SGD settles to the same covariance, the
    solution of ``HΣ + ΣH = (g/N)F``, up to O(ε/(1 − m)) (exact Lyapunov of each run)."""
    h, _, xs = _linear_problem(p=4, n=200, seed=6)
    h, xs = h.numpy(), xs.numpy()
    n = 200
    f = xs.T @ xs / (n - 1)
    g = 0.5
    want = stationary_covariance(torch.tensor(h), torch.tensor(f), lr=g / n, discrete=False)
    want_loss = 0.5 * np.trace(h @ want.numpy())
    for b, m in [(1, 0.0), (10, 0.0), (10, 0.9), (50, 0.5)]:
        per_lr = []
        for big in (n, 4 * n):  # N ×4 (population replicas, same F) at the same g
            lr = g * (1 - m) / (big / b - 1)
            assert noise_scale(lr, dataset_size=big, batch_size=b, momentum=m) == pytest.approx(g)
            got = _heavy_ball_lyapunov(h, f, lr=lr, n=big, batch_size=b, momentum=m)
            err = 0.5 * np.trace(h @ got) * big / n / want_loss - 1
            per_lr.append(err / (lr / (1 - m)))
        # first order in ε/(1 − m): error/(ε/(1 − m)) is the same at both ε (measured within
        # 5%; zeroth order would give a ratio ≈ 1/4, second order ≈ 4)
        assert 0.9 < per_lr[0] / per_lr[1] < 1.1, (b, m, per_lr)
    # momentum doubles the noise: the η/B rule (g ≈ εN/B, no 1/(1 − m)) would be off 2×
    lr = 0.01
    full = _heavy_ball_lyapunov(h, f, lr=lr, n=n, batch_size=1, momentum=0.5)
    ratio = 0.5 * np.trace(h @ full) / want_loss
    assert ratio == pytest.approx(
        noise_scale(lr, dataset_size=n, batch_size=1, momentum=0.5) / g, rel=0.02
    )
    assert abs(ratio / (lr * n / g) - 1) > 0.9


def test_batch_size_for_noise_scale_inverts_noise_scale():
    for lr, n, b, m in [(0.1, 1000, 10, 0.0), (0.03, 5000, 128, 0.9)]:
        g = noise_scale(lr, dataset_size=n, batch_size=b, momentum=m)
        assert batch_size_for_noise_scale(g, lr=lr, dataset_size=n, momentum=m) == pytest.approx(b)
    # B_opt ∝ εN/(1 − m) at fixed g (large N/B)
    b1 = batch_size_for_noise_scale(1000.0, lr=0.01, dataset_size=10**6)
    b2 = batch_size_for_noise_scale(1000.0, lr=0.02, dataset_size=2 * 10**6, momentum=0.75)
    assert b2 / b1 == pytest.approx(16, rel=1e-3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: laplace_evidence(1.0, torch.ones(2), l2=0.0, num_samples=3, num_classes=2), "l2"),
        (
            lambda: laplace_evidence(1.0, -torch.ones(2), l2=1.0, num_samples=3, num_classes=2),
            "positive definite",
        ),
        (
            lambda: laplace_evidence(1.0, torch.ones(2, 3), l2=1.0, num_samples=3, num_classes=2),
            "square matrix",
        ),
        (
            lambda: laplace_evidence(1.0, torch.ones(2), l2=1.0, num_samples=0, num_classes=2),
            "num_samples",
        ),
        (
            lambda: laplace_evidence(1.0, torch.ones(2), l2=1.0, num_samples=3, num_classes=1),
            "num_classes",
        ),
        (lambda: logistic_map(torch.ones(3, 2), torch.ones(2), l2=1.0), "shape"),
        (lambda: logistic_map(torch.ones(2, 2), torch.tensor([0.0, 2.0]), l2=1.0), "binary"),
        (lambda: logistic_map(torch.ones(2, 2), torch.ones(2), l2=-1.0), "l2"),
        (lambda: logistic_map(torch.eye(2), torch.ones(2), l2=1e-8, max_iter=2), "converge"),
        (lambda: noise_scale(0.0, dataset_size=10, batch_size=1), "lr"),
        (lambda: noise_scale(0.1, dataset_size=0, batch_size=1), "dataset_size"),
        (lambda: noise_scale(0.1, dataset_size=10, batch_size=0), "batch_size"),
        (lambda: noise_scale(0.1, dataset_size=10, batch_size=11), "exceeds"),
        (lambda: noise_scale(0.1, dataset_size=10, batch_size=1, momentum=1.0), "momentum"),
        (lambda: batch_size_for_noise_scale(0.0, lr=0.1, dataset_size=10), "scale"),
    ],
)
def test_evidence_and_noise_scale_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(("lr", "steps", "batch_size"), [(0.05, 40, 1), (0.3, 17, 3), (0.9, 9, 2)])
def test_lyapunov_test_loss_is_the_exact_sgd_recursion(lr, steps, batch_size):
    """The eigenbasis closed form equals the matrix recursion of the moments (_sgd_exact)."""
    from perturb.experiments.baselines import lyapunov_test_loss

    q = _model(seed=4)
    got = float(lyapunov_test_loss(q, lr=lr, steps=steps, batch_size=batch_size))
    assert got == pytest.approx(_sgd_exact(q, lr, steps, batch_size), rel=1e-10)


def test_lyapunov_test_loss_tends_to_the_stationary_loss():
    from perturb.experiments.baselines import lyapunov_test_loss

    h, c, _ = _linear_problem(p=4, seed=3)
    g = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    q = QuadraticModel(torch.tensor(1.0, dtype=torch.float64), g, h, c)
    floor = 1.0 - 0.5 * float(g @ torch.linalg.solve(h, g))
    want = floor + float(stationary_excess_loss(h, c, lr=0.2, batch_size=2))
    got = float(lyapunov_test_loss(q, lr=0.2, steps=2000, batch_size=2))
    assert got == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------
# Seed 002: iterate averaging ↔ learning-rate schedules.
# ---------------------------------------------------------------------------

import sympy  # noqa: E402
from sympy import Rational as R  # noqa: E402

import perturb  # noqa: E402
from perturb.experiments.baselines import (  # noqa: E402
    averaging_gap_series,
    averaging_weights,
    equivalent_schedule,
    iterate_average_moments,
    iterate_average_test_loss,
    weighted_iterate_series,
)
from perturb.reference import (  # noqa: E402
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


def test_eta_over_b_leftovers_of_the_engines_series():
    """docs/baselines.md: at T = τ/η, B = η/n the series depends on η only through these."""
    tau, n, eta = sympy.symbols("tau n eta", positive=True)
    sched = perturb.Online()
    s = perturb.series(3, sched)
    t_sym, b_sym = sched.batches, sched.batch_size
    leftover = {}
    for term in s.terms:
        c = sympy.expand(
            (term.coefficient * eta**term.power).subs({t_sym: tau / eta, b_sym: eta / n})
        )
        rest = sympy.expand(c - c.subs(eta, 0))  # the part that does not collapse
        lead = sympy.expand(rest.coeff(eta, 1) * eta)
        if lead != 0:
            leftover[term.contraction.text] = sympy.factor(lead)
    assert leftover == {
        "G·H·G": -eta * tau / 2,
        "G·H·H·G": eta * tau**2,
        "G_a J_abc G_b G_c": eta * tau**2 / 4,
        "tr(C H H)": eta * tau * n / 2,
        "G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc": eta * tau * n / 2,
        "C_(a,b) J_abc G_c": eta * tau * n / 4,
    }


def test_mean_hessian_equals_materialized_hessian():
    # independent reference: torch.func.hessian of the mean loss, float64
    from perturb.experiments.baselines import mean_hessian
    from perturb.experiments.models import mlp
    from perturb.experiments.simulation import model_loss

    gen = torch.Generator().manual_seed(0)
    loss_fn, theta0 = model_loss(mlp((1, 2, 2), 3, hidden=(4,)).double())
    x = torch.randn(10, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    ref = torch.func.hessian(lambda t: loss_fn(t, x, y).mean())(theta0)
    for chunk in (1, 7, 1000):
        got = mean_hessian(loss_fn, theta0, x, y, chunk=chunk)
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="chunk must be an integer ≥ 1"):
        mean_hessian(loss_fn, theta0, x, y, chunk=0)
    with pytest.raises(ValueError, match="1-D parameter vector"):
        mean_hessian(loss_fn, theta0[None], x, y)


def test_per_sample_derivatives_equal_an_autograd_loop():
    # independent reference: one torch.autograd.grad per sample, float64
    from perturb.experiments.baselines import per_sample_derivatives
    from perturb.experiments.models import mlp
    from perturb.experiments.simulation import model_loss

    gen = torch.Generator().manual_seed(1)
    loss_fn, theta0 = model_loss(mlp((1, 2, 2), 3, hidden=(4,)).double())
    x = torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    got = per_sample_derivatives(loss_fn, theta0, x, y)
    for i in range(6):
        t = theta0.clone().requires_grad_(True)
        value = loss_fn(t, x[i : i + 1], y[i : i + 1])[0]
        (g,) = torch.autograd.grad(value, t)
        assert abs(float(got[0][i]) - value.detach().item()) < 1e-14
        assert torch.allclose(got[1][i], g, rtol=0, atol=1e-14)
