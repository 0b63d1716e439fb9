"""Numeric evaluation of the re-summed diagrams: exact sums over embeddings with torch.

The symbolic half (which diagrams survive re-summation, their prefactors, edges and time
units) is :mod:`perturb.symbolic.resummed`; this module evaluates them on tensors: the
sums over embeddings ``h_{T-j}(1, y_1..y_j)`` by powers of a bidiagonal matrix, the time
integrals of Remark 2, and the re-summed value of a quantity in an eigenbasis of ``H``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import torch

from perturb.numeric.predictions import warn_if_unstable
from perturb.symbolic.contractions import (
    contract_moment_network,
    default_einsum,
    refinements_of,
    rows_of,
)
from perturb.symbolic.embeddings import EpochOrders
from perturb.symbolic.resummed import ResummedTerm, resummed_terms
from perturb.symbolic.schedules import Schedule

__all__ = [
    "complete_homogeneous",
    "epoch_time_sum",
    "open_network",
    "resummed_by_quantity",
    "resummed_values",
    "time_integral",
    "time_sum",
]


def complete_homogeneous(zs: torch.Tensor, n: int) -> torch.Tensor:
    """``h_n(z_0, …, z_j)`` along the last axis, by powers of a bidiagonal matrix.

    ``h_n(z_0..z_j)`` is the corner entry ``(B^{n+j})_{j,0}`` of the lower bidiagonal
    ``B = diag(z) + (unit sub-diagonal)``; the power is taken by repeated squaring
    (``O(log n)`` products) on the lower-triangular entries held as separate tensors, so
    every product is ``O(j³)`` elementwise operations over the batch.

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
    return _complete_homogeneous_list(list(zs.unbind(-1)), n)


def _complete_homogeneous_list(zs: list, n: int) -> torch.Tensor:
    """:func:`complete_homogeneous` of ``z_0..z_j`` given one by one (tensors that
    broadcast together, or the number ``1.0``), broadcast to their common shape."""
    j = len(zs) - 1
    tensors = [z for z in zs if isinstance(z, torch.Tensor)]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    ref = tensors[0] if tensors else torch.ones((), dtype=torch.float64)
    full = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    if n < 0:
        return full
    if j == 0:
        return full + zs[0] ** n
    size = j + 1
    base: dict[tuple[int, int], torch.Tensor | float] = {(i, i): z for i, z in enumerate(zs)}
    base.update({(i + 1, i): 1.0 for i in range(j)})
    result = None
    power = n + j
    while power:
        if power & 1:
            result = base if result is None else _lower_product(result, base, size)
        power >>= 1
        if power:
            base = _lower_product(base, base, size)
    return full + result[j, 0]


def _times(x, y):
    """``x·y`` where either may be the number ``1.0`` (no tensor operation then)."""
    if isinstance(x, float) and x == 1.0:
        return y
    if isinstance(y, float) and y == 1.0:
        return x
    return x * y


