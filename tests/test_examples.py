"""Every example script runs (small settings; the full runs are documented in docs/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "archimedes.py": [
        "--etas",
        "0.1",
        "--chains",
        "50",
        "--burn",
        "2",
        "--window",
        "5",
        "--long-steps",
        "200",
    ],
    "mean_estimation.py": ["--sets", "200", "--points", "3"],
    "gdc.py": ["--trials", "4", "--lrs", "0.1", "--train-size", "3", "--population", "16"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *CASES[script]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "|" in result.stdout  # prints its table
