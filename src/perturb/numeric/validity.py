r"""How far a prediction from statistics at ``θ_0`` can be trusted, before any SGD is run.

Three estimates, each from the theory and the measured statistics, none fitted to runs:

**Truncation.**  A series ``Σ_d c_d`` cut after ``c_D`` errs by the terms left out.
Where the next term was measured, the error of the sum through ``d < D`` is estimated
by what follows, ``e_d = |c_{d+1}| + e_{d+1}``; the error of the last sum, whose next
term is unknown, by the geometric continuation of the last two,
``e_D = |c_D| · min(1, |c_D / c_{D−1}|)`` (a series whose terms stop shrinking gets an
estimate as large as its last term).  The same rule serves the un-resummed series (by
powers of ``η``) and the re-summed one (by number of edges), to which the Krylov
subspace's ``k`` vs ``k/2`` difference is added (:func:`truncation_estimates`).

**Displacement.**  Every predictor freezes the statistics at ``θ_0``; they fail once
the weights move over the distance in which ``H`` changes by itself, ``ρ = ‖H‖/‖J‖``
(:func:`curvature_radius`, in the Krylov subspace).  The quadratic model gives the
root-mean-square displacement in closed form for every schedule
(:func:`rms_displacement`): per eigen-direction ``a`` of ``H`` (``x_a = 1 − ηh_a``) the
mean moves by ``−G_a (1 − x_a^T)/h_a``, and the batch noise adds a variance that depends
on which steps share points (online: none; epochs: the same batch in every epoch, or on
average ``B²/N`` points between epochs when reshuffled; GD: every step).

**Mean-square instability.**  Where the per-sample Hessians fluctuate, SGD's second
moment can grow although ``|1 − ηh| < 1`` for every ``h`` (GD stable):
:func:`perturb.numeric.stability.mean_square_growth` on the projected Hessians
``QᵀH_iQ`` bounds that growth from below; :func:`mean_square_excess` is its excess over
the mean dynamics' own growth, in e-folds of the root-mean-square deviation.

**Hessian ladder.**  A step multiplies the deviation by ``I − ηH_b``, not ``I − ηH``: the
per-sample Hessians ``H_i = H + A_i`` add ``(η²/B) E_i[A_i S A_i]`` to its second moment
(``S = E[δδᵀ]``, fed by the gradient noise, the mean path and the mixed cumulant
``⟨∇l, ∇∇l⟩``), a ladder of Hessian cumulants with four edges and more that no
truncated predictor holds.  :func:`hessian_ladder` is the test loss it adds on the
quadratic model with per-sample Hessians ("resummed 3" plus it is exact on every
quadratic population); the validity estimate adds its size to every other predictor's.

Example:
    >>> import numpy as np
    >>> truncation_estimates(np.array([[1.0, -0.1, 0.01]]))  # the next term ≈ 0.001
    array([[0.111, 0.011, 0.001]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from perturb.checks import check_int
from perturb.numeric.krylov import KrylovSubspace
from perturb.numeric.predictions import growth
from perturb.numeric.stability import mean_square_growth
from perturb.symbolic.schedules import Schedule

__all__ = [
    "MEAN_SQUARE_EXCESS",
    "TRUST_FRACTION",
    "curvature_radius",
    "displacement_ratio",
    "hessian_ladder",
    "ladder_estimate",
    "ladder_loss",
    "loss_spread",
    "mean_square_excess",
    "overshoot",
    "rms_displacement",
    "truncation_estimates",
    "with_ladder",
]

TRUST_FRACTION = 0.1
"""A prediction is trusted when its error estimate is at most this fraction of the change
it predicts, ``|value − l(θ_0)|`` (and neither displacement nor instability rules it out)."""
MEAN_SQUARE_EXCESS = 1.0
"""Mean-square instability is flagged when the second moment grows by more than this many
e-folds (of the root-mean-square deviation) beyond the mean dynamics over the run."""


def truncation_estimates(
    contributions: np.ndarray,
    extra: np.ndarray | None = None,
    *,
    ratio: np.ndarray | float | None = None,
) -> np.ndarray:
    """Error estimates of the partial sums ``Σ_{d' ≤ d} c_{d'}`` for every ``d``.

    Args:
        contributions: ``c_d`` along the last axis, shape ``(..., D+1)``.
        extra: errors to add to each partial sum (e.g. the Krylov ``k`` vs ``k/2``
            differences of the cumulative re-summed values), same shape.
        ratio: a floor under the geometric ratio ``|c_D/c_{D−1}|`` that continues the
            last term, shape ``(...)``: each further edge on a path that moves by ``d``
            brings one more ``J`` and a factor ``≈ d/ρ`` (:func:`displacement_ratio`),
            which the two last terms cannot show where the weights move more than they
            did over the terms measured.

    Returns:
        Shape ``(..., D+1)``; ``inf`` for a lone ``c_0`` (nothing to continue from), for
        every sum that holds a non-finite contribution and for every sum before it.

    Example:
        >>> import numpy as np
        >>> truncation_estimates(np.array([[2.0, 0.5, 0.5]]))  # terms stop shrinking
        array([[1.5, 1. , 0.5]])
    """
    c = np.abs(np.asarray(contributions, dtype=float))
    if c.shape[-1] < 1:
        raise ValueError(f"contributions need at least one order, got shape {c.shape}")
    out = np.empty_like(c)
    if c.shape[-1] == 1:
        out[...] = np.inf
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            last = np.where(c[..., -2] > 0, c[..., -1] / c[..., -2], 1.0)
        if ratio is not None:
            last = np.fmax(last, np.asarray(ratio, dtype=float))
        out[..., -1] = c[..., -1] * np.minimum(1.0, last)
        for d in range(c.shape[-1] - 2, -1, -1):
            out[..., d] = c[..., d + 1] + out[..., d + 1]
    broken = np.cumsum(~np.isfinite(c), axis=-1) > 0  # a sum holding a non-finite term
    out[~np.isfinite(out) | broken] = np.inf
    if extra is not None:
        out = out + np.abs(np.asarray(extra, dtype=float))
    return out


def displacement_ratio(displacement: np.ndarray, radius: float) -> np.ndarray:
    """``d/ρ``: the root-mean-square displacement against the distance over which ``H``
    changes by its own size, the ratio of successive terms of the expansion in ``J``
    along the path (``0`` where ``ρ`` is unknown or infinite).

    Example:
        >>> displacement_ratio(np.array([0.1, 2.0]), 0.5)
        array([0.2, 4. ])
    """
    d = np.asarray(displacement, dtype=float)
    if not np.isfinite(radius) or radius <= 0:
        return np.zeros_like(d)
    return d / radius


def curvature_radius(subspace: KrylovSubspace, *, iterations: int = 50) -> float:
    """``ρ = ‖H‖ / ‖J‖``: the distance over which ``H`` changes by its own size.

    ``‖H‖`` is the largest Ritz value in absolute value; ``‖J‖ = max_{|u|=1} |J[u,u,u]|``
    over the subspace the third derivative was projected on (a lower bound of the full
    norm, so ``ρ`` is an upper bound), by the higher-order power iteration
    ``u ← J[u,u,·]/‖J[u,u,·]‖`` from the extreme Ritz vectors and four seeded random
    vectors, the best of them kept.

    Returns:
        ``inf`` when the subspace holds no projected ``J`` (build it for order 3).

    Example:
        >>> import torch, perturb
        >>> from perturb.numeric.krylov import krylov_subspace
        >>> pop = perturb.Population(lambda p, x: (p ** 2).sum() / 2 + (p ** 3).sum() / 6 + x @ p,
        ...                          torch.eye(2, dtype=torch.float64))
        >>> sub = krylov_subspace(pop, None, torch.zeros(2, dtype=torch.float64), rank=2, order=3)
        >>> round(curvature_radius(sub), 6)  # H = I, J = diag 1: ρ = 1
        1.0
    """
    if 3 not in subspace.means:
        return float("inf")
    j = subspace.means[3]
    m = j.shape[0]
    h = subspace.hessian[:m, :m]
    evecs = torch.linalg.eigh((h + h.T) / 2)[1]
    h_norm = float(torch.abs(subspace.ritz_values()).max())
    gen = torch.Generator().manual_seed(0)
    starts = [evecs[:, -1], evecs[:, 0]]
    starts += [torch.randn(m, generator=gen, dtype=j.dtype) for _ in range(4)]
    best = 0.0
    for u in starts:
        u = u / torch.linalg.vector_norm(u)
        for _ in range(iterations):
            v = torch.einsum("abc,a,b->c", j, u, u)
            norm = float(torch.linalg.vector_norm(v))
            if norm == 0.0:
                break
            u = v / norm
        best = max(best, abs(float(torch.einsum("abc,a,b,c->", j, u, u, u))))
    return h_norm / best if best > 0 else float("inf")


def rms_displacement(
    hess: torch.Tensor,
    grad: torch.Tensor,
    cov: torch.Tensor,
    *,
    lr: Sequence[float],
    schedule: Schedule,
) -> np.ndarray:
    r"""``sqrt(E‖θ_T − θ_0‖²)`` on the quadratic model, per learning rate, for any schedule.

    On the quadratic model (Hessian ``H`` everywhere, per-sample gradients ``G + ζ_i``
    with ``Cov ζ_i = C``, the training set drawn iid), every schedule is ``E`` epochs of
    ``M`` batches of ``B`` (online: ``E = 1``, ``M = T``; GD: ``M = 1``, ``B = N``,
    ``E = T``).  Along an eigen-direction ``a`` of ``H`` (``x_a = 1 − ηh_a``) step ``t``
    enters ``θ_T`` with the weight ``w_t = x_a^{T−1−t}``, so the mean moves by
    ``−η G_a Σ_t w_t = −G_a (1 − x_a^T)/h_a``, and the batch noises ``ξ_t`` have
    ``Cov(ξ_s, ξ_t) = |b_s ∩ b_t| C/B²``.  In the same order every epoch the batches
    repeat (``|b_s ∩ b_t| = B`` for ``s ≡ t mod M``)::

        Var_a = (η²/B) C_aa Σ_j (Σ_e w_{eM+j})²;

    reshuffled, two steps of one epoch share nothing and two steps of different epochs
    share ``B²/N`` points on average, so with ``W_e = Σ_{t in epoch e} w_t``::

        Var_a = η² C_aa [ Σ_t w_t² / B + ((Σ_e W_e)² − Σ_e W_e²) / N ].

    Online (``E = 1``) both give ``(η²/B) C_aa (1 − x_a^{2T})/(1 − x_a²)`` and GD both
    ``(1 − x_a^T)²/h_a² · C_aa/N``.

    Args:
        hess: ``H`` (``(P, P)``, or projected ``(k, k)``).
        grad: ``G`` in the same basis.
        cov: ``C`` in the same basis.
        lr: learning rates.
        schedule: a numeric :func:`~perturb.Online`, :func:`~perturb.Epochs` or
            :func:`~perturb.GD` schedule.

    Returns:
        Shape ``(L,)``; ``inf`` where it overflows (directions with ``|x_a| > 1`` grow
        like ``|x_a|^T``).

    Raises:
        ValueError: for anything but a :class:`~perturb.symbolic.schedules.Schedule`
            with numeric sizes.

    Example:
        >>> import torch, perturb
        >>> one = torch.ones(1, 1, dtype=torch.float64)
        >>> rms_displacement(one, torch.ones(1, dtype=torch.float64), 0 * one, lr=[0.5],
        ...                  schedule=perturb.Online(steps=1, batch_size=1))
        array([0.5])
    """
    h, g, c = _eigenbasis(hess, grad, cov, schedule)
    steps = int(schedule.batches) * int(schedule.epochs)
    out = []
    for eta in np.asarray(lr, dtype=float).reshape(-1):
        x = 1.0 - eta * h
        with np.errstate(over="ignore", invalid="ignore"):
            reach = eta * _geometric(x, steps)
            spread = np.diagonal(_pair_weights(x, schedule))
            total = float(np.sum((reach * g) ** 2 + eta**2 * np.diagonal(c) * spread))
        out.append(np.sqrt(total) if np.isfinite(total) else np.inf)
    return np.array(out)


def _eigenbasis(
    hess: torch.Tensor, grad: torch.Tensor, cov: torch.Tensor, schedule: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``h``, ``G`` and ``C`` in the eigenbasis of ``H`` (float64 arrays), after checking
    that ``schedule`` is a numeric :class:`Schedule`."""
    if not isinstance(schedule, Schedule) or not schedule.is_numeric:
        raise ValueError(f"schedule must be a numeric Schedule, got {schedule!r}")
    evals, evecs = torch.linalg.eigh((hess + hess.T) / 2)
    g = (evecs.T @ grad).double().cpu().numpy()
    c = (evecs.T @ cov @ evecs).double().cpu().numpy()
    return evals.double().cpu().numpy(), g, c


