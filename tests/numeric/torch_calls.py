"""Counted work for the cost tests: how many torch operations a call runs.

A test that a long run costs what a short one does counts the operations instead of
timing them (no wall clock in tests): closed forms take ``O(log T)`` matrix products, so
the count grows by a small factor from ``T = 10²`` to ``10⁵``, where a loop over the steps
would multiply it by 1000.  Timings of the same calls are in ``benchmarks/bench_long_runs.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.overrides import TorchFunctionMode


class _Count(TorchFunctionMode):
    """Counts every torch function, method and operator call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def torch_calls(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``fn(*args, **kwargs)`` and the number of torch operations it ran.

    Example:
        >>> import torch
        >>> torch_calls(lambda x: (x * 2 + 1).sum(), torch.ones(3))[1]
        3
    """
    with _Count() as count:
        out = fn(*args, **kwargs)
    return out, count.calls
