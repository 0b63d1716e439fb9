r"""Matrix-free diagram values on real networks, with unbiased estimates and error bars.

Every term of a series (:mod:`perturb.symbolic.series`) multiplies a tensor network
(:class:`perturb.symbolic.contractions.Contraction`).  :meth:`Contraction.value` evaluates it from
*materialized* per-sample tensors ``∇^k l_x`` of size ``n·P^k``; this module evaluates the
same number with ``torch.func`` without forming anything of size ``P²``, so it runs on real
networks.

**Moment networks.**  A moment network puts one independent sample on each block ``B`` of a
partition of the tree's nodes; its value over rows ``1..n`` is the V-statistic

.. math::  M = \frac{1}{n^m}\sum_{i_1,\dots,i_m}\ \operatorname{contract}_{v}
           \nabla^{\deg v} l_{x_{i_{B(v)}}},

``m`` the number of blocks.  It is evaluated from the leaves to the root.  A non-root node
``v`` with children ``c_1..c_k`` sends up the vector

.. math::  w_v = \nabla^{k+1} l_{x}[w_{c_1},\dots,w_{c_k},\,\cdot\,]
           = \partial_{w_{c_k}}\cdots\partial_{w_{c_1}} \nabla l_x ,

a gradient differentiated along ``k`` directions (``jvp`` of ``grad``; ``jvp`` of ``jvp`` of
``grad`` for third order, and so on); the root returns the scalar
``∇^k l_x[w_{c_1},…,w_{c_k}]`` (``k`` nested ``jvp`` of the loss).  A message carries one
sample axis for each block that is still *open* on its edge (the block has nodes both inside
and outside the subtree), and the axis is summed as soon as the block closes; nodes of one
block share the sample (a diagonal, never a product).  Each node therefore costs
``Π_{B open or own} n`` directional derivatives of one sample, done with ``vmap`` in chunks
of ``chunk_size``; memory stays at ``Π_{B open} n · P`` per message, and when that exceeds a
budget the engine enumerates chunks of one block's samples in an outer loop (the value is
linear in each block's sum).  A block that straddles two subtrees makes the cost quadratic
in ``n``: ``tr(C H) = E_s g_sᵀ H g_s`` needs ``H`` applied to every ``g_s``, i.e. ``n²``
single-row derivatives, and no exact matrix-free form is cheaper without forming ``H``.
Three evaluation paths:

* *summed* (the node's sample closes at the node and its inputs do not depend on it): the
  directional derivative of the summed loss ``Σ_i l_i``, one batched call; this gives
  ``G = ∇ Σ l``, ``H u`` (HVP, ``jvp`` of ``grad``), ``J[u, v, ·]`` (``jvp`` of ``θ ↦ H(θ)u``)
  and the test root ``Σ_i ∇^k l_i[u,…]`` (nested ``jvp``);
* *per row* (the node's block stays open, inputs shared): per-sample gradients ``g_i`` and
  per-sample ``H_i u``, ``J_i[u, v, ·]`` with ``vmap`` over rows;
* *diagonal* (an input depends on the node's own sample, e.g. ``E_i[H_i g_i]`` or a train
  root): ``vmap`` over (row, direction) pairs.

**Cumulants.**  A cumulant network is the Möbius sum over refinements of its partition, as in
:meth:`Contraction.value` (``Contraction._refinements``); identical moment networks (same
Weisfeiler-Lehman hash and isomorphic) are evaluated once.

**Unbiased estimates.**  On a sample of ``n`` iid rows the V-statistic is biased.  The
U-statistic averages over tuples of *distinct* rows; by inclusion-exclusion over coincidences

.. math::  \sum_{\text{distinct}} = \sum_{\pi \text{ partition of the blocks}} μ(\hat0, π)
           \sum_{\text{tuples constant on the blocks of } π},\qquad
           μ(\hat0, π) = \prod_{B∈π} (-1)^{|B|-1}(|B|-1)!,

a combination of V-sums of the networks with blocks merged by ``π``, divided by
``n(n-1)…(n-m+1)``.  Error bars use *batch means*: the sample is split at random into ``K``
disjoint groups, the U-statistic is computed within each group, the estimate is their mean
(still exactly unbiased) and its standard error is ``sd(group estimates)/√K``.  Why this
rather than the full-sample U-statistic with a jackknife: the group estimates are
independent and identically distributed, so ``SE²`` is exactly unbiased for the variance
of the estimate (and the error is about Student-t with ``K−1`` degrees of freedom when the
group estimates are near normal), the same group estimates give the error bar of any
linear combination (a prediction at any η and T) for free, and a statistic with ``q``
distinct samples costs ``n^q/K^{q-1}`` instead of ``n^q`` evaluations.  The price is
efficiency for degenerate statistics (e.g. ``G·G`` at a minimum, where the first-order
Hoeffding term vanishes): the variance of the second-order term grows by up to a factor
``K``.  A jackknife of the full-sample U-statistic would need the leave-one-group-out sums
of every network, i.e. group axes on every message, multiplying the cost by up to
``K^{m-1}``.

**Disjoint tuples (the default estimator, linear cost).**  The complete U-statistic above
costs ``n_g²`` or more single-row derivatives per group whenever a block spans two
subtrees.  An *incomplete* U-statistic avoids that: shuffle the rows once and cut them into
``R = ⌊n/m⌋`` disjoint tuples of ``m`` rows, ``m`` the most blocks of any refinement (the
same tuples for every requested contraction, each using its first columns).  Within tuple
``r`` every refinement's moment network is evaluated with block ``i`` on row ``i`` of the
tuple (one sample per block, no sums: every node is one single-row nested directional
derivative), and the Möbius sum of these gives ``Z_r``, an unbiased estimate of the
cumulant network because the rows of a tuple are distinct iid draws.  The ``Z_r`` of
different tuples are iid, so ``mean_r Z_r`` has standard error ``sd(Z_r)/√R``, exactly the
batch-means formula with ``K = R`` groups: :class:`Statistics` stores the ``Z_r`` as its
group values, and since every contraction uses the same tuples, the spread of per-tuple
predictions gives a prediction's error bar.  The cost is ``R × nodes`` derivatives per
network, linear in ``n``; the price is variance: each tuple uses one assignment of its rows
to the blocks instead of all of them, typically a few times the variance of the complete
U-statistic on the same rows, repaid many times over by the rows one can afford.

Two choices make a tuple network cheap.  (1) *Which node is evaluated last.*  Node ``v`` is
``∇^{deg v} l`` with ``deg`` its degree in the undirected tree, so any node can be the one
that receives every neighbour's message and returns the scalar; a scalar with ``k``
directions (``k`` nested ``jvp`` of the loss, no reverse pass) costs a fraction of a vector
node with ``k − 1``, so ``G·H·G`` becomes ``∇²l_b[g_a, g_c]`` instead of ``g_a·(H_b g_c)``
and ``G_a J_abc G_b G_c`` one third-order scalar instead of a ``J``-vector product.  The
engine costs every root (messages already computed for another network on the same
tuples are free) and takes the cheapest.  (2) *Messages are cached across networks*, keyed
by tuple column and incoming messages.  On CUDA a per-row vector node starts from the
reverse-over-reverse HVP (faster there for per-sample directions; forward-over-reverse
everywhere else).

**Predictions.**  :func:`measure` computes every contraction of the requested series once at
``θ_0``; :meth:`Statistics.predict` then evaluates any numeric schedule's coefficients and a
whole grid of learning rates at no further cost.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import sympy as sp
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from perturb.experiments.models import check_model, cross_entropy_per_sample
from perturb.numeric.distributed import (
    all_ints,
    gather_blocks,
    same_on_all_ranks,
    shard,
    sum_over_ranks,
    world,
)
from perturb.numeric.prediction import Population
from perturb.symbolic.contractions import Contraction
from perturb.symbolic.diagrams import set_partitions
from perturb.symbolic.schedules import Epochs, Online, Schedule
from perturb.symbolic.series import QUANTITIES, series

__all__ = [
    "FlatLoss",
    "MeasuredPrediction",
    "Statistics",
    "contraction_value",
    "flat_loss",
    "measure",
    "moment_network",
]

_GROUP = -1  # the axis of the disjoint groups (batch means); present on every message
_DEFAULT_BUDGET = 2**25  # elements of one message (sample axes × P)
_MESSAGE_CACHE = 2**28  # elements of tuple messages kept for reuse (or ¼ of free memory, if more)
_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------- adapters


@dataclass(frozen=True, eq=False)
class FlatLoss:
    """A model's per-sample loss as a function of one flat parameter vector.

    ``FlatLoss(params, x, y)`` returns the ``(n,)`` per-sample losses
    ``loss(model(x; params), y)``.  Parameters are a flat vector (``P`` entries in the order
    of ``model.named_parameters()``); buffers are fixed at their current values.  Build it
    with :func:`flat_loss`.

    Attributes:
        model: the module (its own parameters are not used, only its structure).
        loss: ``loss(output, y) -> (n,)`` per-sample losses.
        names: parameter names.
        shapes: parameter shapes.
        buffers: the fixed buffers.
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    buffers: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """``P``, the number of parameters."""
        return sum(math.prod(s) for s in self.shapes)

    def unflatten(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into the model's named parameter tensors."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            k = math.prod(shape)
            out[name] = params[offset : offset + k].view(shape)
            offset += k
        return out

    def to(self, dtype: torch.dtype, device: torch.device) -> FlatLoss:
        """The same loss with buffers cast (floating ones) and moved."""
        bufs = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in self.buffers.items()
        }
        return FlatLoss(self.model, self.loss, self.names, self.shapes, bufs)

    def __call__(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, (self.unflatten(params), dict(self.buffers)), (x,))
        return self.loss(out, y)


