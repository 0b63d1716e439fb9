"""Independent reference implementations used to check the perturbative engine.

Nothing in this subpackage imports the rest of :mod:`perturb`: it is the ground truth the
engine is tested against, and users can run it to check perturb themselves.

* :func:`oracle_series`: exact unrolling of SGD with a symbolic η on polynomial
  landscapes, every sample sequence enumerated (exact rationals).
* :func:`unroll_taylor`: the same for any torch loss, by autodiff in η at η = 0.
* :func:`averaged_oracle_series`: the same for the loss at a weighted average of the
  iterates of SGD with a per-step learning rate (seed 002's averaging ↔ schedules).
* :func:`expected_loss`: the exact expectation of SGD's test or train loss at a numeric η,
  for any torch loss, every sample sequence enumerated (float64); :func:`count_sequences`
  says how many there are.
* :func:`derivative_tensors`, :func:`polynomial_derivative_tensors`: materialized
  per-sample derivative tensors (float64, or exact rationals).
"""

from .averaging import averaged_oracle_series
from .enumeration import count_sequences, expected_loss
from .oracle import oracle_series, unroll_taylor
from .tensors import derivative_tensors, polynomial_derivative_tensors, population_statistics

__all__ = [
    "averaged_oracle_series",
    "count_sequences",
    "derivative_tensors",
    "expected_loss",
    "oracle_series",
    "polynomial_derivative_tensors",
    "population_statistics",
    "unroll_taylor",
]
