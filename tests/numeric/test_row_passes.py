"""Per-row passes of the Krylov build (perturb.numeric.row_passes) against materialized
derivatives (``torch.autograd.functional`` row by row), in chunks of every size."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from perturb.numeric.adapters import objective
from perturb.numeric.derivatives import derivative, summed
from perturb.numeric.row_passes import (
    per_sample_projected,
    row_chunks,
    symmetric_projection,
    weighted_gradient,
)

F64 = torch.float64


def _loss(p, x):  # a smooth per-row loss of P = 4 parameters, non-zero third derivative
    return torch.tanh(x @ p[:3]) * p[3] + 0.25 * (x @ p[:3]) ** 2 * torch.sin(p[3])


def _case():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=F64)
    theta = torch.randn(4, generator=gen, dtype=F64)
    basis = torch.linalg.qr(torch.randn(4, 3, generator=gen, dtype=F64))[0]
    return objective(_loss, x, theta), x, theta, basis


@functools.cache
def _thirds():
    """The materialized third derivatives ``∇³l_i`` of every row, ``(n, P, P, P)``."""
    _, x, theta, _ = _case()
    return torch.stack(
        [
            jacobian(lambda t, r=r: hessian(lambda s: _loss(s, r), t, create_graph=True), theta)
            for r in x
        ]
    )


def test_row_chunks_cover_the_rows_once():
    for n, size in [(5, 1), (5, 2), (5, 5), (5, 9), (1, 3)]:
        index = [i for s in row_chunks(n, size) for i in range(s.start, s.stop)]
        assert index == list(range(n))
        assert all(s.stop - s.start <= size for s in row_chunks(n, size))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 9])
def test_per_sample_projected_is_the_materialized_projection(chunk_size):
    """``Qᵀ g_i`` and ``Qᵀ H_i u``, any chunk: the same numbers to rounding."""
    obj, x, theta, q = _case()
    u = torch.linspace(-1.0, 1.0, 4, dtype=F64)
    grads = torch.stack([jacobian(lambda t, r=r: _loss(t, r), theta) for r in x])
    hvps = torch.stack([hessian(lambda t, r=r: _loss(t, r), theta) @ u for r in x])
    torch.testing.assert_close(
        per_sample_projected(obj, q, (), chunk_size), grads @ q, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        per_sample_projected(obj, q, (u,), chunk_size), hvps @ q, rtol=0, atol=1e-12
    )


def test_per_sample_projected_shows_a_bar_over_the_rows(capsys):
    obj, _, _, q = _case()
    quiet = per_sample_projected(obj, q, (), 2)
    assert capsys.readouterr() == ("", "")
    loud = per_sample_projected(obj, q, (), 2, desc="rows")
    out, err = capsys.readouterr()
    assert out == "" and "rows: 100%" in err and "5/5" in err
    assert torch.equal(quiet, loud)


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_weighted_gradient_is_the_weighted_sum_of_row_gradients(chunk_size):
    obj, x, theta, _ = _case()
    w = torch.tensor([1.0, -1.0, 0.5, 2.0, -3.0], dtype=F64)
    want = sum(wi * jacobian(lambda t, r=r: _loss(t, r), theta) for wi, r in zip(w, x, strict=True))
    torch.testing.assert_close(weighted_gradient(obj, w, chunk_size), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 2, 6])
def test_symmetric_projection_of_the_mean_third_derivative(batch):
    """``J[q_a, q_b, q_c]`` of the mean loss from its 6 sorted pairs, any number of
    directions per call, equals the materialized tensor contracted with ``Q`` thrice;
    per row (``leading=(n,)``) likewise."""
    obj, _, theta, q = _case()
    third = _thirds()
    want_mean = torch.einsum("ijk,ia,jb,kc->abc", third.mean(0), q, q, q)
    mean_vector = derivative(summed(obj.batch), vector=True)

    def mean_fn(us):
        return q.T @ mean_vector(theta, obj.rows, us) / obj.n

    got = symmetric_projection(mean_fn, q, 3, leading=(), batch=batch)
    torch.testing.assert_close(got, want_mean, rtol=0, atol=1e-12)
    assert torch.equal(got, got.permute(1, 0, 2))  # one value per sorted pair of directions
    for axes in itertools.permutations(range(3)):  # and the last index agrees to rounding
        torch.testing.assert_close(got, got.permute(*axes), rtol=0, atol=1e-12)
    want_rows = torch.einsum("nijk,ia,jb,kc->nabc", third, q, q, q)
    got_rows = symmetric_projection(
        lambda us: per_sample_projected(obj, q, us, 2), q, 3, leading=(obj.n,), batch=batch
    )
    torch.testing.assert_close(got_rows, want_rows, rtol=0, atol=1e-12)
