"""Competing predictors of SGD's test loss, from the same statistics at ``θ_0``.

The other seeds' theories, each integrated from its own equations rather than obtained
by dropping diagrams, so the tests can hold them against perturb's series:

* :mod:`~perturb.experiments.baselines.quadratic`: the quadratic model of the loss at
  ``θ_0`` (per-sample derivatives, the mean Hessian) and the ODE (gradient flow), SDE
  and Lyapunov (exact discrete SGD with constant noise) test losses on it;
* :mod:`~perturb.experiments.baselines.stationary`: stationary covariances near a
  minimum, the Boltzmann ratio of two minima, SLQ log-determinants, the covariances
  of averaged iterates;
* :mod:`~perturb.experiments.baselines.evidence`: the Laplace evidence, an exact
  logistic-regression MAP, the SGD noise scale;
* :mod:`~perturb.experiments.baselines.averaging`: iterate averages and their
  equivalent learning-rate schedules, as moments and as η-series.

Every public name is re-exported here.

Example:
    >>> from perturb.experiments.baselines import noise_scale
    >>> noise_scale(0.1, dataset_size=1000, batch_size=10)
    9.9
"""

from perturb.experiments.baselines.averaging import (
    AVERAGES,
    averaging_gap_series,
    averaging_weights,
    equivalent_schedule,
    iterate_average_moments,
    iterate_average_test_loss,
    weighted_iterate_series,
)
from perturb.experiments.baselines.evidence import (
    LaplaceEvidence,
    LogisticFit,
    batch_size_for_noise_scale,
    laplace_evidence,
    logistic_map,
    noise_scale,
)
from perturb.experiments.baselines.quadratic import (
    QuadraticModel,
    lyapunov_test_loss,
    mean_hessian,
    ode_test_loss,
    per_sample_derivatives,
    sde_test_loss,
)
from perturb.experiments.baselines.stationary import (
    LogdetEstimate,
    boltzmann_ratio,
    ema_covariance,
    logdet_slq,
    slq_bias_bound,
    stationary_covariance,
    stationary_excess_loss,
    two_point_average_covariance,
)

__all__ = [
    "AVERAGES",
    "LaplaceEvidence",
    "LogdetEstimate",
    "LogisticFit",
    "QuadraticModel",
    "averaging_gap_series",
    "averaging_weights",
    "batch_size_for_noise_scale",
    "boltzmann_ratio",
    "ema_covariance",
    "equivalent_schedule",
    "iterate_average_moments",
    "iterate_average_test_loss",
    "laplace_evidence",
    "logdet_slq",
    "logistic_map",
    "lyapunov_test_loss",
    "mean_hessian",
    "noise_scale",
    "ode_test_loss",
    "per_sample_derivatives",
    "sde_test_loss",
    "slq_bias_bound",
    "stationary_covariance",
    "stationary_excess_loss",
    "two_point_average_covariance",
    "weighted_iterate_series",
]