def _geometric(r: np.ndarray, n: int) -> np.ndarray:
    """``Σ_{j<n} r^j``, stable where ``r → 1``."""
    r = np.asarray(r, dtype=float)
    near = np.abs(1.0 - r) < 1e-9
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        far = (1.0 - r**n) / (1.0 - np.where(near, 0.0, r))
    return np.where(near, n - (n * (n - 1) / 2) * (1.0 - r), far)


def _pair_weights(x: np.ndarray, schedule: Schedule) -> np.ndarray:
    r"""``S_ab`` with ``Cov(δ_a, δ_b) = η² C_ab S_ab`` for the quadratic model's
    deviation along eigen-directions with ``x_a = 1 − ηh_a``, every schedule in closed
    form (the pairwise version of :func:`perturb.numeric.validity.rms_displacement`)."""
    m, b, e = int(schedule.batches), int(schedule.batch_size), int(schedule.epochs)
    xx = x[:, None] * x[None, :]
    steps = m * e
    if schedule.name == "gd":  # one batch of N, the same every step
        reach = _geometric(x, steps)
        return reach[:, None] * reach[None, :] / b
    if e == 1 or schedule.name == "online":
        return _geometric(xx, steps) / b
    repeat = _geometric(x**m, e)  # Σ_e x^{(E−1−e)M}
    if not schedule.shuffle:  # batch j recurs every epoch: (Σ_e w_{eM+j}) pairs
        return _geometric(xx, m) * repeat[:, None] * repeat[None, :] / b
    within = _geometric(x, m)  # W_e = x^{(E−1−e)M} Σ_j x^{M−1−j}
    total = (within * repeat)[:, None] * (within * repeat)[None, :]
    diagonal = within[:, None] * within[None, :] * _geometric(xx**m, e)
    return _geometric(xx, steps) / b + (total - diagonal) / (m * b)


