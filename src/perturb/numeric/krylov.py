r"""Re-summed predictions on real networks: Rayleigh–Ritz in a block-Krylov subspace.

The re-summed diagrams (:mod:`perturb.symbolic.resummed`) need matrix functions of ``ηH`` (every
edge carries ``η(I − ηH)^{Δt−1}``), which the exact path gets from a full
eigendecomposition of the ``P×P`` mean Hessian: impossible for ``P ≈ 10⁵``.  This
module replaces ``H`` by its Rayleigh–Ritz (Galerkin) projection on a ``k``-dimensional
subspace and reuses the exact path there.

**Subspace.**  Block Lanczos with full reorthogonalization on Hessian-vector products
(``jvp`` of ``grad`` of the mean loss, never a ``P×P`` matrix), started from the vectors
the diagrams contract: the mean gradient ``G`` and ``m`` random combinations of the
centred per-sample gradients

.. math::  z_j = \frac{1}{\sqrt n}\sum_i ε_{ij}\,(g_i − G),\qquad ε_{ij} = ±1,
           \qquad \mathbb E_ε[z_j z_jᵀ] = C,

each one gradient of the ``ε``-weighted loss (no per-sample gradients).  Their span is a
randomized sketch of the range of ``C`` (the noise terms ``tr(C f(H))``), and the
Krylov space ``span{S, HS, H²S, …}`` of the starting block ``S = [G, z_1..z_m]``
captures ``f(H)`` applied to it.  The basis ``Q`` (``P×k``, orthonormal, nested: its
first ``r`` columns span the subspace of the first iterations) gives
``T = QᵀHQ`` (block tridiagonal up to rounding), whose upper triangle is read off the
same products (the projections of ``HQ_j`` on the earlier blocks), so ``T`` is the exact
Galerkin matrix whatever the loss of orthogonality in the recurrence.
A block whose residual vanishes (an invariant subspace) is continued with random
vectors, so ``k = P`` always spans everything.

**Projection.**  Every tensor the re-summed diagrams contract is projected on ``Q``:
``G → QᵀG``, ``H → T``, per-sample gradients ``g_i → Qᵀg_i`` (so
``C → (1/n)Σ(Qᵀg_i)(Qᵀg_i)ᵀ − QᵀG GᵀQ``, the cumulant formed as in the exact path),
per-sample Hessians ``Qᵀ H_i Q`` and third derivatives ``J[Q, Q, Q]`` (nested ``jvp``)
only where the order needs them.  The re-summed value of a diagram is a polynomial in
these tensors and in ``f(H)`` for scalar functions ``f``; the Galerkin value replaces
every vector by its component in ``span Q`` and ``f(H)`` by ``Q f(T) Qᵀ``.  With
``k = P`` the projection is a rotation and the value is exact; the quadratic forms
``Gᵀ f(H) G`` are Gauss quadratures, exact for polynomials ``f`` of degree below twice
the number of block iterations, so they converge quickly for smooth ``f``; the noise
terms converge as ``span Q`` exhausts the range of ``C``.  Rayleigh–Ritz rather than
Lanczos applied term by term because the diagrams contract mixed products (``C`` on both
sides of ``f(H)``, ``J`` with three ``f(H)`` legs) that have no single starting vector;
one subspace for all of them keeps every diagram consistent and costs one basis.

**Error estimate.**  The basis is nested, so the prediction from its first ``⌊k/2⌋``
columns costs only a small eigendecomposition; ``|value(k) − value(k/2)|``
(:attr:`perturb.Prediction.error`) estimates the error of the ``k/2`` value and, when
the convergence is at least geometric, bounds the error of the ``k`` value.
:attr:`KrylovSubspace.residual` is ``‖HQ − QT‖_F``.

**Cost** (:attr:`KrylovSubspace.cost`): ``k`` Hessian-vector products of the mean loss,
``1 + m`` full-batch gradients, ``n`` per-sample gradients (orders ≥ 2),
``n·k`` per-sample Hessian-vector products (order 3), ``k(k+1)/2`` mean third-derivative
products (order 3), plus ``O(Pk²)`` for the orthogonalization; memory ``P·k`` for the
basis and ``n·k^{m}`` for the projected order-``m`` per-sample tensors.  Predictions at
any ``η`` and ``T`` then cost ``O(k³)`` (closed-form sums over steps: ``T = 10⁵`` costs
what ``T = 10²`` does) and no further network evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import vmap
from tqdm.auto import tqdm

from perturb.checks import check_int, check_lr
from perturb.numeric.adapters import Objective, objective
from perturb.numeric.derivatives import MAX_VMAP_ROWS, derivative, summed, vmap_rows
from perturb.numeric.distributed import (
    all_ints,
    gathered_rows,
    local_share,
    same_on_all_ranks,
    summed_tensor,
    world,
)
from perturb.numeric.predictions import UNSTABLE_GROWTH, Prediction, warn_if_unstable
from perturb.numeric.resummation import resummed_by_quantity
from perturb.numeric.row_passes import (
    per_sample_projected,
    row_chunks,
    symmetric_projection,
    weighted_gradient,
)
from perturb.symbolic.resummed import check_resummable, resummed_terms
from perturb.symbolic.schedules import Online, Schedule
from perturb.symbolic.series import QUANTITIES

__all__ = ["KrylovSubspace", "krylov_subspace"]


@dataclass(frozen=True, eq=False)
class KrylovSubspace:
    """A Krylov subspace of the mean Hessian with every tensor projected on it.

    Build it with :func:`krylov_subspace`; :meth:`predict` then evaluates re-summed
    predictions for any schedule, learning rate and number of steps.

    Attributes:
        basis: ``Q``, shape ``(P, k)``, orthonormal columns (device and dtype of the
            computation).
        hessian: ``T = QᵀHQ``, ``(k, k)``, float64 on the CPU.
        derivs: projected per-sample tensors ``{m: (n, k_m, …, k_m)}`` (float64, CPU),
            ``k_1 = k`` and ``k_m`` = :attr:`higher_rank` for ``m ≥ 2``.
        means: projected mean tensors ``{m: (k_m, …, k_m)}`` (float64, CPU),
            ``k_m = k`` for ``m ≤ 2`` and :attr:`higher_rank` for ``m ≥ 3``.
        order: highest number of edges the projected tensors support.
        quantities: quantities the projected tensors support.
        block_size: columns of the starting block (``1 + probes``).
        residual: ``‖HQ − QT‖_F``, the Lanczos residual of the last block.
        cost: network evaluations and seconds spent building it.
    """

    basis: torch.Tensor
    hessian: torch.Tensor
    derivs: Mapping[int, torch.Tensor]
    means: Mapping[int, torch.Tensor]
    order: int
    quantities: tuple[str, ...]
    block_size: int
    residual: float
    cost: Mapping[str, float]
    _eigen: dict = field(default_factory=dict, repr=False, compare=False)
    _networks: dict = field(default_factory=dict, repr=False, compare=False)
    _ranks: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rank(self) -> int:
        """``k``, the dimension of the subspace."""
        return int(self.hessian.shape[0])

    @property
    def higher_rank(self) -> int:
        """``k_3 ≤ k``: the basis vectors the higher-order tensors are projected on."""
        sizes = [t.shape[1] for m, t in self.derivs.items() if m >= 2]
        sizes += [t.shape[0] for m, t in self.means.items() if m >= 3]
        return int(min(sizes, default=self.rank))

    def ranks(
        self, schedule: Schedule, quantity: str, order: int, rank: int | None = None
    ) -> tuple[int, ...]:
        """The rank at which the diagrams with ``0..order`` edges are evaluated.

        The diagrams with ``d`` edges use the first ``r_d`` basis vectors, ``r_d`` the
        smallest dimension among the projected tensors that the diagrams with at most ``d``
        edges contract (:attr:`higher_rank` once they need per-sample Hessians or ``J``),
        scaled by ``rank/k`` when fewer than ``k`` vectors are asked for (so the ``k/2``
        error estimate halves every dimension).

        Example:
            >>> import torch, perturb
            >>> pop = perturb.Population(
            ...     lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(4, dtype=torch.float64))
            >>> sub = krylov_subspace(pop, None, torch.ones(4), rank=4, order=3, higher_rank=2)
            >>> sub.ranks(perturb.Online(steps=3, batch_size=1), "test", 3)
            (4, 4, 4, 2)
        """
        rank = self.rank if rank is None else rank
        key = (str(schedule), quantity, order, rank)
        if key not in self._ranks:
            levels = []
            for d in range(order + 1):
                per_sample, means = _needed_orders(d, (quantity,), (schedule,))
                sizes = [self.derivs[m].shape[1] for m in per_sample if m >= 1 and m in self.derivs]
                sizes += [self.means[m].shape[0] for m in means if m >= 1 and m in self.means]
                size = min(sizes, default=self.rank)
                levels.append(min(rank, max(1, rank * size // self.rank)))
            self._ranks[key] = tuple(levels)
        return self._ranks[key]

    def ritz_values(self, rank: int | None = None) -> torch.Tensor:
        """Eigenvalues of the leading ``rank × rank`` block of ``T`` (the Ritz values).

        Example:
            >>> import torch, perturb
            >>> pop = perturb.Population(
            ...     lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(2, dtype=torch.float64))
            >>> krylov_subspace(pop, None, torch.ones(2), rank=2).ritz_values().round(decimals=9)
            tensor([1., 1.], dtype=torch.float64)
        """
        return self._eigenbasis(self.rank if rank is None else rank)[0]

    def predict(
        self,
        schedule: Schedule,
        *,
        lr: float,
        quantity: str = "test",
        order: int | None = None,
        rank: int | None = None,
        integral: bool = False,
    ) -> Prediction:
        """The re-summed prediction from the first ``rank`` basis vectors.

        Args:
            schedule: numeric online SGD (:func:`perturb.Online`) or GD.
            lr: η.
            quantity: one of the quantities the subspace was built for.
            order: highest number of edges (default and maximum: :attr:`order`).
            rank: use the first ``rank`` columns of the basis (default all).
            integral: Remark 2's integrals of exponentials instead of exact sums.

        Returns:
            A re-summed :class:`perturb.Prediction` with :attr:`~Prediction.rank`,
            the values from ``⌊rank/2⌋`` columns (:attr:`~Prediction.coarse_values`,
            whence :attr:`~Prediction.error`) and :attr:`cost`.

        Example:
            >>> import torch, perturb
            >>> pop = perturb.Population(
            ...     lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(3, dtype=torch.float64))
            >>> sub = krylov_subspace(pop, None, torch.ones(3), rank=3)
            >>> pred = sub.predict(perturb.Online(steps=10, batch_size=1), lr=0.1)
            >>> pred.rank, round(pred.total, 6)
            (3, 0.172949)
        """
        order = self.check(schedule, quantity, order)
        rank = check_int("rank", self.rank if rank is None else rank, minimum=1, maximum=self.rank)
        lr = check_lr(lr)
        growth = warn_if_unstable(
            self.ritz_values(rank), lr, int(schedule.steps), integral=integral, stacklevel=3
        )
        fine = self._values(schedule, quantity, order, lr, rank, integral)
        coarse = self._values(schedule, quantity, order, lr, max(rank // 2, 1), integral)
        return Prediction(
            unstable=growth > UNSTABLE_GROWTH,
            growth=growth,
            quantity=quantity,
            lr=lr,
            values=tuple(fine),
            resummed=True,
            rank=rank,
            coarse_values=tuple(coarse),
            cost=dict(self.cost),
        )

    def check(self, schedule: Schedule, quantity: str, order: int | None) -> int:
        """Raise unless the subspace supports ``schedule``, ``quantity`` and ``order``.

        Returns:
            The order (default :attr:`order`).

        Example:
            >>> import torch, perturb
            >>> pop = perturb.Population(
            ...     lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(2, dtype=torch.float64))
            >>> krylov_subspace(pop, None, torch.ones(2), rank=2).check(
            ...     perturb.Online(steps=3, batch_size=1), "test", None)
            2
        """
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        check_resummable(schedule)
        if not schedule.is_numeric:
            raise ValueError("predict needs numeric schedule sizes, e.g. Online(steps=100)")
        built = {q for name in self.quantities for q in _parts_of(name)}
        if quantity not in QUANTITIES or not set(_parts_of(quantity)) <= built:
            raise ValueError(
                f"this subspace was built for quantities {self.quantities}, got {quantity!r}; "
                "pass quantities=... to krylov_subspace"
            )
        order = check_int("order", self.order if order is None else order, maximum=self.order)
        per_sample, means = _needed_orders(order, (quantity,), (schedule,))
        missing = sorted(per_sample - set(self.derivs)) + sorted(means - set(self.means))
        if missing:
            raise ValueError(
                f"the {schedule.name} diagrams of {quantity!r} need projected derivatives of "
                f"orders {missing} that this subspace lacks; build it with schedules=[...] "
                "including this schedule"
            )
        return order

    def values(
        self,
        schedule: Schedule,
        *,
        lr: Sequence[float],
        quantity: str = "test",
        order: int | None = None,
        rank: int | None = None,
        integral: bool = False,
        rows: torch.Tensor | None = None,
    ) -> np.ndarray:
        """The re-summed values by order on a grid of learning rates, from chosen rows.

        The Galerkin matrix ``T`` (hence the eigenbasis) and the projected mean third
        derivative are those of all rows; the per-sample tensors, and the means of the
        loss and gradient, are those of ``rows`` (all by default), which is how
        :meth:`perturb.Statistics.predict` gets its jackknife error bars.  No warning
        here (:meth:`predict` warns).

        Args:
            schedule: numeric online SGD or GD.
            lr: the learning rates.
            quantity: one the subspace supports.
            order: highest number of edges (default :attr:`order`).
            rank: leading basis vectors to use (default all).
            integral: Remark 2's integral form.
            rows: indices of the rows to average over.

        Returns:
            Shape ``(L, order+1)`` (``(L, order+1, P)`` for displacement), float64.

        Example:
            >>> import torch, perturb
            >>> pop = perturb.Population(
            ...     lambda p, x: 0.5 * (p * p).sum() + x @ p, torch.eye(3, dtype=torch.float64))
            >>> sub = krylov_subspace(pop, None, torch.ones(3), rank=3)
            >>> sub.values(perturb.Online(steps=10, batch_size=1), lr=[0.1, 0.2]).shape
            (2, 3)
        """
        order = self.order if order is None else order
        rank = self.rank if rank is None else rank
        lrs = torch.as_tensor(np.asarray(lr, dtype=float).reshape(-1), dtype=torch.float64)
        levels = self.ranks(schedule, quantity, order, rank)
        parts = {}
        for r in sorted(set(levels), reverse=True):
            top = max(d for d, level in enumerate(levels) if level == r)
            parts[r] = self._values_at(schedule, quantity, top, lrs, r, integral, rows)
        width = max(part.shape[1] for part in parts.values())  # orders that have diagrams
        first = next(iter(parts.values()))
        out = np.zeros((first.shape[0], width, *first.shape[2:]))
        for d, level in enumerate(levels[:width]):
            if d < parts[level].shape[1]:
                out[:, d] = parts[level][:, d]
        return out

    def _values_at(self, schedule, quantity, order, lrs, rank, integral, rows) -> np.ndarray:
        """:meth:`values` with every tensor on the first ``rank`` basis vectors."""
        evals, evecs, derivs, means = self._eigenbasis(rank)
        networks = None
        if rows is None:  # open networks are reused across steps and schedules
            networks = self._networks.setdefault(rank, {})
        else:
            rows = torch.as_tensor(rows, dtype=torch.long)
            derivs = {m: t[rows] for m, t in derivs.items()}
            means = dict(means)
            for m, t in derivs.items():
                if m != 2:
                    means[m] = t.mean(0)
        values = resummed_by_quantity(
            derivs, schedule, quantity, order=order, lr=lrs, integral=integral, means=means,
            eigh=(evals, evecs), rotated=True, warn=False, networks=networks,
        )  # fmt: skip
        out = torch.stack(values, dim=1)  # (L, order+1[, k])
        if quantity == "displacement":
            q = self.basis[:, :rank]
            out = (out.to(device=q.device, dtype=q.dtype) @ q.T).to("cpu", torch.float64)
        return out.numpy()

    def _values(self, schedule, quantity, order, lr, rank, integral) -> list:
        out = self.values(
            schedule, lr=[lr], quantity=quantity, order=order, rank=rank, integral=integral
        )[0]
        if quantity != "displacement":
            return [float(v) for v in out]
        q = self.basis
        return [torch.as_tensor(v, dtype=q.dtype, device=q.device) for v in out]

    def _eigenbasis(self, rank: int) -> tuple:
        """Ritz values and vectors of the leading block, the tensors rotated (cached).

        Tensors projected on fewer than ``rank`` vectors are left out (:meth:`ranks`
        never asks them at this rank).
        """
        if rank not in self._eigen:
            evals, evecs = torch.linalg.eigh(self.hessian[:rank, :rank])
            derivs = {
                m: _rotate(_leading(t, rank, first=1), evecs, first=1)
                for m, t in self.derivs.items()
                if t.ndim == 1 or t.shape[1] >= rank
            }
            means = {
                m: _rotate(_leading(t, rank, first=0), evecs, first=0)
                for m, t in self.means.items()
                if m != 2 and (t.ndim == 0 or t.shape[0] >= rank)
            }
            means[2] = torch.diag(evals)
            self._eigen[rank] = (evals, evecs, derivs, means)
        return self._eigen[rank]


def _rotate(tensor: torch.Tensor, evecs: torch.Tensor, *, first: int) -> torch.Tensor:
    """Every axis from ``first`` on expressed in the basis ``evecs`` (columns)."""
    for axis in range(first, tensor.ndim):
        tensor = torch.tensordot(tensor, evecs, dims=([axis], [0])).movedim(-1, axis)
    return tensor


def _leading(tensor: torch.Tensor, rank: int, *, first: int) -> torch.Tensor:
    """The entries of ``tensor`` on the first ``rank`` basis vectors (axes ``first…``)."""
    index = (slice(None),) * first + (slice(0, rank),) * (tensor.ndim - first)
    return tensor[index]


def _parts_of(quantity: str) -> tuple[str, ...]:
    """The quantities whose diagrams make up ``quantity`` (the gap is test − train)."""
    return ("test", "train") if quantity == "gap" else (quantity,)


def _needed_orders(
    order: int, quantities: Iterable[str], schedules: Iterable[Schedule]
) -> tuple[set[int], set[int]]:
    """Derivative orders needed per sample (nodes sharing a part) and as means."""
    per_sample, means = {0}, {0, 2}
    names = {q for quantity in quantities for q in _parts_of(quantity)}
    for name in sorted(names):
        for schedule in schedules:
            for term in resummed_terms(order, schedule, name):
                d = term.diagram
                for v in range(d.nodes):
                    if v == 0 and term.open_root:
                        continue
                    k = len(d.children[v]) + (v != 0)
                    means.add(k)
                    if len(d.parts[d.part_of[v]]) > 1:
                        per_sample.add(k)
    return per_sample, means


def _orthonormalize(
    w: torch.Tensor, basis: list[torch.Tensor], max_cols: int, tol: float
) -> torch.Tensor:
    """Pivoted Gram–Schmidt (twice) of the columns of ``w`` against ``basis`` and each other.

    Columns whose norm after projection falls below ``tol`` times their norm before are
    dropped (deflation); at most ``max_cols`` columns are kept.  The pivot is the first
    column whose relative norm is within ``tol`` of the largest: ties (every column of a
    Lanczos block enters already orthogonal, ratio 1) go by position, not by rounding, so
    the basis does not depend on how the rows were chunked.
    """
    scale = torch.linalg.vector_norm(w, dim=0)
    kept: list[torch.Tensor] = []
    for _ in range(2):
        for q in basis:
            w = w - q @ (q.T @ w)
    while len(kept) < max_cols and w.shape[1]:
        norms = torch.linalg.vector_norm(w, dim=0)
        ratio = norms / scale.clamp_min(torch.finfo(w.dtype).tiny)
        best = int(torch.nonzero(ratio >= ratio.max() * (1 - tol))[0])
        if not norms[best] > tol * scale[best]:
            break
        q = w[:, best] / norms[best]
        for _ in range(2):  # the second pass restores orthogonality lost to rounding
            for b in basis:
                q = q - b @ (b.T @ q)
            for k in kept:
                q = q - k * (k @ q)
            q = q / torch.linalg.vector_norm(q)
        kept.append(q)
        keep = [i for i in range(w.shape[1]) if i != best]
        w, scale = w[:, keep], scale[keep]
        w = w - torch.outer(q, q @ w)
    if not kept:
        return w.new_zeros((w.shape[0], 0))
    return torch.stack(kept, dim=1)


def _block_lanczos(
    hvp: Callable[[torch.Tensor], torch.Tensor],  # (P, b) -> H applied to each column
    start: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    *,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Orthonormal ``Q`` (``P×rank``), ``T = QᵀHQ`` and the residual ``‖HQ − QT‖_F``.

    ``progress`` shows a tqdm bar over the basis vectors (one update per block).
    """
    p = start.shape[0]
    tol = 1e3 * torch.finfo(start.dtype).eps
    blocks: list[torch.Tensor] = []
    columns: list[torch.Tensor] = []
    block = _orthonormalize(start, [], rank, tol)
    residual = 0.0
    cols = 0
    bar = tqdm(total=rank, desc="krylov: lanczos", unit="vec", disable=not progress)
    while True:
        if block.shape[1] == 0:  # invariant subspace (or nothing to start from): go on at random
            need = min(max(start.shape[1], 1), rank - cols)
            noise = torch.randn(p, need, generator=generator, dtype=start.dtype)
            block = _orthonormalize(noise.to(start.device), blocks, need, tol)
        blocks.append(block)
        cols += block.shape[1]
        w = hvp(block)
        bar.update(block.shape[1])
        coeffs = torch.cat([b.T @ w for b in blocks], dim=0)
        for _ in range(2):
            for b in blocks:
                w = w - b @ (b.T @ w)
        if cols >= rank:
            columns.append(coeffs)
            residual = float(torch.linalg.matrix_norm(w))
            break
        columns.append(coeffs)
        block = _orthonormalize(w, blocks, min(start.shape[1] or 1, rank - cols), tol)
    bar.close()
    q = torch.cat(blocks, dim=1)
    upper = torch.zeros(cols, cols, dtype=torch.float64)
    offset = 0
    for c in columns:  # column block j holds Q_{≤j}ᵀ H Q_j: the upper triangle of QᵀHQ
        upper[: c.shape[0], offset : offset + c.shape[1]] = c.to("cpu", torch.float64)
        offset += c.shape[1]
    upper = torch.triu(upper)
    return q, upper + torch.triu(upper, 1).T, residual


