"""Every example script runs (small settings; the full runs are documented in docs/).

The default run starts one interpreter for all the scripts (each runs as ``__main__`` with
its own ``sys.argv``, the torch default dtype and seed reset between them): the imports,
most of a script's time at these settings, are paid once.  ``-m slow`` runs each script in
an interpreter of its own, as ``python examples/<script>`` does.
"""

from __future__ import annotations

import json
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
EVIDENCE = ["--points", "4", "--splits", "2"]

# Runs each (script, argv) of the JSON list argv[1] as __main__ and writes, per script, its
# exit status (1 for an exception, with the traceback on its standard error), standard
# output and standard error to the JSON file argv[2].
DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
import torch

examples, out = sys.argv[1], sys.argv[2]
cases = json.loads(sys.argv[3])
sys.path.insert(0, examples)  # as for python examples/<script>: the script's folder first
dtype, seed, cwd = torch.get_default_dtype(), torch.initial_seed(), os.getcwd()
results = {}
for script, args in cases:
    path = os.path.join(examples, script)
    sys.argv = [path, *args]
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    os.chdir(cwd)
    results[script] = {"returncode": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
with open(out, "w") as fh:
    json.dump(results, fh)
"""


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> tuple[dict, Path]:
    """Every example in one interpreter: per script its exit status and output, and the
    evidence example's figure."""
    tmp = tmp_path_factory.mktemp("examples")
    figure = tmp / "evidence.png"
    cases = [(s, CASES[s]) for s in sorted(CASES)]
    cases.append(("evidence.py", [*EVIDENCE, "--out", str(figure)]))
    out = tmp / "results.json"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT / "examples"), str(out), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), figure


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, shared_run):
    result = shared_run[0][script]
    assert result["returncode"] == 0, result["stderr"]
    assert "|" in result["stdout"]  # prints its table


def test_evidence_example_runs(shared_run):
    results, figure = shared_run
    result = results["evidence.py"]
    assert result["returncode"] == 0, result["stderr"]
    assert "| λ | E/N |" in result["stdout"] and figure.exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_in_its_own_interpreter(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *CASES[script]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "|" in result.stdout  # prints its table


@pytest.mark.slow
def test_evidence_example_runs_in_its_own_interpreter(tmp_path):
    out = tmp_path / "evidence.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "evidence.py"), *EVIDENCE, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "| λ | E/N |" in result.stdout and out.exists()
