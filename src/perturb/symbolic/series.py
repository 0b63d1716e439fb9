"""The η-series of SGD's expected loss, assembled from diagrams.

For a schedule (:mod:`perturb.symbolic.schedules`) and a measured quantity,

    E[quantity after T steps] = Σ_d η^d Σ_D  (−1/B)^d · emb(D) / |Aut(D)| · value(D),

where ``D`` runs over the diagrams with ``d`` edges (:mod:`perturb.symbolic.diagrams`),
``emb(D)`` is the exact number of embeddings of ``D`` into the schedule, and
``value(D)`` is the diagram's tensor contraction (:mod:`perturb.symbolic.contractions`).
The train loss carries an extra ``1/N`` (the root averages over the training set),
the gap is test minus train, and the displacement ``E[θ_T − θ_0]`` replaces the
root by a free index.  Diagrams with the same contraction are merged, so each
power of η is a sum of (coefficient in T, N, B, E) × (named contraction).

Derivation in brief: ``θ_{t+1} − θ_0 = (θ_t − θ_0) − (η/B) Σ_{n∈batch t}
Σ_k ∇^{k+1} l_n[(θ_t − θ_0)^{⊗k}]/k!`` unrolls into plane trees weighted by
``Π 1/k_v!``, which regroup into unordered trees weighted by ``1/|Aut(tree)|``
summed over all labellings; averaging over the data groups labellings by which
nodes share a point (moment form) or, after Möbius inversion, by cumulants.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import sympy as sp

from perturb.checks import check_order
from perturb.symbolic.contractions import Contraction, is_exact
from perturb.symbolic.diagrams import Diagram, labelled_partitions, rooted_trees
from perturb.symbolic.schedules import FORMS, Online, Schedule

__all__ = ["QUANTITIES", "Series", "Term", "eta", "power_terms", "series"]

QUANTITIES = ("test", "train", "gap", "displacement")
"""The quantities a series can be of."""

eta = sp.Symbol("η", positive=True)
"""The learning rate, the series variable."""


@dataclass(frozen=True)
class Term:
    """One contraction at one power of η.

    Attributes:
        power: the power ``d`` of η.
        coefficient: sympy expression in the schedule's symbols.
        contraction: the tensor network multiplying it.

    Example:
        >>> term = series(1).terms[1]
        >>> term.power, term.coefficient, term.symbol
        (1, -T, G·G)
    """

    power: int
    coefficient: sp.Expr
    contraction: Contraction

    @property
    def symbol(self) -> sp.Symbol:
        """The contraction as a sympy symbol named by its plain-text name.

        Example:
            >>> series(2).terms[-1].symbol
            tr(C H)
        """
        return sp.Symbol(self.contraction.text, commutative=True)


@dataclass(frozen=True)
class Series:
    """SGD's expected quantity as a truncated power series in η.

    Attributes:
        order: the highest power of η kept.
        schedule: the schedule it describes.
        quantity: ``"test"``, ``"train"``, ``"gap"`` or ``"displacement"``.
        form: ``"cumulant"`` or ``"moment"``.
        terms: the non-zero terms, by power then name.

    Example:
        >>> s = series(1)
        >>> s.coefficient(1)
        -G·G*T
    """

    order: int
    schedule: Schedule
    quantity: str
    form: str
    terms: tuple[Term, ...] = field(repr=False)

    @property
    def expr(self) -> sp.Expr:
        """The whole series as one sympy expression in η and the contraction symbols.

        Example:
            >>> series(1).expr
            -G·G*T*η + l
        """
        return sp.Add(*(eta**t.power * t.coefficient * t.symbol for t in self.terms))

    def coefficient(self, power: int) -> sp.Expr:
        """The sympy coefficient of ``η^power``: Σ (coefficient × contraction symbol).

        Example:
            >>> series(1, Online(batch_size=1)).coefficient(1)
            -G·G*T
        """
        return sp.Add(*(t.coefficient * t.symbol for t in self.terms if t.power == power))

    def by_power(self) -> list[list[Term]]:
        """Terms grouped by power of η, from ``η^0`` to ``η^order``.

        Example:
            >>> [len(terms) for terms in series(2).by_power()]
            [1, 1, 2]
        """
        return [[t for t in self.terms if t.power == d] for d in range(self.order + 1)]

    def evaluate(
        self,
        derivs: Mapping[int, object],
        *,
        lr: float | sp.Expr = 1,
        einsum=None,
    ) -> list:
        """Numeric contribution of each power of η.

        Args:
            derivs: per-sample derivative tensors (see :meth:`Contraction.value`).
            lr: the learning rate η.
            einsum: optional einsum function (numpy's or torch's by default).

        Returns:
            ``order + 1`` values: the η^d term for each ``d``, with the schedule's
            symbols replaced by numbers (they must all be numeric).

        Example:
            >>> import numpy as np
            >>> d = {0: np.array([0.0, 0.0]), 1: np.array([[1.0], [3.0]])}
            >>> [float(x) for x in series(1, Online(steps=2, batch_size=1)).evaluate(d, lr=0.1)]
            [0.0, -0.8]
        """
        if not self.schedule.is_numeric:
            raise ValueError(
                "evaluate needs a schedule with numeric sizes, got symbolic "
                f"{self.schedule}; build it with numbers, e.g. Online(steps=10, batch_size=1)"
            )
        out = []
        for d, terms in enumerate(self.by_power()):
            total = 0
            for t in terms:
                value = t.contraction.value(derivs, einsum=einsum)
                total = total + _number(t.coefficient * sp.sympify(lr) ** d, value) * value
            out.append(total)
        return out

    # ----------------------------------------------------------------- formats
    def to_text(self) -> str:
        """Plain text, one line per power of η.

        Example:
            >>> print(series(1).to_text())
            η^0: (1)·l
            η^1: (-T)·G·G
        """
        lines = []
        for d, terms in enumerate(self.by_power()):
            body = " + ".join(f"({sp.factor(t.coefficient)})·{t.contraction.text}" for t in terms)
            lines.append(f"η^{d}: {body or '0'}")
        return "\n".join(lines)

    def to_latex(self) -> str:
        """LaTeX: an ``align*`` body, one line per power of η.

        Example:
            >>> print(series(1).to_latex())
            \\eta^{0} &: \\left(1\\right) l \\\\
            \\eta^{1} &: \\left(- T\\right) G \\cdot G
        """
        lines = []
        for d, terms in enumerate(self.by_power()):
            body = " + ".join(
                rf"\left({sp.latex(sp.factor(t.coefficient))}\right) {t.contraction.latex}"
                for t in terms
            )
            lines.append(rf"\eta^{{{d}}} &: {body or '0'}")
        return " \\\\\n".join(lines)

    def to_json(self) -> str:
        """JSON: schedule, quantity and one record per term.

        Example:
            >>> import json
            >>> record = json.loads(series(1).to_json())["terms"][1]
            >>> record["power"], record["coefficient"], record["contraction"]
            (1, '-T', 'G·G')
        """
        records = [
            {
                "power": t.power,
                "coefficient": str(sp.factor(t.coefficient)),
                "contraction": t.contraction.text,
                "latex": t.contraction.latex,
                "parents": list(t.contraction.parents),
                "parts": [list(p) for p in t.contraction.parts],
            }
            for t in self.terms
        ]
        return json.dumps(
            {
                "order": self.order,
                "quantity": self.quantity,
                "form": self.form,
                "schedule": _schedule_dict(self.schedule),
                "terms": records,
            },
            indent=2,
            ensure_ascii=False,
        )

    def __str__(self) -> str:
        return self.to_text()


def _number(coefficient: sp.Expr, value) -> object:
    """The coefficient as a number of the kind ``value`` is made of."""
    c = sp.nsimplify(coefficient) if not coefficient.is_number else coefficient
    if not c.is_number:
        raise ValueError(f"coefficient {coefficient} still has symbols")
    if is_exact(value):
        c = sp.Rational(c)
        return Fraction(int(c.p), int(c.q))
    return float(c)


def _schedule_dict(s: Schedule) -> dict:
    return {
        "name": s.name,
        "batches": str(s.batches),
        "batch_size": str(s.batch_size),
        "epochs": str(s.epochs),
        "shuffle": s.shuffle,
        "steps": str(s.steps),
        "train_size": str(s.train_size),
    }


def series(
    order: int,
    schedule: Schedule | None = None,
    quantity: str = "test",
    *,
    form: str = "cumulant",
) -> Series:
    """SGD's expected ``quantity`` to order ``η^order``.

    Args:
        order: highest power of η, at least 0.
        schedule: the schedule; default :func:`perturb.Online` with symbols T, B.
        quantity: ``"test"``, ``"train"``, ``"gap"`` (test − train) or
            ``"displacement"`` (``E[θ_T − θ_0]``, a vector).
        form: ``"cumulant"`` (named cumulants such as ``C``, ``S``) or ``"moment"``.

    Returns:
        The :class:`Series`.

    Example:
        >>> print(series(2, Online(batch_size=1)))  # doctest: +NORMALIZE_WHITESPACE
        η^0: (1)·l
        η^1: (-T)·G·G
        η^2: (T*(2*T - 1)/2)·G·H·G + (T/2)·tr(C H)
    """
    check_order(order)
    schedule = Online() if schedule is None else schedule
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule must be a Schedule (Online, Epochs, GD), got {type(schedule).__name__}"
        )
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if quantity == "gap":
        terms = _merge(
            [
                *_terms(order, schedule, "test", form),
                *_negate(_terms(order, schedule, "train", form)),
            ]
        )
    else:
        terms = _terms(order, schedule, quantity, form)
    return Series(order=order, schedule=schedule, quantity=quantity, form=form, terms=terms)


def _negate(terms: tuple[Term, ...]) -> list[Term]:
    return [Term(t.power, -t.coefficient, t.contraction) for t in terms]


@lru_cache(maxsize=64)
def _terms(order: int, schedule: Schedule, quantity: str, form: str) -> tuple[Term, ...]:
    out: list[Term] = []
    for d in range(order + 1):
        out.extend(power_terms(d, schedule, quantity, form))
    return tuple(out)


def power_terms(d: int, schedule: Schedule, quantity: str, form: str) -> list[Term]:
    """The merged terms of ``η^d`` alone (``quantity`` not ``"gap"``; no input checks).

    Every labelled partition of every tree with ``d`` edges contributes
    ``(−1/B)^d · emb / |Aut(tree)|`` (``/N`` for the train loss) to its contraction.

    Example:
        >>> [(str(t.coefficient), t.contraction.text)
        ...  for t in power_terms(2, Online(batch_size=1), "test", "cumulant")]
        [('T**2 - T/2', 'G·H·G'), ('T/2', 'tr(C H)')]
    """
    train = quantity == "train"
    open_root = quantity == "displacement"
    if open_root and d == 0:
        return []
    base = sp.Integer(-1) ** d / schedule.batch_size**d
    if train:
        base /= schedule.train_size
    single = schedule.single_epoch
    collected: list[Term] = []
    for parents in rooted_trees(d + 1):
        if open_root and parents.count(0) != 1:
            continue
        aut = Diagram(parents=parents, parts=tuple((v,) for v in range(d + 1))).tree_automorphisms
        root_quantity = "train" if train else "test"
        for parts in labelled_partitions(parents, quantity=root_quantity, path_condition=single):
            count = schedule.embeddings(
                Diagram(parents=parents, parts=parts), form=form, train_root=train
            )
            if count == 0:
                continue
            contraction = Contraction(parents=parents, parts=parts, form=form, open_root=open_root)
            collected.append(Term(d, base * count / aut, contraction))
    return list(_merge(collected))


def _merge(terms: list[Term]) -> tuple[Term, ...]:
    """Add up terms with equal power and isomorphic contraction; drop zeros.

    Terms are first grouped by the contraction's canonical form (exact equality); the
    groups are then compared by isomorphism within equal Weisfeiler-Lehman hashes, so
    a rare tie the canonical form misses is still merged.
    """
    by_key: dict[tuple, list] = {}
    for t in terms:
        canonical = t.contraction.canonical
        entry = by_key.get((t.power, canonical))
        if entry is None:
            by_key[(t.power, canonical)] = [t.coefficient, canonical, t.power]
        else:
            entry[0] += t.coefficient
    buckets: dict[tuple[int, str], list[list]] = {}
    groups: list[list] = []
    for entry in by_key.values():
        bucket = buckets.setdefault((entry[2], entry[1].hash), [])
        for other in bucket:
            if other[1].is_isomorphic(entry[1]):
                other[0] += entry[0]
                break
        else:
            bucket.append(entry)
            groups.append(entry)
    merged = []
    for coefficient, contraction, power in groups:
        coefficient = sp.cancel(coefficient)
        if coefficient != 0:
            merged.append(Term(power, coefficient, contraction))
    merged.sort(key=lambda t: (t.power, -len(t.contraction.tensors), t.contraction.text))
    return tuple(merged)
