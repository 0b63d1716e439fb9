"""The noise a subspace leaves out (perturb.numeric.curve.outside_noise and
perturb.numeric.path_noise.OutsideNoise), against materialized tensors and an exact
full-space second-moment recursion that shares no code with them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, vmap

from perturb.numeric.adapters import objective
from perturb.numeric.curve import outside_noise
from perturb.numeric.path_noise import NoiseState, OutsideNoise, segment_from


def _quadratic(seed: int, p: int = 12, n: int = 30):
    """``l_i(θ) = ½θᵀHθ + g_iᵀθ``: a dense ``H`` (spectrum in [0.05, 1]) and correlated,
    non-isotropic per-sample gradients."""
    rng = np.random.default_rng(seed)
    vec = np.linalg.qr(rng.normal(size=(p, p)))[0]
    lam = np.sort(rng.uniform(0.05, 1.0, size=p))[::-1]
    lam[0] = 1.0
    h = vec @ np.diag(lam) @ vec.T
    mix = rng.normal(size=(p, p)) @ np.diag(rng.uniform(0.2, 2.0, size=p))
    gs = rng.normal(size=(n, p)) @ mix.T
    return h, gs - gs.mean(0), vec


@pytest.mark.parametrize(("seed", "batch_size"), [(0, 1), (1, 4)])
def test_the_bounds_hold_the_exact_loss_on_a_quadratic_with_an_invariant_basis(seed, batch_size):
    """With ``Q`` spanning eigenvectors of ``H`` (and no per-sample Hessians), the exact
    noise loss ``½ tr(H M_t)``, ``M ← KMK + (η²/B)C``, is the in-subspace recursion plus a
    part between :class:`OutsideNoise`'s bounds, equal to both after one step, at every
    ``t`` to ``10⁴`` (``η‖H‖ = 0.5`` and ``1.5``: the bounds separate)."""
    h, gs, vec = _quadratic(seed)
    p, k = h.shape[0], 4
    c = gs.T @ gs / len(gs)
    q = vec[:, :k]
    rest = c - q @ q.T @ c @ q @ q.T
    basis = torch.tensor(q)
    seg = segment_from(torch.zeros(p), basis, torch.tensor(q.T @ h @ q),
                       torch.tensor(gs @ q), None, None)  # fmt: skip
    seg = dataclasses.replace(
        seg, outside_trace=float(np.trace(rest)), outside_curvature=float(np.trace(h @ rest))
    )
    checked = {int(v) for v in np.geomspace(1, 10_000, 60)}
    for lr in (0.5, 1.5):
        inside = NoiseState.start(seg, lr=lr, batch_sizes=[batch_size])
        out = OutsideNoise.start(lr=lr, batch_sizes=[batch_size])
        kk = np.eye(p) - lr * h
        m = np.zeros((p, p))
        for t in range(1, 10_001):
            m = kk @ m @ kk + lr**2 / batch_size * c
            inside.step(seg, np.zeros(k))
            out.step(seg)
            if t not in checked:
                continue
            exact = 0.5 * np.trace(h @ m)
            value, estimate = out.loss(seg)
            noise = inside.loss(seg, np.zeros(k), np.zeros(k))[0]
            slack = 1e-12 * exact
            low, high = value[0] - estimate[0] - slack, value[0] + estimate[0] + slack
            assert low <= exact - noise[0] <= high, (t, lr)
            if t == 1:
                np.testing.assert_allclose(exact - noise[0], value[0], rtol=1e-12)
                assert estimate[0] <= 1e-12 * value[0]
        assert estimate[0] > 0.05 * value[0]  # the bounds did separate


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_the_estimator_against_materialized_tensors_on_a_network():
    """``a = tr C − tr QᵀCQ`` and ``b = tr(H(C − ΠCΠ))`` from materialized per-sample
    gradients and Hessian (float64) on a small tanh network with real-valued random data
    and a random basis.  The probes' mean is within 4 exact standard errors (the
    Rademacher quadratic form's variance, ``(2/n²) Σ_{i≠j} W_ij²`` a probe): a false
    failure has probability below 1e-4 a quantity under a normal approximation."""
    torch.manual_seed(0)
    net = _Net().double()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    obj = objective(net, (x, y))
    theta = obj.theta0
    per = vmap(grad(lambda t, xi, yi: obj.single(t, xi, yi)), in_dims=(None, 0, 0))(theta, x, y)
    zeta = (per - per.mean(0)).numpy()
    h = hessian(lambda t: obj.batch(t, x, y).mean())(theta).numpy()
    p, n = zeta.shape[1], zeta.shape[0]
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(p, 5)))[0]
    proj = q @ q.T
    c = zeta.T @ zeta / n
    a = np.trace(c) - np.trace(q.T @ c @ q)
    b = np.trace(h @ (c - proj @ c @ proj))
    probes = 400
    ((a_hat, b_hat, se),) = outside_noise(obj, [torch.tensor(q)], probes=probes, seed=3, chunk=16)
    r, inside = zeta @ (np.eye(p) - proj), zeta @ proj
    wa = r @ r.T
    wb = r @ h @ r.T + inside @ h @ r.T + r @ h @ inside.T
    for w, est, exact in ((wa, a_hat, a), (wb, b_hat, b)):
        off = w - np.diag(np.diag(w))
        sd = np.sqrt(2 * (off**2).sum() / n**2 / probes)
        assert abs(est - exact) <= 4 * sd, (est, exact, sd)
        assert sd < 0.2 * abs(exact)  # the check is sharp
    assert 0.5 * se < np.sqrt(2 * ((wb - np.diag(np.diag(wb))) ** 2).sum() / n**2 / probes) < 2 * se


def test_a_whole_basis_leaves_nothing_out():
    h, gs, vec = _quadratic(2, p=6, n=10)
    obj = objective(
        lambda t, g: 0.5 * t @ torch.tensor(h) @ t + g @ t, torch.tensor(gs),
        torch.zeros(6, dtype=torch.float64),
    )  # fmt: skip
    ((a, b, se),) = outside_noise(obj, [torch.tensor(vec)], probes=4, seed=0, chunk=5)
    assert abs(a) < 1e-12 and abs(b) < 1e-12 and se < 1e-12


def test_a_small_subspace_of_a_network_against_the_whole_space():
    """A tanh network on real digits (P = 67): the curve at rank 8 against the curve in
    the whole space (rank 67, nothing outside), to ηT = 1.  Carrying the outside noise
    at least halves rank 8's error at every recorded step ``t ≥ 1`` (its bounds are
    tight there), and the estimate covers rank 8's error at every recorded step, both B."""
    from sklearn.datasets import load_digits

    from perturb.numeric.curve import CurveSettings, learning_curve

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data[:200] / 16, dtype=torch.float64)[:, ::4]
    y = torch.tensor(digits.target[:200]) % 4
    net = torch.nn.Sequential(torch.nn.Linear(16, 3), torch.nn.Tanh(), torch.nn.Linear(3, 4))
    net = net.double()
    steps, kw = [0, 1, 3, 10], {"lr": [0.1], "batch_sizes": [1, 8]}
    curves = {
        name: learning_curve(net, (x, y), steps=steps, settings=settings, **kw)
        for name, settings in {
            "whole": CurveSettings(rank=67, higher_rank=8, per_decade=2, sde=False),
            "k8": CurveSettings(rank=8, higher_rank=8, per_decade=2, sde=False),
            "k8 inside only": CurveSettings(
                rank=8, higher_rank=8, per_decade=2, sde=False, outside_probes=0
            ),
        }.items()
    }
    exact = curves["whole"].curve[0]
    error = np.abs(curves["k8"].curve[0] - exact)
    inside_only = np.abs(curves["k8 inside only"].curve[0] - exact)
    assert np.all(curves["k8"].outside[0, :, 1:] > 0)
    assert np.all(error[:, 1:] < 0.5 * inside_only[:, 1:])
    assert np.all(error <= curves["k8"].error_estimate[0])


@pytest.mark.parametrize(("kwargs", "match"), [({"probes": 0}, "probes"), ({"chunk": 0}, "chunk")])
def test_outside_noise_errors(kwargs, match):
    obj = objective(lambda t, x: (t * x).sum(), torch.ones(3, 2, dtype=torch.float64),
                    torch.zeros(2, dtype=torch.float64))  # fmt: skip
    args = {"probes": 2, "seed": 0, "chunk": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        outside_noise(obj, [torch.eye(2, dtype=torch.float64)], **args)
