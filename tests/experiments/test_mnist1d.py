"""MNIST-1D generated offline: shapes, determinism, untouched global RNG, the dataset loader;
and ``validate`` and ``compare`` on it with the 1-D convnet (here, in one file, so that one
process generates the 4,000 + 1,000 sequences once for all of them: seconds each time).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from perturb.experiments.comparison import QUADRATIC, compare
from perturb.experiments.data import load_dataset
from perturb.experiments.mnist1d import SEQUENCE_LENGTH, mnist1d_arrays
from perturb.experiments.models import build_model
from perturb.experiments.pipeline import load_population
from perturb.experiments.predictors import LADDER
from perturb.experiments.validation import validate

RESUMMED = ["resummed 2", "resummed 3"]
SEED = 0


def test_arrays_are_deterministic_and_split_like_the_package():
    x, y, xt, yt = mnist1d_arrays(samples=200, seed=5)
    assert x.shape == (160, 1, SEQUENCE_LENGTH) and xt.shape == (40, 1, SEQUENCE_LENGTH)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert set(np.unique(np.concatenate([y, yt]))) == set(range(10))
    assert np.bincount(np.concatenate([y, yt]), minlength=10).tolist() == [20] * 10
    both = np.concatenate([x, xt])
    assert abs(float(both.mean())) < 1e-5 and abs(float(both.std()) - 1) < 1e-4
    again = mnist1d_arrays(samples=200, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((x, y, xt, yt), again, strict=True))
    other = mnist1d_arrays(samples=200, seed=6)[0]
    assert not np.array_equal(x, other)


def test_global_random_state_is_restored():
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    mnist1d_arrays(samples=20, seed=0)
    assert (np.random.rand(), random.random()) == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="samples must be an integer ≥ 10"):
        mnist1d_arrays(samples=5)
    with pytest.raises(ValueError, match="seed must be an integer ≥ 0"):
        mnist1d_arrays(seed=-1)


def test_load_dataset_mnist1d_and_its_convnet():
    train = load_dataset("mnist1d")
    test = load_dataset("MNIST-1D", split="test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.input_shape == (1, SEQUENCE_LENGTH) and train.num_classes == 10
    model = build_model("smooth-convnet", train.input_shape, train.num_classes, seed=0)
    assert any(isinstance(m, torch.nn.Conv1d) for m in model.modules())
    logits = model(train.x[:8])
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()


# ------------------------------------------------------------------ validate and compare


def test_mnist1d_runs_end_to_end_with_every_predictor():
    """Sequences (1, 40), the 1-D convnet (34,202 parameters): the SDE and the re-summed
    series in a Krylov subspace, the table saying so."""
    result = validate(
        dataset="mnist1d",
        lrs=(0.01,),
        steps=4,
        trials=4,
        population=16,
        records=2,
        orders=(0, 1),
        gap=False,
        progress=False,
        krylov_rank=16,
        krylov_higher_rank=4,
    )
    assert result.config["parameters"] == 34202 and result.config["population"] == 16
    assert result.predictors == [
        "order 0", "order 1", "noiseless", "SDE", "resummed 2", "resummed 3", "resummed 3+ladder"
    ]  # fmt: skip
    assert result.config["unavailable"] == {}
    table = result.table()
    assert "       resummed 2: in a Krylov subspace of H of rank 16 (P = 34202)" in table
    for r in result.rows:
        assert r["ci_low"] < r["actual"] < r["ci_high"] and not r["divergent"]
        assert all(math.isfinite(p["value"]) for p in r["predictions"].values())


def test_mnist1d_compare_runs_every_theory_on_a_projection():
    """The 1-D convnet (34,202 parameters) is too big for the materialized Hessian: gradient
    flow runs on the projection of rank 18, whose two blocks ``[G, z_1..z_8]`` and ``H·`` of
    them make the Gauss quadratures ``GᵀHʲG`` exact for ``j ≤ 3``; so gradient flow,
    ``l − ½GᵀH⁻¹(I − e^{−2tH})G``, is its Taylor series ``l − t|G|² + t²GᵀHG − ⅔t³GᵀH²G +
    ⅓t⁴GᵀH³G`` (Hessian-vector products here) up to the next term, ``−(2/15)t⁵GᵀH⁴G``."""
    result = compare(
        dataset="mnist1d",
        lrs=(0.01,),
        batch_sizes=(1,),
        steps=(2, 4),
        trials=4,
        orders=(1,),
        population=16,
        krylov_rank=18,
        krylov_higher_rank=4,
    )
    assert result.config["parameters"] == 34202
    assert result.predictors == ["order 1", *RESUMMED, LADDER, *QUADRATIC]
    for name in QUADRATIC:
        assert result.notes[name].startswith(
            "on the quadratic model projected on the Krylov subspace of H of rank 18 "
            "(34202 parameters > max_hessian_parameters = 4000)"
        )
    assert result.notes["resummed 3"].startswith(
        "in a Krylov subspace of H of rank 18 (3-edge diagrams on 4) (P = 34202)"
    )
    data = load_population("mnist1d", population=16, seed=SEED)
    net = build_model("smooth-convnet", data.input_shape, data.num_classes, seed=SEED).double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def mean_loss(p):
        logits = torch.func.functional_call(net, p, (data.x.double(),))
        return nn.functional.cross_entropy(logits, data.y)

    grad = torch.func.grad(mean_loss)(params)

    def hvp(v):
        return torch.func.jvp(torch.func.grad(mean_loss), (params,), (v,))[1]

    def dot(u, v):
        return sum(float((u[k] * v[k]).sum()) for k in u)

    powers = [grad]
    for _ in range(4):
        powers.append(hvp(powers[-1]))
    ghg = [dot(grad, v) for v in powers]  # GᵀHʲG, j = 0..4
    for r in result.rows:
        t = r["lr"] * r["steps"]
        taylor = float(mean_loss(params)) - t * ghg[0] + t**2 * ghg[1]
        taylor += -2 / 3 * t**3 * ghg[2] + 1 / 3 * t**4 * ghg[3]
        got = r["predictions"]["gradient flow"]["value"]
        assert got == pytest.approx(taylor, abs=t**5 * abs(ghg[4]) + 1e-6), (t, ghg)
        assert not r["divergent"] and math.isfinite(r["predictions"]["order 1"]["value"])
