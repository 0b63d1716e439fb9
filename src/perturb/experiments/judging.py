"""A validity estimate on every prediction of a validation run, and its calibration.

Each prediction gets an ``error_estimate`` (same units as its value, from the theory:
:mod:`perturb.numeric.validity`) and a verdict ``trusted``: finite and not blown up,
an estimate at most :data:`~perturb.numeric.validity.TRUST_FRACTION` of the change it
predicts, the root-mean-square displacement of the quadratic model within the radius
``ρ = ‖H‖/‖J‖`` over which the frozen statistics hold, and no mean-square instability
(:data:`~perturb.numeric.validity.MEAN_SQUARE_EXCESS`), nor a single sample whose step
overshoots (``ηλ_max(H_i)/B >`` :data:`OVERSHOOT`, the sample expected to be drawn:
:func:`perturb.numeric.stability.per_sample_top_curvatures`).  None of it looks at the SGD
runs; :func:`judge` then compares with them: per predictor the fraction of trusted
rows within ``error_estimate`` plus the interval's half-width (the calibration), the
fraction of rows off by more than 10 half-widths that it called untrusted,
"trusted up to ηT ≈ …", the largest ``ηt`` below the first untrusted one, and the
largest ``ηt`` up to which it actually stays within 2 half-widths at every row.

Example:
    >>> from types import SimpleNamespace
    >>> row = {"lr": 0.1, "steps": 1, "eta_t": 0.1, "actual": 1.0, "ci_low": 0.9,
    ...        "ci_high": 1.1, "divergent": False,
    ...        "predictions": {"order 1": {"value": 0.95, "error_ci": -0.5, "unstable": False}}}
    >>> result = SimpleNamespace(rows=[row], config={"lrs": [0.1]}, validity={})
    >>> judge(result, {"order 1": {1: [0.001]}}, {}, start_loss=1.2)
    >>> row["predictions"]["order 1"]["trusted"], result.validity["order 1"]["calibration"]
    (True, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from perturb.numeric.validity import MEAN_SQUARE_EXCESS, TRUST_FRACTION

__all__ = ["FAR_OFF", "OVERSHOOT", "WITHIN", "by_steps", "half_width", "judge", "validity_lines"]

OVERSHOOT = 2.0
"""A single sample's step amplifies a deviation along its top curvature once
``ηλ_max(H_i)/B`` exceeds this (``|1 − ηλ/B| > 1``); such a row is untrusted once the
overshooting samples are expected to be drawn at least once."""
FAR_OFF = 10.0
"""Rows off by more than this many interval half-widths must be called untrusted."""
WITHIN = 2.0
"""The report's horizon: the largest ``ηt`` up to which a predictor stays within this many
half-widths of the SGD mean at every row (``within_2ci_up_to``)."""


def by_steps(row: dict) -> int:
    """The key of a row of :func:`perturb.validate`: its step.

    Example:
        >>> by_steps({"lr": 0.1, "steps": 20})
        20
    """
    return int(row["steps"])


def judge(
    result: Any,
    estimates: dict,
    motion: dict,
    *,
    start_loss: float,
    key: Callable[[dict], Hashable] = by_steps,
) -> None:
    """Add ``error_estimate`` and ``trusted`` to every prediction of ``result.rows``.

    Args:
        result: a :class:`~perturb.experiments.validation.ValidationResult` or a
            :class:`~perturb.experiments.comparison.Comparison` (``rows`` with ``lr``,
            ``eta_t``, ``actual``, ``divergent``, the interval as ``ci_low``/``ci_high``
            or ``ci_half``; ``config`` with ``lrs`` and optionally
            ``curvature_radius``; ``validity``).
        estimates: ``{name: {key: (L,) error estimates}}``.
        motion: ``{key: {"rms_displacement": (L,), "mean_square_excess": (L,)}}``,
            optionally with ``"overshoot"``, ``"overshoot_draws"`` and
            ``"hessian_ladder"`` (L,) (empty: no displacement or instability check).
        start_loss: ``l(θ_0)``.
        key: a row's key in ``estimates`` and ``motion`` (default its step; a
            comparison's rows are keyed by ``(batch_size, steps)``).
    """
    lrs = [float(lr) for lr in result.config["lrs"]]
    radius = float(result.config.get("curvature_radius", math.inf))
    for row in result.rows:
        li, s = lrs.index(float(row["lr"])), key(row)
        where = motion.get(s)
        moved = math.nan if where is None else float(where["rms_displacement"][li])
        excess = math.nan if where is None else float(where["mean_square_excess"][li])
        rung = where.get("hessian_ladder") if where is not None else None
        has = where is not None and "overshoot" in where
        kick = float(where["overshoot"][li]) if has else math.nan
        draws = float(where["overshoot_draws"][li]) if has else 0.0
        row["validity"] = {
            "rms_displacement": moved,
            "displacement_over_radius": moved / radius if math.isfinite(moved) else math.nan,
            "mean_square_excess": excess,
            "overshoot": kick,
            "overshoot_draws": draws,
        }
        if rung is not None:  # measured only with per-sample Hessians in the subspace
            row["validity"]["hessian_ladder"] = float(rung[li])
        frozen_ok = (
            not moved > radius
            and not excess > MEAN_SQUARE_EXCESS
            and not (kick > OVERSHOOT and draws >= 1.0)
        )
        for name, entry in row["predictions"].items():
            by_step = estimates.get(name, {})
            est = float(np.asarray(by_step[s])[li]) if s in by_step else math.inf
            entry["error_estimate"] = est
            change = abs(entry["value"] - start_loss)
            entry["trusted"] = bool(
                frozen_ok
                and not entry["unstable"]
                and math.isfinite(est)
                and est <= TRUST_FRACTION * change
            )
    result.validity = _summary(result.rows)


def _summary(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per predictor: trusted horizon, calibration, and far-off rows called untrusted."""
    out: dict[str, dict[str, Any]] = {}
    names = list(rows[0]["predictions"]) if rows else []
    for name in names:
        compared = [r for r in rows if not r["divergent"]]
        untrusted_at = [r["eta_t"] for r in rows if not r["predictions"][name]["trusted"]]
        first_bad = min(untrusted_at, default=math.inf)
        horizon = max((r["eta_t"] for r in rows if r["eta_t"] < first_bad), default=None)
        trusted = [r for r in compared if r["predictions"][name]["trusted"]]
        hits = [
            r
            for r in trusted
            if abs(r["predictions"][name]["value"] - r["actual"])
            <= r["predictions"][name]["error_estimate"] + half_width(r)
        ]
        far = [
            r
            for r in compared
            if r["predictions"][name]["unstable"]
            or abs(r["predictions"][name]["error_ci"]) > FAR_OFF
        ]
        within = _within_up_to(compared, name, WITHIN)
        out[name] = {
            "within_2ci_up_to": within,
            "trusted_up_to": horizon,
            "trusted_rows": len(trusted),
            "calibration": len(hits) / len(trusted) if trusted else None,
            "far_off_rows": len(far),
            "far_off_untrusted": (
                sum(not r["predictions"][name]["trusted"] for r in far) / len(far) if far else None
            ),
        }
    return out


