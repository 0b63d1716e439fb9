r"""Mean-square (in)stability of SGD near a point, from measured per-sample curvatures.

SGD can be unstable in mean square where GD is stable: the mean dynamics contracts
(``|1 − ηh| < 1`` for every eigenvalue ``h`` of ``H``) while the fluctuations of the
per-sample Hessians ``H_i`` around ``H`` make the second moment of the deviation grow.
This module computes the growth rate of that second moment, the learning rate where it
crosses one, and the growth over a run, on the directions the caller measured.

**The second-moment map.**  Linearize online SGD (batches of ``B`` rows drawn iid, with
replacement, afresh each step) around ``θ_0``: the deviation obeys
``δ_{t+1} = (I − ηH_{B_t}) δ_t``, ``H_B = (1/B) Σ_{b∈B} H_{i_b}`` (gradients at ``θ_0``
add a driving term ``−ηg_B``: the second moment then settles when the map below
contracts and, driven generically, grows like its rate when it does not).  ``B_t`` is
independent of ``δ_t`` (a function of ``B_0..B_{t−1}``), so
``M_t = E[δ_t δ_tᵀ]`` obeys ``M_{t+1} = 𝓛(M_t)`` with

.. math::  𝓛(M) = E[(I − ηH_B) M (I − ηH_B)] = K M K + η^2 E[D_B M D_B],
           \qquad K = I − ηH,\quad D_B = H_B − H,

the cross terms vanishing as ``E[D_B] = 0``.  With ``D_B = (1/B)Σ_b D_{i_b}`` and the
draws independent with mean zero, only ``b = c`` survives in
``(1/B^2)Σ_{b,c} E[D_{i_b} M D_{i_c}]``:

.. math::  𝓛(M) = K M K + \frac{η^2}{B}\, E_i[A_i M A_i],\qquad A_i = H_i − H,

``E_i`` the uniform average over the rows given (the population; the covariance is the
population's, no ``n/(n−1)``).  Batches drawn without replacement from ``n`` rows would
scale the second term by ``(n−B)/(n−1)``; that schedule is not modelled here.

**λ_max is the spectral radius.**  ``𝓛`` maps symmetric matrices to symmetric ones, is
self-adjoint for ``⟨X, Y⟩ = tr(XY)`` (``tr(N·AMA) = tr(ANA·M)`` for symmetric ``A``),
and positive (a sum of congruences maps PSD to PSD).  For an eigenvector ``M`` of the
lowest eigenvalue write ``M = M_+ − M_-`` (PSD parts on orthogonal ranges) and
``|M| = M_+ + M_-`` (same norm); then
``⟨|M|,𝓛|M|⟩ + ⟨M,𝓛M⟩ = 2(⟨M_+,𝓛M_+⟩ + ⟨M_-,𝓛M_-⟩) ≥ 0``, so
``λ_max ≥ −λ_min``: the spectral radius ``ρ(𝓛)`` is ``λ_max``; and for a top
eigenvector ``M``, ``⟨|M|,𝓛|M|⟩ − ⟨M,𝓛M⟩ = 4⟨M_+,𝓛M_-⟩ ≥ 0`` makes ``|M|`` one too:
a PSD top eigenvector ``M_*``.  Hence
``‖M_t‖_F ≤ ρ^t ‖M_0‖_F`` and, with ``⟨M_*, M_t⟩ = ⟨𝓛^t M_*, M_0⟩ = ρ^t δ_0ᵀM_*δ_0``,
``E‖δ_t‖^2 = tr M_t ≥ ρ^t δ_0ᵀM_*δ_0 / ‖M_*‖``: the second moment grows like ``ρ^t``
from every ``δ_0`` outside a proper subspace.  (On all ``m×m`` matrices ``λ_max`` is the
same ``ρ``: the argument on Hermitian matrices gives a PSD top eigenvector ``R + iW``,
whose real part ``R`` is a real symmetric one.)

**Compression: a rigorous lower bound.**  Let ``U`` (``P×m``) have orthonormal columns.
``S ↦ USUᵀ`` embeds symmetric ``m×m`` matrices isometrically, and
``Uᵀ𝓛(USUᵀ)U = K_U S K_U + (η^2/B) E_i[A_{U,i} S A_{U,i}]`` with ``K_U = UᵀKU = I −
ηUᵀHU`` and ``A_{U,i} = Uᵀ(H_i − H)U``: the same formula on the projected matrices.  Its
``λ_max`` is a maximum of the Rayleigh quotient of ``𝓛`` over a subspace, so it is at
most ``λ_max(𝓛)`` (Cauchy interlacing).  A rate above one on any ``m`` directions
therefore *proves* mean-square instability of the full linearized dynamics; a rate below
one proves nothing about the directions left out.  With ``m = 1`` (a unit vector ``u``)
the rate is ``(1 − ηuᵀHu)^2 + (η^2/B) Var_i(uᵀH_iu)``, a further lower bound for any ``U``
whose span holds ``u``.

**Computation.**  In the eigenbasis of ``H_U`` (``h_a``, an orthogonal change of basis
``S ↦ VᵀSV`` of the symmetric matrices, which keeps the spectrum) the orthonormal basis
``e_{ac} = (E_{ac} + E_{ca})/\sqrt 2`` (``a < c``), ``e_{aa} = E_{aa}`` of the
``N = m(m+1)/2`` symmetric matrices makes ``M ↦ KMK`` diagonal (``(1 − ηh_a)(1 − ηh_c)``)
and the noise term the fixed ``N×N`` matrix ``C_{pq} = ⟨e_p, E_i[A_i e_q A_i]⟩ =
2α_pα_q E_i[A_{ab}A_{cd} + A_{ad}A_{cb}]`` (``p = (a,c)``, ``q = (b,d)``, ``α = 1/2``
on the diagonal, ``1/\sqrt 2`` off it).  ``C`` costs one ``N×n`` by ``n×N`` product,
``O(n m^4/4)``, once for all ``η``; each rate is then the top eigenvalue of the dense
symmetric ``diag((1 − ηh_a)(1 − ηh_c)) + (η^2/B) C``, ``O(N^3)``.  Dense rather than
Lanczos on the matrix-free map (``O(n m^3)`` per product): the products would cost more
than the dense eigenvalue for ``n ≳ m``, the eigenvalues cluster near one at small ``η``
(slow Lanczos), and a dense solve is exact to rounding.  ``m`` is limited to
:data:`MAX_DIRECTIONS` (``N^2`` floats); compress to fewer directions for more (still a
lower bound).

**Threshold.**  For ``η > 0``, ``ρ(𝓛_η) ≤ 1`` iff ``λ_max(ηQ − L) ≤ 0`` with
``𝓛_η = I − ηL + η^2 Q``, ``L(M) = HM + MH`` and ``Q(M) = HMH + E_i[A_iMA_i]/B``.
``η ↦ λ_max(ηQ − L)`` is convex (``λ_max`` of an affine family), so the stable set is an
interval ``[0, η_*]`` and the rate exceeds one for every ``η > η_*``.  If ``h_min < 0``,
``M = vvᵀ`` (``Hv = h_min v``) gives ``⟨M,(ηQ − L)M⟩ > 0`` for every ``η``: ``η_* = 0``.
Directions ``u`` with ``Hu = 0`` and every ``H_iu = 0`` are *flat*: ``𝓛`` is the identity
on symmetric matrices supported there and decouples from the rest, so they are
removed (singular values of ``[H; H_1; …; H_n]`` below :data:`FLAT_RTOL` times the
largest).  If ``h_min = 0`` on a non-flat direction, ``η_* = 0`` again:
``⟨vvᵀ,(L − ηQ)vvᵀ⟩ = −ηE_i(vᵀA_iv)^2/B ≤ 0``, and a PSD ``L − ηQ`` with that zero
diagonal entry would need ``(L − ηQ)(vvᵀ) = −ηE_i[(A_iv)(A_iv)ᵀ]/B = 0``, i.e. a flat
``v``.  Otherwise ``L`` is positive definite, diagonal ``h_a + h_c`` in the basis above, and
``L − ηQ ⪰ 0`` iff ``η ≤ 1/λ_max(L^{-1/2} Q L^{-1/2})``: the threshold is one eigenvalue,
no bisection.  The ``(a, a)`` entry of that matrix is at least ``h_a/2``, so
``η_* ≤ 2/h_max``, GD's threshold.  In one dimension with ``B = 1`` it is
``2E[H_i]/E[H_i^2]``.

Example:
    >>> import numpy as np
    >>> curv = np.array([[[0.0]], [[2.0]]])  # two rows, h = 1, Var = 1: GD stable to η = 2
    >>> mean_square_rate(curv.mean(0), curv, lr=[0.5, 1.5]).round(6)  # 1 − 2η + 2η²
    array([0.5, 2.5])
    >>> round(mean_square_threshold(curv.mean(0), curv), 12)  # 2E[x²]/E[x⁴]
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch.func import vmap
from tqdm.auto import tqdm

from perturb.checks import check_int, check_ints, check_lrs
from perturb.numeric.adapters import Objective, objective
from perturb.numeric.derivatives import derivative
from perturb.numeric.distributed import (
    all_ints,
    gather_blocks,
    local_share,
    same_on_all_ranks,
    world,
)

__all__ = [
    "FLAT_RTOL",
    "MAX_DIRECTIONS",
    "SYMMETRY_RTOL",
    "mean_square_growth",
    "mean_square_rate",
    "mean_square_threshold",
    "per_sample_curvatures",
    "per_sample_top_curvatures",
]

MAX_DIRECTIONS = 96
"""Most directions ``m`` accepted: the dense map has ``(m(m+1)/2)^2`` entries (173 MB at 96)."""

SYMMETRY_RTOL = 1e-4
"""Largest ``‖X − Xᵀ‖_F / ‖X‖_F`` accepted for the Hessians (they are then symmetrized)."""

FLAT_RTOL = 1e-10
"""Directions whose curvature (``H`` and every ``H_i``) is below this times the largest are
flat: neutral in mean square, left out of :func:`mean_square_threshold`."""


def _as_float64(name: str, value: Any) -> np.ndarray:
    """``value`` (a tensor, array or nested sequence of real numbers) as a float64 array."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a {value.dtype} tensor")
        return value.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array of real numbers, got {value!r}") from err
    if array.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must be an array of real numbers, got dtype {array.dtype} "
            f"({type(value).__name__})"
        )
    return array.astype(np.float64)


