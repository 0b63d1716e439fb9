"""The paper's landscapes: their statistics at θ_0 and their input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perturb.experiments.landscapes import (
    archimedes,
    gaussian_fit,
    mean_estimation,
    symmetric_unit_values,
)
from perturb.reference import population_statistics


def _stats(pop, theta0, order=3):
    return population_statistics(pop.derivatives(theta0, order))


@pytest.mark.parametrize("rows", [2, 3, 5, 8, 11])
def test_symmetric_unit_values_have_mean_zero_and_unit_variance(rows):
    x = symmetric_unit_values(rows)
    assert x.shape == (rows,)
    assert torch.allclose(x, -x.flip(0), atol=1e-15)  # symmetric
    assert abs(float(x.mean())) < 1e-15
    assert abs(float((x**2).mean()) - 1) < 1e-14
    assert bool((x[1:] > x[:-1]).all())


@pytest.mark.parametrize("rows", [2, 6])
def test_archimedes_statistics_at_the_origin(rows):
    """G = 0, H = diag(2, 1, 0), C = ½[[1, −1], [−1, 1]] ⊕ 0, J_uvz = 1, J_uuz = J_vvz = 0."""
    pop, theta0 = archimedes(rows=rows)
    assert theta0.tolist() == [0.0, 0.0, 0.0]
    s = _stats(pop, theta0)
    assert torch.allclose(s["G"], torch.zeros(3, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(s["H"], torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)))
    c = torch.zeros(3, 3, dtype=torch.float64)
    c[:2, :2] = 0.5 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert torch.allclose(s["C"], c, atol=1e-14)
    j = s["J"]
    for idx in [(0, 1, 2), (1, 0, 2), (2, 0, 1), (0, 2, 1)]:
        assert abs(float(j[idx]) - 1) < 1e-14
    assert abs(float(j[0, 0, 2])) < 1e-14 and abs(float(j[1, 1, 2])) < 1e-14
    # the only J entries with an index z are the uvz ones
    assert float(j[:, :, 2].abs().sum()) == pytest.approx(2.0)


def test_archimedes_valley_and_its_symmetry():
    """l = ½H vanishes on u = v = 0 for every z; shifting z and rotating (u, v) is a symmetry."""
    pop, _ = archimedes()
    gen = torch.Generator().manual_seed(0)

    def test_loss(theta):
        return float(torch.stack([pop.loss_fn(theta, x) for x in pop.data]).mean())

    for z in torch.linspace(-7, 7, 9, dtype=torch.float64):
        assert test_loss(torch.tensor([0.0, 0.0, float(z)], dtype=torch.float64)) == 0.0
    for _ in range(5):
        theta = torch.randn(3, generator=gen, dtype=torch.float64)
        a = float(torch.rand((), generator=gen, dtype=torch.float64)) * 6
        rot = torch.tensor(
            [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64
        )
        moved = torch.cat([rot @ theta[:2], theta[2:] + a])
        for x in pop.data:
            assert float(pop.loss_fn(moved, x)) == pytest.approx(float(pop.loss_fn(theta, x)))


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("rows", [2, 5])
def test_mean_estimation_has_fixed_noise_and_variable_curvature(dim, rows):
    for h in (0.01, 1.0, 30.0):
        pop, theta0 = mean_estimation(curvature=h, noise=1.5, dim=dim, rows=rows)
        assert len(pop) == rows * dim
        s = _stats(pop, theta0, order=2)
        eye = torch.eye(dim, dtype=torch.float64)
        assert torch.allclose(s["G"], torch.zeros(dim, dtype=torch.float64), atol=1e-14)
        assert torch.allclose(s["H"], h * eye, atol=1e-14)
        assert torch.allclose(s["C"], 1.5**2 * eye, atol=1e-13)


def test_gaussian_fit_statistics():
    """At the truth h = 0: G = 0, H = ½; C = Var(x²)/4 e^{−2h}; S = −κ₃(x²)/8 e^{−3h} ≠ 0."""
    pop, theta0 = gaussian_fit(rows=8, h0=0.0)
    x2 = pop.data[:, 0] ** 2
    s = _stats(pop, theta0)
    assert abs(float(s["G"][0])) < 1e-15
    assert float(s["H"][0, 0]) == pytest.approx(0.5, abs=1e-15)
    for h0 in (0.0, 0.5, -0.3):
        pop, theta0 = gaussian_fit(rows=8, h0=h0)
        s = _stats(pop, theta0)
        var = float(((x2 - x2.mean()) ** 2).mean())
        k3 = float(((x2 - x2.mean()) ** 3).mean())
        assert float(s["C"][0, 0]) == pytest.approx(var / 4 * math.exp(-2 * h0), rel=1e-12)
        assert float(s["S"][0, 0, 0]) == pytest.approx(-k3 / 8 * math.exp(-3 * h0), rel=1e-12)
        assert abs(float(s["S"][0, 0, 0])) > 1e-3  # non-Gaussian gradient noise
    x = pop.data[:, 0].numpy()
    assert abs(np.mean(x**4) - 3) > 1e-2  # non-zero fourth cumulant of x
    assert theta0.tolist() == [-0.3]
    assert gaussian_fit()[1].tolist() == [0.5]


def test_bad_inputs():
    with pytest.raises(ValueError, match="rows must be an integer ≥ 2"):
        symmetric_unit_values(1)
    with pytest.raises(TypeError, match="rows must be an integer ≥ 2"):
        archimedes(rows=2.0)
    with pytest.raises(ValueError, match="rows must be an integer ≥ 2"):
        archimedes(rows=0)
    with pytest.raises(ValueError, match="curvature must be a positive finite number"):
        mean_estimation(curvature=0.0)
    with pytest.raises(ValueError, match="curvature must be a positive finite number"):
        mean_estimation(curvature=-1.0)
    with pytest.raises(TypeError, match="curvature must be a real number"):
        mean_estimation(curvature="flat")
    with pytest.raises(ValueError, match="noise must be a positive finite number"):
        mean_estimation(curvature=1.0, noise=math.nan)
    with pytest.raises(ValueError, match="dim must be an integer ≥ 1"):
        mean_estimation(curvature=1.0, dim=0)
    with pytest.raises(TypeError, match="dim must be an integer ≥ 1"):
        mean_estimation(curvature=1.0, dim=True)
    with pytest.raises(ValueError, match="rows must be an integer ≥ 3"):
        gaussian_fit(rows=2)
    with pytest.raises(ValueError, match="h0 must be finite"):
        gaussian_fit(h0=math.inf)
    with pytest.raises(TypeError, match="h0 must be a real number"):
        gaussian_fit(h0="zero")
