"""The validation pipeline on a small digits population (fast settings)."""

from __future__ import annotations

import json
import math

import pytest

from perturb.cli import main
from perturb.data import DataError
from perturb.validate import validate


@pytest.fixture(scope="module")
def small():
    return validate(
        lrs=(0.002, 0.01), steps=10, trials=64, population=24, records=2, progress=False, seed=1
    )


def test_rows_and_predictors(small):
    assert small.predictors == [
        "order 0",
        "order 1",
        "order 2",
        "order 3",
        "ODE",
        "SDE",
        "resummed 2",
    ]
    assert [(r["lr"], r["steps"]) for r in small.rows] == [
        (0.002, 5),
        (0.002, 10),
        (0.01, 5),
        (0.01, 10),
    ]
    for r in small.rows:
        assert r["ci_low"] < r["actual"] < r["ci_high"]
        assert math.isclose(r["eta_t"], r["lr"] * r["steps"])


def test_small_eta_t_predictions_lie_in_the_interval(small):
    """At ηt ≤ 0.1 the order-3 truncation error is far below the CI (≈ (ηt)⁴ of the
    loss scale), so |error| > 3.29 would happen with probability 1e-3 per row from
    sampling alone (99.9% t-quantile); 4 rows: false-failure rate < 0.4%."""
    for r in small.rows:
        if r["eta_t"] <= 0.1:
            for name in ("order 3", "resummed 2"):
                assert abs(r["predictions"][name]["error_ci"]) < 3.29, (name, r)


def test_order_one_is_exact_at_first_order(small):
    """d/dη of the order-1 prediction is −t·G·G: check the order-0 and 1 rows differ."""
    r = small.rows[0]
    assert r["predictions"]["order 0"]["value"] > r["predictions"]["order 1"]["value"]


def test_outputs_written(tmp_path):
    result = validate(
        lrs=(0.01,),
        steps=4,
        trials=8,
        population=12,
        records=1,
        progress=False,
        resummed=False,
        out=tmp_path,
    )
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["steps"] == 4 and len(payload["rows"]) == 1
    assert (tmp_path / "results.csv").read_text().startswith("lr,steps,eta_t,actual")
    for png in ("test_loss_vs_lr.png", "error_vs_eta_t.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "order 1" in result.table()


def test_divergent_learning_rate_is_reported(tmp_path):
    result = validate(
        lrs=(0.01, 1e9),
        steps=6,
        trials=4,
        population=12,
        records=1,
        progress=False,
        resummed=False,
        orders=(0, 1),
    )
    rows = {r["lr"]: r for r in result.rows}
    assert rows[1e9]["divergent"] and not rows[0.01]["divergent"]
    assert "divergent" in result.table()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(dataset="mnist"), DataError, "unknown dataset"),
        (dict(lrs=(-0.1,)), ValueError, "lrs must be positive"),
        (dict(trials=1), ValueError, "trials must be at least 2"),
        (dict(orders=(5,)), ValueError, "orders must be integers in 0..4"),
        (dict(steps=0), ValueError, "steps must be a positive integer"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        validate(progress=False, **kwargs)


def test_cli_reports_bad_dataset():
    with pytest.raises(SystemExit) as info:
        main(["validate", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"])
    assert info.value.code == 2
