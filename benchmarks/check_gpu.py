"""Check that perturb computes the same numbers on a CUDA device as on the CPU.

Run on a machine with a GPU: ``python benchmarks/check_gpu.py``.  The test suite needs no
GPU, so this script is where the CUDA paths are checked, in float64 against the CPU:

* ``measure(..., exact=True)``: every order-3 contraction of every schedule and quantity
  on 32 digits rows and the digits ``smooth_convnet``;
* ``measure(...)`` with the tuple estimator and with the sketches (4 groups) on the same
  rows (same seed, same tuples, same splits and signs):
  values and standard errors;
* ``simulate``: 16 online SGD trials of 20 steps, test and train losses of every trial;
  and on the GPU, the CUDA-graph replay of the vectorized step against the eager step
  (two learning rates, batch 2, test-loss curves recorded every 5 steps).

Prints the largest relative difference of each and exits with status 1 if any exceeds
``1e-9``.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from perturb.experiments.data import load_dataset
from perturb.experiments.models import smooth_convnet
from perturb.experiments.simulation import model_loss, simulate
from perturb.numeric.measuring import measure
from perturb.numeric.statistics import HostCopy
from perturb.symbolic.schedules import Online

TOLERANCE = 1e-9


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    data = load_dataset("digits")
    x, y = data.x[:32], data.y[:32]
    model = smooth_convnet((1, 8, 8), 10)
    worst: dict[str, float] = {}
    for exact, estimator in ((True, {}), (False, {"estimator": "tuples"}),
                             (False, {"estimator": "sketch", "groups": 4})):  # fmt: skip
        stats = {
            dev: measure(
                model.to(dev),
                (x.to(dev), y.to(dev)),
                order=3,
                quantities=("test", "train", "gap", "displacement"),
                exact=exact,
                dtype=torch.float64,
                device=dev,
                progress=False,
                **estimator,
            )
            for dev in ("cpu", "cuda")
        }
        name = "measure exact" if exact else f"measure {estimator['estimator']}"
        keys = list(stats["cpu"].contractions)
        worst[name + " values"] = max(
            _rel(stats["cuda"].value(k), stats["cpu"].value(k)) for k in keys
        )
        if not exact:
            worst[name + " standard errors"] = max(
                _rel(stats["cuda"].se(k), stats["cpu"].se(k)) for k in keys
            )
        print(f"{name}: {len(keys)} contractions")
    model = model.to("cpu")
    loss_fn, theta0 = model_loss(model)
    trials = {
        dev: simulate(
            loss_fn,
            theta0,
            (data.x, data.y),
            Online(steps=20, batch_size=1),
            lr=0.1,
            trials=16,
            dtype=torch.float64,
            device=dev,
            seed=0,
        )
        for dev in ("cpu", "cuda")
    }
    worst["simulate test losses"] = _rel(trials["cuda"].test_loss, trials["cpu"].test_loss)
    worst["simulate train losses"] = _rel(trials["cuda"].train_loss, trials["cpu"].train_loss)
    # the CUDA-graph replay of the vectorized step against the eager step, on the GPU,
    # with a recorded curve (the static buffers are read between replays)
    simulate_module = sys.modules["perturb.experiments.sgd_step"]
    runs = {}
    for graphs in (True, False):
        simulate_module.CUDA_GRAPHS = graphs
        runs[graphs] = simulate(
            loss_fn,
            theta0,
            (data.x, data.y),
            Online(steps=20, batch_size=2),
            lr=[0.05, 0.2],
            trials=16,
            dtype=torch.float64,
            device="cuda",
            seed=1,
            record_every=5,
        )
    simulate_module.CUDA_GRAPHS = True
    worst["simulate, CUDA graph vs eager: test losses"] = _rel(
        runs[True].test_loss, runs[False].test_loss
    )
    worst["simulate, CUDA graph vs eager: curves"] = _rel(runs[True].curve, runs[False].curve)
    # large per-tuple vectors leave the device through a reused page-locked buffer
    host = HostCopy()
    gen = torch.Generator().manual_seed(2)
    for shape in ((512, 4096), (300, 4000), (1024, 1024)):
        big = torch.randn(shape, generator=gen, dtype=torch.float64).cuda()
        worst["measure, staged copy to host"] = max(
            worst.get("measure, staged copy to host", 0.0), _rel(host(big), big.cpu().numpy())
        )
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| check (float64, CUDA vs CPU) | max relative difference |")
    print("|---|---:|")
    for name, value in worst.items():
        print(f"| {name} | {value:.1e} |")
    bad = [name for name, value in worst.items() if not value <= TOLERANCE]
    if bad:
        print(f"FAILED (> {TOLERANCE:g}): {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
