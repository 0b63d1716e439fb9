"""The paper's corollaries as an API, each computed from the diagram engine.

The predictions here evaluate the engine (:func:`perturb.series`, or
:func:`perturb.predict` with re-summed diagrams) rather than a closed form typed in
from the paper; the closed forms appear in the docstrings and the tests compare them
with the engine.  Two exceptions are closed forms by purpose, and the tests equate
them with the engine: :func:`gap_limit` (the ``T → ∞`` limit ``tr(C H^{-1})/N``) and
:func:`stic` (a differentiable torch expression for training loops).

* Corollary 1 (SGD drifts along valleys, :func:`drift_velocity`, :func:`displacement`):
  the long-time velocity of online SGD near a minimum, from the re-summed displacement.
* Corollary 2 (generalization gap and test-loss increase of GD,
  :func:`gd_generalization_gap`, :func:`gd_test_loss_increase`, :func:`gap_limit`) and
  STIC, the gap as a differentiable regularizer (:func:`stic`).
* Corollary 4 (GDC, :func:`gdc_loss`): full-batch GD on a modified loss that matches
  SGD's expected test loss through ``η²``.
* Corollary 5 (SGD vs ODE and SDE, :func:`sgd_minus_ode`, :func:`non_gaussian_part`):
  filters of a :class:`~perturb.symbolic.series.Series`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
from torch.func import grad, hessian, vmap

from perturb.checks import check_int, check_lr
from perturb.numeric.prediction import Population, predict
from perturb.symbolic.schedules import GD, Online
from perturb.symbolic.series import Series

__all__ = [
    "displacement",
    "drift_velocity",
    "gap_limit",
    "gd_generalization_gap",
    "gd_test_loss_increase",
    "gdc_loss",
    "non_gaussian_part",
    "sgd_minus_ode",
    "stic",
]

#: The automatic start ``T₁`` of :func:`drift_velocity` is this many relaxation times.
_RELAXATION_TIMES = 50

LossFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- checks


def _check_population(population: object) -> Population:
    if not isinstance(population, Population):
        raise TypeError(f"population must be a Population, got {type(population).__name__}")
    return population


def _check_theta(theta0: object) -> torch.Tensor:
    theta = torch.as_tensor(theta0, dtype=torch.float64)
    if theta.ndim != 1 or theta.numel() == 0:
        raise ValueError(f"theta0 must be a non-empty 1-D tensor, got shape {tuple(theta.shape)}")
    return theta


def _check_lr(lr: object) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a positive real number, got {lr!r}")
    return check_lr(lr)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer ≥ 1, got {value!r}")
    return check_int(name, value, minimum=1)


def _mean_hessian_eigenvalues(population: Population, theta: torch.Tensor) -> torch.Tensor:
    derivs = population.derivatives(theta, 2)
    return torch.linalg.eigvalsh(derivs[2].mean(0))


def _tolerance(evals: torch.Tensor) -> float:
    return 1e-9 * max(float(evals.abs().max()), 1e-300)


# ------------------------------------------------------------------- Corollary 1


def displacement(
    population: Population,
    theta0: torch.Tensor,
    *,
    lr: float,
    steps: int,
    batch_size: int = 1,
    order: int = 3,
) -> np.ndarray:
    """Expected displacement ``E[θ_T − θ_0]`` of online SGD, from re-summed diagrams.

    The engine's ``predict(..., Online(steps=T, batch_size=B), quantity="displacement",
    resummed=True, order=order)``: every re-summed diagram with at most ``order``
    edges, each edge carrying ``η (I − ηH)^{Δt−1}``, summed exactly over its
    embeddings (cost independent of ``T``).

    Args:
        population: the data distribution.
        theta0: the initial point, 1-D.
        lr: learning rate ``η > 0``.
        steps: ``T``.
        batch_size: ``B``.
        order: the most edges per diagram (3 is the first order with noise-driven drift).

    Returns:
        ``E[θ_T − θ_0]`` to that order, a float64 array of shape ``(P,)``.

    Example:
        >>> from perturb.experiments.landscapes import archimedes
        >>> pop, theta0 = archimedes()
        >>> displacement(pop, theta0, lr=0.1, steps=1).tolist()  # one step: E ∇l = 0
        [0.0, 0.0, 0.0]
    """
    population = _check_population(population)
    theta = _check_theta(theta0)
    lr = _check_lr(lr)
    steps = _check_count("steps", steps)
    batch_size = _check_count("batch_size", batch_size)
    pred = predict(
        population,
        theta,
        Online(steps=steps, batch_size=batch_size),
        lr=lr,
        order=order,
        quantity="displacement",
        resummed=True,
    )
    return np.asarray(pred.total, dtype=np.float64).reshape(theta.numel())


def drift_velocity(
    population: Population,
    theta0: torch.Tensor,
    *,
    lr: float,
    steps: int | None = None,
    batch_size: int = 1,
    order: int = 3,
) -> np.ndarray:
    """Corollary 1: the long-time expected velocity of online SGD near a minimum.

    From the re-summed displacement (:func:`displacement`),

        v = (E[θ_{T₂} − θ_0] − E[θ_{T₁} − θ_0]) / (T₂ − T₁),   T₂ = 2 T₁.

    Near a minimum (``H ⪰ 0``, ``0 < ηh < 2``) every transient of the re-summed
    diagrams decays at least like ``|1 − ηh|^t`` over the positive eigenvalues ``h`` of
    ``H``; by default ``T₁ = ⌈50/r⌉`` with ``r = min_h −log|1 − ηh|``
    (``≈ 50/(η h_min⁺)``, ``h_min⁺`` the smallest positive eigenvalue), so the
    transients are below ``e^{−50}`` and ``v`` is the constant asymptotic velocity
    along the flat directions (``h = 0``, where displacements grow linearly in ``T``).
    The cost does not depend on ``T``.

    Derivation check on ARCHIMEDES (:func:`perturb.experiments.landscapes.archimedes`) at ``θ = 0``:
    ``G = 0``, so every diagram needs its leaves tied; with at most 3 edges the only
    surviving displacement diagram is root ← ``J``-node ← two tied leaves (``C``), of
    value ``−½ η³ Σ_{s<t<T} J_{μνλ} (K^{t−s−1})_μ (K^{t−s−1})_ν C_{μν} K_λ^{T−t−1}``
    in an eigenbasis of ``H``.  Along the flat ``z`` (``K_z = 1``) the sum over ``s``
    is ``1/(1 − (1−ηh_μ)(1−ηh_ν)) = 1/(η(h_μ+h_ν)) (1 + O(η))`` for long times, so

        v_z = −(η²/2) Σ_{μν} J_{μνz} C_{μν}/(h_μ + h_ν) + O(η³) = η²/6

    with ``H_{uv} = diag(2, 1)``, ``J_{uvz} = 1`` and ``C = ½[[1, −1], [−1, 1]]``:
    two off-diagonal terms ``1·(−½)/3``.  The exact order-3 value is
    ``(η²/6) / (1 − 2η/3)``; order-4 diagrams add nothing to it.

    Args:
        population: the data distribution.
        theta0: a point near (or at) a minimum, 1-D.
        lr: learning rate ``η > 0`` with ``η h_max < 2``.
        steps: ``T₁`` (the velocity is then the mean over steps ``T₁ … 2T₁``);
            ``None`` chooses it as above.
        batch_size: ``B``.
        order: the most edges per re-summed diagram.

    Returns:
        The velocity per step, a float64 array of shape ``(P,)``.

    Raises:
        ValueError: ``H`` has a negative eigenvalue (not near a minimum), no positive
            eigenvalue (nothing relaxes; pass ``steps``), or ``η h_max ≥ 2`` (GD on
            ``l`` diverges).

    Example:
        >>> from perturb.experiments.landscapes import archimedes
        >>> pop, theta0 = archimedes()
        >>> v = drift_velocity(pop, theta0, lr=0.01)
        >>> round(float(v[2] / (0.01**2 / 6)), 4), round(float(abs(v[:2]).max()), 12)
        (1.0067, 0.0)
    """
    population = _check_population(population)
    theta = _check_theta(theta0)
    lr = _check_lr(lr)
    batch_size = _check_count("batch_size", batch_size)
    evals = _mean_hessian_eigenvalues(population, theta)
    tol = _tolerance(evals)
    if float(evals.min()) < -tol:
        raise ValueError(
            "drift_velocity needs θ_0 near a minimum (H positive semi-definite); the mean "
            f"Hessian has eigenvalue {float(evals.min()):.3g}"
        )
    if lr * float(evals.max()) >= 2:
        raise ValueError(
            f"lr·h_max = {lr * float(evals.max()):.3g} >= 2: GD on the mean loss diverges "
            "and there is no long-time velocity"
        )
    if steps is None:
        positive = evals[evals > tol]
        if positive.numel() == 0:
            raise ValueError(
                "the mean Hessian has no positive eigenvalue, so there is no relaxation "
                "time to choose T₁ from; pass steps="
            )
        rate = float((-torch.log(torch.abs(1 - lr * positive))).min())
        first = math.ceil(_RELAXATION_TIMES / rate)
    else:
        first = _check_count("steps", steps)
    kwargs = {"lr": lr, "batch_size": batch_size, "order": order}
    near = displacement(population, theta, steps=first, **kwargs)
    far = displacement(population, theta, steps=2 * first, **kwargs)
    return (far - near) / first


# ------------------------------------------------------------------- Corollary 2


def gd_generalization_gap(
    population: Population,
    theta0: torch.Tensor,
    *,
    lr: float,
    steps: int,
    train_size: int,
) -> float:
    """Corollary 2: GD's expected generalization gap (test − train) after ``T`` steps.

    The engine's order-1 re-summed gap, ``predict(..., GD(train_size=N, steps=T),
    quantity="gap", order=1, resummed=True)``: the only diagram is root ← leaf, tied
    to the training-loss root, so

        E[test − train] = tr(C · η Σ_{k<T} K^k) / N = tr(C (I − K^T) H^{-1}) / N + O(η²),

    ``K = I − ηH`` (the middle form where ``H`` is invertible), the discrete version of
    the paper's ``C_{μν}((I − e^{−ηTH}) H^{-1})^{νμ}/N``.  For small ``ηT`` it is
    ``ηT tr C/N``; for ``H ≻ 0`` and ``0 < ηh < 2`` it tends to :func:`gap_limit`.

    Args:
        population: the data distribution.
        theta0: the initial point (Corollary 2 takes a test minimum), 1-D.
        lr: learning rate ``η > 0``.
        steps: ``T``.
        train_size: ``N``, the size of the training set GD descends on.

    Returns:
        The predicted gap, a float.

    Example:
        >>> from perturb.experiments.landscapes import mean_estimation
        >>> pop, theta0 = mean_estimation(curvature=1.0)
        >>> gd_generalization_gap(pop, theta0, lr=0.5, steps=2, train_size=4)  # (1 − ¼)/4
        0.1875
    """
    population = _check_population(population)
    theta = _check_theta(theta0)
    lr = _check_lr(lr)
    steps = _check_count("steps", steps)
    train_size = _check_count("train_size", train_size)
    pred = predict(
        population,
        theta,
        GD(train_size=train_size, steps=steps),
        lr=lr,
        order=1,
        quantity="gap",
        resummed=True,
    )
    return float(pred.total)


def gd_test_loss_increase(
    population: Population,
    theta0: torch.Tensor,
    *,
    lr: float,
    steps: int,
    train_size: int,
    order: int = 2,
) -> float:
    """Corollary 2: GD's expected test-loss increase ``E l(θ_T) − l(θ_0)`` after ``T`` steps.

    The engine's re-summed test-loss prediction for ``GD(train_size=N, steps=T)`` minus
    its order-0 term ``l(θ_0)``.  At a test minimum (``G = 0``) the order-2 value is the
    single diagram ``H``-root ← two tied leaves (``C``):

        E l(θ_T) − l(θ_0) = tr(C (I − K^T)² H^{-1}) / (2N) + o(η²),   K = I − ηH,

    the discrete form of the paper's ``(C/2N)((I − e^{−ηTH})^{⊗2}) H^{-1}``; per
    eigen-direction ``C (1 − (1 − ηh)^T)² / (2Nh)``: small for ``ηTh ≪ 1`` (flat:
    GD barely moves) and for ``h ≫ 1/(ηT)`` (sharp: the noise ``C/N`` costs
    ``C/(2Nh)``), largest in between.  On quadratic landscapes with constant ``H`` and
    ``C`` (:func:`perturb.experiments.landscapes.mean_estimation`) it is exact at every ``T``.

    Args:
        population: the data distribution.
        theta0: the initial point, 1-D.
        lr: learning rate ``η > 0``.
        steps: ``T``.
        train_size: ``N``.
        order: the most edges per re-summed diagram.

    Returns:
        The predicted increase, a float.

    Example:
        >>> from perturb.experiments.landscapes import mean_estimation
        >>> pop, theta0 = mean_estimation(curvature=1.0)
        >>> gd_test_loss_increase(pop, theta0, lr=0.5, steps=1, train_size=4)  # ¼/(2·4)
        0.03125
    """
    population = _check_population(population)
    theta = _check_theta(theta0)
    lr = _check_lr(lr)
    steps = _check_count("steps", steps)
    train_size = _check_count("train_size", train_size)
    pred = predict(
        population,
        theta,
        GD(train_size=train_size, steps=steps),
        lr=lr,
        order=order,
        quantity="test",
        resummed=True,
    )
    return float(pred.total - pred.by_order[0])


def gap_limit(population: Population, theta0: torch.Tensor, *, train_size: int) -> float:
    """The long-time limit of Corollary 2's gap: ``tr(C H^{-1}) / N``.

    It is the ``T → ∞`` limit of :func:`gd_generalization_gap` when ``H`` is positive
    definite and ``0 < ηh < 2`` for every eigenvalue ``h`` (then ``K^T → 0``); it
    does not depend on ``η``.  When ``C = H`` (maximum likelihood in a well-specified
    model, at the truth: ``C`` is the Fisher information) it is AIC's
    ``(number of parameters)/N``.

    Args:
        population: the data distribution.
        theta0: a point with positive-definite mean Hessian ``H``, 1-D.
        train_size: ``N``.

    Returns:
        ``tr(C H^{-1}) / N`` with ``C`` the population covariance of ``∇l_x(θ_0)``.

    Raises:
        ValueError: ``H`` is not positive definite (the gap then grows without bound
            along flat directions, or GD leaves ``θ_0``).

    Example:
        >>> from perturb.experiments.landscapes import mean_estimation
        >>> pop, theta0 = mean_estimation(curvature=2.0, noise=1.0, dim=3)
        >>> round(gap_limit(pop, theta0, train_size=10), 12)  # tr(I · I/2)/10
        0.15
    """
    population = _check_population(population)
    theta = _check_theta(theta0)
    train_size = _check_count("train_size", train_size)
    derivs = population.derivatives(theta, 2)
    hess = derivs[2].mean(0)
    evals = torch.linalg.eigvalsh(hess)
    if float(evals.min()) <= _tolerance(evals):
        raise ValueError(
            "gap_limit needs a positive-definite mean Hessian H (the T → ∞ limit exists "
            f"only then); its smallest eigenvalue is {float(evals.min()):.3g}"
        )
    grads = derivs[1] - derivs[1].mean(0)
    cov = grads.T @ grads / grads.shape[0]
    return float(torch.trace(torch.linalg.solve(hess, cov))) / train_size


def _per_sample(loss_fn: LossFn, batch_x: torch.Tensor, batch_y: torch.Tensor | None):
    """Per-sample gradients and the mean loss as functions of the parameters."""
    if batch_y is None:

        def grads(p: torch.Tensor) -> torch.Tensor:
            return vmap(grad(loss_fn), in_dims=(None, 0))(p, batch_x)

        def losses(p: torch.Tensor) -> torch.Tensor:
            return vmap(loss_fn, in_dims=(None, 0))(p, batch_x)

    else:

        def grads(p: torch.Tensor) -> torch.Tensor:
            return vmap(grad(loss_fn), in_dims=(None, 0, 0))(p, batch_x, batch_y)

        def losses(p: torch.Tensor) -> torch.Tensor:
            return vmap(loss_fn, in_dims=(None, 0, 0))(p, batch_x, batch_y)

    return grads, losses


def _check_batch(
    loss_fn: object,
    params: object,
    batch_x: object,
    batch_y: object,
    *,
    what: str,
    min_rows: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
    if params.ndim != 1 or params.numel() == 0 or not params.is_floating_point():
        raise ValueError(
            f"params must be a non-empty 1-D floating tensor, got shape {tuple(params.shape)} "
            f"and dtype {params.dtype}"
        )
    xs = torch.as_tensor(batch_x)
    if xs.ndim == 0 or xs.shape[0] < min_rows:
        raise ValueError(
            f"{what} needs a batch of at least {min_rows} rows"
            + (" to estimate the gradient covariance" if min_rows > 1 else "")
            + f", got batch_x of shape {tuple(xs.shape)}"
        )
    ys = None
    if batch_y is not None:
        ys = torch.as_tensor(batch_y)
        if ys.ndim == 0 or ys.shape[0] != xs.shape[0]:
            raise ValueError(
                f"batch_y must have one row per row of batch_x ({xs.shape[0]}), got shape "
                f"{tuple(ys.shape)}"
            )
    return params, xs, ys


def _sample_covariance(g: torch.Tensor) -> torch.Tensor:
    centred = g - g.mean(0)
    return centred.T @ centred / (g.shape[0] - 1)


def _geometric_sum(k: torch.Tensor, steps: int) -> torch.Tensor:
    """``Σ_{j<steps} K^j`` by doubling (``O(log steps)`` products, differentiable)."""
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    total, power = torch.zeros_like(k), eye  # the sum and K^m over the bits used so far
    block_sum, block_power = eye, k  # Σ_{j<2^i} K^j and K^{2^i}
    remaining = steps
    while remaining:
        if remaining & 1:
            total = total + power @ block_sum
            power = power @ block_power
        remaining >>= 1
        if remaining:
            block_sum = block_sum + block_power @ block_sum
            block_power = block_power @ block_power
    return total


def stic(
    loss_fn: LossFn,
    params: torch.Tensor,
    batch_x: torch.Tensor,
    batch_y: torch.Tensor | None = None,
    *,
    train_size: int,
    lr: float | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """STIC: Corollary 2's generalization gap as a differentiable regularizer.

    With ``Ĉ = (1/(n−1)) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ`` the unbiased covariance of the
    per-sample gradients ``g_i = ∇l_i(θ)`` of the batch (``torch.func.vmap(grad)``) and
    ``H`` the materialized Hessian of the batch's mean loss,

        STIC(θ) = tr(Ĉ H^{-1}) / N                      (T → ∞; H ≻ 0), or
        STIC(θ) = tr(Ĉ (I − (I − ηH)^T) H^{-1}) / N     (with lr, steps),

    the second computed as ``tr(Ĉ · η Σ_{k<T} K^k)/N`` (doubling, no inverse: valid
    for singular ``H`` too).  The result is a torch scalar differentiable with respect
    to ``params`` (to be added to the training loss, e.g. to tune a weight decay by
    gradient descent); with ``Ĉ = H`` it is AIC's ``P/N``.  The Hessian is ``P × P``,
    so this suits small models.

    Args:
        loss_fn: ``loss_fn(params, x)`` (or ``loss_fn(params, x, y)`` when ``batch_y``
            is given): the scalar loss of one row.
        params: 1-D floating tensor.
        batch_x: the rows, shape ``(n, ...)``, ``n ≥ 2`` (usually the training set).
        batch_y: optional targets, one per row.
        train_size: ``N``, the size of the training set the gap refers to.
        lr: ``η`` for the finite-``T`` form (together with ``steps``).
        steps: ``T`` for the finite-``T`` form (together with ``lr``).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: fewer than 2 rows, only one of ``lr`` and ``steps``, or (infinite-T
            form) a Hessian that is not positive definite.

    Example:
        >>> import torch
        >>> f = lambda p, x: 0.5 * (p - x) @ (p - x)  # H = I, Ĉ = sample covariance of x
        >>> xs = torch.tensor([[1.0, 0], [-1, 0], [0, 2], [0, -2]], dtype=torch.float64)
        >>> p = torch.zeros(2, dtype=torch.float64)
        >>> round(float(stic(f, p, xs, train_size=4)), 12)  # tr Ĉ / N = (2/3 + 8/3)/4
        0.833333333333
        >>> round(float(stic(f, p, xs, train_size=4, lr=1.0, steps=5)), 12)  # K = 0
        0.833333333333
    """
    params, xs, ys = _check_batch(loss_fn, params, batch_x, batch_y, what="stic")
    train_size = _check_count("train_size", train_size)
    if (lr is None) != (steps is None):
        raise ValueError(
            "pass both lr and steps (finite-T STIC) or neither (the T → ∞ limit), got "
            f"lr={lr!r}, steps={steps!r}"
        )
    grads, losses = _per_sample(loss_fn, xs, ys)
    cov = _sample_covariance(grads(params))
    hess = hessian(lambda p: losses(p).mean())(params)
    if lr is None:
        with torch.no_grad():
            evals = torch.linalg.eigvalsh(hess)
        if float(evals.min()) <= _tolerance(evals):
            raise ValueError(
                "the T → ∞ STIC needs a positive-definite Hessian; its smallest eigenvalue "
                f"is {float(evals.min()):.3g} (pass lr and steps for the finite-T form)"
            )
        return torch.trace(torch.linalg.solve(hess, cov)) / train_size
    lr = _check_lr(lr)
    steps = _check_count("steps", steps)
    k = torch.eye(hess.shape[0], dtype=hess.dtype, device=hess.device) - lr * hess
    return lr * (cov * _geometric_sum(k, steps)).sum() / train_size


# ------------------------------------------------------------------- Corollary 4


def gdc_loss(loss_fn: LossFn, *, lr: float, train_size: int) -> Callable[..., torch.Tensor]:
    """Corollary 4 (GDC): the modified loss on which full-batch GD emulates SGD.

    Returns ``f(params, batch_x, batch_y=None)`` with

        f(θ) = (1/n) Σ_i l_i(θ) + (N−1)/(4N) · η · tr Ĉ(θ),
        Ĉ(θ) = (1/(n−1)) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ,  g_i = ∇l_i(θ),

    differentiable in ``θ`` (``torch.func``).  With the batch the whole training set
    (``n = N``), ``T = N`` steps of GD at learning rate ``η`` on ``f`` have the same
    expected test loss as one epoch of batch-size-1 SGD through ``η²``.

    Derivation (the engine: ``perturb.series(2, Epochs(batch_size=1, epochs=1))`` and
    ``perturb.series(2, GD(steps=N))``): SGD gives ``l − ηN G·G + η²[(N² − N/2)
    G·H·G + (N/2) tr(CH)]``; GD on the plain training loss adds
    ``η² (N−1)/2 · G_b ⟨∇l,∇∇l⟩_(a,ab) = η² (N−1)/4 · G·∇tr C``, from a point seen at
    two steps.  The penalty ``λη tr Ĉ`` (``E Ĉ = C``) changes the first-order term
    ``−ηN G·E∇f`` by ``−η² N λ G·∇tr C`` and nothing else through ``η²``, which cancels
    it for ``λ = (N−1)/(4N)``.

    Args:
        loss_fn: ``loss_fn(params, x)`` or ``loss_fn(params, x, y)``, one row's loss.
        lr: the learning rate ``η > 0`` GD will use.
        train_size: ``N``, the training-set size.

    Returns:
        The modified loss ``f(params, batch_x, batch_y=None)``, a torch scalar.  With
        ``N = 1`` the penalty vanishes (a batch of one row is then allowed).

    Example:
        >>> import torch
        >>> f = gdc_loss(lambda p, x: p[0] * x[0], lr=0.1, train_size=2)
        >>> xs = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # g = 1, 3: Ĉ = 2
        >>> round(float(f(torch.ones(1, dtype=torch.float64), xs)), 12)  # 2 + (1/8)·0.1·2
        2.025
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    lr = _check_lr(lr)
    train_size = _check_count("train_size", train_size)
    weight = (train_size - 1) / (4 * train_size) * lr

    def modified(
        params: torch.Tensor, batch_x: torch.Tensor, batch_y: torch.Tensor | None = None
    ) -> torch.Tensor:
        p, xs, ys = _check_batch(
            loss_fn, params, batch_x, batch_y, what="gdc_loss", min_rows=1 if weight == 0 else 2
        )
        grads, losses = _per_sample(loss_fn, xs, ys)
        mean = losses(p).mean()
        if weight == 0:
            return mean
        return mean + weight * torch.trace(_sample_covariance(grads(p)))

    return modified