def half_width(row: dict) -> float:
    """The 95% interval's half-width of a row (``ci_half``, or from ``ci_low``/``ci_high``).

    Example:
        >>> half_width({"ci_low": 0.5, "ci_high": 1.5}), half_width({"ci_half": 0.1})
        (0.5, 0.1)
    """
    if "ci_half" in row:
        return float(row["ci_half"])
    return (row["ci_high"] - row["ci_low"]) / 2


def _within_up_to(rows: list[dict], name: str, width: float) -> float | None:
    """The largest ``ηt`` up to which every compared row is within ``width`` half-widths."""
    outside = [
        r["eta_t"]
        for r in rows
        if r["predictions"][name]["unstable"]
        or not abs(r["predictions"][name]["error_ci"]) <= width
    ]
    first = min(outside, default=math.inf)
    return max((r["eta_t"] for r in rows if r["eta_t"] < first), default=None)


def validity_lines(validity: dict[str, dict[str, Any]]) -> list[str]:
    """The table's lines: per predictor its trusted horizon, the horizon it actually
    stays within 2 half-widths (when known), and the calibration.

    Example:
        >>> validity_lines({"order 1": {"trusted_up_to": 0.2, "trusted_rows": 4,
        ...                 "calibration": 0.75, "far_off_rows": 0, "far_off_untrusted": None}})
        ['          order 1: trusted up to ηT ≈ 0.2; 3/4 trusted rows within estimate + CI']
    """
    lines = []
    for name, v in validity.items():
        horizon = v["trusted_up_to"]
        where = "never trusted" if horizon is None else f"trusted up to ηT ≈ {horizon:g}"
        calib = ""
        if v["trusted_rows"]:
            hits = round(v["calibration"] * v["trusted_rows"])
            calib = f"; {hits}/{v['trusted_rows']} trusted rows within estimate + CI"
        far = ""
        if v["far_off_rows"]:
            called = round(v["far_off_untrusted"] * v["far_off_rows"])
            far = f"; {called}/{v['far_off_rows']} rows off by > {FAR_OFF:g} CI untrusted"
        stays = v.get("within_2ci_up_to")
        actual = "" if stays is None else f" (actually within {WITHIN:g} CI up to ηT ≈ {stays:g})"
        lines.append(f"{name:>17}: {where}{actual}{calib}{far}")
    return lines
