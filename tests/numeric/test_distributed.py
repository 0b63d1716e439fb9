"""perturb.numeric.distributed: shards, single-process fallbacks, and a real 2-process Gloo run."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from perturb import distributed as D
from perturb.cli import cli
from perturb.symbolic.schedules import Online

_m = importlib.import_module("perturb.numeric.measuring")
_s = importlib.import_module("perturb.experiments.simulation")
_stability = importlib.import_module("perturb.numeric.stability")

LAUNCH_TIMEOUT_S = 240

# The tiny problem shared by the workers and the single-process reference.
PROBLEM = """
import math
import torch
from perturb.symbolic.schedules import Epochs, Online

def tiny(input_shape, num_classes, seed):
    # a 2-unit tanh network (P = 162 on digits): a cheap Hessian for perturb validate
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), 2),
                              torch.nn.Tanh(), torch.nn.Linear(2, num_classes))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net

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

def net_loss(theta, x, y):
    # a 3-4-1 tanh network, P = 20: order-3 statistics, a Krylov subspace of rank 8
    hidden = torch.tanh(theta[:12].reshape(4, 3) @ x + theta[12:16])
    return 0.5 * (theta[16:] @ hidden - y) ** 2

def net_problem():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(203, 3, dtype=torch.float64, generator=g)
    y = torch.randn(203, dtype=torch.float64, generator=g)
    return x, y, 0.5 * torch.randn(20, dtype=torch.float64, generator=g)

def split_runs():
    base = dict(order=3, schedules=(Online(),), quantities=("test",), seed=3, groups=5,
                progress=False)
    mixed = {"l": "sketch", "G·G": "tuples", "G·H·G": "sketch", "tr(C H)": "tuples"}
    kryl = dict(resummed=True, rank=8, higher_rank=6, probes=2)
    return {
        "sketch": dict(base, estimator="sketch", replicates=2, **kryl),
        "auto": dict(base, estimator="auto", pilot=70, **kryl),  # 5 pilot groups
        "mixed": dict(base, order=2, estimator=mixed),
    }

LADDER = dict(lr=[0.05, 0.2], steps=[3, 10])
ONLINE = Online(steps=10, batch_size=1)

def split_summary(name, st, hessian_ladder):
    import numpy as np
    out = {f"{name}_g_{k}": v for k, v in st.group_values.items()}
    out.update({f"{name}_se_{k}": st.se(k) for k in st.group_values})
    out[f"{name}_evaluations"] = st.meta["evaluations"]
    out[f"{name}_world"] = st.meta.get("world_size", 1)
    pred = st.predict(ONLINE, lr=[0.05, 0.2])
    out[f"{name}_predict"] = np.stack([pred.total, pred.se])
    sub = st.subspace
    if sub is not None:
        out[f"{name}_local_rows"] = sub.cost["local_rows"]
        out[f"{name}_basis"] = sub.basis.numpy()
        out[f"{name}_hessian"] = sub.hessian.numpy()
        for m, t in sub.derivs.items():
            out[f"{name}_derivs{m}"] = t.numpy()
        for m, t in sub.means.items():
            out[f"{name}_means{m}"] = t.numpy()
        out[f"{name}_ladder"] = hessian_ladder(sub, **LADDER)
        res = st.predict(ONLINE, lr=[0.05, 0.2], resummed=True)
        out[f"{name}_resummed"] = np.stack([res.total, res.se, res.error])
    if "plan" in st.meta and "contractions" in st.meta["plan"]:
        plan = st.meta["plan"]["contractions"]
        out[f"{name}_pilot_var"] = [[plan[k][e]["variance"] for e in ("tuples", "sketch")]
                                    for k in sorted(plan)]
        out[f"{name}_choice"] = [plan[k]["estimator"] for k in sorted(plan)]
    return out

SCHEDULE = Epochs(train_size=4, batch_size=2, epochs=2)
MEASURE = dict(order=2, schedules=(Online(), Epochs()), quantities=("test", "displacement"),
               seed=5, progress=False, vector_batches=2,  # 7 tuples: batch 1 spans both ranks
               estimator="tuples")