# ------------------------------------------------------------------- Corollary 5


def _check_series(series: object) -> Series:
    if not isinstance(series, Series):
        raise TypeError(f"series must be a perturb Series, got {type(series).__name__}")
    if series.form != "cumulant":
        raise ValueError(
            "noise parts are defined on the cumulant form (a moment mixes means into "
            f"multi-node parts); got form={series.form!r}: build it with form='cumulant'"
        )
    return series


def _filtered(series: Series, keep: Callable[[tuple[tuple[int, ...], ...]], bool]) -> Series:
    terms = tuple(t for t in series.terms if keep(t.contraction.parts))
    return Series(
        order=series.order,
        schedule=series.schedule,
        quantity=series.quantity,
        form=series.form,
        terms=terms,
    )


def sgd_minus_ode(series: Series) -> Series:
    """Corollary 5: the part of a series that the noiseless ODE (gradient flow) lacks.

    A term is noise when its contraction has a part with more than one node (a joint
    cumulant of per-sample derivatives: ``C``, ``⟨∇l,∇∇l⟩``, ``S`` …); the terms whose
    parts are all singletons involve only means (``G``, ``H``, ``J`` …) and are what a
    deterministic descent on ``l`` sees.  For online SGD with ``B = 1`` this starts with
    ``(T/2) tr(C H) η²``.

    Args:
        series: a cumulant-form :class:`~perturb.symbolic.series.Series`.

    Returns:
        A new :class:`~perturb.symbolic.series.Series` with only the noise terms.

    Example:
        >>> import perturb
        >>> print(sgd_minus_ode(perturb.series(2, perturb.Online(batch_size=1))))
        η^0: 0
        η^1: 0
        η^2: (T/2)·tr(C H)
    """
    series = _check_series(series)
    return _filtered(series, lambda parts: any(len(p) > 1 for p in parts))


def non_gaussian_part(series: Series) -> Series:
    """Corollary 5: the terms with cumulants of order three or more (SGD minus SDE).

    An SDE with Gaussian noise of covariance ``C(θ)`` reproduces every term whose
    parts have at most two nodes (means, and second cumulants such as ``C`` and
    ``⟨∇l,∇∇l⟩ = ½∇C``-like mixed ones); what it misses are the terms with a part of
    three or more nodes: ``S = ⟨∇l,∇l,∇l⟩`` and higher joint cumulants.  For online SGD
    with ``B = 1`` the first is ``−(T/6) J:S η³``.

    Args:
        series: a cumulant-form :class:`~perturb.symbolic.series.Series`.

    Returns:
        A new :class:`~perturb.symbolic.series.Series` with only the non-Gaussian terms.

    Example:
        >>> import perturb
        >>> s = non_gaussian_part(perturb.series(3, perturb.Online(batch_size=1)))
        >>> [(t.power, str(t.coefficient), t.contraction.text) for t in s.terms]
        [(3, '-T/6', 'J:S')]
    """
    series = _check_series(series)
    return _filtered(series, lambda parts: any(len(p) > 2 for p in parts))
