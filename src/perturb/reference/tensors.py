"""Materialized derivative tensors: the brute-force reference for small models.

``derivative_tensors`` forms every per-sample derivative ``∇^k l_x(θ_0)`` as a dense
array of shape ``(n, P, …, P)`` (``k`` parameter axes) with ``torch.func``; its cost
is ``n·P^k``, so it is meant for models with a few dozen parameters.
``polynomial_derivative_tensors`` does the same exactly, in rationals, for
polynomial losses written in sympy.  Both feed
:meth:`perturb.symbolic.contractions.Contraction.value` and
:meth:`perturb.symbolic.series.Series.evaluate`, and ``population_statistics`` gives the named
statistics ``G, H, J, C, S`` from them.

Nothing here imports the rest of perturb.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import sympy as sp
import torch
from torch.func import grad, jacfwd, vmap

__all__ = ["derivative_tensors", "polynomial_derivative_tensors", "population_statistics"]


def derivative_tensors(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    theta0: torch.Tensor,
    max_order: int,
) -> dict[int, torch.Tensor]:
    """Per-sample ``∇^k l_x(θ_0)`` for ``k = 0..max_order``, materialized, float64.

    Args:
        loss_fn: ``loss_fn(params, x)``: scalar loss of one row ``x``.
        data: the rows, shape ``(n, ...)``.
        theta0: parameters, shape ``(P,)``.
        max_order: highest derivative order.

    Returns:
        ``{k: tensor of shape (n,) + (P,)*k}``.

    Raises:
        ValueError: non-scalar loss, empty data, or a non-finite derivative (the
            message names the order and the row).

    Example:
        >>> import torch
        >>> f = lambda p, x: (p[0] - x[0]) ** 2
        >>> d = derivative_tensors(f, torch.tensor([[1.0], [3.0]]), torch.zeros(1), 2)
        >>> d[1].flatten().tolist(), d[2].flatten().tolist()
        ([-2.0, -6.0], [2.0, 2.0])
    """
    data = torch.as_tensor(data, dtype=torch.float64)
    theta0 = torch.as_tensor(theta0, dtype=torch.float64).detach()
    if data.ndim == 0 or data.shape[0] == 0:
        raise ValueError(f"data must have at least one row, got shape {tuple(data.shape)}")
    if theta0.ndim != 1:
        raise ValueError(
            f"theta0 must be a 1-D tensor of parameters, got shape {tuple(theta0.shape)}"
        )
    probe = loss_fn(theta0, data[0])
    if not isinstance(probe, torch.Tensor) or probe.numel() != 1 or probe.ndim != 0:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (shape ()), got {shape}")
    out: dict[int, torch.Tensor] = {}
    fn: Callable = loss_fn
    for k in range(max_order + 1):
        if k == 1:
            fn = grad(loss_fn)
        elif k > 1:
            fn = jacfwd(fn)
        values = vmap(fn, in_dims=(None, 0))(theta0, data)
        _check_finite(values, k)
        out[k] = values
    return out


def _check_finite(values: torch.Tensor, k: int) -> None:
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bad.any():
        row = int(torch.nonzero(bad)[0])
        name = {0: "loss", 1: "gradient", 2: "Hessian"}.get(k, f"derivative of order {k}")
        raise ValueError(f"non-finite {name} (∇^{k} l) at data row {row}")


def polynomial_derivative_tensors(
    losses: Sequence[sp.Expr], params: Sequence[sp.Symbol], theta0: Sequence, max_order: int
) -> dict[int, np.ndarray]:
    """Exact per-sample derivative tensors of polynomial losses, as Fractions.

    Args:
        losses: one sympy expression per population row.
        params: the parameter symbols.
        theta0: the point (rationals).
        max_order: highest derivative order.

    Returns:
        ``{k: object array of Fractions, shape (n,) + (P,)*k}``.

    Example:
        >>> import sympy as sp
        >>> x = sp.Symbol("x")
        >>> d = polynomial_derivative_tensors([x**2, x**3], [x], [1], 2)
        >>> [str(v) for v in d[2].flatten()]
        ['2', '6']
    """
    if len(losses) == 0:
        raise ValueError("losses must hold at least one row")
    point = dict(zip(params, [sp.Rational(v) for v in theta0], strict=True))
    p = len(params)
    out: dict[int, np.ndarray] = {}
    for k in range(max_order + 1):
        arr = np.empty((len(losses),) + (p,) * k, dtype=object)
        for i, loss in enumerate(losses):
            for idx in np.ndindex(*((p,) * k)):
                expr = sp.diff(loss, *[params[j] for j in idx]) if idx else loss
                value = sp.Rational(expr.subs(point))
                arr[(i, *idx)] = Fraction(int(value.p), int(value.q))
        out[k] = arr
    return out


def population_statistics(derivs: dict[int, np.ndarray | torch.Tensor]) -> dict[str, object]:
    """The named statistics ``l, G, H, J, C, S`` from per-sample derivative tensors.

    ``G, H, J`` are means of ``∇l, ∇∇l, ∇³l``; ``C`` and ``S`` the second and third
    cumulants of ``∇l`` (population, i.e. divided by ``n``).

    Example:
        >>> import numpy as np
        >>> s = population_statistics({0: np.zeros(2), 1: np.array([[1.0], [3.0]])})
        >>> float(s["G"][0]), float(s["C"][0, 0])
        (2.0, 1.0)
    """
    g = derivs[1]
    n = g.shape[0]
    stats: dict[str, object] = {"l": derivs[0].sum(0) / n, "G": g.sum(0) / n}
    centred = g - stats["G"]
    einsum = torch.einsum if isinstance(g, torch.Tensor) else np.einsum
    stats["C"] = einsum("ia,ib->ab", centred, centred) / n
    stats["S"] = einsum("ia,ib,ic->abc", centred, centred, centred) / n
    for k, name in ((2, "H"), (3, "J")):
        if k in derivs:
            stats[name] = derivs[k].sum(0) / n
    return stats
