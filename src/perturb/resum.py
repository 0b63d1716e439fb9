"""Re-summation: predictions that stay finite for large ηT.

In the cumulant form, a non-root node with one child that sits alone in its part
is the mean Hessian ``H`` at some step.  Chains of such nodes along an edge whose
endpoints sit at steps ``t < t'`` sum, over the ``t' − t − 1`` steps in between, to

    Σ_k C(t'−t−1, k) (−ηH)^k = K^{t'−t−1},   K = I − ηH,

so the *re-summed* diagrams are the diagrams without such nodes, each edge carrying
``η K^{Δt−1}`` instead of ``η`` (the root sits at step ``T``).  Their value depends
on the steps of the embedding, not only on how many there are.  In an eigenbasis
``H = Σ_μ h_μ v_μ v_μᵀ`` an edge with eigen-index ``μ`` carries ``x_μ^{Δt−1}`` with
``x_μ = 1 − ηh_μ``.

Exact sums over embeddings.  Group embeddings by the weak order of their *time
units* (a part in online SGD, where all nodes of a part share a step; a node in GD,
where every step sees every point), with ``j`` distinct times
``0 ≤ τ_1 < … < τ_j ≤ T−1``.  An edge from level ``a`` to level ``b`` (``b = j+1``
for the root) spans the gaps ``a … b−1``; with ``y_i`` the product of ``x_e`` over
the edges spanning gap ``i``,

    Σ_τ Π_e x_e^{τ_b − τ_a − 1} = Π_e x_e^{b_e − a_e − 1} · h_{T−j}(1, y_1, …, y_j),

where ``h_n`` is the complete homogeneous symmetric polynomial; at ``η = 0`` it is
``C(T, j)``, the un-resummed count.  ``h_n(z_0..z_j)`` is the divided difference of
``z^{n+j}`` and equals the corner entry of the ``(n+j)``-th power of the bidiagonal
matrix with diagonal ``z`` and unit sub-diagonal (Opitz), computed by repeated
squaring: ``O(log T)`` products, stable when the ``z`` nearly coincide, and the
same cost for ``T = 10^5`` as for ``T = 10^2``.

Supported schedules: online SGD (any batch size) and full-batch GD.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp
import torch

from perturb.contractions import (
    Contraction,
    _default_einsum,
    _moment_network,
    _refinements_of,
    _rows,
)
from perturb.diagrams import Diagram, _check_order, _labelled_partitions, rooted_trees
from perturb.schedules import Schedule

__all__ = [
    "ResummedTerm",
    "complete_homogeneous",
    "resummed_by_quantity",
    "resummed_terms",
    "resummed_values",
    "time_integral",
    "time_sum",
    "time_sum_exact",
]


@dataclass(frozen=True)
class ResummedTerm:
    """One re-summed diagram with the time structure of its embeddings.

    Attributes:
        diagram: the diagram (no singleton one-child non-root nodes).
        prefactor: ``(−1/B)^d · B^{#parts} / |Aut(tree)|`` (``/N`` for the train loss,
            times ``N`` for a train-root part that holds the root alone), a sympy number.
        edges: the edges as ``(child, parent)`` pairs, in the order of the eigen-indices.
        orders: one entry per weak order of the time units: ``(j, spans)`` where
            ``spans[e] = (a_e, b_e)`` are the levels of edge ``e``'s child and parent.
        open_root: the root is a free index (displacement).
    """

    diagram: Diagram
    prefactor: sp.Expr
    edges: tuple[tuple[int, int], ...]
    orders: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    open_root: bool = False

    @property
    def contraction(self) -> Contraction:
        """The diagram's tensor network (edges carry ``η K^{Δt−1}``)."""
        d = self.diagram
        return Contraction(parents=d.parents, parts=d.parts, open_root=self.open_root)

    def time_integral_expr(self, steps: sp.Expr) -> sp.Expr:
        """Remark 2's integral form of :meth:`time_sum_expr`, in rates ``r_a = ηh_a``.

        Example:
            >>> import sympy as sp
            >>> from perturb.schedules import Online
            >>> skew = [t for t in resummed_terms(3, Online(batch_size=1))
            ...         if t.contraction.text == "J:S"][0]
            >>> skew.time_integral_expr(sp.Symbol("T"))
            (1 - exp(T*(-r_a - r_b - r_c)))/(r_a + r_b + r_c)
        """
        rs = [sp.Symbol(f"r_{string.ascii_lowercase[i]}") for i in range(len(self.edges))]
        total = sp.Integer(0)
        for j, spans in self.orders:
            lams = [sp.Integer(0)] + [
                sp.Add(*(r for r, (a, b) in zip(rs, spans, strict=True) if a <= i < b))
                for i in range(1, j + 1)
            ]
            if j == 1:  # the common case, in the paper's form (1 − e^{−λT})/λ
                total += (1 - sp.exp(-lams[1] * steps)) / lams[1]
            else:
                total += _divided_difference_exp(lams, steps)
        return total

    def time_sum_expr(self, steps: sp.Expr) -> sp.Expr:
        """The sum over embeddings as a sympy expression in ``x_a = 1 − η h_a``.

        One symbol ``x_a`` per edge, named by the edge's letter; closed forms of the
        geometric sums by divided differences (valid where the ``y`` differ).

        Example:
            >>> import sympy as sp
            >>> from perturb.schedules import Online
            >>> skew = [t for t in resummed_terms(3, Online(batch_size=1))
            ...         if t.contraction.text == "J:S"][0]
            >>> sp.simplify(skew.time_sum_expr(sp.Symbol("T")))
            ((x_a*x_b*x_c)**T - 1)/(x_a*x_b*x_c - 1)
        """
        xs = [sp.Symbol(f"x_{string.ascii_lowercase[i]}") for i in range(len(self.edges))]
        total = sp.Integer(0)
        for j, spans in self.orders:
            factor = sp.Mul(*(x ** (b - a - 1) for x, (a, b) in zip(xs, spans, strict=True)))
            ys = [sp.Integer(1)] + [
                sp.Mul(*(x for x, (a, b) in zip(xs, spans, strict=True) if a <= i < b))
                for i in range(1, j + 1)
            ]
            total += factor * _divided_difference_power(ys, steps)
        return total


