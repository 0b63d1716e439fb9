r"""Split-sample sketches: every node of a network one batched derivative over many rows.

The tuple estimator (:func:`perturb.numeric.networks.tuple_values`) gives each node one
row, so a moment network costs one *per-row* derivative per node and tuple, and each
tuple uses one assignment of its rows to the blocks.  A sketch uses every row of a group
at every node instead, through derivatives of *weighted summed losses*, which cost what
a full-batch derivative over the same rows costs.

**Singleton blocks: split means.**  For a moment network whose blocks ``B_1..B_b`` are
single nodes (``G·G``, ``G·H·G``, ``G_a J_abc G_b G_c``, ...) the rows of a group are
shuffled and split into disjoint parts, block ``j`` taking part ``j``, and every node is
the mean tensor of its part, e.g.

.. math::  \widehat{G·H·G} = \bar g_{(1)} · \bar H_{(2)}\, \bar g_{(3)},

an exactly unbiased estimate (the parts are independent samples) that costs two batched
gradients and one batched second-order scalar.  Its variance is that of a product of
means over ``n_g/b`` rows each: the first-order (Hoeffding) term equals the complete
U-statistic's, the degenerate term is at most ``b`` times it.

**Blocks of two or three nodes: random-sign probes.**  A block ``B`` with ``q`` nodes is a
sample expectation ``E_x[⊗_{v∈B} ∇^{\deg v} l_x]``.  With iid weights ``w_i`` on the
part's ``s`` rows, ``E w = 0`` and ``E w^q = 1/s``, every node of the block evaluated on
the weighted sum ``Σ_i w_i l_i`` gives

.. math::  E_w \prod_{v∈B} \Big(\sum_i w_i T_{v,i}\Big) = \sum_i E[w_i^q] \prod_{v∈B} T_{v,i}
           = \frac1s \sum_i \prod_{v∈B} T_{v,i},

because every term with two distinct rows has a factor ``E w_j = 0`` (for ``q ≤ 3`` each
such term has a row of multiplicity one).  ``q = 2``: Rademacher signs over ``√s``
(``z = s^{-1/2}Σ ε_i g_i``, ``zᵀ H̄ z`` estimates ``tr(C H)`` with every row);
``q = 3``: a skewed two-point variable with ``E ε = 0``, ``E ε³ = 1`` (:data:`SKEWED`) over
``s^{1/3}``.  Blocks of four or more nodes would pick up products of pairs
(``E[ε²]² ≠ 0`` for real ``ε``); their networks are evaluated on tuples inside each group
instead (:meth:`Sketcher.tuples_in_groups`).

**What probes cost in variance.**  A probe's own variance does not fall with the rows:
for ``q = 2`` it is about ``E[(T_{v,i}·T_{w,j})²]`` per draw, whatever ``s`` (a tuple
has the same, and a group holds ``s/m`` tuples); for ``q = 3`` the ``s³`` cross terms
make it grow like ``s``.  And the group values of a probed statistic are far from normal
(a quadratic or cubic form in the signs), so its t-intervals over ``K = 16`` groups
undercover (0.89–0.92 for ``tr(C H)``-like statistics on 8-row groups, where the
predictions covered 0.94–0.95; ``tests/numeric/test_sketches.py``).  So
:func:`perturb.measure` probes no block by default (``probe_blocks=1``): networks with a
block of two or more nodes are measured on tuples inside the groups, and only the
products of means are split.

**Cumulants** are Möbius sums of moment networks
(:func:`perturb.numeric.networks.tuple_networks`); every network of every contraction
uses the same split of each group into ``m`` parts and the same weights per row in a
replicate (block ``j`` of a network with ``b`` blocks takes the parts ``j, j + b, …``), so
the moments a cumulant differences share rows and part of the cancellation is kept.

**Replicates.**  ``r`` independent splits and probe draws per group, averaged: the
variance from the split and the probes falls as ``1/r``; that from the rows does not.
Every group's value is unbiased and the groups are disjoint, so the batch-means error
bar of :mod:`perturb.numeric.statistics` applies unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import vmap

from perturb.numeric.adapters import Objective
from perturb.numeric.derivatives import auto_chunk, derivative
from perturb.numeric.engine import MESSAGE_CACHE, Engine, Net, tree_order
from perturb.numeric.networks import tuple_networks, tuple_size
from perturb.symbolic.contractions import Contraction

__all__ = ["MAX_PROBED_BLOCK", "SKEWED", "Sketcher", "sketchable", "skewed_signs"]

MAX_PROBED_BLOCK = 3  # the most nodes of a block that real probes sketch without bias
SKEWED = (4 ** (1 / 3), -(4 ** (1 / 3)) / 2, 1 / 3)  # (a, −b, P[a]): E ε = 0, E ε³ = 1


def skewed_signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """iid draws of :data:`SKEWED` (float64): ``a = 4^{1/3}`` w.p. ``1/3``, ``−a/2`` otherwise.

    ``E ε = a/3 − a/3 = 0`` and ``E ε³ = a³/3 − a³/12 = a³/4 = 1``.

    Example:
        >>> e = skewed_signs((400_000,), torch.Generator().manual_seed(0)).double()
        >>> abs(float(e.mean())) < 0.01, abs(float((e**3).mean()) - 1) < 0.02
        (True, True)
    """
    a, b, p = SKEWED
    u = torch.rand(shape, generator=generator)
    one = torch.ones((), dtype=torch.float64)
    return torch.where(u < p, one * a, one * b)


def _largest_block(net: Net) -> int:
    return max((len(b) for b in net.blocks), default=0)


def sketchable(contraction: Contraction) -> bool:
    """Whether every moment network of the contraction has blocks of ≤ 3 nodes.

    Example:
        >>> sketchable(Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2))))  # tr(C H)
        True
        >>> sketchable(Contraction(parents=(-1, 0, 0, 0), parts=((0, 1, 2, 3),)))
        False
    """
    return all(_largest_block(net) <= MAX_PROBED_BLOCK for net, _ in tuple_networks(contraction))


def _weighted(batch):
    def total(t, w, *rows):
        return (w * batch(t, *rows)).sum()

    return total


class Sketcher:
    """Per-group sketches of contractions over a ``(K, n_g)`` layout of rows.

    Replicate ``r`` is one split of every group into ``parts`` parts with one weight per
    row, drawn once and shared by every contraction, so a message (a node's batched
    derivative, keyed by replicate, rows, weights and incoming messages) that several
    networks need is computed once, up to :data:`~perturb.numeric.engine.MESSAGE_CACHE`
    elements.

    Args:
        obj: the rows, point and loss.
        layout: ``(K, n_g)`` row indices, the disjoint groups.
        generator: draws the splits and the probe weights (CPU generator).
        chunk_size: most rows per batched call (default
            :func:`~perturb.numeric.derivatives.auto_chunk`).
        parts: ``m``, the parts of each split (default: each contraction's
            :func:`~perturb.numeric.networks.tuple_size`, drawn per contraction, no
            sharing).
        probed: the largest block (in nodes) estimated by random-sign probes, at most
            :data:`MAX_PROBED_BLOCK`; networks with larger blocks are averaged over
            tuples inside the groups (``1``: split means only).
        share: the groups this process evaluates (under ``torchrun``: the
            :func:`~perturb.numeric.distributed.shard` of the ``K`` groups); the splits
            and weights are still drawn for all ``K`` groups, so each group's value is
            the one a single process computes, and the values returned hold the
            ``share`` groups only (``None``: all ``K``).

    Attributes:
        evaluations: rows differentiated so far (one row of one batched node counts 1).
        all_groups: ``K``; :attr:`groups` and :attr:`layout` are those of :attr:`share`.

    Example:
        >>> from perturb.numeric.adapters import objective
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
        >>> obj = objective(lambda p, x: ((p - x) ** 2).sum() / 2, x, torch.zeros(1))
        >>> sk = Sketcher(obj, torch.arange(4)[None, :], torch.Generator().manual_seed(0))
        >>> gg = Contraction(parents=(-1, 0), parts=((0,), (1,)))  # G·G = ḡ_(1) · ḡ_(2)
        >>> value = sk.values(gg, replicates=1)  # 1.5·3.5, 2·3 or 2.5·2.5: their mean is
        >>> value.shape, float(value[0]) in {5.25, 6.0, 6.25}  # the U-statistic, 35/6
        (torch.Size([1]), True)
    """

    def __init__(
        self,
        obj: Objective,
        layout: torch.Tensor,
        generator: torch.Generator,
        *,
        chunk_size: int | None = None,
        parts: int | None = None,
        probed: int = MAX_PROBED_BLOCK,
        share: range | None = None,
    ) -> None:
        if not 1 <= probed <= MAX_PROBED_BLOCK:
            raise ValueError(f"probed must be 1, 2 or {MAX_PROBED_BLOCK}, got {probed!r}")
        self.probed = probed
        self.obj = obj
        self.parts = parts
        self._draws: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []
        self._messages: dict[tuple, torch.Tensor] = {}
        self._networks: dict[tuple, list[tuple[Contraction, torch.Tensor]]] = {}
        self._message_elements = 0
        self.all_groups = int(layout.shape[0])
        self.share = range(self.all_groups) if share is None else share
        if not (0 <= self.share.start <= self.share.stop <= self.all_groups and self.share):
            raise ValueError(f"share must be a non-empty range of the {self.all_groups} groups")
        self.layout = layout[self.share.start : self.share.stop]
        self.groups, self.group_size = (int(s) for s in self.layout.shape)
        self.gen = generator
        self.chunk = auto_chunk(obj) if chunk_size is None else int(chunk_size)
        self.evaluations = 0
        self._fns = {
            vector: vmap(derivative(_weighted(obj.batch), vector), in_dims=(None, 0, 0))
            for vector in (True, False)
        }
        self._tuple_engines: dict[int, tuple[Engine, torch.Tensor]] = {}

    # ------------------------------------------------------------------ contractions
    def values(self, contraction: Contraction, *, replicates: int, start: int = 0) -> torch.Tensor:
        """The contraction's sketch in every group (of :attr:`share`), ``(K,)`` or ``(K, P)``,
        float64.

        The mean over the replicates ``start, …, start + replicates − 1`` (independent
        splits and probe draws); networks with a block of more than :attr:`probed`
        nodes are averaged over disjoint tuples inside each group
        (:meth:`tuples_in_groups`).
        """
        nets = tuple_networks(contraction)
        m = self._rows_needed(contraction)
        if self.parts is not None and self.parts < m:
            raise ValueError(f"{contraction.text!r} needs {m} parts, the sketch has {self.parts}")
        total = None
        label = contraction.text
        for r in range(start, start + replicates):
            if self.parts is None:
                split, signs, key = *self._draw(m), None
            else:
                while len(self._draws) <= r:
                    self._draws.append(self._draw(self.parts))
                split, signs, key = *self._draws[r], r
            for net, weight in nets:
                if _largest_block(net) > self.probed:
                    continue
                term = self._cached(net, split, signs, label, key) * weight
                total = term if total is None else total + term
        total = total / replicates if total is not None else 0.0
        for net, weight in nets:
            if _largest_block(net) > self.probed:
                total = total + self.tuples_in_groups(net, m, label) * weight
        return total

    def tuples_in_groups(self, net: Net, m: int, label: str) -> torch.Tensor:
        """The mean over ``⌊n_g/m⌋`` disjoint tuples inside each group: ``(K,)`` or ``(K, P)``."""
        if m not in self._tuple_engines:
            per = self.group_size // m
            tuples = self.layout[:, : per * m].reshape(self.groups * per, m)
            self._tuple_engines[m] = (
                Engine(self.obj, tuples, chunk_size=self.chunk, budget=None),
                tuples,
            )
        engine, tuples = self._tuple_engines[m]
        before = engine.evaluations
        v = engine.tuple_values(net, tuples, label)
        self.evaluations += engine.evaluations - before
        return v.reshape(self.groups, -1, *v.shape[1:]).mean(dim=1)

    def tuple_values(self, contraction: Contraction) -> torch.Tensor:
        """The tuple estimate inside each group: every network on disjoint tuples.

        Example:
            >>> from perturb.numeric.adapters import objective
            >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
            >>> obj = objective(lambda p, x: ((p - x) ** 2).sum() / 2, x, torch.zeros(1))
            >>> sk = Sketcher(obj, torch.arange(4)[None, :], torch.Generator().manual_seed(0))
            >>> sk.tuple_values(Contraction(parents=(-1, 0), parts=((0,), (1,))))  # (2 + 12)/2
            tensor([7.], dtype=torch.float64)
        """
        m = self._rows_needed(contraction)
        total = None
        for net, weight in tuple_networks(contraction):
            term = self.tuples_in_groups(net, m, contraction.text) * weight
            total = term if total is None else total + term
        return total

    def _rows_needed(self, contraction: Contraction) -> int:
        """``m``, the distinct rows per group the contraction needs, checked."""
        m = tuple_size(contraction)
        if self.group_size < m:
            raise ValueError(
                f"{contraction.text!r} needs {m} distinct rows per group, got groups of "
                f"{self.group_size} rows; use fewer groups or more samples"
            )
        return m

    # ------------------------------------------------------------------ one network
    def _cached(self, net: Net, split, signs, label: str, replicate: int | None) -> torch.Tensor:
        """:meth:`network`, evaluated once per shared draw for isomorphic networks.

        An isomorphic network may put its blocks on other parts of the split: its value
        is another unbiased estimate of the same moment, which is all a term needs.
        """
        if replicate is None:
            return self.network(net, split, signs, label)
        c = net.contraction
        bucket = self._networks.setdefault((replicate, c.hash), [])
        for other, value in bucket:
            if other.is_isomorphic(c):
                return value
        value = self.network(net, split, signs, label, replicate=replicate)
        bucket.append((c, value))
        return value

    def _draw(self, m: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """A fresh split of every group into ``m`` parts and fresh weights per row (drawn
        for all ``K`` groups, kept for :attr:`share`)."""
        k, n_g, own = self.all_groups, self.group_size, slice(self.share.start, self.share.stop)
        order = torch.argsort(torch.rand(k, n_g, generator=self.gen), dim=1)[own]
        size = n_g // m
        split = torch.gather(self.layout, 1, order.to(self.layout.device))[:, : size * m]
        split = split.reshape(self.groups, m, size)
        signs = {
            2: (torch.randint(0, 2, (k, m, size), generator=self.gen) * 2 - 1).double()[own],
            3: skewed_signs((k, m, size), self.gen).double()[own],
        }
        return split, signs

    def network(
        self,
        net: Net,
        split: torch.Tensor,
        signs: Mapping[int, torch.Tensor],
        label: str,
        *,
        replicate: int | None = None,
    ) -> torch.Tensor:
        """One moment network in every group from one split ``(K, m, s)``: ``(K,)`` or ``(K, P)``.

        Block ``j`` of the ``b`` blocks takes the parts ``j, j + b, …`` of the ``m``; a
        block of one node weighs its rows ``1/s_j``, one of ``q = 2, 3`` nodes
        ``ε_i/s_j^{1/q}`` with the ``q``-node signs of its rows.  With ``replicate``
        (the index of a shared draw) vector messages are cached under it.
        """
        obj = self.obj
        k, m = int(split.shape[0]), int(split.shape[1])
        b = len(net.blocks)
        block_of = {v: i for i, blk in enumerate(net.blocks) for v in blk}
        rows, weights = [], []
        dtype, device = obj.theta0.dtype, obj.theta0.device
        for j, blk in enumerate(net.blocks):
            parts = list(range(j, m, b))
            idx = split[:, parts, :].reshape(k, -1)
            s = idx.shape[1]
            q = len(blk)
            if q == 1:
                w = torch.full(idx.shape, 1.0 / s, dtype=torch.float64)
            else:
                w = signs[q][:, parts, :].reshape(k, -1) / s ** (1.0 / q)
            rows.append(idx)
            weights.append(w.to(dtype=dtype, device=device))
        children, postorder = tree_order(net.parents)
        msgs: dict[int, torch.Tensor] = {}
        keys: dict[int, tuple] = {}
        for v in postorder:
            if v == 0 and net.open_root:
                (child,) = children[0]
                return msgs[child].to(torch.float64)
            j = block_of[v]
            parts = tuple(range(j, m, b))
            keys[v] = (
                replicate,
                parts,
                len(net.blocks[j]),
                tuple(sorted(keys[c] for c in children[v])),
            )
            if replicate is not None and v != 0 and keys[v] in self._messages:
                msgs[v] = self._messages[keys[v]]
                continue
            us = [msgs[c] for c in children[v]]
            msgs[v] = self._node(rows[j], weights[j], us, v != 0)
            if not torch.isfinite(msgs[v]).all():
                self._locate(msgs[v], rows[j], us, v, label)
            if replicate is not None and v != 0:
                size = msgs[v].numel()
                if self._message_elements + size <= MESSAGE_CACHE:
                    self._messages[keys[v]] = msgs[v]
                    self._message_elements += size
        return msgs[0].to(torch.float64)

    def _node(self, idx, w, us, vector) -> torch.Tensor:
        """``∇^{k+1}(Σ_i w_i l_i)[u_1..u_k, ·]`` (or the scalar) for every group."""
        obj = self.obj
        k, s = (int(d) for d in idx.shape)
        per_call = max(1, self.chunk // max(s, 1))
        out = []
        for g0 in range(0, k, per_call):
            sl = slice(g0, g0 + per_call)
            data = (w[sl], *(r[idx[sl]] for r in obj.rows))
            out.append(self._fns[vector](obj.theta0, data, tuple(u[sl] for u in us)))
            self.evaluations += int(idx[sl].numel())
        return torch.cat(out)

    def _locate(self, res, idx, us, v, label) -> None:
        """Raise naming the first row whose own derivative is not finite."""
        vector = v != 0
        order = len(us) + vector
        flat = res.reshape(res.shape[0], -1)
        q = int(torch.nonzero(~torch.isfinite(flat).all(dim=1))[0])
        per_row = vmap(derivative(self.obj.single, vector), in_dims=(None, 0, None))
        data = tuple(r[idx[q]] for r in self.obj.rows)
        own = per_row(self.obj.theta0, data, tuple(u[q] for u in us))
        bad = ~torch.isfinite(own.reshape(own.shape[0], -1)).all(dim=1)
        where = ""
        if bad.any():
            row = int(idx[q][int(torch.nonzero(bad)[0])])
            where = f" at data row {int(self.obj.origin[row])}"
        raise ValueError(
            f"non-finite derivative ∇^{order} l (node {v} of a moment network of the "
            f"statistic {label!r}){where}"
        )
