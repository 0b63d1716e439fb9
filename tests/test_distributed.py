"""perturb.distributed: shards, single-process fallbacks, and a real 2-process Gloo run."""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from perturb import distributed as D
from perturb.schedules import Epochs, Online

_m = importlib.import_module("perturb.measure")
_s = importlib.import_module("perturb.simulate")

LAUNCH_TIMEOUT_S = 120

# The tiny problem shared by the workers and the single-process reference.
PROBLEM = """
import torch
from perturb.schedules import Epochs, Online

def loss_fn(theta, x, y):
    return 0.5 * (x @ theta[:2] + theta[2] * torch.tanh(x[..., 0]) - y) ** 2

def row_loss(theta, x, y):
    return loss_fn(theta, x, y)

def problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 2, dtype=torch.float64, generator=g)
    y = torch.randn(23, dtype=torch.float64, generator=g)
    theta0 = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    return x, y, theta0

SCHEDULE = Epochs(train_size=4, batch_size=2, epochs=2)
MEASURE = dict(order=2, schedules=(Online(), Epochs()), quantities=("test", "displacement"),
               seed=5, progress=False)
SIMULATE = dict(lr=[0.05, 0.2], trials=7, seed=11, record_every=2)
"""

WORKER = """
import sys
import numpy as np
from perturb import distributed as D
from problem import MEASURE, SCHEDULE, SIMULATE, problem, row_loss, loss_fn

rank, size = D.init_from_env(timeout_s=60)
assert size == 2, size
x, y, theta0 = problem()
st = D.measure_distributed(row_loss, (x, y), theta0, **MEASURE)
tr = D.simulate_distributed(loss_fn, theta0, (x, y), SCHEDULE, **SIMULATE)
out = {f"g_{k}": v for k, v in st.group_values.items()}
out.update({f"se_{k}": st.se(k) for k in st.group_values})
out.update(test=tr.test_loss, train=tr.train_loss, div=tr.diverged, curve=tr.curve,
           groups=st.groups, evaluations=st.meta["evaluations"], main=D.is_main())
np.savez(sys.argv[1] + f"/rank{rank}.npz", **out)
D.shutdown()
"""

