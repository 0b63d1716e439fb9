"""Iterate averaging and learning-rate schedules (seed 002, Lemma 2 and Table 1).

An average ``Σ_t w_tθ_t`` of SGD's iterates is, to first order in ``η``, the last iterate
of SGD on an equivalent schedule of rates; here are the averages' weights, the
equivalent schedules, the exact moments of an average on the quadratic model, and the
η-series of an average's test loss, with where the equivalence breaks.
"""

from __future__ import annotations

import torch

from perturb.checks import check_int, check_order
from perturb.experiments.baselines.quadratic import QuadraticModel

__all__ = [
    "AVERAGES",
    "averaging_gap_series",
    "averaging_weights",
    "equivalent_schedule",
    "iterate_average_moments",
    "iterate_average_test_loss",
    "weighted_iterate_series",
]


AVERAGES = ("two_point", "swa", "ema")
"""Averages of a side-trip ``θ_0 … θ_k`` that :func:`averaging_weights` knows."""


def _number(value: object, what: str):
    import sympy as sp

    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got {value!r}")
    try:
        out = sp.sympify(value)
    except (sp.SympifyError, TypeError) as err:
        raise TypeError(f"{what} must be a number, got {value!r}") from err
    if not (out.is_number and out.is_real):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    return out


def averaging_weights(kind: str, *, steps: int, decay: object = None) -> list:
    """Weights ``w_0 … w_k`` of seed 002's averages of the iterates ``θ_0 … θ_k``.

    * ``"two_point"``: ``(θ_0 + θ_k)/2``, the two ends of a ``k``-step side-trip.
    * ``"swa"``: ``(1/k) Σ_{t=1}^{k} θ_t`` (window ``k``, cycle ``c = 1``; the start
      ``θ_0`` is not in the window).
    * ``"ema"``: the EMA ``θ̄_{t+1} = (1−δ)θ̄_t + δθ_{t+1}`` started at ``θ̄_0 = θ_0``:
      ``w_0 = (1−δ)^k``, ``w_t = δ(1−δ)^{k−t}``.

    All sum to one.  Exact (sympy rationals) when ``decay`` is rational.

    Args:
        kind: one of :data:`AVERAGES`.
        steps: ``k ≥ 1``.
        decay: ``δ ∈ (0, 1]``, for ``"ema"`` only.

    Returns:
        A list of ``k + 1`` sympy numbers.

    Example:
        >>> averaging_weights("swa", steps=2)
        [0, 1/2, 1/2]
        >>> averaging_weights("ema", steps=2, decay="1/2")
        [1/4, 1/4, 1/2]
    """
    import sympy as sp

    k = check_int("steps", steps, minimum=1)
    if kind not in AVERAGES:
        raise ValueError(f"kind must be one of {AVERAGES}, got {kind!r}")
    if (decay is None) != (kind != "ema"):
        raise ValueError(f"decay is required for kind='ema' and only there; got {decay!r}")
    if kind == "two_point":
        return [sp.Rational(1, 2)] + [sp.Integer(0)] * (k - 1) + [sp.Rational(1, 2)]
    if kind == "swa":
        return [sp.Integer(0)] + [sp.Rational(1, k)] * k
    d = _number(decay, "decay")
    if not bool(0 < d <= 1):
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    return [(1 - d) ** k] + [d * (1 - d) ** (k - t) for t in range(1, k + 1)]


def _weights(weights: object, what: str = "weights") -> list:
    if isinstance(weights, str | bytes) or not hasattr(weights, "__len__"):
        raise TypeError(f"{what} must be a sequence of numbers, got {weights!r}")
    out = [_number(w, f"{what}[{i}]") for i, w in enumerate(weights)]
    if len(out) < 2:
        raise ValueError(f"{what} needs one entry per iterate θ_0 … θ_k (k ≥ 1), got {len(out)}")
    if abs(float(sum(out)) - 1) > 1e-12:
        raise ValueError(f"{what} must sum to 1 (an average), got sum {float(sum(out))!r}")
    return out