def loss_spread(
    hess: torch.Tensor,
    grad: torch.Tensor,
    cov: torch.Tensor,
    *,
    lr: Sequence[float],
    schedule: Schedule,
) -> np.ndarray:
    r"""The standard deviation of ``l(θ_T)`` across SGD runs, on the quadratic model.

    On the quadratic model (Hessian ``H``, per-sample gradients ``G + ζ_i`` with
    ``Cov ζ_i = C``) the deviation ``δ = θ_T − θ_0`` has the mean ``μ`` and covariance
    ``Σ`` of :func:`perturb.numeric.validity.rms_displacement` (in the eigenbasis of
    ``H``: ``μ_a = −G_a(1 − x_a^T)/h_a``, ``Σ_ab = η² C_ab S_ab`` with ``S`` the
    schedule's pair weights, e.g. ``(1 − (x_a x_b)^T)/(B(1 − x_a x_b))`` online).  For a
    Gaussian ``δ`` the loss ``l = l_0 + G·δ + ½δᵀHδ`` has, exactly, ::

        Var l = bᵀ Σ b + ½ tr((HΣ)²),    b = G + Hμ.

    Args:
        hess: ``H`` (``(P, P)``, or projected ``(k, k)``).
        grad: ``G`` in the same basis.
        cov: ``C`` in the same basis.
        lr: learning rates.
        schedule: a numeric :func:`~perturb.Online`, :func:`~perturb.Epochs` or
            :func:`~perturb.GD` schedule.

    Returns:
        Shape ``(L,)``; ``inf`` where it overflows.

    Raises:
        ValueError: for anything but a :class:`~perturb.symbolic.schedules.Schedule`
            with numeric sizes.

    Example:
        >>> import torch, perturb
        >>> one = torch.ones(1, 1, dtype=torch.float64)
        >>> # one step at η = 1: δ = −(G + ζ), l = ½(1 + δ)², Var = 0 + ½ (C)² = 0.5
        >>> loss_spread(one, 0 * one[0], one, lr=[1.0],
        ...             schedule=perturb.Online(steps=1, batch_size=1)) ** 2
        array([0.5])
    """
    h, g, c = _eigenbasis(hess, grad, cov, schedule)
    steps = int(schedule.batches) * int(schedule.epochs)
    out = []
    for eta in np.asarray(lr, dtype=float).reshape(-1):
        x = 1.0 - eta * h
        with np.errstate(over="ignore", invalid="ignore"):
            mean = -eta * g * _geometric(x, steps)
            sigma = eta**2 * c * _pair_weights(x, schedule)
            slope = g + h * mean
            hs = h[:, None] * sigma
            var = float(slope @ sigma @ slope + 0.5 * np.sum(hs * hs.T))
        out.append(np.sqrt(max(var, 0.0)) if np.isfinite(var) else np.inf)
    return np.array(out)


