"""Model and data adapters (perturb.numeric.adapters): models with buffers, Population
input, and the input and model errors raised through ``measure`` and ``flat_loss``."""

from __future__ import annotations

import pytest
import torch
from measure_models import (
    F64,
    POLY_DATA,
    POLY_TH,
    _assert_close,
    _image_data,
    _mlp,
    _one_thread,  # noqa: F401
    _packed,
    poly_loss,
)
from torch import nn

from perturb import Contraction, Online, Population, predict, series
from perturb.numeric.adapters import NonSmoothWarning, flat_loss
from perturb.numeric.measuring import measure
from perturb.numeric.networks import contraction_value, moment_network
from perturb.reference.tensors import derivative_tensors


def test_model_with_buffers_and_eval_batchnorm():
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2)
    )
    net = net.to(F64)
    with torch.no_grad():
        net[2].running_mean.fill_(0.3)
        net[2].running_var.fill_(2.0)
    net.eval()
    x, y = torch.randn(5, 1, 2, 2, dtype=F64), torch.tensor([0, 1, 1, 0, 1])
    fn, theta0 = flat_loss(net)
    assert torch.allclose(
        fn(theta0, x, y), nn.functional.cross_entropy(net(x), y, reduction="none")
    )
    per_row, rows = _packed(fn, x, y)
    derivs = derivative_tensors(per_row, rows, theta0, 2)
    for term in series(2, Online(steps=2, batch_size=1)).terms:
        c = term.contraction
        _assert_close(contraction_value(c, net, (x, y)), c.value(derivs), 1e-10, c.text)


def test_population_input_matches_predict():
    population = Population(poly_loss, POLY_DATA)
    stats = measure(population, None, POLY_TH, order=2, exact=True, progress=False)
    schedule = Online(steps=3, batch_size=1)
    want = predict(population, POLY_TH, schedule, lr=0.2, order=2)
    _assert_close(stats.predict(schedule, lr=0.2).total[0], want.total, 1e-10, "population")


def test_errors_inputs():
    net = _mlp()
    x, y = _image_data((1, 2, 3), 5, seed=0)
    with pytest.raises(ValueError, match="one scalar per row"):
        measure(net, (x, y), order=1, loss=lambda out, t: out, progress=False)
    with pytest.raises(ValueError, match="scalar tensor"):
        measure(lambda p, r: p * r[0], POLY_DATA, POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        measure(poly_loss, torch.zeros(0, 3), POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="same number of rows"):
        measure(net, (x, y[:3]), order=1, progress=False)
    with pytest.raises(ValueError, match="theta0 has 3 entries but the model has 53"):
        measure(net, (x, y), torch.zeros(3), order=1, progress=False)
    with pytest.raises(ValueError, match="theta0 is required"):
        measure(poly_loss, POLY_DATA, order=1, progress=False)
    with pytest.raises(ValueError, match="theta0 has 2 entries; is that the right size"):
        measure(poly_loss, POLY_DATA, torch.zeros(2), order=1, progress=False)
    with pytest.raises(ValueError, match="chunk_size must be an integer ≥ 1"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, exact=True, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="max_message_elements must be an integer ≥ 1"):
        contraction_value(
            Contraction((-1, 0), ((0,), (1,))),
            poly_loss,
            POLY_DATA,
            POLY_TH,
            max_message_elements=0,
        )
    with pytest.raises(ValueError, match="data=None with a Population"):
        measure(Population(poly_loss, POLY_DATA), POLY_DATA, POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="1-D parameter vector"):
        measure(poly_loss, POLY_DATA, torch.zeros(3, 1), order=1, progress=False)
    with pytest.raises(ValueError, match="dtype must be"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="cannot be split into 16"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, estimator="groups", progress=False)
    with pytest.raises(ValueError, match="distinct rows per group"):
        measure(
            poly_loss, POLY_DATA, POLY_TH, order=2, groups=2, estimator="groups", progress=False
        )
    with pytest.raises(ValueError, match="tuples of 3 distinct rows, got only 2"):
        measure(poly_loss, POLY_DATA[:2], POLY_TH, order=2, progress=False)
    with pytest.raises(ValueError, match="estimator must be"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, estimator="jackknife", progress=False)
    with pytest.raises(ValueError, match="samples applies to estimates only"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, exact=True, samples=2, progress=False)
    with pytest.raises(ValueError, match="exceeds the 4 rows"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, samples=9, groups=1, progress=False)
    with pytest.raises(ValueError, match="quantities must be among"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=1, quantities=("loss",), progress=False)
    with pytest.raises(ValueError, match="order must be"):
        measure(poly_loss, POLY_DATA, POLY_TH, order=-1, progress=False)
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        measure(3, POLY_DATA, POLY_TH, order=1, progress=False)
    with pytest.raises(ValueError, match="moment-form"):
        moment_network(Contraction((-1, 0), ((0,), (1,))), poly_loss, POLY_DATA, POLY_TH)


def test_errors_models():
    bn = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    x, y = _image_data((1, 2, 3), 4, seed=0)
    with pytest.raises(ValueError, match="training mode"):
        measure(bn, (x, y), order=1, progress=False)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 3))
    with pytest.warns(NonSmoothWarning, match="ReLU"):
        flat_loss(relu)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        flat_loss(poly_loss)
