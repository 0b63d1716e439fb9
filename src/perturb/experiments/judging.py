"""A validity estimate on every prediction of a validation run, and its calibration.

Each prediction gets an ``error_estimate`` (same units as its value, from the theory:
:mod:`perturb.numeric.validity`; its geometric continuation never shrinks slower than the
quadratic model's displacement against ``ρ = ‖H‖/‖J‖``) and a verdict ``trusted``, by the
rule :func:`perturb.numeric.trust.trust_mask` that ``Statistics.trust`` and
``perturb predict`` apply too: finite and not blown up, no mean-square instability, no
single sample whose step overshoots (``ηλ_max(H_i)/B >`` :data:`OVERSHOOT`) once it is
expected to be drawn, and an estimate at most a tenth of the change it predicts or at most
the resolution of the run's ``trials`` (the predicted spread of SGD's loss,
:func:`perturb.numeric.validity.loss_spread`, as a 95% half-width; for the predictors that
follow the noiseless path, :mod:`perturb.experiments.validation_curve`, the spread the
learning curve predicts along it).  None of it looks at the SGD runs; :func:`judge` then
compares with them: per predictor the fraction of trusted rows within ``error_estimate``
plus the interval's half-width (the calibration), the fraction of rows off by more than 10
half-widths that it called untrusted, "trusted up to ηT ≈ …", the largest ``ηt`` below
the first untrusted one, and the largest ``ηt`` up to which it actually stays within 2
half-widths at every row.  A row is compared whenever its trials give a mean and an
interval: it is left out only where every trial blew up (non-finite), so a learning rate
whose runs climb over a bump and come back stays in the calibration.

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

from perturb.numeric.trust import OVERSHOOT, trust_mask

__all__ = [
    "FAR_OFF",
    "OVERSHOOT",
    "WITHIN",
    "by_steps",
    "half_width",
    "judge",
    "trial_lines",
    "validity_lines",
]

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
    resolutions: dict | None = None,
) -> None:
    """Add ``error_estimate`` and ``trusted`` to every prediction of ``result.rows``.

    Args:
        result: a :class:`~perturb.experiments.validation.ValidationResult` or a
            :class:`~perturb.experiments.comparison.Comparison` (``rows`` with ``lr``,
            ``eta_t``, ``actual``, ``divergent`` (every trial blew up), the interval as
            ``ci_low``/``ci_high`` or ``ci_half``; ``config`` with ``lrs`` and optionally
            ``curvature_radius``; ``validity``).
        estimates: ``{name: {key: (L,) error estimates}}``.
        motion: ``{key: {"rms_displacement": (L,), "mean_square_excess": (L,)}}``,
            optionally with ``"overshoot"``, ``"overshoot_draws"`` and
            ``"hessian_ladder"`` (L,) (empty: no displacement or instability check).
        start_loss: ``l(θ_0)``.
        key: a row's key in ``estimates`` and ``motion`` (default its step; a
            comparison's rows are keyed by ``(batch_size, steps)``).
        resolutions: ``{name: {key: (L,) resolutions}}``: for these predictors the
            resolution is read from here instead of ``motion`` (the learning curve's,
            from its own predicted spread along the path; default none).
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
        res = where.get("resolution") if where is not None else None
        spread = where.get("loss_spread") if where is not None else None
        row["validity"]["resolution"] = math.nan if res is None else float(res[li])
        row["validity"]["loss_spread"] = math.nan if spread is None else float(spread[li])
        read = 0.0 if res is None else float(np.nan_to_num(res[li]))
        for name, entry in row["predictions"].items():
            by_step = estimates.get(name, {})
            est = float(np.asarray(by_step[s])[li]) if s in by_step else math.inf
            entry["error_estimate"] = est
            own = (resolutions or {}).get(name, {})
            entry["trusted"] = bool(
                trust_mask(
                    np.array([est]), np.array([entry["value"]]), start_loss=start_loss,
                    resolution=float(np.asarray(own[s])[li]) if s in own else read,
                    unstable=bool(entry["unstable"]), excess=excess, overshoot=kick,
                    overshoot_draws=draws,
                )[0]
            )  # fmt: skip
    result.validity = _summary(result.rows)