def _symmetric(name: str, array: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(array)).sum())} nan/inf")
    swapped = np.swapaxes(array, -1, -2)
    scale = float(np.linalg.norm(array))
    asym = float(np.linalg.norm(array - swapped))
    if asym > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric: ‖X − Xᵀ‖/‖X‖ = {asym / scale:.3g} "
            f"(at most {SYMMETRY_RTOL:g} accepted)"
        )
    return (array + swapped) / 2


def _curvatures(hessian: Any, per_sample_hessians: Any) -> tuple[np.ndarray, np.ndarray]:
    """The checked, symmetrized ``H`` (``m×m``) and centred ``A_i = H_i − E_iH_i``."""
    h = _as_float64("hessian", hessian)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] == 0:
        raise ValueError(f"hessian must be a square (m, m) matrix, m ≥ 1, got shape {h.shape}")
    m = h.shape[0]
    if m > MAX_DIRECTIONS:
        raise ValueError(
            f"at most {MAX_DIRECTIONS} directions are supported (the dense second-moment map "
            f"has (m(m+1)/2)² entries), got m = {m}; project on fewer directions (the rate on "
            "any subspace is still a lower bound)"
        )
    hs = _as_float64("per_sample_hessians", per_sample_hessians)
    if hs.ndim != 3 or hs.shape[1:] != (m, m) or hs.shape[0] == 0:
        raise ValueError(
            f"per_sample_hessians must have shape (n, {m}, {m}), n ≥ 1, matching hessian "
            f"{h.shape}, got shape {hs.shape}"
        )
    h = _symmetric("hessian", h)
    hs = _symmetric("per_sample_hessians", hs)
    return h, hs - hs.mean(axis=0)


