r"""The node engine: moment networks evaluated node by node from the leaves to the root.

A moment network puts one independent sample on each block ``B`` of a partition of the
tree's nodes.  A non-root node ``v`` with children ``c_1..c_k`` sends up the vector

.. math::  w_v = \nabla^{k+1} l_{x}[w_{c_1},\dots,w_{c_k},\,\cdot\,]
           = \partial_{w_{c_k}}\cdots\partial_{w_{c_1}} \nabla l_x ,

a gradient differentiated along ``k`` directions (:func:`perturb.numeric.derivatives.derivative`);
the root returns the scalar ``∇^k l_x[w_{c_1},…,w_{c_k}]``.  :class:`Engine` evaluates a
network in one of two layouts.

**Groups** (:meth:`Engine.sums`, rows ``perm`` of shape ``(K, n_g)``): per-group V-sums.  A
message carries one sample axis for each block that is still *open* on its edge (the block
has nodes both inside and outside the subtree), and the axis is summed as soon as the block
closes; nodes of one block share the sample (a diagonal, never a product).  Each node
therefore costs ``Π_{B open or own} n`` directional derivatives of one sample, done with
``vmap`` in chunks of ``chunk_size``; memory stays at ``Π_{B open} n · P`` per message, and
when that exceeds a budget the engine enumerates chunks of one block's samples in an outer
loop (the value is linear in each block's sum).  A block that straddles two subtrees makes
the cost quadratic in ``n``: ``tr(C H) = E_s g_sᵀ H g_s`` needs ``H`` applied to every
``g_s``, i.e. ``n²`` single-row derivatives, and no exact matrix-free form is cheaper
without forming ``H``.  Three evaluation paths:

* *summed* (the node's sample closes at the node and its inputs do not depend on it): the
  directional derivative of the summed loss ``Σ_i l_i``, one batched call; this gives
  ``G = ∇ Σ l``, ``H u`` (HVP, ``jvp`` of ``grad``), ``J[u, v, ·]`` (``jvp`` of ``θ ↦ H(θ)u``)
  and the test root ``Σ_i ∇^k l_i[u,…]`` (nested ``jvp``);
* *per row* (the node's block stays open, inputs shared): per-sample gradients ``g_i`` and
  per-sample ``H_i u``, ``J_i[u, v, ·]`` with ``vmap`` over rows;
* *diagonal* (an input depends on the node's own sample, e.g. ``E_i[H_i g_i]`` or a train
  root): ``vmap`` over (row, direction) pairs.

**Tuples** (:meth:`Engine.tuple_values`, rows ``(R, m)``): block ``i`` takes row ``i`` of
each tuple, so every node is one single-row nested directional derivative per tuple.  Two
choices make a tuple network cheap.  (1) *Which node is evaluated last.*  Node ``v`` is
``∇^{deg v} l`` with ``deg`` its degree in the undirected tree, so any node can be the one
that receives every neighbour's message and returns the scalar; a scalar with ``k``
directions (``k`` nested ``jvp`` of the loss, no reverse pass) costs a fraction of a vector
node with ``k − 1``, so ``G·H·G`` becomes ``∇²l_b[g_a, g_c]`` instead of ``g_a·(H_b g_c)``
and ``G_a J_abc G_b G_c`` one third-order scalar instead of a ``J``-vector product.  The
engine costs every root (messages already computed for another network on the same
tuples are free) and takes the cheapest.  (2) *Messages are cached across networks*, keyed
by tuple column and incoming messages, up to :data:`MESSAGE_CACHE` elements (or a quarter
of the free memory, if more).  On CUDA a per-row vector node starts from the
reverse-over-reverse HVP (faster there for per-sample directions; forward-over-reverse
everywhere else).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import vmap

from perturb.checks import check_int
from perturb.numeric.adapters import Objective
from perturb.numeric.derivatives import auto_chunk, derivative, free_bytes, summed
from perturb.symbolic.contractions import Contraction

__all__ = ["MESSAGE_CACHE", "Engine", "Net", "canonical_blocks", "tree_order"]

_GROUP = -1  # the axis of the disjoint groups (batch means); present on every message
_DEFAULT_BUDGET = 2**25  # elements of one message (sample axes × P)
MESSAGE_CACHE = 2**28  # elements of tuple messages kept for reuse (or ¼ of free memory, if more)


@dataclass(frozen=True)
class Net:
    """A moment network: tree, blocks of tensor nodes (no open root), open root.

    Example:
        >>> Net(parents=(-1, 0), blocks=((0,), (1,)), open_root=False).contraction.text
        'G·G'
    """

    parents: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    open_root: bool

    @functools.cached_property
    def contraction(self) -> Contraction:
        parts = self.blocks + (((0,),) if self.open_root else ())
        return Contraction(
            parents=self.parents, parts=parts, form="moment", open_root=self.open_root
        )


def tree_order(parents: Sequence[int], root: int = 0) -> tuple[list[list[int]], list[int]]:
    """Children of each node and a post-order (every child before its parent).

    With ``root ≠ 0`` the tree is hung from ``root`` instead: a contraction's tree is an
    undirected tree of symmetric tensors (node ``v`` is ``∇^{deg v} l``), so any node can
    be the one evaluated last.

    Example:
        >>> tree_order((-1, 0, 0))
        ([[1, 2], [], []], [1, 2, 0])
        >>> tree_order((-1, 0, 0), root=1)[0]
        [[2], [0], []]
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