SIMULATE = dict(lr=[0.05, 0.2], trials=7, seed=11, record_every=2)
"""

VALIDATE = [
    "validate", "--population", "16", "--steps", "4", "--trials", "6", "--lr", "0.01",
    "--lr", "0.05", "--orders", "0", "--orders", "1", "--records", "2", "--model",
    "problem:tiny", "--out", "out",
]  # fmt: skip
PREDICT = [
    "predict", "--model", "problem:tiny", "--lr", "0.01", "--lr", "0.1", "--steps", "5", "--order",
    "2", "--samples", "64", "--format", "json",
]  # fmt: skip

# Every 2-process check in one torchrun job (each launch costs seconds of imports): the
# plain API, the command line, and the default path split (sketches, pilot, Krylov,
# per-sample curvatures).
WORKER = """
import contextlib, json, os, sys
from pathlib import Path
import numpy as np
import torch
from perturb import distributed as D
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.measuring import measure
from perturb.numeric.stability import per_sample_top_curvatures
from perturb.numeric.validity import hessian_ladder
from perturb.experiments.simulation import simulate
from perturb.cli import main as perturb_cli
from problem import MEASURE, SCHEDULE, SIMULATE, problem, row_loss, loss_fn
from problem import net_loss, net_problem, split_runs, split_summary

with D.session(timeout_s=60) as (rank, size):
    assert size == 2 and torch.distributed.is_initialized(), size
    print(f"stdout of rank {rank}")  # only rank 0's reaches the terminal
    main = D.is_main()
    x, y, theta0 = problem()
    gather, traffic = torch.distributed.all_gather, []

    def counting(parts, tensor, *args, **kwargs):  # bytes received, as the collective has them
        traffic[-1] += sum(t.numel() * t.element_size() for t in parts)
        return gather(parts, tensor, *args, **kwargs)

    torch.distributed.all_gather = counting
    traffic.append(0)
    st = measure(row_loss, (x, y), theta0, **MEASURE)  # split: plain API under a group
    traffic.append(0)
    ex = measure(row_loss, (x, y), theta0, order=2, exact=True, progress=False)  # whole
    traffic.append(0)
    tr = simulate(loss_fn, theta0, (x, y), SCHEDULE, **SIMULATE)
    torch.distributed.all_gather = gather
    one = simulate(loss_fn, theta0, (x, y), SCHEDULE, lr=0.1, trials=range(4, 5))  # K < W
    local = simulate(loss_fn, theta0, (x, y), SCHEDULE, lr=0.1, trials=3, distributed=False)
    disagree = []
    for call in (  # ranks that disagree fail together, with a message
        lambda: simulate(loss_fn, theta0, (x, y), SCHEDULE, lr=0.1, trials=4, seed=rank),
        lambda: measure(row_loss, (x, y), theta0, order=1, seed=rank, estimator="tuples",
                        progress=False),
    ):
        try:
            call()
            disagree.append("")
        except ValueError as err:
            disagree.append(str(err))
    # the command line as the console script runs it, in a folder per rank (to see who
    # writes), in this process group (a torchrun job can initialize one only once)
    os.chdir(Path(sys.argv[1]) / f"rank{rank}")
    for name, args in zip(("validate", "predict"), json.loads(sys.argv[2]), strict=True):
        with open(f"{name}.stdout", "w") as fh, contextlib.redirect_stdout(fh):
            perturb_cli(args, standalone_mode=False)
    # the default path split: each rank its share, every rank the single-process result
    x, y, theta0 = net_problem()
    split = {}
    for name, kw in split_runs().items():
        split.update(split_summary(name, measure(net_loss, (x, y), theta0, **kw), hessian_ladder))
    idx, lam = per_sample_top_curvatures(net_loss, (x, y), theta0, iterations=6, chunk_size=7)
    split.update(curv_rows=idx, curv=lam)
    split_disagree = []
    for call in (  # ranks that disagree fail together, before any gather of values
        lambda: measure(net_loss, (x, y), theta0, order=1, estimator="sketch", seed=rank,
                        groups=4, progress=False),
        lambda: krylov_subspace(net_loss, (x, y), theta0, rank=3, seed=rank, distributed=True),
        lambda: per_sample_top_curvatures(net_loss, (x, y), theta0, iterations=2, seed=rank),
    ):
        try:
            call()
            split_disagree.append("")
        except ValueError as err:
            split_disagree.append(str(err))
    split.update(disagree=split_disagree)
