"""One seed, one answer: the same command gives the same results.json whatever the thread count.

* ``perturb validate --threads 1`` (pretraining, the re-summed predictors and their
  validity estimates included) run twice in subprocesses, with ``OMP_NUM_THREADS=1`` and
  ``2``: the two ``results.json`` agree bit for bit once the wall-clock timings are left
  out (without a fixed ``--threads`` the float32 sums over rows split by thread count
  round differently, about 1e-8 relative, and SGD and the power iterations carry that);
* the tabular rows of an ``npz`` file, ``(n, d)``, through ``--model mlp``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from perturb.cli import cli

SMALL = [
    "--model", "mlp", "--population", "32", "--trials", "4", "--steps", "4", "--records", "2",
    "--lr", "0.01", "0.05", "--orders", "0", "1", "2", "--krylov-rank", "8",
    "--krylov-higher-rank", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """An npz file of 40 tabular rows of 5 features (float64), two classes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    path = tmp_path_factory.mktemp("data") / "table.npz"
    np.savez(path, x=x, y=(x[:, 0] + x[:, 1] > 0).astype(np.int64))
    return path


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "timings"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_validate_gives_the_same_results_with_one_and_two_threads(table, tmp_path) -> None:
    results = []
    for threads in ("1", "2"):
        out = tmp_path / f"threads-{threads}"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        command = [sys.executable, "-m", "perturb", "validate", "--dataset", f"npz:{table}"]
        command += [*SMALL, "--pretrain", "10", "--threads", "1"]
        done = subprocess.run(
            [*command, "--out", str(out)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads((out / "results.json").read_text()))
    assert "timings" in results[0]  # left out below: wall clocks differ run to run
    first, second = (_without_timings(r) for r in results)
    assert first["config"]["start"]["pretrain_steps"] == 10
    assert first == second


def test_validate_on_tabular_rows_with_the_mlp(table, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["validate", "--dataset", f"npz:{table}", *SMALL, "--no-resummed"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "results.json").read_text())["config"]
    # the mlp on (1, 5) inputs: 5·32 + 32 weights and biases in, 32·2 + 2 out
    assert config["parameters"] == 5 * 32 + 32 + 32 * 2 + 2