def time_sum_exact(orders, xs: list[sp.Expr], steps: int) -> sp.Expr:
    """:func:`time_sum` in exact sympy arithmetic, for any values (equal ones too).

    Example:
        >>> import sympy as sp
        >>> x = sp.Symbol("x")
        >>> sp.expand(time_sum_exact(((1, ((1, 2),)),), [x], 3))
        x**2 + x + 1
    """
    total = sp.Integer(0)
    for j, spans in orders:
        factor = sp.Mul(*(x ** (b - a - 1) for x, (a, b) in zip(xs, spans, strict=True)))
        zs = [sp.Integer(1)] + [
            sp.Mul(*(x for x, (a, b) in zip(xs, spans, strict=True) if a <= i < b))
            for i in range(1, j + 1)
        ]
        if steps - j < 0:
            continue
        z = sp.zeros(j + 1, j + 1)
        for i, zi in enumerate(zs):
            z[i, i] = zi
            if i:
                z[i, i - 1] = 1
        total += factor * (z ** (steps))[j, 0]
    return total


def _divided_difference_exp(lams: list[sp.Expr], steps: sp.Expr) -> sp.Expr:
    """``∫_{Σg=T} Π e^{−λ_i g_i} = Σ_i e^{−λ_i T} / Π_{k≠i} (λ_k − λ_i)`` (distinct λ)."""
    out = sp.Integer(0)
    for i, li in enumerate(lams):
        den = sp.Mul(*(lk - li for k, lk in enumerate(lams) if k != i))
        out += sp.exp(-li * steps) / den
    return out


def _divided_difference_power(zs: list[sp.Expr], steps: sp.Expr) -> sp.Expr:
    """``h_{T−j}(z_0..z_j) = Σ_i z_i^T / Π_{k≠i} (z_i − z_k)`` for distinct ``z``."""
    out = sp.Integer(0)
    for i, zi in enumerate(zs):
        den = sp.Mul(*(zi - zk for k, zk in enumerate(zs) if k != i))
        out += zi**steps / den
    return out