np.savez(sys.argv[1] + f"/split{rank}.npz", **split)
out = {f"g_{k}": v for k, v in st.group_values.items()}
out.update({f"se_{k}": st.se(k) for k in st.group_values})
out.update({f"exact_{k}": v for k, v in ex.group_values.items()})
out.update(test=tr.test_loss, train=tr.train_loss, div=tr.diverged, curve=tr.curve,
           groups=st.groups, evaluations=st.meta["evaluations"], main=main,
           one=one.test_loss, local=local.test_loss, disagree=disagree,
           world=st.meta["world_size"], after=torch.distributed.is_initialized(),
           traffic=traffic)
np.savez(sys.argv[1] + f"/rank{rank}.npz", **out)
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
    st = _m.measure_distributed(p["row_loss"], (x, y), theta0, **p["MEASURE"])
    ref = _m.measure(p["row_loss"], (x, y), theta0, **p["MEASURE"])
    assert st.group_values.keys() == ref.group_values.keys()
    assert (st.groups, st.rows, st.parameters) == (ref.groups, ref.rows, ref.parameters)
    assert st.meta["evaluations"] == ref.meta["evaluations"]
    for k, v in ref.group_values.items():
        np.testing.assert_array_equal(st.group_values[k], v)
    pa = st.predict(Online(steps=3, batch_size=1), lr=[0.1])
    pb = ref.predict(Online(steps=3, batch_size=1), lr=[0.1])
    np.testing.assert_array_equal(pa.total, pb.total)

    tr = _s.simulate_distributed(p["loss_fn"], theta0, (x, y), p["SCHEDULE"], **p["SIMULATE"])
    tref = _s.simulate(p["loss_fn"], theta0, (x, y), p["SCHEDULE"], **p["SIMULATE"])
    np.testing.assert_allclose(tr.test_loss, tref.test_loss, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tr.curve, tref.curve, rtol=0, atol=1e-12)
    assert tr.steps == tref.steps and tr.lrs == tref.lrs


def test_communication_bytes_rejects_bad_arguments():
    t = _s.Trials((0.1,), np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2), bool), (1,),
                  np.zeros((1, 2, 1)))  # fmt: skip
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="world must be a positive integer"):
            D.communication_bytes(t, bad)
    with pytest.raises(TypeError, match="Statistics or a Trials"):
        D.communication_bytes(np.zeros(3), 2)


def test_single_process_other_estimators_pass_through():
    f = lambda p, x: ((p - x) ** 2).sum() / 2  # noqa: E731
    x = torch.eye(3, dtype=torch.float64)
    a = _m.measure_distributed(f, x, torch.zeros(3), order=1, exact=True, progress=False)
    b = _m.measure(f, x, torch.zeros(3), order=1, exact=True, progress=False)
    assert a.exact and all(
        np.array_equal(a.group_values[k], b.group_values[k]) for k in b.group_values
    )