def mean_square_excess(
    subspace: KrylovSubspace,
    *,
    lr: Sequence[float],
    steps: int | Sequence[int],
    batch_size: int = 1,
) -> np.ndarray:
    """E-folds by which SGD's RMS deviation outgrows the mean dynamics, per learning rate.

    :func:`~perturb.numeric.stability.mean_square_growth` of the projected per-sample
    Hessians (the first :attr:`~KrylovSubspace.higher_rank` basis vectors) minus the
    mean dynamics' :func:`~perturb.numeric.predictions.growth` on the same block; a
    rigorous lower bound of the excess of the full linearized dynamics over those
    directions.  ``nan`` where the subspace holds no per-sample Hessians.  The
    second-moment rate is computed once per learning rate for every ``T`` in ``steps``.

    Returns:
        Shape ``(L,)`` for one ``T``, ``(L, S)`` for a sequence of ``S`` of them.

    Example:
        >>> import torch, perturb
        >>> from perturb.numeric.krylov import krylov_subspace
        >>> pop = perturb.Population(lambda p, x: (x * p * p).sum() / 2,  # H_i = diag(x_i)
        ...                          torch.tensor([[0.2], [1.8]], dtype=torch.float64))
        >>> sub = krylov_subspace(pop, None, torch.ones(1, dtype=torch.float64), rank=1,
        ...                       order=2, schedules=[perturb.GD()])
        >>> mean_square_excess(sub, lr=[0.1, 1.5], steps=10).round(2)  # GD stable below 2
        array([0.  , 2.62])
    """
    lrs = np.asarray(lr, dtype=float).reshape(-1)
    many = not isinstance(steps, int | np.integer)
    ts = np.asarray(steps if many else [steps], dtype=float).reshape(-1)
    if 2 not in subspace.derivs:
        out = np.full((len(lrs), len(ts)), np.nan)
        return out if many else out[:, 0]
    per_sample = subspace.derivs[2]
    m = per_sample.shape[1]
    hess = subspace.hessian[:m, :m]
    # growth per step (T = 1), scaled to every T: the rates are computed once per η
    square = mean_square_growth(hess, per_sample, lr=list(lrs), steps=1, batch_size=batch_size)
    evals = torch.linalg.eigvalsh((hess + hess.T) / 2)
    mean = np.array([growth(evals, [eta], 1) for eta in lrs])
    excess = ts[None, :] * (square - mean)[:, None]
    out = np.maximum(excess, 0.0)
    return out if many else out[:, 0]