def krylov_subspace(
    loss_fn_or_model: Any,
    data: Any,
    theta0: torch.Tensor | None = None,
    *,
    rank: int,
    order: int | Mapping[str, int] = 2,
    quantities: Sequence[str] | str = ("test",),
    schedules: Sequence[Schedule] | Schedule | None = None,
    probes: int = 8,
    seed: int = 0,
    loss: Callable | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    per_sample_gradients: bool = False,
    higher_rank: int | None = None,
    distributed: bool = False,
    progress: bool = False,
) -> KrylovSubspace:
    r"""Build a Krylov subspace of the mean Hessian and project the diagrams' tensors on it.

    The rows of ``data`` are the population (exact averages, as in
    :func:`perturb.predict`).  See the module docstring for the method, the error
    estimate and the cost.

    Args:
        loss_fn_or_model: an ``nn.Module`` (with ``data = (x, y)``), a
            :class:`perturb.numeric.adapters.FlatLoss`, a per-row ``loss_fn(params, row)``, a
            :class:`perturb.Population` (then ``data=None``) or an
            :class:`~perturb.numeric.adapters.Objective` (its rows and point are used).
        data: the rows.
        theta0: the point (a model's own parameters by default).
        rank: ``k``, the dimension of the subspace (at most ``P``).
        order: highest number of edges of the re-summed diagrams to support, or one per
            quantity (``{quantity: order}``, every quantity of ``quantities`` named):
            ``{"test": 3, "gap": 2}`` needs no per-sample third derivatives.
        quantities: any of ``"test"``, ``"train"``, ``"gap"``, ``"displacement"``.
        schedules: the schedules (sizes may be symbolic) whose diagrams to support;
            default online SGD.  GD's diagrams (no path condition) need per-sample
            Hessians ``QᵀH_iQ`` already at order 2: ``n·k`` more products.
        probes: ``m``, random combinations of centred per-sample gradients in the
            starting block (``0`` starts from ``G`` alone).
        seed: seed of the probes and of any restart vectors.
        loss: per-sample loss of a model's output (default cross-entropy).
        chunk_size: rows per vectorized call.  Default: the per-row passes take
            :func:`~perturb.numeric.derivatives.vmap_rows` rows (memory bounded whatever
            ``P``), the summed ones (no per-row ``P``-vector) 256.
        device: where the network is evaluated (default: ``theta0``'s).
        dtype: float64 (default) or float32 for the network evaluations; the projected
            problem is solved in float64.
        per_sample_gradients: project the per-sample gradients even where the diagrams
            do not need them (for error bars from row subsets, :meth:`KrylovSubspace.values`).
        higher_rank: ``k_3 ≤ k``: project the per-sample tensors of order ≥ 2 and the
            mean tensors of order ≥ 3 on the first ``k_3`` basis vectors only (default
            ``k``).  They cost ``n·k_3`` per-sample Hessian-vector products and
            ``k_3(k_3+1)/2`` third-derivative products instead of ``n·k`` and
            ``k(k+1)/2``; the diagrams that need them are evaluated at rank ``k_3``
            (:meth:`KrylovSubspace.ranks`), the others at ``k``.
        distributed: under ``torchrun`` (``W > 1`` ranks, ``n ≥ W``) rank ``r``
            differentiates the rows :func:`~perturb.numeric.distributed.shard` ``(n, r, W)``
            only (``cost["local_rows"]``): mean derivatives are partial sums added over
            the ranks (one all-gather per block of products), per-sample tensors are
            all-gathered; every rank gets the single-process subspace to rounding (which
            nearly invariant blocks amplify, as a change of ``chunk_size`` does).
            Default ``False``; :func:`perturb.measure` splits its estimates' subspace.
        progress: show tqdm bars (on standard error, rank 0 only) over the Lanczos
            basis vectors and over the directions of each projected tensor of order
            ``≥ 2``; the numbers do not depend on it.

    Returns:
        A :class:`KrylovSubspace`.

    Example:
        >>> import torch, perturb
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
        ...                           torch.nn.Linear(3, 2))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> sub = krylov_subspace(net, (x, y), rank=10, probes=2)
        >>> sub.rank, sub.cost["hvps"]
        (10, 10)
    """
    if isinstance(loss_fn_or_model, Objective):
        obj = loss_fn_or_model
    else:
        obj = objective(loss_fn_or_model, data, theta0, loss=loss, dtype=dtype, device=device)
    p, n = obj.size, obj.n
    rank = check_int("rank", rank, minimum=1, maximum=p)
    probes = check_int("probes", probes)
    higher_rank = check_int(
        "higher_rank", rank if higher_rank is None else higher_rank, minimum=1, maximum=rank
    )
    if isinstance(quantities, str):
        quantities = (quantities,)
    quantities = tuple(quantities)
    bad = [q for q in quantities if q not in QUANTITIES]
    if bad or not quantities:
        raise ValueError(f"quantities must be a non-empty subset of {QUANTITIES}, got {quantities}")
    if isinstance(order, Mapping):
        if set(order) != set(quantities):
            raise ValueError(
                f"order by quantity must name exactly the quantities {quantities}, "
                f"got {dict(order)!r}"
            )
        orders = {q: check_int(f"order of {q!r}", order[q], minimum=1) for q in quantities}
    else:
        orders = dict.fromkeys(quantities, check_int("order", order, minimum=1))
    if schedules is None:
        schedules = (Online(),)
    elif isinstance(schedules, Schedule):
        schedules = (schedules,)
    schedules = tuple(schedules)
    for schedule in schedules:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedules must hold Schedules, got {type(schedule).__name__}")
        check_resummable(schedule)
    per_sample, mean_orders = set(), set()
    for q, d in orders.items():
        more_per_sample, more_means = _needed_orders(d, (q,), schedules)
        per_sample |= more_per_sample
        mean_orders |= more_means
    if chunk_size is None:  # per-row passes hold chunk·P numbers, summed ones chunk·activations
        top, size = max(per_sample | {1}), obj.theta0.element_size()
        per_row, chunk_size = vmap_rows(p, itemsize=size, order=top), MAX_VMAP_ROWS
    else:
        per_row = chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    cost: dict[str, float] = {
        "rank": rank,
        "higher_rank": higher_rank,
        "rows": n,
        "parameters": p,
        "hvps": 0,
        "gradients": 0,
        "per_sample_gradients": 0,
        "per_sample_hvps": 0,
        "mean_higher_derivatives": 0,
        "per_sample_higher_derivatives": 0,
    }
    start_time = time.perf_counter()
    theta = obj.theta0
    vector = derivative(summed(obj.batch), vector=True)
    mine = local_share(n, distributed=distributed)  # the rows this rank differentiates
    cost["local_rows"] = len(mine)
    split, here = len(mine) < n, obj
    if split:
        agree = all_ints([n, p, rank, probes, seed, higher_rank])
        same_on_all_ranks("rows, parameters, rank, probes, seed, higher_rank", agree)
        here = obj.select(torch.arange(mine.start, mine.stop, device=obj.rows[0].device))
    progress = progress and not (split and world()[0] > 0)

    def total(partial: torch.Tensor) -> torch.Tensor:  # the sum over the ranks' rows
        return summed_tensor(partial) if split else partial

    def partial_sum(us: tuple[torch.Tensor, ...]) -> torch.Tensor:  # this rank's rows
        acc = torch.zeros_like(theta)
        for s in row_chunks(here.n, chunk_size):
            acc = acc + vector(theta, tuple(r[s] for r in here.rows), us)
        return acc

    def hvp(block: torch.Tensor) -> torch.Tensor:
        cost["hvps"] += block.shape[1]
        # out_dims=0, then transposed: vmap cannot place an output that does not depend on
        # u (H = 0: a linear loss) on axis 1 ("expanded size mismatch")
        return total(vmap(lambda u: partial_sum((u,)), in_dims=1)(block).T) / n

    gen = torch.Generator().manual_seed(seed)
    mean_grad = total(partial_sum(())) / n
    cost["gradients"] += 1
    start = [mean_grad]
    for _ in range(probes):
        signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(theta.device, theta.dtype)
        weighted = total(weighted_gradient(here, signs[mine.start : mine.stop], chunk_size))
        start.append((weighted - signs.sum() * mean_grad) / math.sqrt(n))
        cost["gradients"] += 1
    basis, hessian, residual = _block_lanczos(
        hvp, torch.stack(start, dim=1), rank, gen, progress=progress
    )
    lanczos_seconds = time.perf_counter() - start_time

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64)

    def rows(t: torch.Tensor) -> torch.Tensor:  # every row's values (gathered), float64
        return gathered_rows(t, n) if split else cpu(t)

    losses = torch.cat(
        [here.batch(theta, *(r[s] for r in here.rows)) for s in row_chunks(here.n, chunk_size)]
    )
    derivs = {0: rows(losses)}
    means = {0: derivs[0].mean(), 1: cpu(basis.T @ mean_grad), 2: hessian}
    if 1 in per_sample or per_sample_gradients:
        desc = "krylov: per-sample gradients" if progress else None
        derivs[1] = rows(per_sample_projected(here, basis, (), per_row, desc=desc))
        cost["per_sample_gradients"] += n
    batch = max(1, chunk_size // min(n, chunk_size))  # directions per vectorized call
    high = basis[:, :higher_rank]
    for m in sorted(k for k in per_sample if k >= 2):
        derivs[m] = rows(
            symmetric_projection(
                lambda us: per_sample_projected(here, high, us, per_row),
                high,
                m,
                leading=(here.n,),
                batch=max(1, per_row // min(n, per_row)),
                desc=f"krylov: per-sample order {m}" if progress else None,
            )
        )
        calls = math.comb(higher_rank + m - 2, m - 1) * n
        cost["per_sample_hvps" if m == 2 else "per_sample_higher_derivatives"] += calls
    for m in sorted(k for k in mean_orders if k >= 3):
        partial = symmetric_projection(
            lambda us: high.T @ partial_sum(us), high, m, leading=(), batch=batch,
            desc=f"krylov: mean order {m}" if progress else None,
        )  # fmt: skip
        means[m] = total(partial) / n
        cost["mean_higher_derivatives"] += math.comb(higher_rank + m - 2, m - 1)
    cost["lanczos_seconds"] = lanczos_seconds
    cost["seconds"] = time.perf_counter() - start_time
    return KrylovSubspace(
        basis=basis,
        hessian=hessian,
        derivs=derivs,
        means=means,
        order=max(orders.values()),
        quantities=quantities,
        block_size=1 + probes,
        residual=residual,
        cost=cost,
    )