def _time_units(schedule: Schedule, diagram: Diagram, train: bool) -> tuple[list, dict]:
    """Time units and the unit of each non-root node."""
    if schedule.batches == 1:  # GD: every node has its own step
        units = list(range(1, diagram.nodes))
        return units, {v: v for v in units}
    unit_of = {}
    units = []
    for i, part in enumerate(diagram.parts):
        members = [v for v in part if v != 0]
        if members:
            units.append(i)
            unit_of.update({v: i for v in members})
    return units, unit_of


def _level_assignments(units: list, below: dict) -> list[dict]:
    """Every weak order of ``units`` with ``below[u]`` strictly lower than ``u``."""
    out: list[dict] = []

    def rec(remaining: frozenset, level: int, acc: dict) -> None:
        if not remaining:
            out.append(dict(acc))
            return
        minimal = [u for u in sorted(remaining) if not (below.get(u, set()) & remaining)]
        for r in range(1, len(minimal) + 1):
            for chosen in itertools.combinations(minimal, r):
                for u in chosen:
                    acc[u] = level
                rec(remaining - frozenset(chosen), level + 1, acc)
                for u in chosen:
                    del acc[u]

    rec(frozenset(units), 1, {})
    return out


def _supported(schedule: Schedule) -> None:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    if not (schedule.single_epoch or schedule.batches == 1):
        raise ValueError(
            "re-summation supports online SGD (one epoch) and full-batch GD; got "
            f"{schedule.name} with {schedule.epochs} epochs of {schedule.batches} batches"
        )
    if schedule.shuffle and not schedule.single_epoch:
        raise ValueError("re-summation of reshuffled multi-epoch schedules is not supported")


def resummed_terms(order: int, schedule: Schedule, quantity: str = "test") -> list[ResummedTerm]:
    """The re-summed diagrams with up to ``order`` edges and their time structure.

    Args:
        order: highest number of edges.
        schedule: :func:`perturb.Online` or :func:`perturb.GD` (sizes may be symbolic).
        quantity: ``"test"``, ``"train"`` or ``"displacement"``.

    Returns:
        One :class:`ResummedTerm` per labelled partition of each tree.

    Example:
        >>> from perturb.schedules import Online
        >>> sorted({t.contraction.text for t in resummed_terms(2, Online())})
        ['G·G', 'G·H·G', 'l', 'tr(C H)']
    """
    _check_order(order)
    _supported(schedule)
    if quantity not in ("test", "train", "displacement"):
        raise ValueError(
            f"quantity must be one of 'test', 'train', 'displacement', got {quantity!r}"
        )
    train = quantity == "train"
    open_root = quantity == "displacement"
    out: list[ResummedTerm] = []
    for d in range(order + 1):
        for parents in rooted_trees(d + 1):
            if open_root and (d == 0 or parents.count(0) != 1):
                continue
            tree = Diagram(parents=parents, parts=tuple((v,) for v in range(d + 1)))
            for parts in _labelled_partitions(
                parents, quantity="train" if train else "test", path_condition=schedule.single_epoch
            ):
                diagram = Diagram(parents=parents, parts=parts)
                if any(
                    len(diagram.children[v]) == 1 and len(parts[diagram.part_of[v]]) == 1
                    for v in range(1, d + 1)
                ):
                    continue
                term = _term(schedule, diagram, tree.tree_automorphisms, train, open_root)
                if term is not None:
                    out.append(term)
    return out