def overshoot(
    lambda_max: Sequence[float],
    *,
    lr: Sequence[float],
    steps: int,
    batch_size: int,
    population: int,
) -> dict[str, np.ndarray]:
    """The largest single-sample step factor ``ηλ_max(H_i)/B`` and the expected draws of
    the overshooting samples (``ηλ_max(H_i)/B > 2``) in ``steps`` steps, per rate.

    ``lambda_max`` are the samples' top curvatures
    (:func:`perturb.numeric.stability.per_sample_top_curvatures`); each step draws ``B``
    of the ``population`` rows uniformly, so a given row is drawn ``steps·B/population``
    times on average.

    Example:
        >>> out = overshoot([14.0, 5.0], lr=[0.1, 0.3], steps=72, batch_size=1, population=256)
        >>> out["overshoot"].round(2).tolist(), out["overshoot_draws"].round(3).tolist()
        ([1.4, 4.2], [0.0, 0.281])
    """
    lam = np.asarray(lambda_max, dtype=float).reshape(-1)
    kick = np.asarray(lr, dtype=float).reshape(-1, 1) * lam[None, :] / batch_size
    draws = steps * batch_size * (kick > 2).sum(axis=1) / population
    return {"overshoot": kick.max(axis=1), "overshoot_draws": draws}


