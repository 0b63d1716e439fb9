"""The paper's test landscapes as ready :class:`~perturb.numeric.prediction.Population` objects.

Every landscape here is a *finite* population of rows with uniform weights, so the
engine's expectations (:func:`perturb.predict`) are exact averages over the rows, and a
simulation that draws rows uniformly with replacement samples exactly the distribution
the prediction is about.  Where the paper draws ``x ~ N(0, 1)`` we use ``rows``
symmetric values of mean exactly ``0`` and variance exactly ``1``:

* ``rows = 2``: ``x ∈ {−1, +1}``;
* ``rows = n``: the normal quantiles ``Φ^{-1}((i + ½)/n)``, ``i = 0 … n−1``, rescaled
  to unit (population) variance — a Gauss–Hermite-like symmetric grid with uniform
  weights.

The statistics that matter at leading order (``G``, ``H``, ``J``, ``C``) depend only on
the first two moments of ``x``, so they are those of the paper's Gaussian ``x``; higher
cumulants of ``x`` (non-zero for any finite grid) only enter at higher orders.

Functions return ``(population, theta0)`` with ``theta0`` a float64 1-D tensor.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import norm

from perturb.checks import check_int, check_positive
from perturb.numeric.prediction import Population

__all__ = ["archimedes", "gaussian_fit", "mean_estimation", "symmetric_unit_values"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return check_int(name, value, minimum=minimum)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def symmetric_unit_values(rows: int) -> torch.Tensor:
    """``rows`` symmetric values with mean exactly 0 and population variance exactly 1.

    ``rows = 2`` gives ``±1``; otherwise the normal quantiles ``Φ^{-1}((i + ½)/n)``
    rescaled so that ``(1/n) Σ x_i² = 1`` (uniform weights, a stand-in for ``N(0, 1)``).

    Args:
        rows: the number of values, at least 2.

    Returns:
        A float64 tensor of shape ``(rows,)``, increasing.

    Example:
        >>> symmetric_unit_values(2).tolist()
        [-1.0, 1.0]
        >>> x = symmetric_unit_values(5)
        >>> round(float(x.mean()), 12), round(float((x**2).mean()), 12)
        (0.0, 1.0)
    """
    rows = _check_int("rows", rows, 2)
    q = torch.tensor(norm.ppf((torch.arange(rows, dtype=torch.float64) + 0.5) / rows))
    q = (q - q.flip(0)) / 2  # exactly antisymmetric: mean exactly 0
    return q / torch.sqrt((q**2).mean())


def archimedes(*, rows: int = 2) -> tuple[Population, torch.Tensor]:
    """ARCHIMEDES (section 3.1.2): a valley of minima along which SGD drifts.

    Weights ``θ = (u, v, z)``, data ``x`` of mean 0 and variance 1, and

        l_x(θ) = ½ H(θ) + x S(θ),
        H(θ) = u² + v² + (cos z · u + sin z · v)²,
        S(θ) = cos(z − π/4) u + sin(z − π/4) v.

    The test loss ``l = ½H`` vanishes on the valley ``u = v = 0`` (every ``z``), so the
    test gradient along the valley is zero; still, SGD from ``θ = 0`` moves along ``z``
    at ``+η²/6`` per step to leading order (Corollary 1, see
    :func:`perturb.experiments.corollaries.drift_velocity`).  At ``θ = 0``: ``G = 0``,
    ``H = diag(2, 1, 0)``, ``C = ½[[1, −1, 0], [−1, 1, 0], [0, 0, 0]]``, and the
    third derivative ``J_uvz = J_vuz = … = 1`` couples them.  The landscape is
    invariant under ``z → z + a`` together with a rotation of ``(u, v)`` by ``a``, so
    the drift is the same all along the valley.

    Args:
        rows: number of population values of ``x``: 2 gives ``x ∈ {−1, +1}`` (the
            default), more give :func:`symmetric_unit_values` (closer to ``N(0, 1)``).

    Returns:
        ``(population, theta0)``; population rows have shape ``(1,)`` (the value of
        ``x``), ``theta0 = (0, 0, 0)``.

    Example:
        >>> pop, theta0 = archimedes()
        >>> pop.data.flatten().tolist(), theta0.tolist()
        ([-1.0, 1.0], [0.0, 0.0, 0.0])
        >>> d = pop.derivatives(theta0, 2)
        >>> d[2].mean(0).diagonal().tolist()
        [2.0, 1.0, 0.0]
    """
    xs = symmetric_unit_values(rows).reshape(-1, 1)
    return Population(_archimedes_loss, xs), torch.zeros(3, dtype=torch.float64)


def _archimedes_loss(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    u, v, z = theta[0], theta[1], theta[2]
    proj = torch.cos(z) * u + torch.sin(z) * v
    hess = u**2 + v**2 + proj**2
    skew = torch.cos(z - math.pi / 4) * u + torch.sin(z - math.pi / 4) * v
    return 0.5 * hess + x[0] * skew


def mean_estimation(
    *, curvature: float, noise: float = 1.0, dim: int = 1, rows: int = 2
) -> tuple[Population, torch.Tensor]:
    """MEAN ESTIMATION: fixed gradient noise, variable curvature (Figure 2, right).

    A covector-perturbed quadratic

        l_x(θ) = ½ h |θ|² − x·θ,   E x = 0,   Cov x = noise² · I,

    so ``G = 0`` at the truth ``θ_0 = 0``, ``H = h·I`` and ``C = noise²·I`` for every
    ``θ``: only the curvature ``h`` varies.  Full-batch GD for ``T`` steps on ``N``
    points reaches ``θ_T = (1 − (1 − ηh)^T) x̄ / h`` (``x̄`` the training mean), so the
    expected test-loss increase is ``noise² (1 − (1 − ηh)^T)² / (2Nh)`` per dimension:
    ``≈ η²T²h·noise²/(2N)`` for flat minima and ``≈ noise²/(2Nh)`` for sharp ones, both
    smaller than for ``h ≈ 1/(ηT)``.

    The paper's appendix defining MEAN ESTIMATION is missing from the seed; this
    landscape is our reading of it: it has fixed ``C``, a range of ``H`` and is
    initialized at the truth, and it reproduces the claim of Figure 2 (right) that both
    very flat and very sharp minima overfit less than medium ones.

    Population: for ``dim = 1`` the ``rows`` values ``noise ·``
    :func:`symmetric_unit_values` (``rows = 2``: ``x = ±noise``); for ``dim > 1`` the
    "cross" ``{noise·√dim·q·e_j}`` over those values ``q`` and the unit vectors ``e_j``
    (``rows·dim`` points, covariance exactly ``noise²·I``).

    Args:
        curvature: ``h > 0``.
        noise: standard deviation of each coordinate of ``x``, ``> 0``.
        dim: dimension of ``θ``.
        rows: values per axis, at least 2.

    Returns:
        ``(population, theta0)`` with ``theta0 = 0`` (the truth).

    Example:
        >>> pop, theta0 = mean_estimation(curvature=0.5, noise=2.0)
        >>> pop.data.flatten().tolist(), theta0.tolist()
        ([-2.0, 2.0], [0.0])
        >>> d = pop.derivatives(theta0, 2)
        >>> float(d[2].mean()), float((d[1] ** 2).mean())  # H = h, C = noise²
        (0.5, 4.0)
    """
    h = check_positive("curvature", _real("curvature", curvature))
    sigma = check_positive("noise", _real("noise", noise))
    dim = _check_int("dim", dim, 1)
    q = symmetric_unit_values(rows)
    eye = torch.eye(dim, dtype=torch.float64)
    xs = (sigma * math.sqrt(dim)) * (q[:, None, None] * eye[None]).reshape(-1, dim)

    def loss_fn(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * h * (theta @ theta) - x @ theta

    return Population(loss_fn, xs), torch.zeros(dim, dtype=torch.float64)


def gaussian_fit(*, rows: int = 8, h0: float = 0.5) -> tuple[Population, torch.Tensor]:
    """Fitting ``N(0, σ²)`` by SGD with ``h = log σ²`` (section 3.4): non-Gaussian noise.

    Data ``x`` of mean 0 and variance 1 (:func:`symmetric_unit_values`), negative
    log-likelihood up to a constant

        l_x(h) = ½ (h + x² e^{−h}),   ∇l_x(h) = ½ (1 − x² e^{−h}),   ∇∇l_x = ½ x² e^{−h}.

    The minimum of ``l`` is ``h = 0`` (``σ² = 1``), where ``H = ½`` equals the
    Fisher information.  The gradient noise is an affine image of ``x²`` (a chi-squared
    for Gaussian ``x``): ``C = e^{−2h} Var(x²)/4`` and the third cumulant
    ``S = −e^{−3h} κ₃(x²)/8`` is non-zero, so SGD differs from SDE at ``η³``
    (:func:`perturb.experiments.corollaries.non_gaussian_part`).

    Args:
        rows: number of population values, at least 3 (``x = ±1`` would make ``x² = 1``
            and the noise vanish).
        h0: the initial ``h`` (``0.5`` by default, i.e. ``σ² = e^{0.5}``).

    Returns:
        ``(population, theta0)`` with ``theta0 = (h0,)``.

    Example:
        >>> pop, theta0 = gaussian_fit(rows=4, h0=0.0)
        >>> d = pop.derivatives(theta0, 2)
        >>> round(float(d[1].mean()), 12), round(float(d[2].mean()), 12)  # G = 0, H = 1/2
        (0.0, 0.5)
    """
    rows = _check_int("rows", rows, 3)
    start = _real("h0", h0)
    if not math.isfinite(start):
        raise ValueError(f"h0 must be finite, got {h0!r}")
    xs = symmetric_unit_values(rows).reshape(-1, 1)
    return Population(_gaussian_fit_loss, xs), torch.tensor([start], dtype=torch.float64)


def _gaussian_fit_loss(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = theta[0]
    return 0.5 * (h + x[0] ** 2 * torch.exp(-h))