# --------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder and the finished process of one 2-rank Gloo run of ``WORKER``."""
    tmp_path = tmp_path_factory.mktemp("two_ranks")
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()
    proc = _torchrun(tmp_path, WORKER, str(tmp_path), json.dumps([VALIDATE, PREDICT]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path, proc


def test_two_gloo_processes_equal_single_process(two_ranks):
    tmp_path, proc = two_ranks
    r0 = np.load(tmp_path / "rank0.npz")
    r1 = np.load(tmp_path / "rank1.npz")
    assert bool(r0["main"]) and not bool(r1["main"])
    assert int(r0["world"]) == 2 and not r0["after"] and not r1["after"]  # shut down
    assert proc.stdout.count("stdout of rank") == 1 and "stdout of rank 0" in proc.stdout
    for r in (r0, r1):
        assert len(r["disagree"]) == 2
        for message in r["disagree"]:
            assert "the ranks disagree on" in str(message) and "[[" in str(message)
    for name in r0.files:  # every rank holds the same gathered result
        if name not in ("main", "local", "disagree"):
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
    # displacement: 2 batch means of 3 tuples, the second summed from both ranks' tuples
    assert ref.meta["vector_batches"] == 2 and ref.meta["vector_batch_size"] == 3
    assert any(v.shape == (2, 3) for v in ref.group_values.values())

    exact = _m.measure(p["row_loss"], (x, y), theta0, order=2, exact=True, progress=False)
    for k, v in exact.group_values.items():
        np.testing.assert_array_equal(r0[f"exact_{k}"], v)

    tref = _s.simulate(p["loss_fn"], theta0, (x, y), p["SCHEDULE"], **p["SIMULATE"])
    args = (p["loss_fn"], theta0, (x, y), p["SCHEDULE"])
    five = _s.simulate(*args, lr=0.1, trials=5)
    np.testing.assert_allclose(r0["one"], five.test_loss[:, 4:], rtol=0, atol=1e-12)
    for r in (r0, r1):  # distributed=False: each rank ran all 3 trials itself
        np.testing.assert_allclose(r["local"], five.test_loss[:, :3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(r0["test"], tref.test_loss, rtol=0, atol=1e-12)
    # bytes counted in the collectives = the formula, from the single-process results
    assert r0["traffic"].tolist() == [
        D.communication_bytes(ref, 2),
        0,
        D.communication_bytes(tref, 2),
    ]
    assert D.communication_bytes(exact, 2) == 0 and D.communication_bytes(ref, 1) == 0
    np.testing.assert_allclose(r0["train"], tref.train_loss, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r0["curve"], tref.curve, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(r0["div"].astype(bool), tref.diverged)


@pytest.mark.filterwarnings("ignore:re-summed prediction along unstable directions")
def test_two_ranks_split_the_default_path(two_ranks):
    """Sketches, the pilot, the Krylov subspace, the ladder, the predictions and the
    per-sample curvatures: each rank its share, every rank the single-process result."""
    tmp_path, _ = two_ranks
    r0, r1 = (np.load(tmp_path / f"split{r}.npz") for r in (0, 1))
    for r in (r0, r1):
        assert all("the ranks disagree on" in str(e) for e in r["disagree"]), r["disagree"]
    for name in r0.files:  # both ranks hold the same gathered result
        if not name.endswith(("_local_rows", "disagree")):
            np.testing.assert_array_equal(r0[name], r1[name], err_msg=name)

    p = _problem()
    from perturb.numeric.validity import hessian_ladder

    x, y, theta0 = p["net_problem"]()
    ref: dict = {}
    for name, kw in p["split_runs"]().items():
        st = _m.measure(p["net_loss"], (x, y), theta0, **kw)
        ref.update(p["split_summary"](name, st, hessian_ladder))
    idx, lam = _stability.per_sample_top_curvatures(
        p["net_loss"], (x, y), theta0, iterations=6, chunk_size=7
    )
    ref.update(curv_rows=idx, curv=lam)
    assert sorted(r0.files) == sorted([*ref, "disagree"])
    for name, want in ref.items():
        if name.endswith(("_world", "_local_rows", "_choice")):
            continue
        np.testing.assert_allclose(r0[name], want, rtol=0, atol=1e-10, err_msg=name)
    # the work was split: 2 ranks, Krylov rows 102 + 101 of 203, the same total evaluations
    for name in ("sketch", "auto", "mixed"):
        assert int(r0[f"{name}_world"]) == 2 and ref[f"{name}_world"] == 1
    assert [int(r[f"{n}_local_rows"]) for r in (r0, r1) for n in ("sketch", "auto")] == [
        102, 102, 101, 101,
    ]  # fmt: skip
    assert ref["sketch_local_rows"] == 203
    assert r0["auto_choice"].tolist() == list(ref["auto_choice"])  # counted work: one plan
    assert set(ref["auto_choice"]) == {"sketch", "tuples"}  # both estimators exercised


def test_sketcher_share_must_be_groups_of_the_layout():
    from perturb.numeric.adapters import objective
    from perturb.numeric.sketches import Sketcher

    obj = objective(lambda p, x: (p * x).sum(), torch.ones(6, 1), torch.zeros(1))
    layout = torch.arange(6).reshape(3, 2)
    for bad in (range(0), range(2, 4), range(2, 1)):
        with pytest.raises(ValueError, match="share must be a non-empty range of the 3 groups"):
            Sketcher(obj, layout, torch.Generator(), share=bad)
    part = Sketcher(obj, layout, torch.Generator(), share=range(1, 3))
    assert (part.groups, part.all_groups, part.layout.tolist()) == (2, 3, [[2, 3], [4, 5]])


def test_failed_rank_fails_the_job(tmp_path):
    proc = _torchrun(tmp_path, FAILING)
    assert proc.returncode != 0
    assert "rank one exploded" in proc.stdout + proc.stderr


def test_cli_validate_and_predict_under_torchrun(two_ranks, monkeypatch):
    """``perturb validate`` and ``perturb predict`` on 2 ranks equal 1 process; rank 0 only
    prints and writes."""
    tmp_path, _ = two_ranks
    quiet = tmp_path / "rank1"
    assert sorted(f.name for f in quiet.iterdir()) == ["predict.stdout", "validate.stdout"]
    assert all(f.read_text() == "" for f in quiet.iterdir())  # rank 1: no output, no files
    loud = tmp_path / "rank0"
    assert "wrote out/results.json" in (loud / "validate.stdout").read_text()

    monkeypatch.syspath_prepend(str(tmp_path))  # the model factory problem:tiny
    single = tmp_path / "single"
    single.mkdir()
    out = single / "out"
    runner = CliRunner()
    ref_v = runner.invoke(cli, [*VALIDATE[:-1], str(out)], catch_exceptions=False)
    ref_p = runner.invoke(cli, PREDICT, catch_exceptions=False)
    assert ref_v.exit_code == 0 and ref_p.exit_code == 0

    two = json.loads((loud / "out" / "results.json").read_text())
    one = json.loads((out / "results.json").read_text())
    assert two.pop("timings").keys() == one.pop("timings").keys()
    assert len(two["rows"]) == 4 and {"actual", "ci_low", "predictions"} <= set(two["rows"][0])
    _assert_json_close(two, one)
    assert sorted(f.name for f in (loud / "out").iterdir()) == sorted(f.name for f in out.iterdir())

    two_p = json.loads((loud / "predict.stdout").read_text())
    one_p = json.loads(ref_p.stdout)
    assert two_p["rows"] == 63 and {"by_order", "total", "se"} <= set(two_p)
    _assert_json_close(two_p, one_p)


def _assert_json_close(a: object, b: object, path: str = "") -> None:
    """Equal JSON trees, numbers to float64 rounding (``rel 1e-12``)."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for k in b:
            _assert_json_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_json_close(u, v, f"{path}/{i}")
    elif isinstance(b, float) and not isinstance(a, bool):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300, nan_ok=True), path
    else:
        assert a == b, path


def test_bench_distributed_runs_on_cpu(capsys):
    """The benchmark script, tiny: rank 0's share per K, and the bytes of the formula."""
    path = Path(__file__).parents[2] / "benchmarks" / "bench_distributed.py"
    spec = importlib.util.spec_from_file_location("bench_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--side", "8", "--width", "2", "--order", "1", "--tuples", "9", "--trials", "5"]
    bench.main([*args, "--steps", "2", "--worlds", "1", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 2 |")]
    assert len(rows) == 1
    k, tuples, _, nbytes = (cell.strip() for cell in rows[0][:4])
    trials, gathered = rows[0][7].strip(), rows[0][9].strip()
    assert (k, tuples, trials) == ("2", "5", "3")  # ⌈9/2⌉ tuples, ⌈5/2⌉ trials on rank 0
    # order 1, online test loss: 2 scalar contractions (l, G·G); 2 lrs, steps (2,)
    assert nbytes.replace(",", "") == str(8 * 2 * (6 + 5 * 2))
    assert gathered.replace(",", "") == str(8 * 2 * (5 + 3 * 2 * (3 + 1)))
