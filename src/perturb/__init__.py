"""perturb: predict what SGD will do before running it.

The perturbation theory of SGD (Tenka, *A Perturbative Analysis of Stochastic
Descent*): SGD's expected test loss after ``T`` steps at learning rate ``η`` is a
sum over diagrams, rooted trees whose nodes are grouped into parts; a diagram
with ``d`` edges contributes ``O(η^d)``.

Example:
    >>> import perturb
    >>> print(perturb.series(2, perturb.Online(batch_size=1)))  # doctest: +NORMALIZE_WHITESPACE
    η^0: (1)·l
    η^1: (-T)·G·G
    η^2: (T*(2*T - 1)/2)·G·H·G + (T/2)·tr(C H)
"""

from perturb import reference
from perturb.experiments import baselines, corollaries, landscapes
from perturb.experiments.comparison import Comparison, compare
from perturb.experiments.simulation import Trials, simulate
from perturb.experiments.validation import ValidationResult, validate
from perturb.numeric import distributed
from perturb.numeric.krylov import KrylovSubspace, krylov_subspace
from perturb.numeric.measuring import Statistics, measure
from perturb.numeric.prediction import Population, Prediction, predict
from perturb.symbolic.contractions import Contraction, tensor_name
from perturb.symbolic.diagrams import Diagram, count_rooted_trees, diagrams, rooted_trees
from perturb.symbolic.resummed import resummed_terms
from perturb.symbolic.schedules import GD, Epochs, Online, Schedule
from perturb.symbolic.series import QUANTITIES, Series, Term, eta, series

__version__ = "0.1.0"

__all__ = [
    "GD",
    "QUANTITIES",
    "Comparison",
    "Contraction",
    "Diagram",
    "Epochs",
    "KrylovSubspace",
    "Online",
    "Population",
    "Prediction",
    "Schedule",
    "Series",
    "Statistics",
    "Term",
    "Trials",
    "ValidationResult",
    "baselines",
    "compare",
    "corollaries",
    "count_rooted_trees",
    "diagrams",
    "distributed",
    "eta",
    "krylov_subspace",
    "landscapes",
    "measure",
    "predict",
    "reference",
    "resummed_terms",
    "rooted_trees",
    "series",
    "simulate",
    "tensor_name",
    "validate",
]