def flat_loss(
    model: nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_per_sample,
) -> tuple[FlatLoss, torch.Tensor]:
    """Per-sample loss of ``model`` on flat parameters, and the current flat parameters.

    The model is checked with :func:`perturb.experiments.models.check_model` (a warning for ReLU and other
    non-analytic pieces, an error for BatchNorm in training mode).

    Args:
        model: the network.
        loss: ``loss(output, y) -> (n,)``, per-sample losses (default cross-entropy).

    Returns:
        ``(loss_fn, theta0)``: ``loss_fn(params_flat, x_batch, y_batch) -> (n,)`` (a
        :class:`FlatLoss`) and the model's parameters as one detached vector.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> fn, theta0 = flat_loss(net)
        >>> theta0.shape, fn(theta0, torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])).shape
        (torch.Size([8]), torch.Size([4]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    check_model(model)
    named = [(n, p) for n, p in model.named_parameters()]
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters to differentiate")
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fn = FlatLoss(
        model=model,
        loss=loss,
        names=tuple(n for n, _ in named),
        shapes=tuple(p.shape for _, p in named),
        buffers=buffers,
    )
    return fn, theta0


@dataclass(frozen=True, eq=False)
class _Objective:
    """Rows, point and the two loss forms the engine differentiates."""

    single: Callable[..., torch.Tensor]  # (theta, *row) -> scalar
    batch: Callable[..., torch.Tensor]  # (theta, *rows) -> (n,)
    rows: tuple[torch.Tensor, ...]
    theta0: torch.Tensor
    origin: torch.Tensor  # row index in the caller's data of each row here

    @property
    def n(self) -> int:
        return int(self.rows[0].shape[0])

    @property
    def size(self) -> int:
        return int(self.theta0.numel())

    def select(self, idx: torch.Tensor) -> _Objective:
        return _Objective(
            self.single,
            self.batch,
            tuple(r[idx] for r in self.rows),
            self.theta0,
            self.origin[idx],
        )


def _as_rows(data: Any, what: str) -> tuple[torch.Tensor, ...]:
    if isinstance(data, torch.Tensor | np.ndarray):
        rows = (torch.as_tensor(data),)
    elif isinstance(data, Sequence) and not isinstance(data, str) and len(data) > 0:
        rows = tuple(torch.as_tensor(d) for d in data)
    else:
        raise TypeError(f"{what} must be a tensor or a tuple of tensors, got {type(data).__name__}")
    for r in rows:
        if r.ndim == 0:
            raise ValueError(f"{what} must have a leading row axis, got a 0-d tensor")
    n = int(rows[0].shape[0])
    if n == 0:
        raise ValueError(f"{what} is empty: it must hold at least one row, got 0 rows")
    lengths = [int(r.shape[0]) for r in rows]
    if len(set(lengths)) != 1:
        raise ValueError(f"{what}: every tensor needs the same number of rows, got {lengths}")
    return rows


def _objective(
    loss_fn_or_model: Any,
    data: Any,
    theta0: Any,
    *,
    loss: Callable | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> _Objective:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(loss_fn_or_model, Population):
        if data is not None:
            raise ValueError("pass data=None with a Population: its rows are the data")
        data = loss_fn_or_model.data
        loss_fn_or_model = loss_fn_or_model.loss_fn
    if data is None:
        raise ValueError("data is required (a tensor of rows, or (x, y) for a model)")
    if isinstance(loss_fn_or_model, nn.Module):
        fn, default = flat_loss(
            loss_fn_or_model, cross_entropy_per_sample if loss is None else loss
        )
    elif isinstance(loss_fn_or_model, FlatLoss):
        fn, default = loss_fn_or_model, None
    elif callable(loss_fn_or_model):
        fn, default = None, None
    else:
        raise TypeError(
            "expected an nn.Module, a FlatLoss from flat_loss(), or a per-row loss "
            f"loss_fn(params, x) -> scalar; got {type(loss_fn_or_model).__name__}"
        )
    if theta0 is None:
        if default is None:
            raise ValueError("theta0 is required with a loss function (only a model has its own)")
        theta0 = default
    if device is None:
        device = torch.as_tensor(theta0).device
    device = torch.device(device)
    theta = torch.as_tensor(theta0).detach().to(device=device, dtype=dtype)
    if theta.ndim != 1:
        raise ValueError(f"theta0 must be a 1-D parameter vector, got shape {tuple(theta.shape)}")
    rows = _as_rows(data, "data")
    rows = tuple(
        r.to(device=device, dtype=dtype if r.is_floating_point() else r.dtype) for r in rows
    )
    n = int(rows[0].shape[0])
    origin = torch.arange(n, device=device)
    if fn is not None:
        if theta.numel() != fn.size:
            raise ValueError(
                f"theta0 has {theta.numel()} entries but the model has {fn.size} parameters"
            )
        fn = fn.to(dtype, device)
        batch = fn

        def single(t, *row):
            return fn(t, *(r.unsqueeze(0) for r in row))[0]

        k = min(n, 2)
        probe = fn(theta, *(r[:k] for r in rows))
        if not isinstance(probe, torch.Tensor) or tuple(probe.shape) != (k,):
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe)
            raise ValueError(
                f"the per-sample loss must return one scalar per row, shape ({k},) for {k} "
                f"rows; got {shape}"
            )
    else:
        user = loss_fn_or_model
        single = user
        batch = vmap(user, in_dims=(None, *([0] * len(rows))))
        try:
            probe = user(theta, *(r[0] for r in rows))
        except (RuntimeError, IndexError, ValueError) as err:
            raise ValueError(
                f"loss_fn(theta0, row) failed on the first row (theta0 has {theta.numel()} "
                f"entries; is that the right size?): {err}"
            ) from err
        if not isinstance(probe, torch.Tensor) or probe.ndim != 0:
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe)
            raise ValueError(
                f"loss_fn(params, x) must return a scalar tensor (shape ()) per row, got {shape}"
            )
    return _Objective(single, batch, rows, theta, origin)


# ------------------------------------------------------------------------------ derivatives


def _jvp_along(f: Callable, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return jvp(f, (t,), (u,))[1]


def _derivative(scalar: Callable, vector: bool, *, reverse_first: bool = False) -> Callable:
    """``(θ, rows, us) ↦ ∇^{k+1} s(θ)[u_1..u_k, ·]`` (vector) or ``∇^k s(θ)[u_1..u_k]``.

    Forward-over-reverse: ``jvp`` along each ``u`` of ``grad`` (vector) or of the value.
    With ``reverse_first`` a vector with ``k ≥ 1`` directions starts from the
    reverse-over-reverse HVP ``∇(∇s·u_1)`` and takes ``jvp`` along ``u_2..u_k``: the same
    number, faster for per-sample directions on a GPU (``benchmarks/bench_derivatives.py``).
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