def equivalent_schedule(weights: object) -> list:
    """Seed 002's learning-rate schedule equivalent to averaging the iterates with ``weights``.

    With frozen per-sample gradients ``g_t`` (Lemma 2's assumption), ``θ_t = θ_0 −
    η Σ_{s<t} g_s`` and ``Σ_t w_t θ_t = θ_0 − η Σ_s c_s g_s`` with the tail sums

    ``c_s = Σ_{t>s} w_t``,  ``s = 0 … k−1``,

    which is the last iterate of SGD with learning rate ``η c_s`` at step ``s``.  This
    gives Table 1: two-point ``c_s = ½`` (``η/2``), SWA ``c_s = (k − s)/k`` (linear
    decay, ``(k+1−i)/k`` for ``i = s + 1``), EMA ``c_s = 1 − (1−δ)^{k−s}`` (exactly, when
    the EMA starts at ``θ_0``; seed 002 needs ``k ≫ 1/δ`` because its EMA starts earlier).
    The identity is exact to first order in ``η`` on any landscape; see
    :func:`averaging_gap_series` for the first order where it is not.

    Args:
        weights: ``w_0 … w_k`` summing to one (e.g. from :func:`averaging_weights`).

    Returns:
        ``[c_0, …, c_{k−1}]``, sympy numbers.

    Example:
        >>> equivalent_schedule(averaging_weights("swa", steps=4))
        [1, 3/4, 1/2, 1/4]
        >>> equivalent_schedule(averaging_weights("two_point", steps=3))
        [1/2, 1/2, 1/2]
    """
    w = _weights(weights)
    return [sum(w[s + 1 :]) for s in range(len(w) - 1)]


def _rates(lrs: object, k: int | None = None, what: str = "lrs") -> list[float]:
    if isinstance(lrs, str | bytes) or not hasattr(lrs, "__len__") or len(lrs) < 1:
        raise ValueError(f"{what} must be a non-empty sequence (one per step), got {lrs!r}")
    out = [float(_number(x, f"{what}[{i}]")) for i, x in enumerate(lrs)]
    if k is not None and len(out) != k:
        raise ValueError(f"{what} has {len(out)} entries, expected one per step ({k})")
    return out