def canonical_blocks(blocks: Iterable[Iterable[int]]) -> tuple[tuple[int, ...], ...]:
    """Blocks as sorted tuples in sorted order: one spelling per partition.

    Example:
        >>> canonical_blocks([[2, 1], [0]])
        ((0,), (1, 2))
    """
    return tuple(sorted(tuple(sorted(b)) for b in blocks))


class Engine:
    """Evaluates moment networks over a row layout: per-group V-sums or per-tuple values.

    Args:
        obj: the rows, point and loss.
        perm: the layout, ``(K, n_g)`` row indices (groups) or ``(R, m)`` (tuples).
        chunk_size: most single-row directional derivatives per ``vmap`` call (default
            :func:`~perturb.numeric.derivatives.auto_chunk`).
        budget: most elements of one message (sample axes × ``P``).
        vector_batches: ``(K, s, offset)`` to keep open-root tuple values as batch means
            (:meth:`tuple_values`).

    Attributes:
        evaluations: single-row directional derivatives computed so far.
        cache, tuple_cache: network values by WL hash (isomorphic networks evaluated once).

    Example:
        >>> import torch
        >>> from perturb.numeric.adapters import objective
        >>> obj = objective(lambda p, x: ((p - x) ** 2).sum() / 2, torch.tensor([[1.0], [3.0]]),
        ...                 torch.zeros(1))
        >>> engine = Engine(obj, torch.arange(2)[None, :], chunk_size=8, budget=None)
        >>> engine.sums(Net((-1, 0), ((0,), (1,)), False), "G·G")  # Σ_ij g_i g_j
        tensor([16.], dtype=torch.float64)
    """

    def __init__(
        self,
        obj: Objective,
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
            chunk_size = auto_chunk(obj)
        self.chunk = check_int("chunk_size", chunk_size, minimum=1)
        self.budget = (
            _DEFAULT_BUDGET
            if budget is None
            else check_int("max_message_elements", budget, minimum=1)
        )
        self.cache: dict[str, list[tuple[Contraction, torch.Tensor]]] = {}
        self.tuple_cache: dict[str, list[tuple[Contraction, torch.Tensor]]] = {}
        self.evaluations = 0
        self.messages: dict[tuple, torch.Tensor] = {}
        self.message_elements = 0
        self.message_budget = MESSAGE_CACHE
        free = free_bytes(obj.theta0.device)
        if free is not None and MESSAGE_CACHE > 0:  # a quarter of the free memory
            self.message_budget = max(MESSAGE_CACHE, free // 4 // obj.theta0.element_size())
        single, batch = obj.single, obj.batch
        reverse = obj.theta0.device.type == "cuda"
        self._fns = {
            ("elem", True): vmap(
                derivative(single, True, reverse_first=reverse), in_dims=(None, 0, 0)
            ),
            ("elem", False): vmap(derivative(single, False), in_dims=(None, 0, 0)),
            ("sum", True): vmap(derivative(summed(batch), True), in_dims=(None, 0, 0)),
            ("sum", False): vmap(derivative(summed(batch), False), in_dims=(None, 0, 0)),
            ("rows", True): vmap(
                vmap(derivative(single, True), in_dims=(None, 0, None)), in_dims=(None, 0, 0)
            ),
            ("rows", False): vmap(
                vmap(derivative(single, False), in_dims=(None, 0, None)), in_dims=(None, 0, 0)
            ),
        }

    # ------------------------------------------------------------------ cache
    def sums(self, net: Net, label: str) -> torch.Tensor:
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
    def _network_sums(self, net: Net, label: str) -> torch.Tensor:
        parents, open_root = net.parents, net.open_root
        count = len(parents)
        children, postorder = tree_order(parents)
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
    def tuple_values(self, net: Net, tuples: torch.Tensor, label: str) -> torch.Tensor:
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

    def _network_tuples(self, net: Net, tuples: torch.Tensor, label: str) -> torch.Tensor:
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

    def _hang(self, net: Net, block_of: Mapping[int, int], tuples: torch.Tensor):
        """The cheapest node to evaluate last, with its tree order and message keys.

        Every node is tried as the root (an open root stays at node 0) and costed by
        :meth:`_hung_at`; ties keep the lowest node.
        """
        roots = [0] if net.open_root else range(len(net.parents))
        best = min((self._hung_at(net, block_of, tuples, r) for r in roots), key=lambda h: h[0])
        return best[1:]

    def _hung_at(self, net: Net, block_of: Mapping[int, int], tuples: torch.Tensor, root: int):
        """``(cost, root, children, postorder, keys)`` with ``root`` evaluated last.

        A node's message depends only on its tuple column and the messages it receives (a
        derivative is symmetric in its directions): equal keys, equal messages, within this
        network and across networks on the same tuples.  The cost counts each message not
        yet stored once, by :data:`_VECTOR_COST` and :data:`_SCALAR_COST`.
        """
        tag = (tuples.data_ptr(), tuple(tuples.shape))
        children, postorder = tree_order(net.parents, root)
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
