r"""Cumulant networks as weighted sums of moment networks: exact, unbiased, per tuple.

A contraction (:class:`~perturb.symbolic.contractions.Contraction`) is evaluated here from
the moment networks of :mod:`perturb.numeric.engine`, with weights that depend on the
estimate wanted.

**Cumulants.**  A cumulant network is the Möbius sum over refinements ``ρ`` of its
partition, ``Σ_ρ Π_B (-1)^{k_B-1}(k_B-1)! M_ρ``, as in :meth:`Contraction.value`;
identical moment networks (same Weisfeiler-Lehman hash and isomorphic) are evaluated once.

**Unbiased estimates.**  On a sample of ``n`` iid rows the V-statistic is biased.  The
U-statistic averages over tuples of *distinct* rows; by inclusion-exclusion over coincidences

.. math::  \sum_{\text{distinct}} = \sum_{\pi \text{ partition of the blocks}} μ(\hat0, π)
           \sum_{\text{tuples constant on the blocks of } π},\qquad
           μ(\hat0, π) = \prod_{B∈π} (-1)^{|B|-1}(|B|-1)!,

a combination of V-sums of the networks with blocks merged by ``π``, divided by
``n(n-1)…(n-m+1)`` (:func:`networks`, :func:`group_values`).

**Tuples.**  With one row per block and the rows of a tuple distinct iid draws, every
moment network is an unbiased estimate of its population value, and so is the Möbius sum
of them (:func:`tuple_networks`, :func:`tuple_values`): the estimator
:func:`perturb.numeric.measuring.measure` uses by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from perturb.numeric.adapters import objective
from perturb.numeric.engine import Engine, Net, canonical_blocks
from perturb.symbolic.contractions import Contraction, refinements_of
from perturb.symbolic.diagrams import set_partitions

__all__ = [
    "contraction_value",
    "group_values",
    "moment_network",
    "networks",
    "single_layout",
    "tuple_networks",
    "tuple_size",
    "tuple_values",
]


def _refinements(contraction: Contraction) -> list[tuple[tuple[tuple[int, ...], ...], int]]:
    return refinements_of(
        contraction.tensors, open_root=contraction.open_root, form=contraction.form
    )


def networks(
    contraction: Contraction, *, unbiased: bool, group_size: int
) -> list[tuple[Net, float]]:
    """Moment networks and weights whose per-group V-sums combine into the value.

    Exact (V-statistic): ``Σ_ρ w_ρ S_ρ / n^{m_ρ}``.  Unbiased (U-statistic):
    ``Σ_ρ w_ρ Σ_π μ(π) S_{ρ∨π} / (n)_{m_ρ}``.

    Example:
        >>> gg = Contraction(parents=(-1, 0), parts=((0,), (1,)))  # G·G
        >>> [(net.blocks, w) for net, w in networks(gg, unbiased=True, group_size=4)]
        [(((0, 1),), -0.08333333333333333), (((0,), (1,)), 0.08333333333333333)]
    """
    out: dict[tuple, float] = {}
    order: list[tuple] = []
    for refined, weight in _refinements(contraction):
        blocks = [tuple(b) for b in refined if not (contraction.open_root and tuple(b) == (0,))]
        m = len(blocks)
        if not unbiased:
            merges = [([[i] for i in range(m)], 1)]
            scale = group_size**m
        else:
            merges = [(pi, _mobius(pi)) for pi in set_partitions(list(range(m)))]
            scale = math.perm(group_size, m)
        if scale == 0:
            raise ValueError(
                f"{contraction.text!r} needs {m} distinct rows per group, got groups of "
                f"{group_size} rows; use fewer groups or more samples"
            )
        for pi, mu in merges:
            merged = canonical_blocks(tuple(v for i in part for v in blocks[i]) for part in pi)
            key = (merged,)
            if key not in out:
                out[key] = 0.0
                order.append(key)
            out[key] += weight * mu / scale
    return [
        (Net(contraction.parents, key[0], contraction.open_root), out[key])
        for key in order
        if out[key] != 0.0
    ]


def _mobius(partition: Sequence[Sequence[int]]) -> int:
    return math.prod((-1) ** (len(b) - 1) * math.factorial(len(b) - 1) for b in partition)


def group_values(
    engine: Engine, contraction: Contraction, *, unbiased: bool, label: str | None = None
) -> torch.Tensor:
    """The contraction's value in each group: ``(K,)`` or ``(K, P)``, float64.

    Example:
        >>> import torch
        >>> from perturb.numeric.adapters import objective
        >>> obj = objective(lambda p, x: ((p - x) ** 2).sum() / 2, torch.tensor([[1.0], [3.0]]),
        ...                 torch.zeros(1))
        >>> engine = Engine(obj, single_layout(2, "cpu"), chunk_size=8, budget=None)
        >>> gg = Contraction(parents=(-1, 0), parts=((0,), (1,)))
        >>> group_values(engine, gg, unbiased=True)  # g_1 g_2 = (-1)(-3)
        tensor([3.], dtype=torch.float64)
    """
    label = contraction.text if label is None else label
    total = None
    for net, weight in networks(contraction, unbiased=unbiased, group_size=engine.group_size):
        term = engine.sums(net, label) * weight
        total = term if total is None else total + term
    return total


def tuple_size(contraction: Contraction) -> int:
    """``m``: the most independent blocks of any refinement (an open root is no block).

    Example:
        >>> tuple_size(Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))))  # tr(C H)
        3
    """
    return max(
        sum(1 for b in refined if not (contraction.open_root and tuple(b) == (0,)))
        for refined, _ in _refinements(contraction)
    )


def tuple_networks(contraction: Contraction) -> list[tuple[Net, float]]:
    """Moment networks and Möbius weights, one sample per block: ``Σ_ρ w_ρ M_ρ``.

    Example:
        >>> trc = Contraction(parents=(-1, 0), parts=((0, 1),))  # tr(C)
        >>> [(net.blocks, w) for net, w in tuple_networks(trc)]
        [(((0, 1),), 1.0), (((0,), (1,)), -1.0)]
    """
    out: dict[tuple[tuple[int, ...], ...], float] = {}
    for refined, weight in _refinements(contraction):
        blocks = [tuple(b) for b in refined if not (contraction.open_root and tuple(b) == (0,))]
        key = canonical_blocks(blocks)
        out[key] = out.get(key, 0.0) + weight
    return [
        (Net(contraction.parents, key, contraction.open_root), w)
        for key, w in out.items()
        if w != 0.0
    ]


def tuple_values(
    engine: Engine, contraction: Contraction, tuples: torch.Tensor, label: str | None = None
) -> torch.Tensor:
    """Per-tuple unbiased estimates ``Z_r`` of a cumulant network: ``(R,)`` or ``(R, P)``.

    ``tuples`` is ``(R, m')`` row indices, distinct within a row, ``m' ≥``
    :func:`tuple_size`; block ``i`` of every refinement takes column ``i``.  As the rows of
    a tuple are distinct iid draws, every moment network with one row per block is an
    unbiased estimate of its population value, and so is their Möbius sum.

    Example:
        >>> import torch
        >>> from perturb.numeric.adapters import objective
        >>> obj = objective(lambda p, x: ((p - x) ** 2).sum() / 2, torch.tensor([[1.0], [3.0]]),
        ...                 torch.zeros(1))
        >>> tuples = torch.tensor([[0, 1], [1, 0]])
        >>> engine = Engine(obj, tuples, chunk_size=8, budget=None)
        >>> trc = Contraction(parents=(-1, 0), parts=((0, 1),))  # tr(C): g_a² − g_a g_b
        >>> tuple_values(engine, trc, tuples)
        tensor([-2.,  6.], dtype=torch.float64)
    """
    label = contraction.text if label is None else label
    m = tuple_size(contraction)
    if tuples.shape[1] < m:
        raise ValueError(f"{contraction.text!r} needs tuples of {m} rows, got {tuples.shape[1]}")
    total = None
    for net, weight in tuple_networks(contraction):
        term = engine.tuple_values(net, tuples, label) * weight
        total = term if total is None else total + term
    return total


def single_layout(n: int, device: torch.device | str) -> torch.Tensor:
    """The layout of one group holding every row: ``(1, n)``.

    Example:
        >>> single_layout(3, "cpu")
        tensor([[0, 1, 2]])
    """
    return torch.arange(n, device=device)[None, :]


def moment_network(
    network: Contraction,
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    loss: Callable | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    max_message_elements: int | None = None,
) -> torch.Tensor:
    r"""Value of one moment network over the rows, matrix-free.

    .. math::  M = \frac{1}{n^m}\sum_{i_1..i_m} \operatorname{contract}_v
               \nabla^{\deg v} l_{x_{i_{B(v)}}}(θ_0)

    with one independent row per part ``B`` of ``network.parts`` (the V-statistic, exact
    when the rows are the population).

    Args:
        network: a :class:`Contraction` with ``form="moment"``.
        loss_fn_or_model: an ``nn.Module`` (with ``data = (x, y)``), a :class:`FlatLoss`, or a
            per-row ``loss_fn(params, *row) -> scalar``.
        data: the rows: a tensor, or a tuple of tensors with a common leading axis.
        theta0: the point (default: a model's own parameters).
        loss: per-sample loss for a model (default cross-entropy).
        chunk_size: most single-row directional derivatives per ``vmap`` call.
        dtype: ``torch.float32`` or ``torch.float64`` for the derivatives (sums are float64).
        device: where to compute (default: ``theta0``'s device).
        max_message_elements: memory bound of one message (sample axes × ``P``); larger
            messages are enumerated in chunks of one block's samples.

    Returns:
        A float64 scalar tensor, or a ``(P,)`` vector when ``network.open_root``.

    Example:
        >>> import torch
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> gg = Contraction(parents=(-1, 0), parts=((0,), (1,)), form="moment")
        >>> float(moment_network(gg, f, torch.tensor([[1.0], [3.0]]), torch.zeros(1)))
        4.0
    """
    if not isinstance(network, Contraction):
        raise TypeError(f"network must be a Contraction, got {type(network).__name__}")
    if network.form != "moment":
        raise ValueError(
            f"moment_network needs a moment-form network, got form={network.form!r}; "
            "use contraction_value for cumulants"
        )
    obj = objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    engine = Engine(
        obj,
        single_layout(obj.n, obj.theta0.device),
        chunk_size=chunk_size,
        budget=max_message_elements,
    )
    blocks = tuple(b for b in network.parts if not (network.open_root and tuple(b) == (0,)))
    net = Net(network.parents, canonical_blocks(blocks), network.open_root)
    return engine.sums(net, network.text)[0] / obj.n ** len(blocks)


def contraction_value(
    contraction: Contraction,
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    unbiased: bool = False,
    loss: Callable | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    max_message_elements: int | None = None,
) -> torch.Tensor:
    r"""Value of a contraction (cumulant or moment form) over the rows, matrix-free.

    A cumulant network is the Möbius sum over the refinements ``ρ`` of its partition,
    ``Σ_ρ Π_B (-1)^{k_B-1}(k_B-1)! M_ρ``, of moment networks ``M_ρ`` (as
    :meth:`Contraction.value`).  With ``unbiased=False`` the rows are the population and the
    result equals ``contraction.value(derivative_tensors(...))``.  With ``unbiased=True`` the
    rows are an iid sample and every ``M_ρ`` is replaced by its U-statistic (distinct rows,
    by inclusion-exclusion over coincidences), an unbiased estimate of the population value;
    :func:`measure` adds error bars.

    Args:
        contraction: the network.
        loss_fn_or_model, data, theta0, loss, chunk_size, dtype, device,
            max_message_elements: as for :func:`moment_network`.
        unbiased: U-statistic instead of the V-statistic.

    Returns:
        A float64 scalar tensor, or a ``(P,)`` vector for an open root.

    Example:
        >>> import torch
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> trc = Contraction(parents=(-1, 0), parts=((0, 1),))  # tr(C) with a train root
        >>> rows = torch.tensor([[1.0], [3.0]])
        >>> float(contraction_value(trc, f, rows, torch.zeros(1)))
        1.0
        >>> float(contraction_value(trc, f, rows, torch.zeros(1), unbiased=True))
        2.0
    """
    if not isinstance(contraction, Contraction):
        raise TypeError(f"contraction must be a Contraction, got {type(contraction).__name__}")
    obj = objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    engine = Engine(
        obj,
        single_layout(obj.n, obj.theta0.device),
        chunk_size=chunk_size,
        budget=max_message_elements,
    )
    return group_values(engine, contraction, unbiased=unbiased)[0]