def iterate_average_moments(
    model: QuadraticModel,
    *,
    lrs: object,
    weights: object = None,
    batch_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of ``Σ_t w_t θ_t − θ_0`` for SGD with step sizes ``η_t``.

    SGD on the quadratic model with constant noise (see :func:`lyapunov_test_loss`),
    ``Δ_{t+1} = K_tΔ_t − η_t(G + ξ̄_t)``, ``K_t = I − η_tH``, ``Cov ξ̄_t = C/B``, from
    ``Δ_0 = 0``.  With the running sum ``A_t = Σ_{s≤t} w_sΔ_s``, ``P = Cov Δ``,
    ``X = Cov(A, Δ)``, ``Y = Cov A``, one step is linear and the moments obey

    ``m' = K m − ηG``,  ``a' = a + w' m'``,
    ``P' = KPKᵀ + (η²/B)C``,  ``X' = XKᵀ + w'P'``,
    ``Y' = Y + w'(XKᵀ + KXᵀ) + w'²P'``

    (the later noise is independent of the past).  ``H`` and ``C`` need not commute.

    Args:
        model: ``l``, ``G``, ``H``, ``C`` at ``θ_0``.
        lrs: ``η_0 … η_{k−1}``, one learning rate per step.
        weights: ``w_0 … w_k`` (any reals; an average sums to one); ``None``: the last
            iterate (``w = (0, …, 0, 1)``), i.e. plain SGD on the schedule ``lrs``.
        batch_size: ``B``.

    Returns:
        ``(mean, cov)``, shapes ``(P,)`` and ``(P, P)``, float64.

    Example:
        >>> import torch
        >>> q = QuadraticModel(torch.tensor(0.0), torch.zeros(1), torch.eye(1), torch.eye(1))
        >>> m, s = iterate_average_moments(q, lrs=[0.5, 0.5], weights=[0.5, 0, 0.5])
        >>> round(float(s), 6)  # ¼·Var θ_2 = ¼·(¼·¼ + ¼)
        0.078125
    """
    k = len(_rates(lrs))
    etas = _rates(lrs, k)
    if weights is None:
        ws = [0.0] * k + [1.0]
    else:
        if isinstance(weights, str | bytes) or not hasattr(weights, "__len__"):
            raise TypeError(f"weights must be a sequence of numbers, got {weights!r}")
        ws = [float(_number(w, f"weights[{i}]")) for i, w in enumerate(weights)]
        if len(ws) != k + 1:
            raise ValueError(f"weights needs len(lrs) + 1 = {k + 1} entries, got {len(ws)}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    h = model.hess.to(torch.float64)
    c = model.cov.to(torch.float64) / batch_size
    g = model.grad.to(torch.float64)
    p = len(g)
    eye = torch.eye(p, dtype=torch.float64)
    m = torch.zeros(p, dtype=torch.float64)
    a = torch.zeros(p, dtype=torch.float64)
    cov_d = torch.zeros(p, p, dtype=torch.float64)
    cross = torch.zeros(p, p, dtype=torch.float64)
    cov_a = torch.zeros(p, p, dtype=torch.float64)
    for eta, w in zip(etas, ws[1:], strict=True):
        kk = eye - eta * h
        m = kk @ m - eta * g
        a = a + w * m
        cov_d = kk @ cov_d @ kk.T + eta**2 * c
        xk = cross @ kk.T
        cov_a = cov_a + w * (xk + xk.T) + w**2 * cov_d
        cross = xk + w * cov_d
    return a, (cov_a + cov_a.T) / 2


def iterate_average_test_loss(
    model: QuadraticModel,
    *,
    lrs: object,
    weights: object = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Exact expected test loss at ``Σ_t w_tθ_t`` on the quadratic model (seed 002).

    ``l + G·a + ½aᵀHa + ½tr(HY)`` with ``a``, ``Y`` from :func:`iterate_average_moments`.
    Comparing ``weights`` at constant ``lrs = [η]*k`` with ``weights=None`` at
    ``lrs = [η c_s]`` (:func:`equivalent_schedule`) tests seed 002's equivalences: they
    agree through ``η¹`` (and the noise term ``(η²/2B)Σc_s² tr(HC)`` agrees) but the mean
    differs at ``η²`` by ``Σ_{r<s} c_s(1 − c_r)·HG``, so the loss differs by
    ``η²Σ_{r<s}c_s(1 − c_r)·GᵀHG + O(η³)``.

    Example:
        >>> import torch
        >>> q = QuadraticModel(torch.tensor(0.0), torch.ones(1), torch.eye(1), torch.eye(1))
        >>> avg = iterate_average_test_loss(q, lrs=[0.01] * 2, weights=[0.5, 0, 0.5])
        >>> sch = iterate_average_test_loss(q, lrs=[0.005] * 2)
        >>> round(float(avg - sch) / 0.01**2, 2)  # ≈ c_1(1 − c_0)·GᵀHG = ¼
        0.25
    """
    a, cov_a = iterate_average_moments(model, lrs=lrs, weights=weights, batch_size=batch_size)
    h = model.hess.to(torch.float64)
    return (
        model.loss.to(torch.float64)
        + model.grad.to(torch.float64) @ a
        + 0.5 * a @ h @ a
        + 0.5 * torch.trace(h @ cov_a)
    )


# Names of the engine's contractions through η³ (perturb.series, online SGD, cumulant form).
_CONTRACTIONS = {
    "l": 0,
    "G·G": 1,
    "G·H·G": 2,
    "tr(C H)": 2,
    "G·H·H·G": 3,
    "tr(C H H)": 3,
    "G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc": 3,
    "G_a J_abc G_b G_c": 3,
    "C_(a,b) J_abc G_c": 3,
    "J:S": 3,
}


def _weighted_coefficients(alphas: list, ws: list, b) -> dict:
    """Coefficients of the contractions in ``_CONTRACTIONS`` for rates ``α``, weights ``w``."""
    k = len(alphas)
    beta = [alphas[p] * sum(ws[p + 1 :]) for p in range(k)]
    a1 = [sum(alphas[:s]) for s in range(k)]  # A_s = Σ_{r<s} α_r
    a2 = [sum(x**2 for x in alphas[:s]) for s in range(k)]  # Σ_{r<s} α_r²
    ab = [sum(alphas[r] * beta[r] for r in range(s)) for s in range(k)]  # Σ_{r<s} α_r β_r
    s1, s2, s3 = sum(beta), sum(x**2 for x in beta), sum(x**3 for x in beta)
    chain = sum(beta[s] * a1[s] for s in range(k))
    return {
        "l": sum(ws),
        "G·G": -s1,
        "G·H·G": chain + s1**2 / 2,
        "tr(C H)": s2 / (2 * b),
        "G·H·H·G": -sum(beta[s] * (a1[s] ** 2 - a2[s]) / 2 for s in range(k)) - s1 * chain,
        "tr(C H H)": -sum(beta[s] * ab[s] for s in range(k)) / b,
        "G_a ⟨∇l,∇∇l⟩_(c,ab) H_bc": -sum(beta[s] ** 2 * a1[s] for s in range(k)) / b,
        "G_a J_abc G_b G_c": -sum(beta[s] * a1[s] ** 2 for s in range(k)) / 2 - s1**3 / 6,
        "C_(a,b) J_abc G_c": -sum(beta[s] * a2[s] for s in range(k)) / (2 * b) - s1 * s2 / (2 * b),
        "J:S": -s3 / (6 * b**2),
    }


def _series_from(coefficients: dict, *, steps: int, batch_size: int, order: int):
    import sympy as sp

    from perturb.symbolic.schedules import Online
    from perturb.symbolic.series import Series, Term, series

    contractions = {}
    for term in series(3, Online()).terms:
        contractions[term.contraction.text] = term.contraction
    missing = set(_CONTRACTIONS) - set(contractions)
    if missing:
        raise RuntimeError(
            f"perturb.symbolic.series no longer names the contractions {sorted(missing)}"
        )
    terms = tuple(
        Term(_CONTRACTIONS[name], sp.sympify(value), contractions[name])
        for name, value in coefficients.items()
        if _CONTRACTIONS[name] <= order and sp.simplify(value) != 0
    )
    sched = Online(steps=steps, batch_size=batch_size)
    return Series(order=order, schedule=sched, quantity="test", form="cumulant", terms=terms)


def weighted_iterate_series(
    *, weights: object, rates: object = None, batch_size: int = 1, order: int = 3
):
    """η-series of ``E l(Σ_t w_tθ_t)`` for online SGD with learning rate ``ηα_t`` at step ``t``.

    Unrolling ``θ_{t+1} = θ_t − ηα_t ∇l_{x_t}(θ_t)`` around ``θ_0`` (batch means of ``B``
    iid samples; ``g_s, H_s, J_s`` the derivatives of step ``s``'s batch at ``θ_0``) gives
    ``D = Σ_t w_t(θ_t − θ_0) = ηD₁ + η²D₂ + η³D₃ + …`` with ``β_p = α_p Σ_{t>p} w_t``,
    ``A_s = Σ_{r<s} α_r``:

    ``D₁ = −Σ_p β_p g_p``,  ``D₂ = Σ_{r<s} β_sα_r H_s g_r``,
    ``D₃ = −Σ_{q<r<s} β_sα_rα_q H_sH_r g_q − ½Σ_s β_s Σ_{r,r'<s} α_rα_{r'} J_s[g_r, g_{r'}]``,

    and ``E l(θ_0 + D) = l + G·ED + ½E DᵀHD + ⅙E J[D,D,D] + …``.  Taking expectations
    (``E g gᵀ = GGᵀ + C/B``, ``Cov(g, H_s) = ⟨∇l,∇∇l⟩/B``, third cumulant ``S/B²``) the
    coefficients of the engine's contractions are, with ``Σβ^j = Σ_p β_p^j``:

    * ``η¹``: ``G·G``: ``−Σβ``.
    * ``η²``: ``G·H·G``: ``Σ_s β_sA_s + (Σβ)²/2``; ``tr(C H)``: ``Σβ²/(2B)``.
    * ``η³``: ``G·H·H·G``: ``−Σ_s β_s Σ_{q<r<s}α_rα_q − Σβ·Σ_s β_sA_s``;
      ``tr(C H H)``: ``−Σ_{r<s} β_sα_rβ_r/B``; ``G_a⟨∇l,∇∇l⟩_(c,ab)H_bc``:
      ``−Σ_s β_s²A_s/B``; ``G_aJ_abcG_bG_c``: ``−½Σ_s β_sA_s² − (Σβ)³/6``;
      ``C_(a,b)J_abcG_c``: ``−½Σ_s β_s Σ_{r<s}α_r²/B − Σβ·Σβ²/(2B)``; ``J:S``: ``−Σβ³/(6B²)``.

    With ``α = 1`` and ``w = (0, …, 0, 1)`` these are the engine's online-SGD
    coefficients (``perturb.series(3, Online(...))``).

    Args:
        weights: ``w_0 … w_k``, one per iterate.
        rates: ``α_0 … α_{k−1}`` (default all 1).
        batch_size: ``B``.
        order: highest power of η kept (``≤ 3``).

    Returns:
        A :class:`perturb.Series` (schedule ``Online(steps=k, batch_size=B)``), exact when
        the inputs are rational; evaluate it with :meth:`perturb.Series.evaluate`.

    Example:
        >>> s = weighted_iterate_series(weights=averaging_weights("two_point", steps=2), order=2)
        >>> print(s.to_text())  # doctest: +NORMALIZE_WHITESPACE
        η^0: (1)·l
        η^1: (-1)·G·G
        η^2: (1)·G·H·G + (1/4)·tr(C H)
    """
    order = check_order(order, maximum=3)
    if isinstance(weights, str | bytes) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a sequence of numbers, got {weights!r}")
    ws = [_number(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if len(ws) < 2:
        raise ValueError(f"weights needs one entry per iterate θ_0 … θ_k (k ≥ 1), got {len(ws)}")
    k = len(ws) - 1
    if rates is None:
        alphas = [_number(1, "rates")] * k
    else:
        if isinstance(rates, str | bytes) or not hasattr(rates, "__len__"):
            raise TypeError(f"rates must be a sequence of numbers, got {rates!r}")
        alphas = [_number(a, f"rates[{i}]") for i, a in enumerate(rates)]
        if len(alphas) != k:
            raise ValueError(f"rates needs len(weights) − 1 = {k} entries, got {len(alphas)}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    coefficients = _weighted_coefficients(alphas, ws, _number(batch_size, "batch_size"))
    return _series_from(coefficients, steps=k, batch_size=batch_size, order=order)


def averaging_gap_series(weights: object, *, batch_size: int = 1, order: int = 3):
    """Where seed 002's averaging ↔ schedule equivalence breaks: ``E l(avg) − E l(schedule)``.

    The average ``Σ_t w_tθ_t`` of a constant-``η`` side-trip minus the last iterate of SGD
    on :func:`equivalent_schedule` ``η c_s`` (same ``θ_0``, same batches), as an η-series
    (difference of two :func:`weighted_iterate_series`; both have ``β_s = c_s``, so ``D₁``
    and every term built from ``D₁`` alone — ``G·G``, ``tr(C H)``, ``J:S`` — cancel).  What
    is left, with ``c`` the schedule:

    * ``η²``: ``Σ_{r<s} c_s(1 − c_r) · G·H·G`` — the equivalence holds through ``η¹``
      on any landscape and, at ``η²``, exactly when ``G = 0`` (no third derivative here:
      the iterates the gradients are taken at differ by ``O(η)``, felt through ``H``);
    * ``η³``: ``G·H·H·G``, ``tr(C H H)``, the gradient–Hessian cumulant and, from the
      third derivative, ``−½Σ_s c_s Σ_{r<s}(1 − c_r²)/B · C_(a,b)J_abcG_c`` (the noise-
      driven drift ``−½J[C]`` is built at the full ``η`` along the averaged trajectory)
      and ``−½Σ_s c_s (s² − (Σ_{r<s}c_r)²) · G_aJ_abcG_bG_c``.

    Example:
        >>> print(averaging_gap_series(averaging_weights("two_point", steps=2), order=2))
        η^0: 0
        η^1: 0
        η^2: (1/4)·G·H·G
    """
    order = check_order(order, maximum=3)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    w = _weights(weights)
    c = equivalent_schedule(w)
    b = _number(batch_size, "batch_size")
    a = _weighted_coefficients([_number(1, "rate")] * len(c), w, b)
    s = _weighted_coefficients(c, [0] * len(c) + [1], b)
    diff = {name: a[name] - s[name] for name in a}
    return _series_from(diff, steps=len(c), batch_size=batch_size, order=order)
