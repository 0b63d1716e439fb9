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
(``S = E[δδᵀ]``), a ladder of Hessian cumulants with four edges and more that no
predictor holds.  :func:`hessian_ladder` is the test loss it adds on the quadratic model
with per-sample Hessians; the validity estimate adds its size to every predictor's.

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
    "hessian_ladder",
    "ladder_loss",
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


def truncation_estimates(contributions: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
    """Error estimates of the partial sums ``Σ_{d' ≤ d} c_{d'}`` for every ``d``.

    Args:
        contributions: ``c_d`` along the last axis, shape ``(..., D+1)``.
        extra: errors to add to each partial sum (e.g. the Krylov ``k`` vs ``k/2``
            differences of the cumulative re-summed values), same shape.

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
            ratio = np.where(c[..., -2] > 0, c[..., -1] / c[..., -2], 1.0)
        out[..., -1] = c[..., -1] * np.minimum(1.0, ratio)
        for d in range(c.shape[-1] - 2, -1, -1):
            out[..., d] = c[..., d + 1] + out[..., d + 1]
    broken = np.cumsum(~np.isfinite(c), axis=-1) > 0  # a sum holding a non-finite term
    out[~np.isfinite(out) | broken] = np.inf
    if extra is not None:
        out = out + np.abs(np.asarray(extra, dtype=float))
    return out


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
    if not isinstance(schedule, Schedule) or not schedule.is_numeric:
        raise ValueError(f"schedule must be a numeric Schedule, got {schedule!r}")
    m, b, e = int(schedule.batches), int(schedule.batch_size), int(schedule.epochs)
    evals, evecs = torch.linalg.eigh((hess + hess.T) / 2)
    g = (evecs.T @ grad).numpy()
    c = torch.diagonal(evecs.T @ cov @ evecs).numpy()
    h = evals.numpy()
    age = np.arange(m * e - 1, -1, -1, dtype=float)  # T − 1 − t for t = 0 … T − 1
    out = []
    for eta in np.asarray(lr, dtype=float).reshape(-1):
        with np.errstate(over="ignore", invalid="ignore"):
            w = ((1.0 - eta * h)[:, None] ** age[None, :]).reshape(-1, e, m)  # (k, E, M)
            reach = eta * w.sum(axis=(1, 2))
            if schedule.shuffle:
                per_epoch = w.sum(axis=2)
                pairs = per_epoch.sum(axis=1) ** 2 - (per_epoch**2).sum(axis=1)
                spread = (w**2).sum(axis=(1, 2)) / b + pairs / (m * b)
            else:
                spread = (w.sum(axis=1) ** 2).sum(axis=1) / b
            total = float(np.sum((reach * g) ** 2 + eta**2 * c * spread))
        out.append(np.sqrt(total) if np.isfinite(total) else np.inf)
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
    cov: torch.Tensor,
    *,
    lr: Sequence[float],
    steps: int | Sequence[int],
    batch_size: int = 1,
) -> np.ndarray:
    r"""The test loss the per-sample Hessian fluctuations add to the quadratic model.

    On the quadratic model with per-sample Hessians ``H_i = H + A_i`` (``E A_i = 0``) and
    gradients ``G + ζ_i`` (``Cov ζ_i = C``), online SGD with ``B`` iid draws per step moves
    the deviation ``δ = θ − θ_0`` by ``δ ← (I − ηH_b)δ − ηg_b``.  With ``K = I − ηH`` its
    mean ``m ← Km − ηG`` and covariance ``M`` follow ::

        M ← K M K + (η²/B) C + (η²/B) E_i[A_i S A_i],    S = M + m mᵀ,

    (plus the mixed term ``(η²/B) E_i[A_i m ζ_iᵀ + ζ_i mᵀ A_i]``, three edges, which the
    re-summed predictions hold).  Without the last term (``A_i = 0``) this is the
    quadratic model of "resummed 2" and the SDE; the ladder is what the last term adds,
    ``X = M − M|_{A=0}`` with ``X ← K X K + (η²/B) E_i[A_i S A_i]``, to the test loss
    ``½ tr(H X_T)``.

    Args:
        hess: ``H``, ``(m, m)``.
        per_sample_hessians: ``H_i``, ``(n, m, m)`` (centred here).
        grad: ``G``, ``(m,)``.
        cov: ``C``, ``(m, m)``.
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
        >>> g = torch.ones(1, dtype=torch.float64)
        >>> ladder_loss(h, hs, g, 0 * h, lr=[0.5], steps=2)  # ½ · ¼ · (½ G)²
        array([0.03125])
    """
    h = torch.as_tensor(hess, dtype=torch.float64).cpu().numpy()
    m = h.shape[0]
    hs = torch.as_tensor(per_sample_hessians, dtype=torch.float64).cpu().numpy()
    g = torch.as_tensor(grad, dtype=torch.float64).cpu().numpy().reshape(-1)
    c = torch.as_tensor(cov, dtype=torch.float64).cpu().numpy()
    if h.shape != (m, m) or hs.ndim != 3 or hs.shape[1:] != (m, m):
        raise ValueError(
            f"hess must be (m, m) and per_sample_hessians (n, m, m), got {h.shape} and {hs.shape}"
        )
    if g.shape != (m,) or c.shape != (m, m):
        raise ValueError(f"grad must be ({m},) and cov ({m}, {m}), got {g.shape} and {c.shape}")
    many = not isinstance(steps, int | np.integer)
    ts = [int(t) for t in (steps if many else [steps])]
    if not ts or min(ts) < 0:
        raise ValueError(f"steps must be non-negative, got {steps!r}")
    a = hs - hs.mean(axis=0)
    # q[(a, c), (b, d)] = E[A_ab A_cd]: vec(E[A S A]) = q vec(S) for a symmetric A
    q = np.einsum("iab,icd->acbd", a, a).reshape(m * m, m * m) / len(a)
    eta = np.asarray(lr, dtype=float).reshape(-1, 1, 1)
    k = np.eye(m)[None] - eta * h[None]  # (L, m, m)
    noise = eta**2 / batch_size
    mean = np.zeros((len(eta), m))
    base = np.zeros((len(eta), m, m))
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
            ladder = k @ ladder @ k + noise * kick
            base = k @ base @ k + noise * c[None]
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
    per_sample = subspace.derivs[2][:, :m, :m]
    grads = subspace.derivs[1][:, :m]
    centred = grads - grads.mean(dim=0)
    cov = centred.T @ centred / len(grads)
    return ladder_loss(
        subspace.hessian[:m, :m],
        per_sample,
        subspace.means[1][:m],
        cov,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
    )
