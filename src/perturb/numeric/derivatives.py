r"""Directional derivatives of a loss at rows, the one primitive every network node calls.

A node of a network with incoming messages ``u_1..u_k`` needs

.. math::  ∇^{k+1} s(θ)[u_1,\dots,u_k,\,\cdot\,] = \partial_{u_k}\cdots\partial_{u_1} ∇s(θ)
           \quad\text{(a vector)}\qquad\text{or}\qquad ∇^k s(θ)[u_1,\dots,u_k]
           \quad\text{(a scalar)},

``s`` the loss of one row or the summed loss of a batch (:func:`summed`).  :func:`derivative`
builds it from ``torch.func``: forward-over-reverse (``jvp`` of ``grad``) by default, so
nothing of size ``P²`` is ever formed.  :func:`auto_chunk` and :func:`vmap_rows` size the
``vmap`` calls and :func:`free_bytes` reads the memory they may use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from perturb.checks import check_int
from perturb.numeric.adapters import Objective

__all__ = [
    "MAX_VMAP_ROWS",
    "VMAP_BUDGET",
    "auto_chunk",
    "derivative",
    "free_bytes",
    "summed",
    "vmap_rows",
]

VMAP_BUDGET = 2**28  # bytes of parameter-sized tensors one vectorized per-row call may hold
MAX_VMAP_ROWS = 256  # rows per call beyond which vectorizing buys nothing more


def _jvp_along(f: Callable, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return jvp(f, (t,), (u,))[1]


def derivative(scalar: Callable, vector: bool, *, reverse_first: bool = False) -> Callable:
    """``(θ, rows, us) ↦ ∇^{k+1} s(θ)[u_1..u_k, ·]`` (vector) or ``∇^k s(θ)[u_1..u_k]``.

    Forward-over-reverse: ``jvp`` along each ``u`` of ``grad`` (vector) or of the value.
    With ``reverse_first`` a vector with ``k ≥ 1`` directions starts from the
    reverse-over-reverse HVP ``∇(∇s·u_1)`` and takes ``jvp`` along ``u_2..u_k``: the same
    number, faster for per-sample directions on a GPU (``benchmarks/bench_derivatives.py``).

    Args:
        scalar: ``scalar(θ, *rows) -> scalar tensor``.
        vector: return the gradient differentiated along ``us`` (else the value).
        reverse_first: start a vector from the reverse-over-reverse HVP.

    Returns:
        ``fn(theta, rows, us)`` with ``rows`` a tuple of tensors and ``us`` a tuple of
        directions; ``vmap`` it over rows and directions.

    Example:
        >>> import torch
        >>> s = lambda t, x: (x * t**3).sum() / 6  # ∇³s = diag(x)
        >>> hvp = derivative(s, True)  # (∇²s) u = diag(x t) u
        >>> hvp(torch.ones(2), (torch.tensor([1.0, 2.0]),), (torch.tensor([1.0, 1.0]),))
        tensor([1., 2.])
        >>> float(derivative(s, False)(torch.ones(2), (torch.ones(2),), (torch.ones(2),) * 3))
        2.0
    """

    def fn(theta, rows, us):
        if vector and reverse_first and us:
            f = functools.partial(_hvp_reverse_at, scalar, rows, us[0])
            us = us[1:]
        elif vector:
            f = functools.partial(_grad_at, scalar, rows)
        else:
            f = functools.partial(_value_at, scalar, rows)
        for u in us:
            f = functools.partial(_jvp_along, f, u)
        return f(theta)

    return fn


def _hvp_reverse_at(scalar, rows, u, t):
    return grad(lambda s: torch.dot(grad(scalar)(s, *rows), u))(t)


def _grad_at(scalar, rows, t):
    return grad(scalar)(t, *rows)


def _value_at(scalar, rows, t):
    return scalar(t, *rows)


def summed(batch: Callable) -> Callable:
    """The summed loss ``(θ, *rows) ↦ Σ_i l_i(θ)`` of a batch loss ``(θ, *rows) -> (n,)``.

    Example:
        >>> import torch
        >>> float(summed(lambda t, x: x @ t)(torch.ones(2), torch.eye(2)))
        2.0
    """

    def total(t, *rows):
        return batch(t, *rows).sum()

    return total


def vmap_rows(parameters: int, *, itemsize: int, order: int = 1, budget: int = VMAP_BUDGET) -> int:
    r"""Rows per vectorized per-row call whose parameter-sized tensors fit in ``budget`` bytes.

    A ``vmap`` over ``c`` rows of the order-``m`` per-row derivative
    ``∇^m l_i[u_1..u_{m−1}, ·]`` (forward over reverse, :func:`derivative`) holds ``c``
    copies of every ``P``-sized tensor of one row: the per-row gradient and its
    flattened copy (2), and each of the ``m − 1`` forward-mode levels carries a tangent
    beside every primal (×2 per level), so at most about

    .. math::  b(m) = 2^{m+1}\,P\,s \quad\text{bytes per row}

    (``s`` = ``itemsize``; measured on :func:`~perturb.experiments.models.stem_mlp`,
    ``P = 10⁶``, float32, calls of 8 rows: 1.6, 4.2 and 12.3 × ``P·s`` at ``m = 1, 2,
    3``).  The rows

    .. math::  c = \min\big(256,\ \max(1,\ ⌊\mathrm{budget} / b(m)⌋)\big)

    keep ``c · b(m) ≤ budget`` (256 MiB by default, :data:`VMAP_BUDGET`) whenever one row
    fits, whatever ``P``: memory is bounded by design, never ``n × P``.  The rows'
    activations (``c`` × the network's activations per row, a few times over) come on top;
    for convolutions they can match ``b(m)``.  256 rows (:data:`MAX_VMAP_ROWS`) already
    amortize the per-call overhead, and larger calls are not faster on the CPU: at
    ``P = 10⁶`` (float32) a per-row gradient costs 6.5 ms a row in calls of 8 rows, 8.5 in
    calls of 16 and 13 in calls of 32 (each call's ``c·P`` tensors are freshly mapped
    pages, beyond the cache).

    Args:
        parameters: ``P``.
        itemsize: bytes per number (4 for float32, 8 for float64).
        order: ``m``, the derivative order of the per-row pass (1: gradients).
        budget: bytes one call may hold.

    Returns:
        ``c``, between 1 and 256.

    Example:
        >>> vmap_rows(1_000_000, itemsize=4, order=2)  # 2^28 / (8 · 4·10⁶) rows
        8
        >>> vmap_rows(1_000, itemsize=8), vmap_rows(10**9, itemsize=8, order=3)
        (256, 1)
    """
    parameters = check_int("parameters", parameters, minimum=1)
    itemsize = check_int("itemsize", itemsize, minimum=1)
    order = check_int("order", order, minimum=1)
    budget = check_int("budget", budget, minimum=1)
    per_row = 2 ** (order + 1) * parameters * itemsize
    return int(min(MAX_VMAP_ROWS, max(1, budget // per_row)))


def auto_chunk(obj: Objective) -> int:
    """Rows per ``vmap`` call when ``chunk_size`` is not given.

    On the CPU, messages of about 16 MB (``2^24 / (8 P)`` rows, 16 to 1024; fewer than 16
    where :func:`vmap_rows` of an order-3 node allows fewer: 4 at ``P = 10⁶``, float32).  On a
    CUDA device, the rows whose third-order node (``J_i[u, v, ·]``, the costliest node of an
    order-3 network) fits in a quarter of the free memory: the memory per row is read off
    two small probe calls (4 and 16 rows; the difference removes fixed workspace), and the
    chunk is clamped to 16..8192 rows.  This resets CUDA's peak-memory statistics.

    Example:
        >>> import torch
        >>> from perturb.numeric.adapters import objective
        >>> auto_chunk(objective(lambda p, x: (p * x).sum(), torch.ones(4, 3), torch.zeros(3)))
        1024
    """
    p = obj.size
    row_numel = sum(r[0].numel() for r in obj.rows)
    least = min(16, vmap_rows(p, itemsize=obj.theta0.element_size(), order=3))
    cpu_chunk = int(min(1024, max(least, 2**24 // (8 * p + 8 * row_numel))))
    device = obj.theta0.device
    if device.type != "cuda" or obj.n < 16:
        return cpu_chunk
    fn = vmap(derivative(obj.single, True), in_dims=(None, 0, 0))
    gen = torch.Generator(device="cpu").manual_seed(0)
    peaks = []
    for k in (4, 16):
        rows = tuple(r[:k] for r in obj.rows)
        us = tuple(
            torch.randn(k, p, generator=gen).to(device=device, dtype=obj.theta0.dtype)
            for _ in range(2)
        )
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(obj.theta0, rows, us)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_row = max((peaks[1] - peaks[0]) / 12, 4 * p * obj.theta0.element_size())
    return int(min(8192, max(16, free_bytes(device) // 4 // per_row)))


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: CUDA's free memory, or the host's available
    physical memory (Linux); ``None`` where it cannot be read.

    Example:
        >>> import torch
        >>> free = free_bytes(torch.device("cpu"))
        >>> free is None or free > 0
        True
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None
