"""Numeric evaluation of the re-summed diagrams: exact sums over embeddings with torch.

The symbolic half (which diagrams survive re-summation, their prefactors, edges and time
units) is :mod:`perturb.symbolic.resummed`; this module evaluates them on tensors: the
sums over embeddings ``h_{T-j}(1, y_1..y_j)`` by powers of a bidiagonal matrix, the time
integrals of Remark 2, and the re-summed value of a quantity in an eigenbasis of ``H``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

import torch

from perturb.symbolic.contractions import (
    contract_moment_network,
    default_einsum,
    refinements_of,
    rows_of,
)
from perturb.symbolic.resummed import ResummedTerm, resummed_terms
from perturb.symbolic.schedules import Schedule

__all__ = [
    "complete_homogeneous",
    "open_network",
    "resummed_by_quantity",
    "resummed_values",
    "time_integral",
    "time_sum",
]


def complete_homogeneous(zs: torch.Tensor, n: int) -> torch.Tensor:
    """``h_n(z_0, …, z_j)`` along the last axis, by powers of a bidiagonal matrix.

    Args:
        zs: values, shape ``(..., j+1)``.
        n: the degree (``h_n = 0`` for ``n < 0``).

    Returns:
        Shape ``(...)``.

    Example:
        >>> import torch
        >>> z = torch.tensor([1.0, 0.5], dtype=torch.float64)
        >>> float(complete_homogeneous(z, 3))  # 1 + 0.5 + 0.25 + 0.125
        1.875
    """
    j = zs.shape[-1] - 1
    if n < 0:
        return torch.zeros(zs.shape[:-1], dtype=zs.dtype, device=zs.device)
    if j == 0:
        return zs[..., 0] ** n
    z = torch.diag_embed(zs) + torch.diag_embed(
        torch.ones((*zs.shape[:-1], j), dtype=zs.dtype, device=zs.device), offset=-1
    )
    return torch.linalg.matrix_power(z, n + j)[..., j, 0]


def time_sum(orders, xs: list[torch.Tensor], steps: int) -> torch.Tensor:
    """The exact sum over embeddings of ``Π_e x_e^{Δt_e − 1}``, vectorized.

    Args:
        orders: :attr:`ResummedTerm.orders`.
        xs: one broadcastable tensor of ``1 − ηh`` values per edge.
        steps: ``T``.

    Example:
        >>> import torch
        >>> x = torch.tensor(0.5, dtype=torch.float64)
        >>> float(time_sum(((1, ((1, 2),)),), [x], 3))  # Σ_{t<3} 0.5^{3-t-1}
        1.75
    """
    total = None
    for j, spans in orders:
        shape = torch.broadcast_shapes(*(x.shape for x in xs)) if xs else ()
        ref = xs[0] if xs else torch.ones((), dtype=torch.float64)
        factor = torch.ones(shape, dtype=ref.dtype, device=ref.device)
        for x, (a, b) in zip(xs, spans, strict=True):
            factor = factor * x ** (b - a - 1)
        zs = [torch.ones(shape, dtype=ref.dtype, device=ref.device)]
        for i in range(1, j + 1):
            y = torch.ones(shape, dtype=ref.dtype, device=ref.device)
            for x, (a, b) in zip(xs, spans, strict=True):
                if a <= i < b:
                    y = y * x
            zs.append(y)
        value = factor * complete_homogeneous(torch.stack(zs, dim=-1), steps - j)
        total = value if total is None else total + value
    return total


def time_integral(orders, rates: list[torch.Tensor], steps: float) -> torch.Tensor:
    """Remark 2's continuous form of :func:`time_sum`: integrals of exponentials.

    Each edge's ``x_e^{Δt−1}`` becomes ``exp(−r_e Δt)`` with ``r_e = ηh_e``, and the sum
    over embedding steps the integral over ``0 < τ_1 < … < τ_j < T``:

        ∫ Π_i exp(−λ_i g_i) dg over g_0 + … + g_j = T, g ≥ 0,

    with ``λ_i`` the summed rates of the edges spanning gap ``i`` (``λ_0 = 0``), the
    corner entry of ``exp(T·Z)`` for the bidiagonal ``Z`` with diagonal ``−λ`` and unit
    sub-diagonal (stable for coinciding rates).  Its ratio to the exact sum is
    ``1 + O(η)`` at fixed ``ηT`` (the paper's ``1 + o(η)``).

    Args:
        orders: :attr:`ResummedTerm.orders`.
        rates: one broadcastable tensor of ``ηh`` values per edge.
        steps: ``T``.

    Example:
        >>> import torch
        >>> r = torch.tensor(0.1, dtype=torch.float64)
        >>> round(float(time_integral(((1, ((1, 2),)),), [r], 10.0)), 6)  # (1 − e^{−1})/0.1
        6.321206
    """
    total = None
    for j, spans in orders:
        shape = torch.broadcast_shapes(*(r.shape for r in rates)) if rates else ()
        ref = rates[0] if rates else torch.zeros((), dtype=torch.float64)
        lams = [torch.zeros(shape, dtype=ref.dtype, device=ref.device)]
        for i in range(1, j + 1):
            lam = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            for r, (a, b) in zip(rates, spans, strict=True):
                if a <= i < b:
                    lam = lam + r
            lams.append(lam)
        diag = -torch.stack(lams, dim=-1)
        z = torch.diag_embed(diag)
        if j:
            ones = torch.ones((*shape, j), dtype=ref.dtype, device=ref.device)
            z = z + torch.diag_embed(ones, offset=-1)
        value = torch.linalg.matrix_exp(steps * z)[..., j, 0]
        total = value if total is None else total + value
    return total


def resummed_values(
    terms: list[ResummedTerm],
    derivs: Mapping[int, torch.Tensor],
    *,
    lr: float,
    steps: int,
    schedule: Schedule,
    means: Mapping[int, torch.Tensor] | None = None,
    eigh: tuple[torch.Tensor, torch.Tensor] | None = None,
    integral: bool = False,
) -> list[torch.Tensor]:
    """Exact re-summed contributions by number of edges, via a full eigendecomposition.

    Args:
        terms: from :func:`resummed_terms`.
        derivs: per-sample derivative tensors (float64 torch), ``{k: (n, P, …)}``.
        lr: η.
        steps: ``T``.
        schedule: the (numeric) schedule the terms were built for.
        means: optional mean tensors ``{k: (P, …)}``; nodes alone in their part use
            them, so per-sample tensors are needed only for orders that occur in
            multi-node parts.  ``means[2]`` (else the mean of ``derivs[2]``) is ``H``.
        eigh: ``torch.linalg.eigh(H)`` if already computed (reused across calls).
        integral: use Remark 2's integrals of exponentials (:func:`time_integral`)
            instead of the exact sums over steps.

    Returns:
        One value per number of edges ``0..order`` (vectors for displacement).

    Example:
        On ``l_x(θ) = θ²/2 + xθ`` with ``x = ±1`` (``H = 1``, ``C = 1``) from ``θ_0 = 1``
        the re-summed order-2 test loss is exact: at ``η = 0.1`` the mean of ``θ_t`` is
        ``0.9^t`` and its variance follows ``v ← 0.81 v + 0.01``.

        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
        >>> derivs = {0: 0.5 + x, 1: (1 + x)[:, None], 2: torch.ones(2, 1, 1).double()}
        >>> s = Online(steps=50, batch_size=1)
        >>> parts = resummed_values(resummed_terms(2, s), derivs, lr=0.1, steps=50, schedule=s)
        >>> mean, var = 0.9**50, sum(0.01 * 0.81**k for k in range(50))
        >>> abs(float(sum(parts)) - (mean**2 + var) / 2) < 1e-12
        True
    """
    if not schedule.is_numeric:
        raise ValueError("resummed_values needs a schedule with numeric sizes")
    means = dict(means or {})
    hess = means[2] if 2 in means else derivs[2].mean(0)
    evals, evecs = torch.linalg.eigh(hess) if eigh is None else eigh
    rotated = {k: _rotate(t, evecs, first=1) for k, t in derivs.items()}
    rotated_means = {k: _rotate(t, evecs, first=0) for k, t in means.items()}
    x = 1 - lr * evals
    order = max(t.diagram.edges for t in terms)
    open_root = any(t.open_root for t in terms)
    shape = (hess.shape[0],) if open_root else ()
    zero = torch.zeros(shape, dtype=hess.dtype, device=hess.device)
    out: list = [zero] * (order + 1)
    for term in terms:
        d = term.diagram.edges
        network = open_network(term, rotated, rotated_means)
        xs = [x.reshape((-1,) + (1,) * (d - 1 - i)) for i in range(d)]
        if not d:
            weights = torch.ones((), dtype=hess.dtype, device=hess.device)
        elif integral:
            rates = [(lr * evals).reshape((-1,) + (1,) * (d - 1 - i)) for i in range(d)]
            weights = time_integral(term.orders, rates, steps)
        else:
            weights = time_sum(term.orders, xs, steps)
        if term.open_root:
            letters = string.ascii_lowercase[:d]
            value = evecs @ torch.einsum(f"{letters},{letters}->a", network, weights)
        else:
            value = (network * weights).sum()
        out[d] = out[d] + float(term.prefactor) * lr**d * value
    return out


def resummed_by_quantity(
    derivs: Mapping[int, torch.Tensor],
    schedule: Schedule,
    quantity: str,
    *,
    order: int,
    lr: float,
    integral: bool = False,
    means: Mapping[int, torch.Tensor] | None = None,
    eigh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """:func:`resummed_values` of ``quantity``, the gap as test minus train.

    Args:
        derivs: per-sample tensors, as for :func:`resummed_values`.
        schedule: a numeric online or GD schedule.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        order: highest number of edges.
        lr: η.
        integral: Remark 2's integral form.
        means: mean tensors, as for :func:`resummed_values`.
        eigh: ``torch.linalg.eigh(H)``, computed here when not given.

    Returns:
        One value per number of edges ``0..order``.

    Example:
        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> g = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # l_x = ½θ² + xθ at 0
        >>> derivs = {0: torch.zeros(2, dtype=torch.float64), 1: g,
        ...           2: torch.ones(2, 1, 1, dtype=torch.float64)}
        >>> v = resummed_by_quantity(derivs, Online(steps=3, batch_size=1), "test",
        ...                          order=1, lr=0.5)
        >>> float(v[1])  # −η G² (1 + x + x²) with G = 2, x = 1 − η
        -3.5
    """
    if quantity == "gap":
        parts = [
            resummed_by_quantity(
                derivs, schedule, q, order=order, lr=lr, integral=integral, means=means, eigh=eigh
            )
            for q in ("test", "train")
        ]
        return [a - b for a, b in zip(*parts, strict=True)]
    if eigh is None:
        hess = means[2] if means and 2 in means else derivs[2].mean(0)
        eigh = torch.linalg.eigh(hess)
    terms = resummed_terms(order, schedule, quantity)
    return resummed_values(
        terms,
        derivs,
        lr=lr,
        steps=int(schedule.steps),
        schedule=schedule,
        means=means,
        eigh=eigh,
        integral=integral,
    )


def _rotate(tensor: torch.Tensor, evecs: torch.Tensor, *, first: int) -> torch.Tensor:
    """Express every parameter axis (from axis ``first`` on) in the eigenbasis."""
    out = tensor
    for axis in range(first, tensor.ndim):
        out = torch.tensordot(out, evecs, dims=([axis], [0])).movedim(-1, axis)
    return out


def open_network(
    term: ResummedTerm, rotated: Mapping[int, object], means: Mapping[int, object] | None = None
):
    """The cumulant network of a re-summed term with every edge index left open.

    Args:
        term: a :class:`~perturb.symbolic.resummed.ResummedTerm`.
        rotated: per-sample derivative tensors ``{k: (n, P, …)}`` (numpy or torch),
            usually in the eigenbasis of ``H``.
        means: optional mean tensors for nodes alone in their part.

    Returns:
        A tensor with one axis of length ``P`` per edge, edges in node order.

    Example:
        >>> import numpy as np
        >>> from perturb.symbolic.resummed import resummed_terms
        >>> from perturb.symbolic.schedules import Online
        >>> term = next(t for t in resummed_terms(1, Online()) if t.diagram.edges == 1)
        >>> g = np.array([[1.0, 0.0], [3.0, 2.0]])  # two rows, P = 2
        >>> open_network(term, {1: g})  # G_a G_a with a open: G ⊙ G, G = (2, 1)
        array([4., 1.])
    """
    d = term.diagram
    einsum = default_einsum(rotated)
    n = rows_of(rotated)
    total = None
    for blocks, weight in refinements_of(d.parts, open_root=term.open_root):
        value = contract_moment_network(
            d.parents, blocks, term.open_root, rotated, n, einsum, means, keep_edges=True
        )
        value = value * weight
        total = value if total is None else total + value
    return total