def _lower_product(a: dict, b: dict, size: int) -> dict:
    """The product of two lower-triangular matrices held as ``{(row, column): entry}``
    (entries broadcast; the number ``1.0`` costs nothing)."""
    out = {}
    for r in range(size):
        for c in range(r + 1):
            acc = None
            for m in range(c, r + 1):
                x, y = a.get((r, m)), b.get((m, c))
                if x is not None and y is not None:
                    term = _times(x, y)
                    acc = term if acc is None else acc + term
            if acc is not None:
                out[r, c] = acc
    return out


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

    Fixed-order epochs (:class:`~perturb.symbolic.resummed.EpochOrders`) go to
    :func:`epoch_time_sum`.
    """
    if isinstance(orders, EpochOrders):
        return epoch_time_sum(orders, xs, steps)
    shape = torch.broadcast_shapes(*(x.shape for x in xs)) if xs else ()
    ref = xs[0] if xs else torch.ones((), dtype=torch.float64)
    total = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    for j, spans in orders:
        factor = 1.0  # each factor keeps only the axes of the edges it involves
        for x, (a, b) in zip(xs, spans, strict=True):
            if b - a - 1:
                factor = _times(factor, x ** (b - a - 1))
        zs = [1.0]
        for i in range(1, j + 1):
            y = 1.0
            for x, (a, b) in zip(xs, spans, strict=True):
                if a <= i < b:
                    y = _times(y, x)
            zs.append(y)
        if not any(isinstance(z, torch.Tensor) for z in zs):
            zs[0] = torch.ones((), dtype=ref.dtype, device=ref.device)
        total = total + _times(factor, _complete_homogeneous_list(zs, steps - j))
    return total


def epoch_time_sum(orders: EpochOrders, xs: list[torch.Tensor], steps: int) -> torch.Tensor:
    """The exact sum over multi-epoch embeddings of ``Π_e x_e^{t_p − t_c − 1}``.

    ``E`` epochs of ``M`` batches, ``T = M·E``; a node at epoch ``e`` whose training point
    sits in batch ``m`` of that epoch is at step ``t = e·M + m``.  Each group of
    :attr:`~perturb.symbolic.resummed.EpochOrders.groups` (a weak order of the nodes'
    epochs with ``k`` levels and, per batch coordinate ``c``, of the batch indices with
    ``j_c`` levels: one coordinate in a fixed order, one per epoch level when reshuffled)
    is

        weight · Π_e x_e^{c_e} (x_e^M)^{β_e−α_e−1} · Π_c h_{M−j_c}(y_c) · h_{E−k}(w),

    ``y_{c,i} = Π_e x_e^{(batch-gap multiplicity)}``, ``w_i = Π_e (x_e^M)^{(epoch-gap
    multiplicity)}`` (:meth:`~perturb.symbolic.resummed.EpochGroup.exponents`).  Groups
    with equal exponents are merged and each ``h`` is computed once: by its recursion for
    degree ≤ 16, else by :func:`complete_homogeneous` (``O(log M + log E)`` matrix
    products), so ``T = 10^5`` costs what ``T = 10^2`` does.

    Args:
        orders: an :class:`~perturb.symbolic.resummed.EpochOrders`.
        xs: one broadcastable tensor of ``1 − ηh`` values per edge.
        steps: ``T``, a multiple of ``M``.

    Example:
        >>> import torch
        >>> from perturb.symbolic.resummed import resummed_terms
        >>> from perturb.symbolic.schedules import Epochs
        >>> s = Epochs(train_size=3, batch_size=1, epochs=2)  # M = 3, T = 6
        >>> leaf = [t for t in resummed_terms(1, s) if t.diagram.edges == 1][0]
        >>> x = torch.tensor(0.5, dtype=torch.float64)
        >>> float(epoch_time_sum(leaf.orders, [x], 6))  # Σ_{t<6} 0.5^{5−t}
        1.96875
    """
    m = int(orders.batches_per_epoch)
    if steps % m:
        raise ValueError(f"steps must be a multiple of M = {m}, got {steps}")
    epochs = steps // m
    shape = torch.broadcast_shapes(*(x.shape for x in xs))
    ref = xs[0] if xs else torch.ones((), dtype=torch.float64)
    bases = {False: xs, True: [x**m for x in xs]}
    merged: dict = {}  # groups with the same exponents add their weights
    for group in orders.groups:
        key = (group.exponents(), group.batches, group.epochs)
        merged[key] = merged.get(key, 0.0) + float(group.weight)
    cache: dict = {}

    def h(power_of_m: bool, gaps: tuple, n: int) -> torch.Tensor:
        if (power_of_m, gaps, n) not in cache:
            zs = [_power_product(bases[power_of_m], col, shape, ref) for col in gaps]
            cache[power_of_m, gaps, n] = _complete_homogeneous_any(zs, n)
        return cache[power_of_m, gaps, n]

    total = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    for ((consts, mults, batch, epoch), batches, k), weight in merged.items():
        if weight == 0.0:
            continue
        factor = torch.full(shape, weight, dtype=ref.dtype, device=ref.device)
        for x, xm, c, q in zip(xs, bases[True], consts, mults, strict=True):
            factor = factor * x**c * xm**q
        for gaps, j in zip(batch, batches, strict=True):
            factor = factor * h(False, gaps, m - j)
        total = total + factor * h(True, epoch, epochs - k)
    return total


_SMALL_DEGREE = 16  # below this, the recursion in the number of variables is cheaper


def _complete_homogeneous_any(zs: list[torch.Tensor], n: int) -> torch.Tensor:
    """``h_n(z_0..z_j)``: the recursion for small ``n``, else :func:`complete_homogeneous`."""
    if n < 0:
        return torch.zeros_like(zs[0])
    if n > _SMALL_DEGREE:
        return _complete_homogeneous_list(zs, n)
    row = [torch.ones_like(zs[0])] + [torch.zeros_like(zs[0])] * n
    for z in zs:
        for i in range(1, n + 1):
            row[i] = row[i] + z * row[i - 1]
    return row[n]


def _power_product(bases: list[torch.Tensor], powers, shape, ref) -> torch.Tensor:
    """``Π_e bases_e^{powers_e}`` broadcast to ``shape``."""
    out = torch.ones(shape, dtype=ref.dtype, device=ref.device)
    for base, p in zip(bases, powers, strict=True):
        if p:
            out = out * base**p
    return out


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

    Raises:
        ValueError: several epochs of several batches, which have no integral form here.
    """
    if isinstance(orders, EpochOrders):
        raise ValueError(
            "Remark 2's integral form is implemented for online SGD and full-batch GD; for "
            "several epochs of several batches use the exact sums (integral=False)"
        )
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
    lr: float | Sequence[float] | torch.Tensor,
    steps: int | Sequence[int],
    schedule: Schedule,
    means: Mapping[int, torch.Tensor] | None = None,
    eigh: tuple[torch.Tensor, torch.Tensor] | None = None,
    integral: bool = False,
    rotated: bool = False,
    warn: bool = True,
    networks: dict | None = None,
) -> list[torch.Tensor]:
    r"""Exact re-summed contributions by number of edges, via a full eigendecomposition.

    In the eigenbasis ``H = V diag(h) Vᵀ`` a term with ``d`` edges is
    ``prefactor · η^d · Σ_{a_1..a_d} N_{a_1..a_d} · S_T(x_{a_1}, …, x_{a_d})``, ``N`` the
    cumulant network with its edge indices open (:func:`open_network`), ``S_T`` the sum over
    embeddings (:func:`time_sum`) and ``x = 1 − ηh``.  ``N`` depends on neither ``η`` nor
    ``T``: it is built once per term (the inputs rotated once, lazily) and contracted with
    the weights of a whole grid of learning rates and steps, the weights computed for all
    learning rates in one vectorized call per ``T`` (no loop over steps: ``T = 10⁵`` costs
    what ``T = 10²`` does).  Where the root is the mean Hessian alone in its part
    (``diag(h)`` in the eigenbasis) its two edges carry one index, so the network and the
    weights have one axis fewer (``tr(C H)``, ``G·H·G``: ``P`` numbers instead of ``P²``).

    Args:
        terms: from :func:`resummed_terms`.
        derivs: per-sample derivative tensors (float64 torch), ``{k: (n, P, …)}``.
        lr: η, or a 1-D grid of learning rates.
        steps: ``T``, or a 1-D grid of numbers of steps (the terms' prefactors must not
            depend on ``T``: those of the online train loss, ``1/N = 1/(TB)``, do).
        schedule: the (numeric) schedule the terms were built for.
        means: optional mean tensors ``{k: (P, …)}``; nodes alone in their part use
            them, so per-sample tensors are needed only for orders that occur in
            multi-node parts.  ``means[2]`` (else the mean of ``derivs[2]``) is ``H``.
        eigh: ``torch.linalg.eigh(H)`` if already computed (reused across calls).
        integral: use Remark 2's integrals of exponentials (:func:`time_integral`)
            instead of the exact sums over steps.
        rotated: ``derivs`` and ``means`` are already expressed in the eigenbasis
            ``eigh[1]`` (which then only rotates a displacement back).
        warn: issue an :class:`~perturb.numeric.predictions.UnstableDirectionWarning`
            where some ``|1 − ηh| > 1`` (:func:`~perturb.numeric.predictions.growth`).
        networks: a dict in which to keep each term's open network between calls with
            the same tensors (the network depends on the diagram, not on ``η``, ``T`` or
            the schedule's time structure): later calls, for other steps or schedules,
            skip the contractions.  The caller owns it and must not share it between
            different tensors.

    Returns:
        One value per number of edges ``0..order``, each of shape ``lr.shape +
        steps.shape`` (scalars for a scalar ``lr`` and ``steps``), then ``(P,)`` for
        displacement.

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
        >>> grid = resummed_values(resummed_terms(2, s), derivs, lr=[0.05, 0.1], steps=[10, 50],
        ...                        schedule=s)
        >>> tuple(grid[2].shape), abs(float(sum(grid)[1, 1] - sum(parts))) < 1e-15
        ((2, 2), True)
    """
    if not schedule.is_numeric:
        raise ValueError("resummed_values needs a schedule with numeric sizes")
    means = dict(means or {})
    if eigh is None:
        eigh = torch.linalg.eigh(means[2] if 2 in means else derivs[2].mean(0))
    evals, evecs = eigh
    lrs = torch.as_tensor(lr, dtype=evals.dtype, device=evals.device)
    lr_shape = tuple(lrs.shape)
    lrs = lrs.reshape(-1)
    step_list = [int(t) for t in torch.as_tensor(steps).reshape(-1).tolist()]
    step_shape = tuple(torch.as_tensor(steps).shape)
    if warn:
        warn_if_unstable(evals, lrs, max(step_list), integral=integral, stacklevel=3)
    inputs = _EigenInputs(derivs, means, evals, evecs, rotated=rotated)
    order = max(t.diagram.edges for t in terms)
    tail = (evals.shape[0],) if any(t.open_root for t in terms) else ()
    zero = torch.zeros((len(lrs), len(step_list), *tail), dtype=evals.dtype, device=evals.device)
    out = [zero] * (order + 1)
    rate = lrs[:, None] * evals[None, :]  # (L, P)
    base = rate if integral else 1 - rate
    for term in terms:
        d = term.diagram.edges
        if networks is None:
            network, axes = inputs.network(term)
        else:
            key = (term.diagram.parents, term.diagram.parts, term.open_root)
            if key not in networks:
                networks[key] = inputs.network(term)
            network, axes = networks[key]
        value = _contract_over_time(term, network, axes, base, step_list, integral=integral)
        if term.open_root:
            value = value @ evecs.T  # back from the eigenbasis, (L, S, P)
        scale = (float(term.prefactor) * lrs**d).reshape(-1, 1, *(1,) * len(tail))
        out[d] = out[d] + scale * value
    return [v.reshape((*lr_shape, *step_shape, *tail)) for v in out]