def ladder_loss(
    hess: torch.Tensor,
    per_sample_hessians: torch.Tensor,
    grad: torch.Tensor,
    per_sample_gradients: torch.Tensor,
    *,
    lr: Sequence[float],
    steps: int | Sequence[int],
    batch_size: int = 1,
) -> np.ndarray:
    r"""The test loss the per-sample Hessian fluctuations add beyond three edges.

    On a quadratic population with per-sample Hessians ``H_i = H + A_i`` (``E A_i = 0``)
    and gradients at ``θ_0`` ``G + ζ_i`` (``E ζ_i = 0``, ``Cov ζ_i = C``), in any
    correlation with each other, online SGD with ``B`` iid draws per step moves the
    deviation ``δ = θ − θ_0`` by ``δ ← (I − ηH_b)δ − ηg_b``.  The batch is independent of
    ``δ``, so with ``K = I − ηH`` the mean follows ``m ← Km − ηG`` and the covariance,
    exactly, ::

        M ← K M K + (η²/B) (C + E_i[A_i m ζ_iᵀ + ζ_i mᵀ A_i] + E_i[A_i S A_i]),
        S = M + m mᵀ.

    The test loss is ``l(θ_0) + G·m + ½ tr(H S)``.  Split ``M = M_C + Y + X`` by source:
    ``M_C`` (the gradient noise, two edges) and ``Y`` (the mixed cumulant
    ``⟨∇l, ∇∇l⟩`` fed by the mean path, three edges) are what "resummed 3" holds on a
    quadratic population; the ladder is the rest, ::

        X ← K X K + (η²/B) E_i[A_i (M_C + Y + X + m mᵀ) A_i],

    diagrams with four edges and more, and this function returns ``½ tr(H X_T)``.
    "resummed 3" plus it is SGD's exact expected test loss on every quadratic population.

    Args:
        hess: ``H``, ``(m, m)``.
        per_sample_hessians: ``H_i``, ``(n, m, m)`` (centred here).
        grad: ``G``, ``(m,)``: the mean path's gradient.
        per_sample_gradients: ``G + ζ_i``, ``(n, m)``, the same rows as
            ``per_sample_hessians`` (centred here: ``C`` and the mixed cumulant are their
            population moments over the rows).
        lr: learning rates.
        steps: one ``T`` or several (every one is read off a single recursion).
        batch_size: ``B``.

    Returns:
        Shape ``(L,)`` for one ``T``, ``(L, S)`` for a sequence of ``S``; ``inf`` where
        the second moment overflows.

    Raises:
        ValueError: for shapes that do not match ``H``'s ``(m, m)``.

    Example:
        >>> import torch
        >>> h = torch.ones(1, 1, dtype=torch.float64)
        >>> hs = torch.tensor([[[0.0]], [[2.0]]], dtype=torch.float64)  # A_i = ∓1
        >>> gs = torch.ones(2, 1, dtype=torch.float64)  # no gradient noise
        >>> ladder_loss(h, hs, gs[0], gs, lr=[0.5], steps=2)  # ½ · ¼ · (½ G)²
        array([0.03125])
    """
    h = torch.as_tensor(hess, dtype=torch.float64).cpu().numpy()
    m = h.shape[0]
    hs = torch.as_tensor(per_sample_hessians, dtype=torch.float64).cpu().numpy()
    g = torch.as_tensor(grad, dtype=torch.float64).cpu().numpy().reshape(-1)
    gs = torch.as_tensor(per_sample_gradients, dtype=torch.float64).cpu().numpy()
    if h.shape != (m, m) or hs.ndim != 3 or hs.shape[1:] != (m, m):
        raise ValueError(
            f"hess must be (m, m) and per_sample_hessians (n, m, m), got {h.shape} and {hs.shape}"
        )
    if g.shape != (m,) or gs.shape != (len(hs), m):
        raise ValueError(
            f"grad must be ({m},) and per_sample_gradients ({len(hs)}, {m}), got {g.shape} "
            f"and {gs.shape}"
        )
    many = not isinstance(steps, int | np.integer)
    ts = [int(t) for t in (steps if many else [steps])]
    if not ts or min(ts) < 0:
        raise ValueError(f"steps must be non-negative, got {steps!r}")
    a = hs - hs.mean(axis=0)
    zeta = gs - gs.mean(axis=0)
    c = zeta.T @ zeta / len(zeta)
    # q[(a, c), (b, d)] = E[A_ab A_cd]: vec(E[A S A]) = q vec(S) for a symmetric A
    q = np.einsum("iab,icd->acbd", a, a).reshape(m * m, m * m) / len(a)
    r = np.einsum("iab,ic->abc", a, zeta) / len(a)  # E[A_ab ζ_c]: E[A m ζᵀ] = r·m
    eta = np.asarray(lr, dtype=float).reshape(-1, 1, 1)
    k = np.eye(m)[None] - eta * h[None]  # (L, m, m)
    noise = eta**2 / batch_size
    mean = np.zeros((len(eta), m))
    base = np.zeros((len(eta), m, m))  # M_C + Y: what three edges hold
    ladder = np.zeros((len(eta), m, m))
    out = np.full((len(eta), len(ts)), np.nan)
    wanted = {t: [j for j, s in enumerate(ts) if s == t] for t in set(ts)}
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(max(ts) + 1):
            for j in wanted.get(t, []):
                out[:, j] = 0.5 * np.einsum("ab,lba->l", h, ladder)
            if t == max(ts):
                break
            full = base + ladder + mean[:, :, None] * mean[:, None, :]
            kick = (full.reshape(len(eta), -1) @ q.T).reshape(full.shape)
            mixed = np.einsum("abc,lb->lac", r, mean)
            ladder = k @ ladder @ k + noise * kick
            base = k @ base @ k + noise * (c[None] + mixed + mixed.transpose(0, 2, 1))
            mean = np.einsum("lab,lb->la", k, mean) - eta[:, :, 0] * g[None]
    out[~np.isfinite(out)] = np.inf
    return out if many else out[:, 0]