def _term(schedule, diagram, aut, train, open_root) -> ResummedTerm | None:
    d = diagram.edges
    units, unit_of = _time_units(schedule, diagram, train)
    below: dict = {}
    for v in range(1, diagram.nodes):
        p = diagram.parents[v]
        if p > 0:
            if unit_of[v] == unit_of[p]:
                return None
            below.setdefault(unit_of[p], set()).add(unit_of[v])
    edges = tuple((v, diagram.parents[v]) for v in range(1, diagram.nodes))
    orders = []
    for levels in _level_assignments(units, below):
        j = max(levels.values(), default=0)
        spans = tuple(
            (levels[unit_of[v]], j + 1 if p == 0 else levels[unit_of[p]]) for v, p in edges
        )
        orders.append((j, spans))
    if not orders:  # the part constraints are cyclic: no embedding
        return None
    b = schedule.batch_size
    prefactor = sp.Integer(-1) ** d / b**d / aut
    data_parts = [p for p in diagram.parts if train or 0 not in p]
    for part in data_parts:
        prefactor *= schedule.train_size if part == (0,) else b
    if train:
        prefactor /= schedule.train_size
    return ResummedTerm(
        diagram=diagram,
        prefactor=sp.nsimplify(prefactor),
        edges=edges,
        orders=tuple(orders),
        open_root=open_root,
    )


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
        >>> from perturb.schedules import Online
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
        network = _open_network(term, rotated, rotated_means)
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
        >>> from perturb.schedules import Online
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


def _open_network(
    term: ResummedTerm, rotated: Mapping[int, object], means: Mapping[int, object] | None = None
):
    """The cumulant network with every edge index left open (edges in node order)."""
    d = term.diagram
    einsum = _default_einsum(rotated)
    n = _rows(rotated)
    total = None
    for blocks, weight in _refinements_of(d.parts, open_root=term.open_root):
        value = _moment_network(
            d.parents, blocks, term.open_root, rotated, n, einsum, means, keep_edges=True
        )
        value = value * weight
        total = value if total is None else total + value
    return total


def resummed_report(
    order: int,
    schedule: Schedule,
    quantity: str = "test",
    *,
    fmt: str = "text",
    integral: bool = False,
):
    """The re-summed diagrams of ``quantity`` with their exact sums over embeddings.

    Each line is ``η^d · prefactor · Σ_{indices} (tensor network) · S(x)``: the
    network in index notation with one letter per edge, summed over an eigenbasis of
    ``H``, and ``S`` the exact sum over embeddings in ``x_a = 1 − η h_a`` (``h_a`` the
    eigenvalue of edge ``a``'s index), symbolic in ``T``.

    Args:
        order: highest number of edges.
        schedule: online SGD or GD.
        quantity: ``"test"``, ``"train"`` or ``"displacement"``.
        fmt: ``"text"``, ``"latex"`` or ``"json"``.
        integral: print Remark 2's integrals of exponentials in ``r_a = ηh_a`` instead
            of the exact sums in ``x_a``.

    Example:
        >>> from perturb.schedules import Online
        >>> lines = resummed_report(3, Online(batch_size=1)).splitlines()
        >>> print(next(line for line in lines if "S_(a,b,c)" in line))
        η^3·(-1/6)·Σ J_abc S_(a,b,c) · (x_a**T*x_b**T*x_c**T - 1)/(x_a*x_b*x_c - 1)
    """
    import json

    if fmt not in ("text", "latex", "json"):
        raise ValueError(f"fmt must be one of 'text', 'latex', 'json', got {fmt!r}")
    steps = schedule.steps
    steps = sp.Symbol("T", positive=True, integer=True) if not steps.is_number else steps
    records = []
    for term in resummed_terms(order, schedule, quantity):
        network = term.contraction
        text, tex = network._einstein(network._names())
        if not term.edges:
            time = sp.Integer(1)
        elif integral:
            time = term.time_integral_expr(steps)
        else:
            time = sp.factor(sp.simplify(term.time_sum_expr(steps)))
        records.append((term.diagram.edges, sp.factor(term.prefactor), text, tex, time))
    if fmt == "json":
        return json.dumps(
            [
                {"edges": d, "prefactor": str(p), "network": t, "latex": x, "time_sum": str(s)}
                for d, p, t, x, s in records
            ],
            indent=2,
            ensure_ascii=False,
        )
    if fmt == "latex":
        return " \\\\\n".join(
            rf"\eta^{{{d}}} \left({sp.latex(p)}\right) \sum {x} \; {sp.latex(s)}"
            for d, p, _, x, s in records
        )
    return "\n".join(f"η^{d}·({p})·Σ {t} · {s}" for d, p, t, _, s in records)