def _summed(batch: Callable) -> Callable:
    def total(t, *rows):
        return batch(t, *rows).sum()

    return total


# ----------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class _Net:
    """A moment network: tree, blocks of tensor nodes (no open root), open root."""

    parents: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    open_root: bool

    @functools.cached_property
    def contraction(self) -> Contraction:
        parts = self.blocks + (((0,),) if self.open_root else ())
        return Contraction(
            parents=self.parents, parts=parts, form="moment", open_root=self.open_root
        )


def _tree_order(parents: Sequence[int], root: int = 0) -> tuple[list[list[int]], list[int]]:
    """Children of each node and a post-order (every child before its parent).

    With ``root ≠ 0`` the tree is hung from ``root`` instead: a contraction's tree is an
    undirected tree of symmetric tensors (node ``v`` is ``∇^{deg v} l``), so any node can
    be the one evaluated last.
    """
    neighbours: list[list[int]] = [[] for _ in parents]
    for v, p in enumerate(parents):
        if p >= 0:
            neighbours[p].append(v)
            neighbours[v].append(p)
    children: list[list[int]] = [[] for _ in parents]
    preorder, stack, seen = [], [root], {root}
    while stack:
        v = stack.pop()
        preorder.append(v)
        for c in neighbours[v]:
            if c not in seen:
                seen.add(c)
                children[v].append(c)
                stack.append(c)
    return children, preorder[::-1]


# Relative cost per row of one node evaluated with per-row directions (one per-sample
# gradient = 1): a vector node with k directions, and the evaluation root, a scalar with
# k directions (k nested jvp of the loss: no reverse pass).  Measured on a 98k-parameter
# convnet on a 2-core CPU and on an H100 (docs/benchmarks.md); only their order matters.
_VECTOR_COST = (1.0, 2.5, 6.0, 15.0)
_SCALAR_COST = (0.1, 0.35, 1.2, 3.5)


def _node_cost(table: tuple[float, ...], k: int) -> float:
    return table[k] if k < len(table) else table[-1] * 3.0 ** (k - len(table) + 1)