def _noise_operator(a: np.ndarray, chunk: int = 512) -> np.ndarray:
    """``C_{pq} = ⟨e_p, E_i[A_i e_q A_i]⟩`` on the orthonormal symmetric basis (module doc)."""
    n, m, _ = a.shape
    first, second = np.triu_indices(m)
    index = np.empty((m, m), dtype=np.int64)
    index[first, second] = index[second, first] = np.arange(first.size)
    alpha = np.where(first == second, 0.5, math.sqrt(0.5))
    z = a[:, first, second]  # (n, N): the upper triangle of each A_i
    moments = z.T @ z / n  # E[A_xy A_uv] at pair indices
    out = np.empty((first.size, first.size))
    b, d = first, second  # q = (b, d)
    for start in range(0, first.size, chunk):
        p = slice(start, min(start + chunk, first.size))
        pa, pc = first[p, None], second[p, None]
        out[p] = moments[index[pa, b], index[pc, d]] + moments[index[pa, d], index[pc, b]]
    return 2 * alpha[:, None] * alpha[None, :] * out


def _eigenframe(h: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of ``H`` and the noise operator ``C`` in ``H``'s eigenbasis."""
    evals, evecs = np.linalg.eigh(h)
    rotated = evecs.T @ a @ evecs
    return evals, _noise_operator(rotated)


def _top(matrix: np.ndarray) -> float:
    size = matrix.shape[0]
    return float(
        scipy.linalg.eigh(matrix, eigvals_only=True, subset_by_index=[size - 1, size - 1])[0]
    )


def mean_square_rate(
    hessian: Any, per_sample_hessians: Any, *, lr: float | Sequence[float], batch_size: int = 1
) -> np.ndarray:
    r"""The growth rate per step of ``E[δδᵀ]`` under linearized online SGD, per learning rate.

    .. math::  ρ(η) = λ_{\max}\Big(M ↦ (I − ηH)M(I − ηH) + \frac{η^2}{B}
               E_i[(H_i − H)M(H_i − H)]\Big)

    over symmetric ``M`` (the spectral radius of the second-moment map; module docstring).
    On a subspace (the matrices projected on orthonormal directions ``U``) it is a lower
    bound on the full rate, so ``ρ > 1`` proves mean-square instability.  With ``m = 1``
    it is ``(1 − ηh)^2 + η^2 Var_i(h_i)/B``.  Flat directions (``H`` and every ``H_i``
    vanishing there) are neutral: they hold ``ρ ≥ 1`` exactly.

    Args:
        hessian: ``H``, ``(m, m)``: the mean Hessian in an orthonormal basis (e.g.
            :attr:`~perturb.numeric.krylov.KrylovSubspace.hessian`); ``K = I − ηH`` uses
            it as given, even where it is not the mean of ``per_sample_hessians`` (say,
            measured on more rows).
        per_sample_hessians: ``H_i``, ``(n, m, m)`` in the same basis (e.g.
            :func:`per_sample_curvatures`); centred at their own mean, so their
            covariance is the population's exactly.
        lr: ``η``, one learning rate or several.
        batch_size: ``B``, rows per step, drawn iid with replacement.

    Returns:
        ``ρ(η)`` for each learning rate, float64, shape ``(len(lr),)``.

    Raises:
        ValueError: for misshapen, non-finite or asymmetric Hessians, more than
            :data:`MAX_DIRECTIONS` directions, a learning rate that is not positive and
            finite, or a batch size below one.
        TypeError: for Hessians that are not arrays of real numbers.

    Example:
        >>> import numpy as np
        >>> hs = np.array([[[0.0]], [[2.0]]])  # E[x²] = 1, E[x⁴] = 2
        >>> mean_square_rate([[1.0]], hs, lr=[0.5, 1.0], batch_size=2).round(6)
        array([0.375, 0.5  ])
    """
    h, a = _curvatures(hessian, per_sample_hessians)
    lrs = check_lrs(lr, name="lr")
    batch = check_int("batch_size", batch_size, minimum=1)
    evals, noise = _eigenframe(h, a)
    first, second = np.triu_indices(h.shape[0])
    rates = []
    for eta in lrs:
        k = 1 - eta * evals
        op = eta**2 / batch * noise
        op[np.diag_indices_from(op)] += k[first] * k[second]
        rates.append(_top(op))
    return np.array(rates)


def mean_square_threshold(hessian: Any, per_sample_hessians: Any, *, batch_size: int = 1) -> float:
    r"""The learning rate above which the second moment grows: ``η_* = sup{η : ρ(η) ≤ 1}``.

    The rate :func:`mean_square_rate` exceeds one for every ``η > η_*`` and not below
    (the stable set is an interval, module docstring).  For positive definite ``H``

    .. math::  η_* = 1\big/λ_{\max}\big(L^{-1/2} Q L^{-1/2}\big),\quad L(M) = HM + MH,
               \quad Q(M) = HMH + \tfrac1B E_i[(H_i − H)M(H_i − H)],

    one eigenvalue, at most GD's ``2/h_max``; ``2E[h_i]/E[h_i^2]`` in one dimension at
    ``B = 1``.  Directions where ``H`` and every ``H_i`` vanish (below :data:`FLAT_RTOL`)
    are neutral and left out.

    Args:
        hessian: ``H``, ``(m, m)``, as in :func:`mean_square_rate`.
        per_sample_hessians: ``H_i``, ``(n, m, m)``, as in :func:`mean_square_rate`.
        batch_size: ``B``.

    Returns:
        ``η_*``; ``0.0`` when ``H`` has a negative (or, on a non-flat direction, zero)
        eigenvalue: the rate exceeds one at every ``η > 0``; ``math.inf`` when every
        direction is flat (the rate is one at every ``η``).  Computed on the directions
        given, it is an upper bound on the threshold of the full problem.

    Raises:
        ValueError: as :func:`mean_square_rate`.
        TypeError: as :func:`mean_square_rate`.

    Example:
        >>> import numpy as np
        >>> hs = np.array([[[0.0]], [[2.0]]])
        >>> [round(mean_square_threshold([[1.0]], hs, batch_size=b), 12) for b in (1, 3)]
        [1.0, 1.5]
        >>> mean_square_threshold([[-0.1]], hs - 1.1)  # negative curvature: unstable at once
        0.0
    """
    h, a = _curvatures(hessian, per_sample_hessians)
    batch = check_int("batch_size", batch_size, minimum=1)
    m = h.shape[0]
    stacked = np.concatenate([h[None], a], axis=0).reshape(-1, m)  # flat: Hu = 0, A_iu = 0
    _, sing, vt = np.linalg.svd(stacked, full_matrices=False)
    keep = sing > FLAT_RTOL * sing[0] if sing[0] > 0 else np.zeros(m, dtype=bool)
    if not keep.any():
        return math.inf
    basis = vt[keep].T  # (m, r): the non-flat directions
    h, a = basis.T @ h @ basis, basis.T @ a @ basis
    evals, noise = _eigenframe(h, a)
    if evals[0] <= 0:
        return 0.0
    first, second = np.triu_indices(h.shape[0])
    quad = noise / batch
    quad[np.diag_indices_from(quad)] += evals[first] * evals[second]
    scale = 1 / np.sqrt(evals[first] + evals[second])
    return 1 / _top(scale[:, None] * quad * scale[None, :])


def mean_square_growth(
    hessian: Any,
    per_sample_hessians: Any,
    *,
    lr: float | Sequence[float],
    steps: int,
    batch_size: int = 1,
) -> np.ndarray:
    r"""``log`` of the factor by which the root-mean-square deviation can grow in ``T`` steps.

    .. math::  \tfrac T2 \log\max(1, ρ(η))

    per learning rate, ``ρ`` from :func:`mean_square_rate`.  The second moment grows by
    ``ρ^T``, so its square root (an amplitude, like ``δ`` itself) by ``ρ^{T/2}``; the
    convention of :func:`perturb.numeric.predictions.growth`
    (``T log max(1, max_a |1 − ηh_a|)``, the growth of ``K^T`` along the mean
    dynamics), which it equals when every ``H_i = H`` (then ``ρ = max_a (1 − ηh_a)^2``).
    Its maximum compares with the same
    :data:`~perturb.numeric.predictions.UNSTABLE_GROWTH`.

    Args:
        hessian: ``H``, ``(m, m)``, as in :func:`mean_square_rate`.
        per_sample_hessians: ``H_i``, ``(n, m, m)``, as in :func:`mean_square_rate`.
        lr: one learning rate or several.
        steps: ``T``.
        batch_size: ``B``.

    Returns:
        The growth for each learning rate, float64, shape ``(len(lr),)``; zero where
        ``ρ ≤ 1``.

    Raises:
        ValueError: as :func:`mean_square_rate`, or for ``steps`` below one.
        TypeError: as :func:`mean_square_rate`.

    Example:
        >>> import numpy as np
        >>> hs = np.array([[[0.0]], [[2.0]]])
        >>> mean_square_growth([[1.0]], hs, lr=[0.5, 1.5], steps=10).round(4)  # 5·log 2.5
        array([0.    , 4.5815])
    """
    steps = check_int("steps", steps, minimum=1)
    rates = mean_square_rate(hessian, per_sample_hessians, lr=lr, batch_size=batch_size)
    return steps / 2 * np.log(np.maximum(rates, 1.0))


def per_sample_curvatures(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    basis: torch.Tensor,
    loss: Any = None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The per-sample Hessians projected on ``m`` directions, ``UᵀH_iU``, and their mean.

    Matrix-free: ``n·m`` per-sample Hessian-vector products (``jvp`` of ``grad``,
    :func:`perturb.numeric.derivatives.derivative`), never a ``P×P`` array.  The
    result feeds :func:`mean_square_rate` directly
    (``mean_square_rate(*per_sample_curvatures(...), lr=...)``).  A
    :class:`~perturb.numeric.krylov.KrylovSubspace` built for GD's schedule already holds
    the same tensors as ``derivs[2]`` (with ``hessian`` from the mean loss).

    Args:
        loss_fn_or_model: an ``nn.Module`` (with ``data = (x, y)``), a
            :class:`~perturb.numeric.adapters.FlatLoss`, a per-row ``loss_fn(params, row)``,
            a :class:`~perturb.numeric.population.Population` (``data=None``) or an
            :class:`~perturb.numeric.adapters.Objective` (its rows and point are used).
        data: the rows.
        theta0: the point (a model's own parameters by default).
        basis: ``U``, ``(P, m)`` with orthonormal columns (e.g.
            :attr:`~perturb.numeric.krylov.KrylovSubspace.basis` or some of its columns).
        loss: per-sample loss of a model's output (default cross-entropy).
        chunk_size: rows per vectorized call (memory ``chunk_size·m·P``); default about
            16 MB of products.
        dtype: float64 (default) or float32 for the network evaluations.
        device: where the network is evaluated (default: ``theta0``'s).

    Returns:
        ``(hessian, per_sample_hessians)``: the mean ``(m, m)`` and the ``(n, m, m)``
        projections (symmetrized), float64 on the CPU.

    Raises:
        ValueError: for a basis that is not ``(P, m)``, ``m ≥ 1``, with orthonormal
            columns, a bad ``chunk_size``, or anything :func:`~perturb.numeric.adapters.objective`
            rejects.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> loss_fn = lambda p, row: 0.5 * (row @ p) ** 2  # H_i = x_i x_iᵀ
        >>> h, hs = per_sample_curvatures(loss_fn, x, torch.zeros(1), basis=torch.eye(1))
        >>> h.tolist(), hs.flatten().tolist()
        ([[2.5]], [1.0, 4.0])
    """
    if isinstance(loss_fn_or_model, Objective):
        obj = loss_fn_or_model
    else:
        obj = objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    p, n = obj.size, obj.n
    u = torch.as_tensor(basis)
    if u.ndim != 2 or u.shape[0] != p or u.shape[1] == 0 or not u.is_floating_point():
        raise ValueError(
            f"basis must be a real (P, m) matrix with P = {p} parameters and m ≥ 1 columns, "
            f"got {u.dtype} of shape {tuple(u.shape)}"
        )
    u = u.detach().to(device=obj.theta0.device, dtype=obj.theta0.dtype)
    m = u.shape[1]
    gram = (u.T @ u).to("cpu", torch.float64)
    off = float((gram - torch.eye(m, dtype=torch.float64)).abs().max())
    tol = math.sqrt(torch.finfo(obj.theta0.dtype).eps)
    if not off <= tol:
        raise ValueError(
            f"basis columns must be orthonormal: max |UᵀU − I| = {off:.3g} (at most {tol:.3g})"
        )
    if chunk_size is None:
        chunk_size = max(1, min(n, 2**21 // (m * p)))
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    hvp = derivative(obj.single, vector=True)

    def projected(*row: torch.Tensor) -> torch.Tensor:  # (m, m): [a, b] = u_bᵀ H_i u_a
        return vmap(lambda v: hvp(obj.theta0, row, (v,)))(u.T) @ u

    parts = []
    for start in range(0, n, chunk_size):
        rows = tuple(r[start : start + chunk_size] for r in obj.rows)
        parts.append(vmap(projected)(*rows).detach().to("cpu", torch.float64))
    per_sample = torch.cat(parts)
    per_sample = (per_sample + per_sample.transpose(1, 2)) / 2
    return per_sample.mean(dim=0), per_sample


def per_sample_top_curvatures(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    rows: Sequence[int] | None = None,
    count: int | None = None,
    iterations: int = 30,
    seed: int = 0,
    loss: Any = None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    distributed: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""``λ_max(H_i)``, the largest curvature of each single sample, by batched power iteration.

    One SGD step on sample ``i`` maps a deviation along its top eigenvector by
    ``1 − ηλ_max(H_i)``: beyond ``η λ_max(H_i) > 2`` that step *amplifies* it, however rare
    the sample and whatever the mean-square rate (which averages over samples and can
    stay below one).  Near a minimum where a few samples carry curvature far above the
    mean Hessian's, this is the first step SGD's loss jumps at.

    Power iteration on every row examined at once: from a seeded random unit start
    ``v_{i,0}`` (one per row, all drawn up front, so the result does not depend on
    ``chunk_size``),

    .. math::  w_{i,t} = H_i v_{i,t}, \qquad v_{i,t+1} = w_{i,t} / ‖w_{i,t}‖,
               \qquad λ_i = v_{i,T−1}ᵀ H_i v_{i,T−1} \quad (T = \text{iterations}),

    the Rayleigh quotient of the last iterate.  It converges to the eigenvalue of ``H_i``
    of largest magnitude, its error shrinking like ``(|λ_2|/|λ_1|)^{2(T−1)}`` (no
    convergence when the two largest magnitudes tie, e.g. ``±λ``), and is never larger
    in magnitude.  A row whose product vanishes (``H_iv = 0``) stops there with
    ``λ_i = 0``.  Matrix-free: each iteration is one ``vmap`` of the per-sample
    Hessian-vector product (reverse-over-reverse ``∇(∇l_i·v)``,
    :func:`perturb.numeric.derivatives.derivative` with ``reverse_first``: under ``vmap``
    it is far faster than ``jvp`` of ``grad`` through convolutions) per chunk of rows, so
    the cost is ``iterations`` batched passes over the rows, ``iterations·n`` products in
    all.

    Args:
        loss_fn_or_model: as :func:`per_sample_curvatures`.
        data: the rows.
        theta0: the point.
        rows: indices of the rows to examine (default: every row, or the ``count`` of
            largest loss).
        count: examine only the ``count`` rows of largest loss (where a near-minimum
            network's curvature concentrates), largest first; ``None`` (default): every
            row.  Not together with ``rows``.
        iterations: ``T``, power iterations per row.
        seed: seed of the starts (one :class:`torch.Generator`, ``(n_rows, P)`` normals).
        loss: per-sample loss of a model's output (default cross-entropy).
        chunk_size: rows per vectorized call (memory ``chunk_size·P`` per product, plus
            the network's intermediates for that many rows); default about 16 MB of
            products.
        dtype: float64 (default) or float32 for the network evaluations.
        device: where the network is evaluated.
        distributed: under ``torchrun`` (a default process group of ``W > 1`` ranks)
            rank ``r`` iterates only on the rows examined
            :func:`~perturb.numeric.distributed.shard` ``(k, r, W)`` (their starts as
            above) and the curvatures are all-gathered in row order: every rank gets the
            single-process result.  Every rank must pass the same arguments.  ``False``:
            every row here.
        progress: show a tqdm bar (standard error, rank 0 only) over the power
            iterations of the chunks of rows; the curvatures do not depend on it.

    Returns:
        ``(indices, curvatures)``: the rows examined (int, in the order of ``rows``, by
        default ``0..n−1``) and their ``λ_max(H_i)`` estimates, float64.

    Raises:
        ValueError: for ``count`` or ``iterations`` below one, a bad ``chunk_size``, a row
            index outside ``0..n−1``, both ``rows`` and ``count``, or anything
            :func:`~perturb.numeric.adapters.objective` rejects.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
        >>> loss_fn = lambda p, row: 0.5 * (row @ p) ** 2  # H_i = x_i x_iᵀ, λ = |x_i|²
        >>> idx, lam = per_sample_top_curvatures(loss_fn, x, torch.ones(2), rows=[0, 1])
        >>> idx.tolist(), lam.round(6).tolist()
        ([0, 1], [1.0, 9.0])
        >>> per_sample_top_curvatures(loss_fn, x, torch.ones(2))[1].round(6).tolist()
        [1.0, 9.0, 8.0]
        >>> per_sample_top_curvatures(loss_fn, x, torch.ones(2), count=1)[0].tolist()
        [2]
    """
    if isinstance(loss_fn_or_model, Objective):
        obj = loss_fn_or_model
    else:
        obj = objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    n, p = obj.n, obj.size
    iterations = check_int("iterations", iterations, minimum=1)
    if rows is not None and count is not None:
        raise ValueError(f"give rows or count, not both: got rows={rows!r} and count={count!r}")
    if rows is not None:
        if isinstance(rows, torch.Tensor | np.ndarray):
            rows = rows.tolist()
        picked = list(check_ints("rows", rows, minimum=0, maximum=n - 1))
    elif count is not None:
        count = check_int("count", count, minimum=1)
        losses = obj.batch(obj.theta0, *obj.rows).detach()
        picked = torch.argsort(losses, descending=True)[: min(count, n)].tolist()
    else:
        picked = list(range(n))
    k = len(picked)
    if chunk_size is None:
        chunk_size = max(1, min(k, 2**21 // p))
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randn(k, p, generator=gen, dtype=torch.float64)
    starts = starts / torch.linalg.vector_norm(starts, dim=1, keepdim=True)
    hvp = derivative(obj.single, vector=True, reverse_first=True)
    batched = vmap(lambda v, *row: hvp(obj.theta0, row, (v,)))
    index = torch.as_tensor(picked, dtype=torch.long, device=obj.rows[0].device)
    mine = local_share(k, distributed=distributed)
    if len(mine) < k:
        agree = all_ints([k, p, int(seed), iterations, int(sum(picked))])
        same_on_all_ranks("rows examined, parameters, seed, iterations, sum of rows", agree)
    out = torch.zeros(k, dtype=torch.float64)
    chunks = range(mine.start, mine.stop, chunk_size)
    bar = tqdm(
        total=len(chunks) * iterations, desc="sample curvature", unit="it",
        disable=not progress or (len(mine) < k and world()[0] > 0),
    )  # fmt: skip
    for first in chunks:
        last = min(first + chunk_size, mine.stop)
        sel = index[first:last]
        v = starts[first:last].to(obj.theta0)
        lam = torch.zeros(len(sel), dtype=torch.float64, device=v.device)
        live = torch.arange(len(sel), device=v.device)  # rows still iterating
        for t in range(iterations):
            w = batched(v[live], *(r[sel[live]] for r in obj.rows)).detach()
            lam[live] = (v[live] * w).sum(dim=1).to(torch.float64)
            norm = torch.linalg.vector_norm(w, dim=1)
            going = norm > 0  # a vanishing product: λ = 0 there, and that row stops
            v[live[going]] = w[going] / norm[going, None]
            live = live[going]
            bar.update(1 if live.numel() else iterations - t)
            if live.numel() == 0:
                break
        out[first : first + len(sel)] = lam.cpu()
    bar.close()
    if len(mine) < k:
        return np.asarray(picked, dtype=int), gather_blocks(out[mine.start : mine.stop].numpy(), k)
    return np.asarray(picked, dtype=int), out.numpy()
