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
    "gaussian_fit.py": ["--etas", "0.1", "--chains", "2000", "--rows", "20", "--substeps", "2"],
    "eta_over_b.py": ["--trials", "8", "--population", "16", "--batch-sizes", "1", "2"],
    "long_times.py": ["--runs", "200", "--eta-ts", "1", "--etas", "0.1"],
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


def test_evidence_example_runs(tmp_path):
    out = tmp_path / "evidence.png"
    args = ["--points", "4", "--splits", "2", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "evidence.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "| λ | E/N |" in result.stdout and out.exists()
