"""Checks shared by the tests of the learning curve in validate and compare."""

from __future__ import annotations

from typing import Any

from perturb.experiments.validation_curve import CURVE_PREDICTORS


def assert_only_the_curve_added(plain: dict[str, Any], curved: dict[str, Any]) -> None:
    """Every row of the run without the curve (its actual values, predictions, estimates
    and verdicts) and its validity summary are the curved run's, less the curve's three
    predictors (both as JSON-ready dicts)."""
    assert len(plain["rows"]) == len(curved["rows"])
    for a, b in zip(plain["rows"], curved["rows"], strict=True):
        extra = {k: v for k, v in b["predictions"].items() if k not in CURVE_PREDICTORS}
        assert a["predictions"] == extra
        assert {k: v for k, v in a.items() if k != "predictions"} == {
            k: v for k, v in b.items() if k != "predictions"
        }
    assert {k: v for k, v in curved["validity"].items() if k not in CURVE_PREDICTORS} == (
        plain["validity"]
    )
