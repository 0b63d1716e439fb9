"""The verdicts and the calibration summary of perturb.experiments.judging."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from perturb.experiments.judging import judge, validity_lines


def _row(lr, steps, value, actual=1.0, half=0.1, unstable=False):
    return {
        "lr": lr, "steps": steps, "eta_t": lr * steps, "actual": actual,
        "ci_low": actual - half, "ci_high": actual + half, "divergent": False,
        "predictions": {
            "p": {"value": value, "error_ci": (value - actual) / half, "unstable": unstable}
        },
    }  # fmt: skip


def test_each_reason_for_distrust_and_the_summary():
    """Start loss 2: a change of 1.  Trusted needs estimate ≤ 0.1 (a tenth of it) or ≤ the
    resolution, mean-square excess ≤ 1, a stable value; a displacement beyond ρ = 1 is no
    veto (it enters the estimate, as the floor of its geometric continuation)."""
    rows = [_row(0.1, s, 1.05) for s in (1, 2, 3, 4, 5, 6)]
    rows.append(_row(0.2, 5, 40.0, unstable=True))
    result = SimpleNamespace(rows=rows, config={"lrs": [0.1, 0.2], "curvature_radius": 1.0})
    est = {"p": {1: [0.01, 0.0], 2: [0.2, 0.0], 3: [0.01, 0.0], 4: [0.01, 0.0], 5: [0.01, 0.5],
                 6: [0.2, 0.0]}}  # fmt: skip
    motion = {
        s: {"rms_displacement": np.array([d, 0.0]), "mean_square_excess": np.array([e, 0.0]),
            "resolution": np.array([r, 0.0])}
        for s, d, e, r in ((1, 0.1, 0.0, 0.0), (2, 0.1, 0.0, 0.0), (3, 2.0, 0.0, 0.0),
                           (4, 0.1, 3.0, 0.0), (5, 0.1, 0, 0.0), (6, 0.1, 0.0, 0.3))
    }  # fmt: skip
    judge(result, est, motion, start_loss=2.0)
    verdicts = [r["predictions"]["p"]["trusted"] for r in rows]
    assert verdicts == [True, False, True, False, True, True, False]
    assert rows[2]["validity"]["displacement_over_radius"] == 2.0
    assert rows[5]["validity"]["resolution"] == 0.3
    assert rows[0]["predictions"]["p"]["error_estimate"] == 0.01
    summary = result.validity["p"]
    assert summary["trusted_up_to"] == 0.1  # the first untrusted row is at ηt = 0.2
    assert summary["trusted_rows"] == 4 and summary["calibration"] == 1.0  # 0.05 ≤ est + 0.1
    assert summary["far_off_rows"] == 1 and summary["far_off_untrusted"] == 1.0
    assert summary["within_2ci_up_to"] == pytest.approx(0.6)  # unstable at ηt = 1.0
    line = validity_lines(result.validity)[0]
    assert line == (
        "                p: trusted up to ηT ≈ 0.1 (actually within 2 CI up to ηT ≈ 0.6); "
        "4/4 rows it trusts within estimate + CI; 1/1 rows off by > 10 CI untrusted"
    )
    # untrusted at the smallest ηT but trusted later: not "never trusted", and the
    # counted rows say where they lie
    first = {**result.validity["p"], "trusted_up_to": None}
    assert validity_lines({"p": first})[0] == (
        "                p: untrusted at the smallest ηT (actually within 2 CI up to ηT ≈ 0.6); "
        "4/4 rows it trusts (at larger ηT) within estimate + CI; 1/1 rows off by > 10 CI untrusted"
    )


def test_a_sample_that_overshoots_is_distrusted_once_it_is_drawn():
    """ηλ_max(H_i)/B = 3 > 2: untrusted from the row where the sample is expected to be
    drawn (draws ≥ 1), trusted before."""
    rows = [_row(0.1, s, 1.05) for s in (1, 2)]
    result = SimpleNamespace(rows=rows, config={"lrs": [0.1]})
    motion = {
        s: {"rms_displacement": np.zeros(1), "mean_square_excess": np.zeros(1),
            "overshoot": np.array([3.0]), "overshoot_draws": np.array([d])}
        for s, d in ((1, 0.5), (2, 1.0))
    }  # fmt: skip
    judge(result, {"p": {1: [0.01], 2: [0.01]}}, motion, start_loss=2.0)
    assert [r["predictions"]["p"]["trusted"] for r in rows] == [True, False]
    assert rows[1]["validity"]["overshoot"] == 3.0


def test_a_missing_estimate_is_never_trusted():
    rows = [_row(0.1, 1, 1.05)]
    result = SimpleNamespace(rows=rows, config={"lrs": [0.1]})
    judge(result, {}, {}, start_loss=2.0)
    entry = rows[0]["predictions"]["p"]
    assert math.isinf(entry["error_estimate"]) and not entry["trusted"]
    assert result.validity["p"]["trusted_up_to"] is None
    assert validity_lines(result.validity) == [
        "                p: never trusted (actually within 2 CI up to ηT ≈ 0.1)"
    ]


def test_rows_keyed_by_batch_size_and_step_with_a_half_width():
    """A comparison's rows: keyed by ``(B, T)``, the interval given as ``ci_half``; the
    Hessian ladder is recorded in the row's validity."""
    rows = []
    for b, value in ((1, 1.05), (4, 1.3)):
        row = _row(0.1, 2, value)
        del row["ci_low"], row["ci_high"]
        rows.append({**row, "batch_size": b, "ci_half": 0.1})
    result = SimpleNamespace(rows=rows, config={"lrs": [0.1]})
    est = {"p": {(1, 2): [0.01], (4, 2): [0.05]}}
    motion = {
        (b, 2): {"rms_displacement": np.zeros(1), "mean_square_excess": np.zeros(1),
                 "hessian_ladder": np.array([ladder])}
        for b, ladder in ((1, 0.002), (4, 0.0))
    }  # fmt: skip
    judge(result, est, motion, start_loss=2.0, key=lambda r: (r["batch_size"], r["steps"]))
    assert [r["predictions"]["p"]["error_estimate"] for r in rows] == [0.01, 0.05]
    assert rows[0]["validity"]["hessian_ladder"] == 0.002
    # both trusted (0.01 ≤ 0.095, 0.05 ≤ 0.07); only the first within estimate + 0.1
    assert result.validity["p"]["trusted_rows"] == 2
    assert result.validity["p"]["calibration"] == 0.5
