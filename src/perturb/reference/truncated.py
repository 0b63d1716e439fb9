"""Exact truncated power series in η with rational coefficients, and landscapes on them.

The exact oracles (:func:`~perturb.reference.oracle.oracle_series`,
:func:`~perturb.reference.averaging.averaged_oracle_series`) hold every coordinate of θ
as the coefficients of ``η^0 … η^order`` (Fractions); a product truncated after every
operation is exact, since the low coefficients of a product depend only on those of its
factors.  :class:`Landscape` evaluates polynomial losses and their gradients on such
points.  Also the input checks and sampling helpers both oracles share.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import sympy

__all__ = [
    "Landscape",
    "Point",
    "Series",
    "check_int_at_least",
    "iid_multisets",
    "rational_list",
    "to_fraction",
]

Series = tuple[Fraction, ...]
"""A power series in η truncated at η^order: coefficients of η^0 … η^order."""

Point = tuple[Series, ...]
"""A parameter vector whose coordinates are truncated series in η."""


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` as an int, or a TypeError (not an int) or ValueError (below ``minimum``).

    Example:
        >>> check_int_at_least("steps", 3, 1)
        3
        >>> check_int_at_least("steps", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: steps must be >= 1; got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= {minimum}; got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def _multinomial(counts: Sequence[int]) -> int:
    out = math.factorial(sum(counts))
    for c in counts:
        out //= math.factorial(c)
    return out


def iid_multisets(n_rows: int, size: int) -> list[tuple[tuple[int, ...], Fraction]]:
    """All multisets of ``size`` iid uniform draws from ``n_rows`` rows, with probabilities.

    Example:
        >>> [(c, str(p)) for c, p in iid_multisets(2, 2)]
        [((2, 0), '1/4'), ((1, 1), '1/2'), ((0, 2), '1/4')]
    """
    out = []
    total = n_rows**size
    for combo in itertools.combinations_with_replacement(range(n_rows), size):
        counts = tuple(combo.count(r) for r in range(n_rows))
        out.append((counts, Fraction(_multinomial(counts), total)))
    return out


_Terms = tuple[tuple[tuple[int, ...], Fraction], ...]


def _mul(a: Series, b: Series, order: int) -> Series:
    out = [Fraction(0)] * (order + 1)
    for i, ai in enumerate(a):
        if ai:
            for j in range(order + 1 - i):
                if b[j]:
                    out[i + j] += ai * b[j]
    return tuple(out)


def to_fraction(value: object, what: str) -> Fraction:
    """``value`` (int, Fraction or sympy Rational, never a float) as a Fraction.

    Example:
        >>> to_fraction(sympy.Rational(1, 3), "lr")
        Fraction(1, 3)
        >>> to_fraction(0.5, "lr")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: lr must be rational (...); got the float 0.5
    """
    if isinstance(value, Fraction):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return Fraction(int(value))
    if isinstance(value, float):
        raise TypeError(
            f"{what} must be rational (int, fractions.Fraction or sympy.Rational); got the float "
            f"{value!r}"
        )
    try:
        expr = sympy.sympify(value)
    except (sympy.SympifyError, TypeError) as err:
        raise TypeError(f"{what} must be rational; got {value!r}") from err
    if not expr.is_Rational:
        raise TypeError(
            f"{what} must be rational (int, fractions.Fraction or sympy.Rational); got {value!r}"
        )
    return Fraction(int(expr.p), int(expr.q))


def _poly_terms(poly: sympy.Poly, what: str) -> _Terms:
    terms = []
    for monom, coeff in poly.terms():
        if not coeff.is_Rational:
            raise ValueError(
                f"{what} has the non-rational coefficient {coeff} (use sympy.Rational, not floats "
                "or other symbols)"
            )
        terms.append((tuple(int(e) for e in monom), Fraction(int(coeff.p), int(coeff.q))))
    return tuple(terms)


class Landscape:
    """Loss and gradient polynomials of every row, evaluated on series-valued points.

    Example:
        >>> x = sympy.Symbol("x")
        >>> land = Landscape([x**2 / 2, x], [x], order=1)
        >>> theta = ((Fraction(1), Fraction(0)),)  # θ = 1 + 0·η
        >>> land.grads(theta)
        [((Fraction(1, 1), Fraction(0, 1)),), ((Fraction(1, 1), Fraction(0, 1)),)]
        >>> land.step(theta, (1, 1), 2)  # θ − (η/2)(1 + 1)
        ((Fraction(1, 1), Fraction(-1, 1)),)
    """

    def __init__(self, losses: Sequence[object], params: Sequence[sympy.Symbol], order: int):
        self.order = order
        self.n_params = len(params)
        self.loss_terms: list[_Terms] = []
        self.grad_terms: list[list[_Terms]] = []
        degree = 0
        for i, expr in enumerate(losses):
            what = f"losses[{i}]"
            try:
                poly = sympy.Poly(sympy.sympify(expr), *params)
            except (sympy.PolynomialError, sympy.SympifyError) as err:
                raise ValueError(
                    f"{what} = {expr} is not a polynomial in the parameters {tuple(params)}"
                ) from err
            self.loss_terms.append(_poly_terms(poly, what))
            self.grad_terms.append([_poly_terms(poly.diff(p), f"d {what} / d {p}") for p in params])
            degree = max(degree, poly.total_degree())
        self.degree = degree
        self._grad_cache: dict[Point, list[Point]] = {}
        self._loss_cache: dict[Point, list[Series]] = {}

    def _powers(self, theta: Point) -> list[list[Series]]:
        one = (Fraction(1),) + (Fraction(0),) * self.order
        powers = []
        for coord in theta:
            row = [one]
            for _ in range(self.degree):
                row.append(_mul(row[-1], coord, self.order))
            powers.append(row)
        return powers

    def _eval(self, terms: _Terms, powers: list[list[Series]]) -> Series:
        acc = [Fraction(0)] * (self.order + 1)
        for exps, coeff in terms:
            mono: Series | None = None
            for mu, e in enumerate(exps):
                if e:
                    mono = powers[mu][e] if mono is None else _mul(mono, powers[mu][e], self.order)
            if mono is None:
                acc[0] += coeff
            else:
                for k, m in enumerate(mono):
                    if m:
                        acc[k] += coeff * m
        return tuple(acc)

    def grads(self, theta: Point) -> list[Point]:
        """``grads(θ)[r][μ]`` = ∂_μ l_r(θ) as a truncated series.

        Example:
            >>> x = sympy.Symbol("x")
            >>> Landscape([x**2], [x], order=1).grads(((Fraction(3), Fraction(1)),))
            [((Fraction(6, 1), Fraction(2, 1)),)]
        """
        cached = self._grad_cache.get(theta)
        if cached is None:
            powers = self._powers(theta)
            cached = [tuple(self._eval(t, powers) for t in row) for row in self.grad_terms]
            self._grad_cache[theta] = cached
        return cached

    def losses(self, theta: Point) -> list[Series]:
        """``losses(θ)[r]`` = l_r(θ) as a truncated series.

        Example:
            >>> x = sympy.Symbol("x")
            >>> Landscape([x**2], [x], order=1).losses(((Fraction(3), Fraction(1)),))
            [(Fraction(9, 1), Fraction(6, 1))]
        """
        cached = self._loss_cache.get(theta)
        if cached is None:
            powers = self._powers(theta)
            cached = [self._eval(t, powers) for t in self.loss_terms]
            self._loss_cache[theta] = cached
        return cached

    def step(self, theta: Point, batch_counts: tuple[int, ...], batch_size: int) -> Point:
        """θ − (η/B) Σ_r k_r ∇l_r(θ), where ``batch_counts[r] = k_r``.

        Example:
            >>> x = sympy.Symbol("x")
            >>> Landscape([x**2], [x], order=1).step(((Fraction(3), Fraction(0)),), (1,), 1)
            ((Fraction(3, 1), Fraction(-6, 1)),)
        """
        grads = self.grads(theta)
        scale = Fraction(1, batch_size)
        out = []
        for mu, coord in enumerate(theta):
            new = list(coord)
            for r, k in enumerate(batch_counts):
                if k:
                    g = grads[r][mu]
                    for j in range(self.order):  # multiplying by η shifts by one power
                        if g[j]:
                            new[j + 1] -= scale * k * g[j]
            out.append(tuple(new))
        return tuple(out)


def rational_list(values: Sequence[Fraction]) -> list[sympy.Rational]:
    """Fractions as sympy Rationals.

    Example:
        >>> rational_list([Fraction(1, 2), Fraction(3)])
        [1/2, 3]
    """
    return [sympy.Rational(v.numerator, v.denominator) for v in values]
