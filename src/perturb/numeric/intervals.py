"""Student-t confidence intervals for the mean of a few noisy runs.

For ``n`` iid values with sample standard deviation ``s`` the standard error of their
mean is ``sem = s/√n`` and the two-sided interval at level ``1 − α`` is
``mean ± t_{1−α/2, n−1}·sem``, with ``t_{q, ν}`` the ``q``-quantile of Student's t with
``ν`` degrees of freedom.  With fewer than two values there is no interval (``nan``).

Example:
    >>> round(t_half_width(0.1, 64), 4)
    0.1998
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["mean_interval", "t_half_width"]


def t_half_width(sem: float, n: int, *, level: float = 0.95) -> float:
    """The half-width ``t_{(1+level)/2, n−1}·sem`` of the t-interval of a mean.

    Args:
        sem: the standard error of the mean, ``s/√n``.
        n: the number of values the mean is over.
        level: the interval's coverage, in ``(0, 1)``.

    Returns:
        The half-width, or ``nan`` for ``n < 2``.

    Raises:
        ValueError: ``level`` outside ``(0, 1)``.

    Example:
        >>> round(t_half_width(1.0, 2), 3)  # t_{0.975, 1}
        12.706
        >>> t_half_width(1.0, 1)
        nan
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * sem)


def mean_interval(values: object, *, level: float = 0.95) -> tuple[float, float]:
    """The mean of the finite ``values`` and the half-width of its t-interval.

    Non-finite values (diverged runs) are left out; the interval is over the rest,
    with ``sem = s/√n`` (``s`` with ``n − 1`` in the denominator).

    Args:
        values: the values, any array-like.
        level: the interval's coverage, in ``(0, 1)``.

    Returns:
        ``(mean, half_width)``; ``nan`` where there are too few finite values.

    Example:
        >>> mean, half = mean_interval([1.0, 2.0, 3.0, float("inf")])
        >>> mean, round(half, 4)  # t_{0.975, 2} · 1/√3
        (2.0, 2.4841)
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = v.size
    mean = float(v.mean()) if n else math.nan
    sem = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return mean, t_half_width(sem, n, level=level)