def with_ladder(estimate: np.ndarray, ladder: np.ndarray) -> np.ndarray:
    """An error estimate widened by the Hessian ladder its prediction leaves out:
    ``estimate + |ladder|``, nothing where the ladder was not measured (``nan``).

    Example:
        >>> with_ladder(np.array([0.1, 0.1]), np.array([-0.05, np.nan]))
        array([0.15, 0.1 ])
    """
    return estimate + np.where(np.isnan(ladder), 0.0, np.abs(ladder))


def ladder_estimate(
    ladder: np.ndarray, rank_error: np.ndarray, ratio: np.ndarray | None
) -> np.ndarray:
    """The error estimate of the ladder itself: its Krylov rank difference plus its own
    size continued by ``min(1, d/ρ)``.  The ladder is the quadratic model's sum of every
    rung; a path that moves by ``d`` changes the Hessians it is built from by a factor
    ``≈ d/ρ`` (:func:`displacement_ratio`), the same geometric continuation the truncation
    estimates take.

    Example:
        >>> ladder_estimate(np.array([0.02]), np.array([0.001]), np.array([0.5]))
        array([0.011])
    """
    own = np.zeros_like(ladder) if ratio is None else np.abs(ladder) * np.minimum(1.0, ratio)
    return np.abs(rank_error) + np.where(np.isfinite(own), own, np.inf)


