"""The learning curve's cost in the budget of ``perturb validate`` and ``perturb compare``:
estimated before it runs (:func:`perturb.experiments.simulation_cost.estimate_curve`), its
gradient count the run's own, a runaway ``--curve`` refused before anything is measured,
the default runs accepted."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from perturb.cli import cli
from perturb.errors import BudgetError
from perturb.experiments.comparison import DEFAULTS as COMPARE_DEFAULTS
from perturb.experiments.pipeline import build, load_population
from perturb.experiments.simulation_cost import (
    DEFAULT_MAX_MEMORY,
    TRIALS_BUDGET_SECONDS,
    CurveEstimate,
    check_curve,
    estimate_curve,
)
from perturb.experiments.validation import DEFAULT_LRS
from perturb.experiments.validation_curve import check_curve_budget
from perturb.numeric.curve import CurveSettings, learning_curve


def _fail(what: str):
    def boom(*args, **kwargs):
        raise AssertionError(f"{what} started")

    return boom


def test_the_estimate_counts_the_gradients_the_curve_counts(tiny):
    """Path, flow and every checkpoint's Krylov passes: the estimate's full-batch gradients
    and checkpoints are those the run counts (two rates, two batch sizes; with and without
    the SDE's flow)."""
    setup = build("mlp", load_population(tiny, population=16, seed=0), seed=0)
    lrs, steps = [0.05, 0.3], [2, 7]
    for sde in (True, False):
        settings = CurveSettings(rank=4, higher_rank=2, sde=sde)
        run = learning_curve(setup.net, (setup.x, setup.y), setup.theta0, lr=lrs, steps=steps,
                             batch_sizes=[1, 3], settings=settings)  # fmt: skip
        e = estimate_curve(
            parameters=setup.parameters, rows=16, lrs=lrs, steps=7, settings=settings
        )
        path = len(lrs) * (8 + (14 if sde else 0))  # T + 1 gradients, and 2T for the flow
        assert run.cost["path"] + run.cost["flow"] == path
        assert (e.lrs, e.steps) == (2, 7) and e.seconds > 0 and e.memory_bytes > 0
        assert e.gradients == run.cost["total"]
        assert e.checkpoints == sum(len(c) for c in run.checkpoints)


BUDGET_CASES = [
    pytest.param(["validate", "--steps", "5000000", "--records", "2"], id="validate"),
    pytest.param(["compare", "--steps", "5000000", "--batch-size", "1"], id="compare"),
]


@pytest.mark.parametrize("args", BUDGET_CASES)
def test_a_runaway_curve_is_refused_before_anything_is_measured(monkeypatch, tmp_path, tiny, args):
    """Two trials of 5·10⁶ steps pass the trials' budget (checked first); the curve's path
    and flow (three full-batch gradients a step) do not."""
    for module in ("validation", "comparison"):
        monkeypatch.setattr(f"perturb.experiments.{module}.measure_at_start", _fail("measuring"))
    monkeypatch.setattr("perturb.experiments.sgd_step.run_trials", _fail("SGD"))
    monkeypatch.setattr("perturb.experiments.validation_curve.learning_curve", _fail("curve"))
    common = ["--dataset", tiny, "--model", "mlp", "--population", "16", "--lr", "0.01"]
    common += ["--trials", "2", "--curve", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, [*args, *common])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "the learning curve would take 1 path of 5000000 steps" in lines[0]
    assert " s budget; " in lines[0] and "--force" in lines[0]
    assert not (tmp_path / "o").exists()


def test_the_default_runs_are_accepted():
    """validate's and compare's defaults with ``--curve`` (the smooth convnet on 256 digits,
    ``T = 100``, rank 32) are within the time and memory bounds."""
    setup = build("smooth-convnet", load_population("digits", population=256, seed=0), seed=0)
    for lrs in (DEFAULT_LRS, COMPARE_DEFAULTS["lrs"]):
        e = check_curve_budget(setup, lrs=lrs, steps=100, rank=32)
        assert e.seconds < TRIALS_BUDGET_SECONDS and e.memory_bytes < DEFAULT_MAX_MEMORY
        assert e.lrs == len(lrs) and e.steps == 100


def test_force_the_memory_bound_and_bad_inputs():
    huge = CurveEstimate(1, 10**8, 30, 3e8, 1e6, 10**6)
    check_curve(huge, force=True)
    with pytest.raises(BudgetError, match=r"over the 3600 s budget; .*pass --force"):
        check_curve(huge)
    small = CurveEstimate(1, 10, 2, 100.0, 1.0, 10**6)
    check_curve(small)
    with pytest.raises(BudgetError, match=r"memory bound; raise --max-memory \(max_memory=bytes\)"):
        check_curve(small, max_memory=1000)
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes, got -1"):
        check_curve(small, max_memory=-1)
    settings = CurveSettings(rank=4)
    sizes = dict(rows=16, lrs=[0.1], steps=10, settings=settings)
    with pytest.raises(ValueError, match="parameters must be an integer ≥ 1, got 0"):
        estimate_curve(parameters=0, **sizes)
    with pytest.raises(ValueError, match="steps must be an integer ≥ 0, got -1"):
        estimate_curve(parameters=5, **{**sizes, "steps": -1})
    with pytest.raises(TypeError, match="settings must be a CurveSettings, got dict"):
        estimate_curve(parameters=5, **{**sizes, "settings": {"rank": 4}})
    cpu = estimate_curve(parameters=10**5, **sizes)
    gpu = estimate_curve(parameters=10**5, **sizes, cuda=True)
    assert gpu.gradients == cpu.gradients and gpu.seconds < cpu.seconds