FAILING = """
from perturb import distributed as D
rank, size = D.init_from_env(timeout_s=30)
if rank == 1:
    raise RuntimeError("rank one exploded")
import torch
torch.distributed.barrier()
D.shutdown()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "problem.py").write_text(textwrap.dedent(PROBLEM))
    (tmp_path / "worker.py").write_text(textwrap.dedent(script))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(tmp_path / "worker.py"), *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )


def _problem() -> dict:
    ns: dict = {}
    exec(textwrap.dedent(PROBLEM), ns)
    return ns


# --------------------------------------------------------------------------- shard


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shard_partitions_in_order(n, size):
    parts = [D.shard(n, r, size) for r in range(size)]
    assert [i for p in parts for i in p] == list(range(n))
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= 1
    assert lens == sorted(lens, reverse=True)
    assert parts == [D.shard(n, r, size) for r in range(size)]  # deterministic


@pytest.mark.parametrize("args", [(-1, 0, 1), (3, 2, 2), (3, -1, 2), (3, 0, 0)])
def test_shard_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        D.shard(*args)
    with pytest.raises(TypeError):
        D.shard(3.0, 0, 1)


# --------------------------------------------------------------------------- fallbacks


def test_no_process_group_fallbacks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert D.world() == (0, 1)
    assert D.is_main()
    assert D.init_from_env() == (0, 1)
    assert not torch.distributed.is_initialized()
    D.shutdown()
    with pytest.raises(ValueError):
        D.init_from_env(timeout_s=0)


def test_single_process_equals_measure_and_simulate():
    p = _problem()
    x, y, theta0 = p["problem"]()
    st = D.measure_distributed(p["row_loss"], (x, y), theta0, **p["MEASURE"])
    ref = _m.measure(p["row_loss"], (x, y), theta0, **p["MEASURE"])
    assert st.group_values.keys() == ref.group_values.keys()
    assert (st.groups, st.rows, st.parameters) == (ref.groups, ref.rows, ref.parameters)
    assert st.meta["evaluations"] == ref.meta["evaluations"]
    for k, v in ref.group_values.items():
        np.testing.assert_array_equal(st.group_values[k], v)
    pa = st.predict(Online(steps=3, batch_size=1), lr=[0.1])
    pb = ref.predict(Online(steps=3, batch_size=1), lr=[0.1])
    np.testing.assert_array_equal(pa.total, pb.total)

    tr = D.simulate_distributed(p["loss_fn"], theta0, (x, y), p["SCHEDULE"], **p["SIMULATE"])
    tref = _s.simulate(p["loss_fn"], theta0, (x, y), p["SCHEDULE"], **p["SIMULATE"])
    np.testing.assert_allclose(tr.test_loss, tref.test_loss, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tr.curve, tref.curve, rtol=0, atol=1e-12)
    assert tr.steps == tref.steps and tr.lrs == tref.lrs


def test_single_process_other_estimators_pass_through():
    f = lambda p, x: ((p - x) ** 2).sum() / 2  # noqa: E731
    x = torch.eye(3, dtype=torch.float64)
    a = D.measure_distributed(f, x, torch.zeros(3), order=1, exact=True, progress=False)
    b = _m.measure(f, x, torch.zeros(3), order=1, exact=True, progress=False)
    assert a.exact and all(
        np.array_equal(a.group_values[k], b.group_values[k]) for k in b.group_values
    )


def test_shard_offset_reproduces_global_trials():
    """Running trials 3..6 alone equals columns 3..6 of the full run."""
    p = _problem()
    x, y, theta0 = p["problem"]()
    args = (p["loss_fn"], theta0, (x, y), Epochs(train_size=4, batch_size=2, epochs=2))
    full = _s.simulate(*args, lr=0.1, trials=7, seed=2)
    s = _s._setup(*args, 0.1, 7, None, 2, None, None, torch.float64, False, None, 1e8)
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)} | {"trials": 4}
    part = _s._run(D._ShardSetup(**fields, offset=3), vectorized=True)
    np.testing.assert_allclose(part.test_loss, full.test_loss[:, 3:], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- 2 processes


def test_two_gloo_processes_equal_single_process(tmp_path):
    proc = _torchrun(tmp_path, WORKER, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = np.load(tmp_path / "rank0.npz")
    r1 = np.load(tmp_path / "rank1.npz")
    assert bool(r0["main"]) and not bool(r1["main"])
    for name in r0.files:  # every rank holds the same gathered result
        if name != "main":
            np.testing.assert_array_equal(r0[name], r1[name])

    p = _problem()
    x, y, theta0 = p["problem"]()
    ref = _m.measure(p["row_loss"], (x, y), theta0, **p["MEASURE"])
    assert int(r0["groups"]) == ref.groups and ref.groups % 2 == 1  # uneven split
    assert int(r0["evaluations"]) == ref.meta["evaluations"]
    assert sum(k.startswith("g_") for k in r0.files) == len(ref.group_values)
    for k, v in ref.group_values.items():
        np.testing.assert_allclose(r0[f"g_{k}"], v, rtol=0, atol=1e-12)
        np.testing.assert_allclose(r0[f"se_{k}"], ref.se(k), rtol=0, atol=1e-12)
    assert any(v.ndim == 2 for v in ref.group_values.values())  # displacement, (R, P)

    tref = _s.simulate(p["loss_fn"], theta0, (x, y), p["SCHEDULE"], **p["SIMULATE"])
    np.testing.assert_allclose(r0["test"], tref.test_loss, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r0["train"], tref.train_loss, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r0["curve"], tref.curve, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(r0["div"].astype(bool), tref.diverged)


def test_failed_rank_fails_the_job(tmp_path):
    proc = _torchrun(tmp_path, FAILING)
    assert proc.returncode != 0
    assert "rank one exploded" in proc.stdout + proc.stderr