def hessian_ladder(
    subspace: KrylovSubspace,
    *,
    lr: Sequence[float],
    steps: int | Sequence[int],
    batch_size: int = 1,
    rank: int | None = None,
) -> np.ndarray:
    """:func:`ladder_loss` on the subspace's first :attr:`~KrylovSubspace.higher_rank`
    basis vectors (or the first ``rank`` of them), from its projected per-sample
    Hessians and gradients.

    Returns:
        As :func:`ladder_loss`; ``nan`` where the subspace holds no per-sample Hessians
        or gradients.

    Raises:
        ValueError: a ``rank`` outside ``1 … higher_rank``.

    Example:
        >>> import torch, perturb
        >>> from perturb.numeric.krylov import krylov_subspace
        >>> pop = perturb.Population(lambda p, x: (x[0] * p * p).sum() / 2 + x[1] * p.sum(),
        ...                          torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64))
        >>> sub = krylov_subspace(pop, None, torch.zeros(1, dtype=torch.float64), rank=1,
        ...                       order=3)  # 3 edges: per-sample Hessians and gradients
        >>> hessian_ladder(sub, lr=[0.5], steps=2)  # the example of ladder_loss
        array([0.03125])
    """
    many = not isinstance(steps, int | np.integer)
    shape = (len(np.asarray(lr).reshape(-1)), len(steps) if many else 1)
    if 2 not in subspace.derivs or 1 not in subspace.derivs:
        out = np.full(shape, np.nan)
        return out if many else out[:, 0]
    m = subspace.derivs[2].shape[1]
    if rank is not None:
        m = check_int("rank", rank, minimum=1, maximum=m)
    return ladder_loss(
        subspace.hessian[:m, :m],
        subspace.derivs[2][:, :m, :m],
        subspace.means[1][:m],
        subspace.derivs[1][:, :m],
        lr=lr,
        steps=steps,
        batch_size=batch_size,
    )