def _summary(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per predictor: trusted horizon, calibration, and far-off rows called untrusted.

    A row is compared unless it has no interval: every trial blew up (``divergent``), or
    fewer than two are left.  Trials that climbed high and came back are in its mean.
    """
    out: dict[str, dict[str, Any]] = {}
    names = list(rows[0]["predictions"]) if rows else []
    compared = [r for r in rows if not r["divergent"] and math.isfinite(half_width(r))]
    for name in names:
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

    The horizon is the largest ``ηT`` below the first untrusted row; the calibration
    counts every compared row the predictor trusts, at any ``ηT`` (trust need not be
    monotone in ``ηT``), so a predictor untrusted at the smallest ``ηT`` is "never
    trusted" only when it trusts no row at all.

    Example:
        >>> validity_lines({"order 1": {"trusted_up_to": 0.2, "trusted_rows": 4,
        ...                 "calibration": 0.75, "far_off_rows": 0, "far_off_untrusted": None}})
        ['          order 1: trusted up to ηT ≈ 0.2; 3/4 rows it trusts within estimate + CI']
        >>> (line,) = validity_lines({"p": {"trusted_up_to": None, "trusted_rows": 2,
        ...     "calibration": 1.0, "far_off_rows": 0, "far_off_untrusted": None}})
        >>> print(line.strip())
        p: untrusted at the smallest ηT; 2/2 rows it trusts (at larger ηT) within estimate + CI
    """
    lines = []
    for name, v in validity.items():
        horizon = v["trusted_up_to"]
        if horizon is not None:
            where = f"trusted up to ηT ≈ {horizon:g}"
        else:
            where = "untrusted at the smallest ηT" if v["trusted_rows"] else "never trusted"
        calib = ""
        if v["trusted_rows"]:
            hits = round(v["calibration"] * v["trusted_rows"])
            later = " (at larger ηT)" if horizon is None else ""
            calib = f"; {hits}/{v['trusted_rows']} rows it trusts{later} within estimate + CI"
        far = ""
        if v["far_off_rows"]:
            called = round(v["far_off_untrusted"] * v["far_off_rows"])
            far = f"; {called}/{v['far_off_rows']} rows off by > {FAR_OFF:g} CI untrusted"
        stays = v.get("within_2ci_up_to")
        actual = "" if stays is None else f" (actually within {WITHIN:g} CI up to ηT ≈ {stays:g})"
        lines.append(f"{name:>17}: {where}{actual}{calib}{far}")
    return lines


def trial_lines(rows: list[dict], trials: int, limit: dict[str, float] | None) -> list[str]:
    """The table's lines on the SGD trials behind the means, per learning rate.

    How many trials blew up (a loss or parameter not finite) and were left out of the
    mean, and how many went above the reported loss limit ``f·max(l(θ_0), l(0))``
    (:meth:`perturb.experiments.simulation.Trials.limits`) and were averaged all the
    same: the most over the rows of each learning rate (their ``dropped`` and
    ``above_limit``).  No line when none did.

    Example:
        >>> rows = [{"lr": 0.2, "dropped": 0, "above_limit": 3},
        ...         {"lr": 0.5, "dropped": 2, "above_limit": 0}]
        >>> for line in trial_lines(rows, 500, {"limit": 11.0, "start": 0.0064, "scale": 1.1}):
        ...     print(line)
        blew up (not finite), left out of the mean: η = 0.5: 2/500
        above 11 = 10 × max(l(θ_0) = 0.0064, l(0) = 1.1), still in the mean: η = 0.2: 3/500
    """

    def most(key: str) -> str:
        worst: dict[float, int] = {}
        for r in rows:
            if r.get(key, 0) > 0:
                worst[r["lr"]] = max(worst.get(r["lr"], 0), int(r[key]))
        return ", ".join(f"η = {lr:g}: {n}/{trials}" for lr, n in worst.items())

    lines = []
    if dropped := most("dropped"):
        lines.append(f"blew up (not finite), left out of the mean: {dropped}")
    if (above := most("above_limit")) and limit is not None:
        level = max(v for v in (limit["start"], limit["scale"], 0.0) if math.isfinite(v))
        factor = f"{limit['limit'] / level:g} × " if level > 0 else ""
        where = f"{limit['limit']:.4g} = {factor}max(l(θ_0) = {limit['start']:.4g}, "
        lines.append(f"above {where}l(0) = {limit['scale']:.4g}), still in the mean: {above}")
    return lines
