r"""Passes over the rows in vectorized chunks: the per-row work of the Krylov build.

:func:`perturb.krylov_subspace` projects every tensor the re-summed diagrams contract on
an orthonormal basis ``Q`` (``P×k``).  The tensors that belong to single rows are never
kept at full size: each chunk of ``c`` rows is differentiated by one ``vmap`` call
(memory ``c·P`` and the call's intermediates, :func:`~perturb.numeric.derivatives.vmap_rows`)
and projected at once, so what is kept is ``n·k`` numbers, never ``n·P``:

* :func:`per_sample_projected`: ``Qᵀ ∇^{m} l_i[u_1..u_{m−1}, ·]`` for every row ``i``;
* :func:`symmetric_projection`: a symmetric order-``m`` tensor on ``Q`` from its distinct
  entries (sorted index tuples), each one vectorized derivative along basis vectors;
* :func:`weighted_gradient`: ``∇ Σ_i w_i l_i``, one backward pass per chunk (no
  per-row gradients), for the random combinations that start the Krylov space.

The chunks only group the work: a sum over the rows is accumulated chunk by chunk, so the
values do not depend on the chunk size beyond floating-point rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
from torch.func import grad, vmap
from tqdm.auto import tqdm

from perturb.numeric.adapters import Objective
from perturb.numeric.derivatives import derivative

__all__ = ["per_sample_projected", "row_chunks", "symmetric_projection", "weighted_gradient"]


def row_chunks(n: int, size: int) -> Iterable[slice]:
    """Consecutive slices of at most ``size`` of the rows ``0..n−1``.

    Example:
        >>> list(row_chunks(5, 2))
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def weighted_gradient(obj: Objective, weights: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``∇ Σ_i w_i l_i(θ_0)``: one backward pass per chunk, no per-sample gradients.

    Example:
        >>> from perturb.numeric.adapters import objective
        >>> x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        >>> obj = objective(lambda p, x: ((p - x) ** 2).sum() / 2, x, torch.zeros(1))
        >>> weighted_gradient(obj, torch.tensor([1.0, -1.0], dtype=torch.float64), 1)
        tensor([2.], dtype=torch.float64)
    """

    def weighted(t, w, *rows):
        return (w * obj.batch(t, *rows)).sum()

    total = torch.zeros_like(obj.theta0)
    for s in row_chunks(obj.n, chunk_size):
        total = total + grad(weighted)(obj.theta0, weights[s], *(r[s] for r in obj.rows))
    return total


def per_sample_projected(
    obj: Objective,
    basis: torch.Tensor,
    us: tuple[torch.Tensor, ...],
    chunk_size: int,
    *,
    desc: str | None = None,
) -> torch.Tensor:
    """``Qᵀ ∇^{len(us)+1} l_i[us…, ·]`` for every row ``i``: shape ``(n, k)``.

    One ``vmap`` call per chunk of ``chunk_size`` rows, projected on ``Q`` (``basis``,
    ``P×k``) before the next, so memory is ``chunk_size·P`` and the result ``n·k``.  A
    ``desc`` shows a tqdm bar of that name over the rows.

    Example:
        >>> from perturb.numeric.adapters import objective
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> obj = objective(lambda p, x: ((p - x) ** 2).sum() / 2, x, torch.zeros(2))
        >>> q = torch.tensor([[1.0], [0.0]], dtype=torch.float64)  # g_i = θ − x_i; Qᵀg_i
        >>> per_sample_projected(obj, q, (), 2).flatten().tolist()
        [-1.0, 0.0, -1.0]
    """
    fn = derivative(obj.single, vector=True)

    def one(*row):
        return fn(obj.theta0, row, us)

    out = []
    bar = tqdm(total=obj.n, desc=desc, unit="row", disable=desc is None)
    for s in row_chunks(obj.n, chunk_size):
        out.append(vmap(one)(*(r[s] for r in obj.rows)) @ basis)
        bar.update(s.stop - s.start)
    bar.close()
    return torch.cat(out)


def symmetric_projection(
    vector_fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
    basis: torch.Tensor,
    m: int,
    *,
    leading: tuple[int, ...],
    batch: int,
    desc: str | None = None,
) -> torch.Tensor:
    """The symmetric order-``m`` tensor ``∇^m[q_a…, ·]`` projected, from sorted index tuples.

    ``vector_fn(us)`` returns the projected last index (shape ``leading + (k,)``) of the
    derivative along the directions ``us``; it is vectorized over ``batch`` tuples at once
    (``batch = 1``: called directly, no ``vmap``, which would double the time of a per-row
    ``vector_fn`` at ``P = 10⁶``).  Each of the ``C(k+m−2, m−1)`` sorted tuples of
    ``m − 1`` basis indices is one call, copied to every permutation.  A ``desc`` shows a
    tqdm bar of that name over the directions.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)  # ∇²(xᵀAx/2)
        >>> q = torch.eye(2, dtype=torch.float64)
        >>> symmetric_projection(lambda us: q.T @ (a @ us[0]), q, 2, leading=(), batch=1)
        tensor([[2., 1.],
                [1., 3.]], dtype=torch.float64)
    """
    k = basis.shape[1]
    out = torch.zeros((*leading, *([k] * m)), dtype=torch.float64)
    lead = (slice(None),) * len(leading)
    tuples = list(itertools.combinations_with_replacement(range(k), m - 1))
    batched = vmap(lambda *us: vector_fn(us))
    bar = tqdm(total=len(tuples), desc=desc, unit="dir", disable=desc is None)
    for start in range(0, len(tuples), batch):
        chunk = tuples[start : start + batch]
        index = torch.tensor(chunk, device=basis.device)
        dirs = [basis[:, index[:, i]].T for i in range(m - 1)]
        values = batched(*dirs) if len(chunk) > 1 else vector_fn(tuple(d[0] for d in dirs))[None]
        values = values.detach().to("cpu", torch.float64)
        for idx, value in zip(chunk, values, strict=True):
            for perm in set(itertools.permutations(idx)):
                out[(*lead, *perm)] = value
        bar.update(len(chunk))
    bar.close()
    return out