_WEIGHT_BUDGET = 2**23  # most entries of one batch of bidiagonal matrices (64 MiB in float64)


def _contract_over_time(term, network, axes, base, steps, *, integral):
    """``Σ N · S_T`` for every learning rate (rows of ``base``) and ``T``: ``(L, S[, P])``."""
    d = len(axes)
    n_lr = base.shape[0]
    if not d:
        return network.expand(n_lr, len(steps))
    ndim, p = network.ndim, base.shape[1]
    letters = string.ascii_lowercase[:ndim]
    out_letters = "z" + (letters[axes[0]] if term.open_root else "")
    if isinstance(term.orders, tuple):
        width = max(j for j, _ in term.orders) + 1
    else:  # the epoch structure: a larger matrix per entry
        width = 8
    chunk = max(1, _WEIGHT_BUDGET // (network.numel() * width * width))
    per_step = []
    for steps_t in steps:
        parts = []
        for start in range(0, n_lr, chunk):
            rows = base[start : start + chunk]
            xs = [
                rows.reshape(rows.shape[0], *(p if i == axes[e] else 1 for i in range(ndim)))
                for e in range(d)
            ]
            if integral:
                weights = time_integral(term.orders, xs, float(steps_t))
            else:
                weights = time_sum(term.orders, xs, steps_t)
            parts.append(torch.einsum(f"{letters},z{letters}->{out_letters}", network, weights))
        per_step.append(torch.cat(parts))
    return torch.stack(per_step, dim=1)


class _Rotated(Mapping):
    """Tensors expressed in an eigenbasis on first use (parameter axes from ``first`` on)."""

    def __init__(self, source, evecs, first, fixed=None):
        self.source, self.evecs, self.first = source, evecs, first
        self.cache = dict(fixed or {})

    def __getitem__(self, k):
        if k not in self.cache:
            self.cache[k] = _rotate(self.source[k], self.evecs, first=self.first)
        return self.cache[k]

    def __contains__(self, k):
        return k in self.cache or k in self.source

    def __iter__(self):
        return iter(set(self.source) | set(self.cache))

    def __len__(self):
        return len(set(self.source) | set(self.cache))


class _EigenInputs:
    """The inputs of :func:`resummed_values` and the open network of each term."""

    def __init__(self, derivs, means, evals, evecs, *, rotated):
        self.n = rows_of(derivs)
        diag = {2: torch.diag(evals)}  # H in its own eigenbasis, exactly
        if rotated:
            self.rot = dict(derivs)
            self.rot_means = {**means, **diag}
        else:
            self.rot = _Rotated(derivs, evecs, 1)
            self.rot_means = _Rotated(means, evecs, 0, fixed=diag)
        self.einsum = default_einsum(derivs)

    def network(self, term: ResummedTerm) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The open network in the eigenbasis and the network axis of each edge."""
        d = term.diagram
        tie = _root_tie(term)
        einsum = self.einsum if tie is None else _tied_einsum(self.einsum, tie)
        total = None
        for blocks, weight in refinements_of(d.parts, open_root=term.open_root):
            value = contract_moment_network(
                d.parents, blocks, term.open_root, self.rot, self.n, einsum, self.rot_means,
                keep_edges=True,
            )  # fmt: skip
            value = value * weight
            total = value if total is None else total + value
        axes = list(range(d.edges))
        if tie is not None:
            first, second = tie
            axes = [a - (a > second) for a in axes]
            axes[second] = axes[first]
        return total, tuple(axes)


def _root_tie(term: ResummedTerm) -> tuple[int, int] | None:
    """The two edges at a root that is the mean Hessian (diagonal in the eigenbasis)."""
    d = term.diagram
    children = d.children[0]
    if term.open_root or len(children) != 2 or len(d.parts[d.part_of[0]]) != 1:
        return None
    return children[0] - 1, children[1] - 1


def _tied_einsum(einsum, tie: tuple[int, int]):
    """``einsum`` with the second edge's index renamed to the first's (a diagonal)."""

    def tied(spec: str, *operands):
        out = spec.split("->")[1]
        spec = spec.replace(out[tie[1]], out[tie[0]])
        inputs, out = spec.split("->")
        out = "".join(dict.fromkeys(out))
        return einsum(f"{inputs}->{out}", *operands)

    return tied


def resummed_by_quantity(
    derivs: Mapping[int, torch.Tensor],
    schedule: Schedule,
    quantity: str,
    *,
    order: int,
    lr: float | Sequence[float] | torch.Tensor,
    integral: bool = False,
    means: Mapping[int, torch.Tensor] | None = None,
    eigh: tuple[torch.Tensor, torch.Tensor] | None = None,
    rotated: bool = False,
    warn: bool = True,
    networks: dict | None = None,
) -> list[torch.Tensor]:
    """:func:`resummed_values` of ``quantity``, the gap as test minus train.

    Args:
        derivs: per-sample tensors, as for :func:`resummed_values`.
        schedule: a numeric online or GD schedule.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        order: highest number of edges.
        lr: η, or a 1-D grid of learning rates (one batched evaluation).
        integral: Remark 2's integral form.
        means: mean tensors, as for :func:`resummed_values`.
        eigh: ``torch.linalg.eigh(H)``, computed here when not given.
        rotated: the tensors are already in the eigenbasis ``eigh[1]``.
        warn: warn about unstable directions (:func:`resummed_values`).
        networks: a cache of open networks (:func:`resummed_values`); the gap's two
            halves share it.

    Returns:
        One value per number of edges ``0..order``, each of shape ``lr.shape`` (then
        ``(P,)`` for displacement).

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
    if eigh is None:
        hess = means[2] if means and 2 in means else derivs[2].mean(0)
        eigh = torch.linalg.eigh(hess)
    if quantity == "gap":
        if not rotated:  # rotate once for both halves
            derivs = {k: _rotate(t, eigh[1], first=1) for k, t in derivs.items()}
            means = {k: _rotate(t, eigh[1], first=0) for k, t in (means or {}).items() if k != 2}
        kw = {"order": order, "lr": lr, "integral": integral, "means": means, "eigh": eigh,
              "networks": networks}  # fmt: skip
        test = resummed_by_quantity(derivs, schedule, "test", rotated=True, warn=warn, **kw)
        train = resummed_by_quantity(derivs, schedule, "train", rotated=True, warn=False, **kw)
        return [a - b for a, b in zip(test, train, strict=True)]
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
        rotated=rotated,
        warn=warn,
        networks=networks,
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