def _canonical_blocks(blocks: Iterable[Iterable[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(sorted(tuple(sorted(b)) for b in blocks))


def _auto_chunk(obj: _Objective) -> int:
    """Rows per ``vmap`` call when ``chunk_size`` is not given.

    On the CPU, messages of about 16 MB (``2^24 / (8 P)`` rows, 16 to 1024).  On a CUDA
    device, the rows whose third-order node (``J_i[u, v, ·]``, the costliest node of an
    order-3 network) fits in a quarter of the free memory: the memory per row is read off
    two small probe calls (4 and 16 rows; the difference removes fixed workspace), and the
    chunk is clamped to 16..8192 rows.  This resets CUDA's peak-memory statistics.
    """
    p = obj.size
    row_numel = sum(r[0].numel() for r in obj.rows)
    cpu_chunk = int(min(1024, max(16, 2**24 // (8 * p + 8 * row_numel))))
    device = obj.theta0.device
    if device.type != "cuda" or obj.n < 16:
        return cpu_chunk
    fn = vmap(_derivative(obj.single, True), in_dims=(None, 0, 0))
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
    return int(min(8192, max(16, _free_bytes(device) // 4 // per_row)))


def _free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: CUDA's free memory, or the host's available
    physical memory (Linux); ``None`` where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


class _Engine:
    """Evaluates moment networks as per-group V-sums over a row layout ``perm (K, n_g)``."""

    def __init__(
        self,
        obj: _Objective,
        perm: torch.Tensor,
        *,
        chunk_size: int | None,
        budget: int | None,
        vector_batches: tuple[int, int, int] | None = None,
    ) -> None:
        self.obj = obj
        self.perm = perm
        self.vector_batches = vector_batches
        self.groups, self.group_size = (int(s) for s in perm.shape)
        if chunk_size is None:
            chunk_size = _auto_chunk(obj)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk = chunk_size
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise ValueError(f"max_message_elements must be a positive integer, got {budget!r}")
        if budget is not None and budget < 1:
            raise ValueError(f"max_message_elements must be a positive integer, got {budget!r}")
        self.budget = _DEFAULT_BUDGET if budget is None else budget
        self.cache: dict[str, list[tuple[Contraction, torch.Tensor]]] = {}
        self.tuple_cache: dict[str, list[tuple[Contraction, torch.Tensor]]] = {}
        self.evaluations = 0
        self.messages: dict[tuple, torch.Tensor] = {}
        self.message_elements = 0
        self.message_budget = _MESSAGE_CACHE
        free = _free_bytes(obj.theta0.device)
        if free is not None and _MESSAGE_CACHE > 0:  # a quarter of the free memory
            self.message_budget = max(_MESSAGE_CACHE, free // 4 // obj.theta0.element_size())
        single, batch = obj.single, obj.batch
        reverse = obj.theta0.device.type == "cuda"
        self._fns = {
            ("elem", True): vmap(
                _derivative(single, True, reverse_first=reverse), in_dims=(None, 0, 0)
            ),
            ("elem", False): vmap(_derivative(single, False), in_dims=(None, 0, 0)),
            ("sum", True): vmap(_derivative(_summed(batch), True), in_dims=(None, 0, 0)),
            ("sum", False): vmap(_derivative(_summed(batch), False), in_dims=(None, 0, 0)),
            ("rows", True): vmap(
                vmap(_derivative(single, True), in_dims=(None, 0, None)), in_dims=(None, 0, 0)
            ),
            ("rows", False): vmap(
                vmap(_derivative(single, False), in_dims=(None, 0, None)), in_dims=(None, 0, 0)
            ),
        }

    # ------------------------------------------------------------------ cache
    def sums(self, net: _Net, label: str) -> torch.Tensor:
        """Per-group V-sums ``Σ_{tuples in group g}`` of ``net``: ``(K,)`` or ``(K, P)``."""
        c = net.contraction
        bucket = self.cache.setdefault(c.hash, [])
        for other, value in bucket:
            if other.is_isomorphic(c):
                return value
        value = self._network_sums(net, label)
        bucket.append((c, value))
        return value

    # ------------------------------------------------------------------ structure
    def _network_sums(self, net: _Net, label: str) -> torch.Tensor:
        parents, open_root = net.parents, net.open_root
        count = len(parents)
        children, postorder = _tree_order(parents)
        sub: dict[int, frozenset[int]] = {}
        for v in postorder:
            sub[v] = frozenset({v}).union(*(sub[c] for c in children[v]))
        block_of = {v: i for i, b in enumerate(net.blocks) for v in b}
        blocks = [frozenset(b) for b in net.blocks]
        opened: dict[int, tuple[int, ...]] = {}
        for v in range(count):
            if v == 0:
                continue
            crossing = [i for i, b in enumerate(blocks) if b & sub[v] and not b <= sub[v]]
            opened[v] = (_GROUP, *crossing)
        p = self.obj.size
        full = {_GROUP: self.groups, **{i: self.group_size for i in range(len(blocks))}}
        sizes = _plan(opened, full, p, self.budget)
        chunked = [d for d in sorted(full) if sizes[d] < full[d]]
        starts = [range(0, full[d], sizes[d]) for d in chunked]
        vector_out = open_root
        acc = torch.zeros(
            (self.groups, p) if vector_out else (self.groups,),
            dtype=torch.float64,
            device=self.obj.theta0.device,
        )
        device = self.obj.theta0.device
        for combo in itertools.product(*starts):
            ranges = {d: torch.arange(full[d], device=device) for d in full}
            for d, s in zip(chunked, combo, strict=True):
                ranges[d] = torch.arange(s, min(s + sizes[d], full[d]), device=device)
            msgs: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
            result = None
            for v in postorder:
                if v == 0 and open_root:
                    (child,) = children[0]
                    dims, tensor = msgs[child]
                    assert dims == (_GROUP,)
                    result = tensor
                    continue
                out_dims = opened[v] if v != 0 else (_GROUP,)
                msgs[v] = (
                    out_dims,
                    self._node(v, children[v], block_of[v], out_dims, msgs, ranges, label),
                )
                if v == 0:
                    result = msgs[v][1]
            g = ranges[_GROUP]
            acc[g] += result
        return acc

    # ------------------------------------------------------------------ one node
    def _node(self, v, kids, own, out_dims, msgs, ranges, label) -> torch.Tensor:
        obj = self.obj
        p = obj.size
        vector = v != 0
        in_dims = {_GROUP, own}.union(*(msgs[c][0] for c in kids))
        diag = any(own in msgs[c][0] for c in kids)
        if diag:
            mode = "elem"
        elif own in out_dims:
            mode = "rows"
        else:
            mode = "sum"
        enum = sorted(in_dims) if mode == "elem" else sorted(in_dims - {own})
        size = {d: len(ranges[d]) for d in in_dims}
        strides = _strides(enum, size)
        total = math.prod(size[d] for d in enum)
        out_strides = _strides(list(out_dims), size)
        out_len = math.prod(size[d] for d in out_dims)
        device = obj.theta0.device
        out = torch.zeros(
            (out_len, p) if vector else (out_len,), dtype=torch.float64, device=device
        )
        rows_per = 1 if mode == "elem" else size[own]
        per_call = max(1, self.chunk // rows_per)
        row_chunk = max(1, min(rows_per, self.chunk))
        fn = self._fns[(mode, vector)]
        groups_range = ranges[_GROUP]
        for q0 in range(0, total, per_call):
            q = torch.arange(q0, min(total, q0 + per_call), device=device)
            idx = {d: (q // strides[d]) % size[d] for d in enum}
            us = tuple(msgs[c][1][_flat(idx, msgs[c][0], size)].to(obj.theta0.dtype) for c in kids)
            group_rows = self.perm[groups_range[idx[_GROUP]]]  # (q, n_g)
            base = sum(
                (idx[d] * out_strides[d] for d in out_dims if d != own or mode == "elem"),
                torch.zeros_like(q),
            )
            if mode == "elem":
                row_ids = group_rows.gather(1, ranges[own][idx[own]][:, None])[:, 0]
                data = tuple(r[row_ids] for r in obj.rows)
                res = fn(obj.theta0, data, us)
                self.evaluations += len(q)
                self._check(res, lambda j, r=row_ids: int(r[j]), v, len(kids) + vector, label)
                out.index_add_(0, base, res.to(torch.float64))
                continue
            for r0 in range(0, rows_per, row_chunk):
                pos = ranges[own][r0 : r0 + row_chunk]
                row_ids = group_rows[:, pos]  # (q, r)
                data = tuple(r[row_ids] for r in obj.rows)
                res = fn(obj.theta0, data, us)
                self.evaluations += row_ids.numel()
                if mode == "sum":
                    if not torch.isfinite(res).all():
                        self._locate(res, row_ids, us, v, len(kids) + vector, vector, label)
                    out.index_add_(0, base, res.to(torch.float64))
                else:
                    flat_rows = row_ids.reshape(-1)
                    self._check(
                        res.reshape(-1, p),
                        lambda j, r=flat_rows: int(r[j]),
                        v,
                        len(kids) + vector,
                        label,
                    )
                    local = torch.arange(r0, r0 + len(pos), device=device)
                    oidx = base[:, None] + local[None, :] * out_strides[own]
                    out.index_add_(0, oidx.reshape(-1), res.reshape(-1, p).to(torch.float64))
        return out

    # ------------------------------------------------------------------ tuples
    def tuple_values(self, net: _Net, tuples: torch.Tensor, label: str) -> torch.Tensor:
        """One sample per block: block ``i`` takes row ``tuples[r, i]``; ``(R,)`` or ``(R, P)``.

        With ``vector_batches = (K, s, offset)`` an open-root network returns ``(K, P)``
        instead: row ``b`` is ``1/s`` times the sum of the per-tuple vectors of the tuples
        whose global index ``offset + r`` lies in ``[b·s, (b+1)·s)`` (tuples past ``K·s``
        are left out), accumulated without ever holding ``R × P`` numbers.

        Every node is one single-row nested directional derivative per tuple (``vmap`` over
        the tuples, in chunks of ``chunk_size`` tuples for the whole network, so memory
        stays at a few ``chunk × P`` messages).  Isomorphic networks are evaluated once; a
        cached one may assign the blocks to other columns of the tuple, which leaves each
        term an unbiased estimate of its moment network and the tuples independent.
        """
        c = net.contraction
        bucket = self.tuple_cache.setdefault(c.hash, [])
        for other, value in bucket:
            if other.is_isomorphic(c):
                return value
        value = self._network_tuples(net, tuples, label)
        bucket.append((c, value))
        return value

    def _network_tuples(self, net: _Net, tuples: torch.Tensor, label: str) -> torch.Tensor:
        open_root = net.open_root
        block_of = {v: i for i, b in enumerate(net.blocks) for v in b}
        root, children, postorder, keys = self._hang(net, block_of, tuples)
        obj, p = self.obj, self.obj.size
        device = obj.theta0.device
        count = int(tuples.shape[0])
        stored = {v: self.messages.get(k) for v, k in keys.items()}
        keep = {}
        for v, k in keys.items():
            if stored[v] is None and k not in keep.values() and self._room(count, v == root):
                shape = (count,) if v == root else (count, p)
                stored[v] = torch.empty(shape, dtype=obj.theta0.dtype, device=device)
                keep[v] = k
        batched = open_root and self.vector_batches is not None
        if batched:
            batches, size, offset = self.vector_batches
            out = torch.zeros((batches, p), dtype=torch.float64, device=device)
        else:
            shape = (count, p) if open_root else (count,)
            out = torch.zeros(shape, dtype=torch.float64, device=device)
        for t0 in range(0, count, self.chunk):
            chunk = tuples[t0 : t0 + self.chunk]
            span = slice(t0, t0 + len(chunk))
            msgs: dict[tuple, torch.Tensor] = {}
            for v in postorder:
                if v == root and open_root:
                    (child,) = children[root]
                    value = msgs[keys[child]].to(torch.float64)
                    if batched:
                        batch = (offset + torch.arange(t0, t0 + len(chunk), device=device)) // size
                        inside = batch < batches
                        out.index_add_(0, batch[inside], value[inside] / size)
                    else:
                        out[span] = value
                    break
                key = keys[v]
                if key not in msgs:
                    if stored[v] is not None and v not in keep:
                        msgs[key] = stored[v][span]
                    else:
                        row_ids = chunk[:, block_of[v]]
                        data = tuple(r[row_ids] for r in obj.rows)
                        us = tuple(msgs[keys[c]] for c in children[v])
                        res = self._fns[("elem", v != root)](obj.theta0, data, us)
                        self.evaluations += len(row_ids)
                        order = len(us) + (v != root)
                        self._check(res, lambda j, r=row_ids: int(r[j]), v, order, label)
                        msgs[key] = res
                        if v in keep:
                            stored[v][span] = res
                if v == root:
                    out[span] = msgs[key].to(torch.float64)
        for v, k in keep.items():
            self.messages[k] = stored[v]
        return out

    def _hang(self, net: _Net, block_of: Mapping[int, int], tuples: torch.Tensor):
        """The cheapest node to evaluate last, with its tree order and message keys.

        Every node is tried as the root (an open root stays at node 0) and costed by
        :meth:`_hung_at`; ties keep the lowest node.
        """
        roots = [0] if net.open_root else range(len(net.parents))
        best = min((self._hung_at(net, block_of, tuples, r) for r in roots), key=lambda h: h[0])
        return best[1:]

    def _hung_at(self, net: _Net, block_of: Mapping[int, int], tuples: torch.Tensor, root: int):
        """``(cost, root, children, postorder, keys)`` with ``root`` evaluated last.

        A node's message depends only on its tuple column and the messages it receives (a
        derivative is symmetric in its directions): equal keys, equal messages, within this
        network and across networks on the same tuples.  The cost counts each message not
        yet stored once, by :data:`_VECTOR_COST` and :data:`_SCALAR_COST`.
        """
        tag = (tuples.data_ptr(), tuple(tuples.shape))
        children, postorder = _tree_order(net.parents, root)
        keys: dict[int, tuple] = {}
        cost, fresh = 0.0, set()
        for v in postorder:
            if v == root and net.open_root:
                break
            kids = tuple(sorted(keys[c] for c in children[v]))
            keys[v] = (block_of[v], kids, v == root, *tag)
            if keys[v] not in self.messages and keys[v] not in fresh:
                fresh.add(keys[v])
                table = _SCALAR_COST if v == root else _VECTOR_COST
                cost += _node_cost(table, len(kids))
        return cost, root, children, postorder, keys

    def _room(self, count: int, scalar: bool) -> bool:
        """Whether one more stored message of ``count`` rows fits the cache budget."""
        size = count if scalar else count * self.obj.size
        if self.message_elements + size > self.message_budget:
            return False
        self.message_elements += size
        return True

    # ------------------------------------------------------------------ errors
    def _describe(self, v: int, order: int, label: str, row: int) -> str:
        return (
            f"non-finite derivative ∇^{order} l (node {v} of a moment network of the statistic "
            f"{label!r}) at data row {int(self.obj.origin[row])}"
        )

    def _check(self, res, row_of, v, order, label) -> None:
        flat = res.reshape(res.shape[0], -1)
        bad = ~torch.isfinite(flat).all(dim=1)
        if bad.any():
            j = int(torch.nonzero(bad)[0])
            raise ValueError(self._describe(v, order, label, row_of(j)))

    def _locate(self, res, row_ids, us, v, order, vector, label) -> None:
        flat = res.reshape(res.shape[0], -1)
        j = int(torch.nonzero(~torch.isfinite(flat).all(dim=1))[0])
        rows = row_ids[j : j + 1]
        data = tuple(r[rows] for r in self.obj.rows)
        per_row = self._fns[("rows", vector)](
            self.obj.theta0, data, tuple(u[j : j + 1] for u in us)
        )
        per_row = per_row.reshape(rows.shape[1], -1)
        bad = ~torch.isfinite(per_row).all(dim=1)
        i = int(torch.nonzero(bad)[0]) if bad.any() else 0
        raise ValueError(self._describe(v, order, label, int(rows[0, i])))


def _strides(dims: Sequence[int], size: Mapping[int, int]) -> dict[int, int]:
    out, s = {}, 1
    for d in reversed(list(dims)):
        out[d] = s
        s *= size[d]
    return out


def _flat(idx: Mapping[int, torch.Tensor], dims: Sequence[int], size: Mapping[int, int]):
    strides = _strides(dims, size)
    flat = None
    for d in dims:
        term = idx[d] * strides[d]
        flat = term if flat is None else flat + term
    return flat


def _plan(
    opened: Mapping[int, tuple[int, ...]], full: Mapping[int, int], p: int, budget: int
) -> dict[int, int]:
    """Chunk lengths per sample axis so that every message has at most ``budget`` elements."""
    sizes = dict(full)
    limit = max(1, budget // max(p, 1))

    def elems(dims):
        return math.prod(sizes[d] for d in dims)

    while True:
        over = [dims for dims in opened.values() if elems(dims) > limit]
        if not over:
            return sizes
        counts: dict[int, int] = {}
        for dims in over:
            for d in dims:
                if sizes[d] > 1:
                    counts[d] = counts.get(d, 0) + 1
        if not counts:
            return sizes
        axis = max(counts, key=lambda d: (counts[d], d != _GROUP, sizes[d]))
        worst = max((dims for dims in over if axis in dims), key=elems)
        others = elems(worst) // sizes[axis]
        sizes[axis] = max(1, min(sizes[axis] - 1, limit // max(others, 1)))


# ---------------------------------------------------------------------- linear combinations


def _networks(
    contraction: Contraction, *, unbiased: bool, group_size: int
) -> list[tuple[_Net, float]]:
    """Moment networks and weights whose per-group V-sums combine into the value.

    Exact (V-statistic): ``Σ_ρ w_ρ S_ρ / n^{m_ρ}``.  Unbiased (U-statistic):
    ``Σ_ρ w_ρ Σ_π μ(π) S_{ρ∨π} / (n)_{m_ρ}``.
    """
    out: dict[tuple, float] = {}
    order: list[tuple] = []
    for refined, weight in contraction._refinements():
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
            merged = _canonical_blocks(tuple(v for i in part for v in blocks[i]) for part in pi)
            key = (merged,)
            if key not in out:
                out[key] = 0.0
                order.append(key)
            out[key] += weight * mu / scale
    return [
        (_Net(contraction.parents, key[0], contraction.open_root), out[key])
        for key in order
        if out[key] != 0.0
    ]


def _mobius(partition: Sequence[Sequence[int]]) -> int:
    return math.prod((-1) ** (len(b) - 1) * math.factorial(len(b) - 1) for b in partition)


def _group_values(
    engine: _Engine, contraction: Contraction, *, unbiased: bool, label: str | None = None
) -> torch.Tensor:
    """The contraction's value in each group: ``(K,)`` or ``(K, P)``, float64."""
    label = contraction.text if label is None else label
    total = None
    for net, weight in _networks(contraction, unbiased=unbiased, group_size=engine.group_size):
        term = engine.sums(net, label) * weight
        total = term if total is None else total + term
    return total


def _tuple_size(contraction: Contraction) -> int:
    """``m``: the most independent blocks of any refinement (an open root is no block)."""
    return max(
        sum(1 for b in refined if not (contraction.open_root and tuple(b) == (0,)))
        for refined, _ in contraction._refinements()
    )


def _tuple_networks(contraction: Contraction) -> list[tuple[_Net, float]]:
    """Moment networks and Möbius weights, one sample per block: ``Σ_ρ w_ρ M_ρ``."""
    out: dict[tuple[tuple[int, ...], ...], float] = {}
    for refined, weight in contraction._refinements():
        blocks = [tuple(b) for b in refined if not (contraction.open_root and tuple(b) == (0,))]
        key = _canonical_blocks(blocks)
        out[key] = out.get(key, 0.0) + weight
    return [
        (_Net(contraction.parents, key, contraction.open_root), w)
        for key, w in out.items()
        if w != 0.0
    ]


def _tuple_values(
    engine: _Engine, contraction: Contraction, tuples: torch.Tensor, label: str | None = None
) -> torch.Tensor:
    """Per-tuple unbiased estimates ``Z_r`` of a cumulant network: ``(R,)`` or ``(R, P)``.

    ``tuples`` is ``(R, m')`` row indices, distinct within a row, ``m' ≥``
    :func:`_tuple_size`; block ``i`` of every refinement takes column ``i``.  As the rows of
    a tuple are distinct iid draws, every moment network with one row per block is an
    unbiased estimate of its population value, and so is their Möbius sum.
    """
    label = contraction.text if label is None else label
    m = _tuple_size(contraction)
    if tuples.shape[1] < m:
        raise ValueError(f"{contraction.text!r} needs tuples of {m} rows, got {tuples.shape[1]}")
    total = None
    for net, weight in _tuple_networks(contraction):
        term = engine.tuple_values(net, tuples, label) * weight
        total = term if total is None else total + term
    return total


def _single_layout(n: int, device) -> torch.Tensor:
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
    obj = _objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    engine = _Engine(
        obj,
        _single_layout(obj.n, obj.theta0.device),
        chunk_size=chunk_size,
        budget=max_message_elements,
    )
    blocks = tuple(b for b in network.parts if not (network.open_root and tuple(b) == (0,)))
    net = _Net(network.parents, _canonical_blocks(blocks), network.open_root)
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
    obj = _objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    engine = _Engine(
        obj,
        _single_layout(obj.n, obj.theta0.device),
        chunk_size=chunk_size,
        budget=max_message_elements,
    )
    return _group_values(engine, contraction, unbiased=unbiased)[0]


# ------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class MeasuredPrediction:
    """Predictions of one quantity for one schedule over a grid of learning rates.

    Attributes:
        schedule: the numeric schedule.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        lr: the learning rates, shape ``(L,)``.
        coefficients: the numeric coefficient of ``η^d``, shape ``(order+1,)`` (``(order+1,
            P)`` for the displacement).
        coefficient_se: standard errors of :attr:`coefficients`.
        by_order: the ``η^d`` contributions, ``(L, order+1[, P])``.
        total: the truncated series at each ``lr``, ``(L[, P])``.
        se: standard error of :attr:`total` (the spread of the per-group predictions over
            ``√K``; zero for exact statistics).
    """

    schedule: Schedule
    quantity: str
    lr: np.ndarray
    coefficients: np.ndarray
    coefficient_se: np.ndarray
    by_order: np.ndarray
    total: np.ndarray
    se: np.ndarray


@dataclass
class Statistics:
    """Values of contractions at ``θ_0``: exact, or unbiased estimates with error bars.

    Attributes:
        order: the highest power of η the statistics serve.
        exact: whether the values are exact averages over the rows (``se`` is zero).
        rows: rows used (``K · n_g`` for groups, ``R · m`` for tuples).
        groups: ``K``, the number of disjoint groups, or ``R``, the number of tuples (1
            when exact).
        parameters: ``P``.
        contractions: key -> :class:`Contraction`.
        group_values: key -> per-group (per-tuple) values ``(K,)`` or ``(K, P)`` (float64);
            with tuples an open-root statistic holds ``meta["vector_batches"]`` batch means
            of ``meta["vector_batch_size"]`` tuples each (``R`` per-tuple vectors when
            measured with ``vector_batches=None``).
        meta: free-form JSON-able metadata (dtype, seed, schedules, quantities, …).

    Example:
        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
        >>> pred = st.predict(Online(steps=3, batch_size=1), lr=[0.0, 0.1])
        >>> [round(float(v), 6) for v in pred.total]
        [0.5, 0.35]
    """

    order: int
    exact: bool
    rows: int
    groups: int
    parameters: int
    contractions: dict[str, Contraction]
    group_values: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.contractions)

    def __contains__(self, item: Contraction | str) -> bool:
        return self._find(item) is not None

    def _find(self, item: Contraction | str) -> str | None:
        if isinstance(item, str):
            return item if item in self.contractions else None
        key = item.key
        if key in self.contractions:
            return key
        for k, c in self.contractions.items():  # keys from another version of the printer
            if c.open_root == item.open_root and c.form == item.form and c.is_isomorphic(item):
                return k
        return None

    def _key(self, item: Contraction | str) -> str:
        key = self._find(item)
        if key is None:
            name = item if isinstance(item, str) else item.text
            raise KeyError(f"no statistic for {name!r}; measured: {sorted(self.contractions)}")
        return key

    def value(self, item: Contraction | str) -> np.ndarray:
        """The value (the mean of the group estimates): a 0-d array or a ``(P,)`` vector."""
        return self.group_values[self._key(item)].mean(axis=0)

    def se(self, item: Contraction | str) -> np.ndarray:
        """Standard error of :meth:`value` (zero when exact, NaN with one group)."""
        return _se(self.group_values[self._key(item)], self.exact)

    def __getitem__(self, item: Contraction | str) -> np.ndarray:
        return self.value(item)

    def to_text(self) -> str:
        """One line per statistic: name, value ± standard error (vectors by their norm)."""
        lines = []
        for key, c in self.contractions.items():
            v, s = self.value(key), self.se(key)
            if v.ndim:
                lines.append(f"{c.text}: |v| = {np.linalg.norm(v):.6g} (vector of {v.size})")
            else:
                lines.append(f"{c.text}: {float(v):.6g} ± {float(s):.2g}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ predictions
    def predict(
        self,
        schedule: Schedule,
        *,
        lr: float | Sequence[float] | np.ndarray,
        quantity: str = "test",
        order: int | None = None,
    ) -> MeasuredPrediction:
        r"""Predict ``quantity`` after ``schedule`` for every learning rate in ``lr``.

        ``E[q] ≈ Σ_{d≤order} η^d Σ_t c_t(T, B, N, E) · v_t`` with the schedule's numbers in
        the series coefficients ``c_t`` and the stored values ``v_t``; the standard error is
        the spread of the same prediction made from each group's values, over ``√K``.

        Args:
            schedule: a numeric schedule.
            lr: one learning rate or a grid.
            quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
            order: highest power of η (default: :attr:`order`).

        Returns:
            A :class:`MeasuredPrediction`.
        """
        order = self.order if order is None else order
        if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= self.order:
            raise ValueError(f"order must be an integer in 0..{self.order}, got {order!r}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        if not schedule.is_numeric:
            raise ValueError(
                "predict needs numeric schedule sizes, e.g. Online(steps=100, batch_size=1); "
                f"got {schedule}"
            )
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
        lrs = np.atleast_1d(np.asarray(lr, dtype=float))
        if lrs.ndim != 1 or not np.all(np.isfinite(lrs)):
            raise ValueError(f"lr must be a finite number or a 1-D grid of them, got {lr!r}")
        s = series(order, schedule, quantity)
        missing = [t.contraction.text for t in s.terms if self._find(t.contraction) is None]
        if missing:
            raise KeyError(
                f"statistics lack {sorted(set(missing))} for {quantity!r} on {schedule}; "
                "measure them with the schedule and quantity included"
            )
        vector = quantity == "displacement"
        count = self.groups  # vectors may be batch means: their own number of rows
        if s.terms:
            count = self.group_values[self._key(s.terms[0].contraction)].shape[0]
        shape = (count, self.parameters) if vector else (count,)
        per_group = np.zeros((order + 1, *shape))
        for t in s.terms:
            coefficient = sp.sympify(t.coefficient)
            if not coefficient.is_number:
                raise ValueError(f"coefficient {coefficient} of {t.contraction.text} has symbols")
            per_group[t.power] += float(coefficient) * self.group_values[self._key(t.contraction)]
        powers = lrs[:, None] ** np.arange(order + 1)[None, :]  # (L, d+1)
        coefficients = per_group.mean(axis=1)
        by_order = np.einsum("ld,d...->ld...", powers, coefficients)
        group_totals = np.einsum("ld,dg...->lg...", powers, per_group)
        return MeasuredPrediction(
            schedule=schedule,
            quantity=quantity,
            lr=lrs,
            coefficients=coefficients,
            coefficient_se=_se(np.moveaxis(per_group, 1, 0), self.exact),
            by_order=by_order,
            total=by_order.sum(axis=1),
            se=_se(np.moveaxis(group_totals, 1, 0), self.exact),
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to one ``.npz`` file: JSON metadata and float64 arrays (no pickle).

        Example:
            >>> import tempfile, pathlib, torch
            >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
            >>> st = measure(f, torch.eye(2), torch.zeros(2), order=1, exact=True, progress=False)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     st.save(pathlib.Path(tmp) / "stats.npz")
            ...     back = Statistics.load(pathlib.Path(tmp) / "stats.npz")
            >>> sorted(back.contractions) == sorted(st.contractions)
            True
        """
        entries, arrays = [], {}
        for i, (key, c) in enumerate(self.contractions.items()):
            entries.append(
                {
                    "key": key,
                    "text": c.text,
                    "parents": list(c.parents),
                    "parts": [list(p) for p in c.parts],
                    "form": c.form,
                    "open_root": c.open_root,
                }
            )
            arrays[f"values_{i}"] = np.asarray(self.group_values[key], dtype=np.float64)
        header = {
            "format": "perturb.Statistics",
            "version": 1,
            "order": self.order,
            "exact": self.exact,
            "rows": self.rows,
            "groups": self.groups,
            "parameters": self.parameters,
            "meta": self.meta,
            "entries": entries,
        }
        with open(os.fspath(path), "wb") as fh:
            np.savez(fh, header=np.array(json.dumps(header, ensure_ascii=False)), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Statistics:
        """Read a file written by :meth:`save` (``allow_pickle=False``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"statistics file {path!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: np.array(z[k]) for k in z.files if k != "header"}
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"{path!r} is not a perturb statistics file: {err}") from err
        if header.get("format") != "perturb.Statistics":
            raise ValueError(f"{path!r} is not a perturb statistics file")
        contractions, values = {}, {}
        for i, e in enumerate(header["entries"]):
            c = Contraction(
                parents=tuple(e["parents"]),
                parts=tuple(tuple(p) for p in e["parts"]),
                form=e["form"],
                open_root=bool(e["open_root"]),
            )
            contractions[e["key"]] = c
            values[e["key"]] = arrays[f"values_{i}"]
        return cls(
            order=int(header["order"]),
            exact=bool(header["exact"]),
            rows=int(header["rows"]),
            groups=int(header["groups"]),
            parameters=int(header["parameters"]),
            contractions=contractions,
            group_values=values,
            meta=dict(header.get("meta", {})),
        )

    def communication_bytes(self, world: int) -> int:
        """Bytes each rank receives when ``world`` ranks split this measurement (see
        :func:`perturb.numeric.distributed.communication_bytes`)."""
        if self.exact or self.meta.get("estimator") != "tuples":
            return 0
        batched = "vector_batches" in self.meta
        width = whole = 0
        for key, v in self.group_values.items():
            if batched and self.contractions[key].open_root:
                whole += int(v.size)
            else:
                width += int(np.prod(v.shape[1:]))
        return 8 * world * (6 + -(-self.groups // world) * width + whole)


class _HostCopy:
    """Device tensors to NumPy; large CUDA ones through one reused page-locked buffer.

    Per-tuple vectors (``vector_batches=None``) are ``R × P`` float64 (0.8 GB at
    ``R = 1024``, ``P ≈ 10⁵``); a pageable device-to-host copy of that took 0.6 s on an
    H100 host, the staged copy plus a host copy about a third of that (docs/benchmarks.md).
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self, tensor: torch.Tensor) -> np.ndarray:
        tensor = tensor.detach()
        if tensor.device.type != "cuda" or tensor.numel() < 2**20:
            return tensor.cpu().numpy()
        if self.buffer is None or self.buffer.numel() < tensor.numel():
            self.buffer = torch.empty(tensor.numel(), dtype=torch.float64, pin_memory=True)
        staged = self.buffer[: tensor.numel()].view(tensor.shape)
        staged.copy_(tensor.to(torch.float64))
        return staged.numpy().copy()


def _se(group_values: np.ndarray, exact: bool) -> np.ndarray:
    k = group_values.shape[0]
    if exact:
        return np.zeros(group_values.shape[1:])
    if k < 2:
        return np.full(group_values.shape[1:], np.nan)
    return group_values.std(axis=0, ddof=1) / math.sqrt(k)


def _collect(
    order: int, schedules: Sequence[Schedule], quantities: Sequence[str]
) -> dict[str, Contraction]:
    out: dict[str, Contraction] = {}
    for schedule in schedules:
        for quantity in quantities:
            for term in series(order, schedule, quantity).terms:
                out.setdefault(term.contraction.key, term.contraction)
    return out


def measure(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    order: int,
    schedules: Sequence[Schedule] | Schedule | None = None,
    quantities: Sequence[str] | str = ("test",),
    samples: int | None = None,
    exact: bool = False,
    seed: int = 0,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    groups: int = 16,
    progress: bool = True,
    loss: Callable | None = None,
    max_message_elements: int | None = None,
    estimator: str = "tuples",
    tuple_range: Callable[[int], range] | None = None,
    distributed: bool = True,
    vector_batches: int | None = 64,
) -> Statistics:
    r"""Measure every contraction of the requested series once at ``θ_0``.

    With ``exact=True`` the rows are the population and each value is the exact average
    (V-statistic), as :func:`perturb.predict` computes from materialized tensors.  Otherwise
    the rows are an iid sample from the population (``samples`` of them drawn without
    replacement when given), and ``estimator`` picks the unbiased estimate:

    * ``"tuples"`` (default, cost linear in ``n``): the rows are shuffled (``seed``) and cut
      into ``R = ⌊n/m⌋`` disjoint tuples of ``m`` rows, ``m`` the most independent blocks of
      any refinement of any requested contraction (the same tuples serve every contraction,
      each using the first columns it needs, so per-tuple predictions are well defined).
      Each tuple gives one unbiased estimate ``Z_r`` per contraction (every block of every
      refinement takes its own row of the tuple, one single-row derivative per node); the
      value is ``mean_r Z_r`` with standard error ``sd(Z_r)/√R`` (the ``Z_r`` are iid).
      :attr:`Statistics.groups` is ``R`` and :attr:`Statistics.group_values` holds the
      ``Z_r``; ``groups`` is ignored.  An open-root (displacement) statistic is a
      ``P``-vector per tuple; it is kept as ``K = ⌊R/s⌋`` batch means of
      ``s = ⌈R/vector_batches⌉`` consecutive tuples (``s = ⌊R/2⌋`` if that leaves one
      batch; the first ``K·s`` tuples, fewer than ``s`` left out; the batch means are
      iid, so ``sd/√K`` is still the standard error), accumulated on the device:
      ``K × P`` numbers instead of ``R × P`` (0.8 GB per statistic at ``R = 1024``,
      ``P ≈ 10⁵``).
    * ``"groups"`` (cost up to quadratic in ``n``): the rows are split at random into
      ``groups`` disjoint groups of ``⌊n/K⌋`` rows (the ``n mod K`` left over are unused),
      each contraction's complete U-statistic is computed within every group, and the value
      is the mean of the group estimates with standard error ``sd/√K`` (batch means; see
      the module notes).  More efficient per row, far slower per second.

    Args:
        loss_fn_or_model: an ``nn.Module`` (``data = (x, y)``), a :class:`FlatLoss`, a
            :class:`perturb.Population` (``data=None``) or a per-row
            ``loss_fn(params, *row) -> scalar``.
        data: the rows (a tensor, or a tuple of tensors with a common first axis).
        theta0: the point; default a model's parameters.
        order: highest power of η.
        schedules: schedules whose series are needed; default ``(Online(), Epochs())`` with
            symbolic sizes, which covers every contraction of every schedule.
        quantities: any of ``"test"``, ``"train"``, ``"gap"``, ``"displacement"``.
        samples: use a random subset of this many rows (estimates only).
        exact: exact averages over the rows.
        seed: seed of the subset and of the split into groups.
        chunk_size: most single-row directional derivatives per ``vmap`` call.
        device: where to compute (default: ``theta0``'s or the model's device).
        dtype: ``torch.float32`` or ``torch.float64`` (sums are accumulated in float64).
        groups: ``K``, the number of groups for the error bars (``estimator="groups"``).
        progress: show a tqdm bar over the contractions.
        loss: a model's per-sample loss (default cross-entropy).
        max_message_elements: memory bound of one message (see :func:`moment_network`).
        estimator: ``"tuples"`` or ``"groups"`` (estimates only; see above).
        tuple_range: for sharding across processes (:mod:`perturb.numeric.distributed`): given
            the number ``R`` of tuples, the range of tuples this call evaluates; the
            result then holds those tuples only (``meta["tuples_total"]`` is ``R``).
        distributed: under ``torchrun`` (a default :mod:`torch.distributed` process
            group of ``W > 1`` processes is initialized), split the ``R`` tuples across
            the ranks and all-gather the per-tuple values
            (:func:`measure_distributed`): every rank must pass the
            same arguments and gets the single-process result.  ``exact=True`` and
            ``estimator="groups"`` are computed whole on every rank.  ``False``: compute
            everything here.
        vector_batches: most batch means kept per open-root statistic (tuple estimator;
            at least 2); ``None`` keeps every tuple's vector.

    Returns:
        :class:`Statistics`.

    Example:
        >>> import torch
        >>> from perturb.symbolic.schedules import Online
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> st = measure(f, torch.eye(2), torch.zeros(2), order=2, exact=True, progress=False)
        >>> round(float(st.predict(Online(steps=2, batch_size=1), lr=0.1).total[0]), 6)
        0.42
    """
    if distributed and tuple_range is None:
        if world()[1] > 1:
            return measure_distributed(
                loss_fn_or_model, data, theta0, order=order, schedules=schedules,
                quantities=quantities, samples=samples, exact=exact, seed=seed,
                chunk_size=chunk_size, device=device, dtype=dtype, groups=groups,
                progress=progress, loss=loss, max_message_elements=max_message_elements,
                estimator=estimator, vector_batches=vector_batches,
            )  # fmt: skip
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ValueError(f"order must be a non-negative integer, got {order!r}")
    if schedules is None:
        schedules = (Online(), Epochs())
    elif isinstance(schedules, Schedule):
        schedules = (schedules,)
    schedules = tuple(schedules)
    for s in schedules:
        if not isinstance(s, Schedule):
            raise TypeError(f"schedules must hold Schedule objects, got {type(s).__name__}")
    if isinstance(quantities, str):
        quantities = (quantities,)
    quantities = tuple(quantities)
    for q in quantities:
        if q not in QUANTITIES:
            raise ValueError(f"quantities must be among {QUANTITIES}, got {q!r}")
    if exact and samples is not None:
        raise ValueError("exact=True averages over all rows; samples applies to estimates only")
    if estimator not in ("tuples", "groups"):
        raise ValueError(f"estimator must be 'tuples' or 'groups', got {estimator!r}")
    if vector_batches is not None and (
        isinstance(vector_batches, bool)
        or not isinstance(vector_batches, int)
        or vector_batches < 2
    ):
        raise ValueError(f"vector_batches must be an integer ≥ 2 or None, got {vector_batches!r}")
    obj = _objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    device_ = obj.theta0.device
    gen = torch.Generator().manual_seed(int(seed))
    contractions = _collect(order, schedules, quantities)
    tuples = None
    if exact:
        k, layout = 1, _single_layout(obj.n, device_)
    else:
        if estimator == "groups" and (
            isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
        ):
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        n = obj.n
        if samples is not None:
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
                raise ValueError(f"samples must be a positive integer, got {samples!r}")
            if samples > n:
                raise ValueError(f"samples={samples} exceeds the {n} rows of data")
            obj = obj.select(torch.randperm(n, generator=gen)[:samples].to(device_))
            n = samples
        if estimator == "groups":
            size = n // groups
            if size < 1:
                raise ValueError(f"{n} rows cannot be split into {groups} non-empty groups")
            k = groups
            layout = torch.randperm(n, generator=gen)[: k * size].reshape(k, size).to(device_)
        else:
            m = max(_tuple_size(c) for c in contractions.values())
            k = n // m
            if k < 1:
                raise ValueError(
                    f"the statistics need tuples of {m} distinct rows, got only {n} rows"
                )
            tuples = torch.randperm(n, generator=gen)[: k * m].reshape(k, m).to(device_)
            layout = tuples
    meta_extra: dict[str, Any] = {}
    batching = None
    if (
        tuples is not None
        and vector_batches is not None
        and any(c.open_root for c in contractions.values())
    ):
        size = -(-k // vector_batches)  # the fewest tuples per batch, then the most batches
        if k // size < 2 <= k:
            size = k // 2
        batching = (k // size, size, 0)
        meta_extra.update(vector_batches=k // size, vector_batch_size=size)
    if tuple_range is not None:
        if tuples is None:
            raise ValueError("tuple_range applies to estimator='tuples' with exact=False only")
        part = tuple_range(k)
        meta_extra.update(tuple_range=[part.start, part.stop], tuples_total=k)
        tuples = layout = tuples[part.start : part.stop]
        k = len(part)
        if batching is not None:
            batching = (batching[0], batching[1], part.start)
    engine = _Engine(
        obj, layout, chunk_size=chunk_size, budget=max_message_elements, vector_batches=batching
    )
    host = _HostCopy()
    values: dict[str, np.ndarray] = {}
    bar = tqdm(contractions.items(), desc="measure", disable=not progress, unit="stat")
    for key, c in bar:
        bar.set_postfix_str(c.text, refresh=False)
        if tuples is None:
            v = host(_group_values(engine, c, unbiased=not exact))
        else:  # an empty range of tuples gives empty per-tuple values, zero batch sums
            v = host(_tuple_values(engine, c, tuples))
        values[key] = v.astype(np.float64, copy=False)
    if not exact:
        meta_extra["estimator"] = estimator
        if tuples is not None:
            meta_extra["tuple_size"] = int(tuples.shape[1])
    return Statistics(
        order=order,
        exact=bool(exact),
        rows=int(layout.numel()),
        groups=k,
        parameters=obj.size,
        contractions=contractions,
        group_values=values,
        meta={
            "dtype": str(dtype).replace("torch.", ""),
            "seed": int(seed),
            "quantities": list(quantities),
            "schedules": [str(s) for s in schedules],
            "evaluations": engine.evaluations,
            "networks": sum(len(b) for b in engine.cache.values())
            + sum(len(b) for b in engine.tuple_cache.values()),
            **meta_extra,
        },
    )


def measure_distributed(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    exact: bool = False,
    estimator: str = "tuples",
    progress: bool = True,
    **kw: Any,
) -> Statistics:
    """:func:`perturb.numeric.measuring.measure`, with the tuples split across the ranks.

    Every rank builds the same seeded layout of ``R`` disjoint tuples as ``measure``;
    rank ``r`` evaluates the tuples :func:`shard` ``(R, r, W)`` only, and the per-tuple
    values are all-gathered (float64) in tuple order (an open-root statistic's batch
    means, ``vector_batches``, are partial on each rank and summed), so every rank returns the
    :class:`~perturb.numeric.measuring.Statistics` of a single-process ``measure`` (to float64
    rounding); ``meta["evaluations"]`` is the total over the ranks and
    ``meta["world_size"]`` is ``W``.  Only the default ``estimator="tuples"`` with
    ``exact=False`` is split: ``exact=True`` and ``estimator="groups"`` are computed
    whole on every rank (same result everywhere, no speed-up).  ``measure`` itself calls
    this under a process group; same arguments; the progress bar shows on rank 0 only.

    Raises:
        ValueError: For bad arguments (as ``measure``), or when the ranks disagree on the
            number of tuples, tuple size, parameters, seed or number of contractions.

    Example:
        >>> f = lambda p, x: ((p - x) ** 2).sum() / 2
        >>> x = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> a = measure_distributed(f, x, torch.zeros(2), order=2, progress=False)
        >>> b = measure(f, x, torch.zeros(2), order=2, progress=False)
        >>> all(np.array_equal(a.group_values[k], b.group_values[k]) for k in b.group_values)
        True
    """
    rank, size = world()
    if size == 1 or exact or estimator != "tuples":
        return measure(
            loss_fn_or_model, data, theta0, exact=exact, estimator=estimator,
            progress=progress and rank == 0, distributed=False, **kw,
        )  # fmt: skip
    local = measure(
        loss_fn_or_model, data, theta0, exact=False, estimator="tuples",
        progress=progress and rank == 0, tuple_range=lambda k: shard(k, rank, size),
        distributed=False, **kw,
    )  # fmt: skip
    total = int(local.meta["tuples_total"])
    layout = [total, local.meta["tuple_size"], local.parameters, local.meta["seed"]]
    rows = all_ints([*layout, len(local.group_values), local.meta["evaluations"]])
    same_on_all_ranks("tuples, tuple size, parameters, seed, contractions", rows[:, :5])
    batched = "vector_batches" in local.meta
    values = {
        key: sum_over_ranks(v)
        if batched and local.contractions[key].open_root
        else gather_blocks(v, total, axis=0)
        for key, v in local.group_values.items()
    }
    meta = {k: v for k, v in local.meta.items() if k not in ("tuple_range", "tuples_total")}
    meta.update(evaluations=int(rows[:, 5].sum()), world_size=size)
    return replace(
        local,
        rows=total * int(local.meta["tuple_size"]),
        groups=total,
        group_values=values,
        meta=meta,
    )
