"""perturb: predict what SGD will do before running it.

The perturbation theory of SGD (Tenka, *A Perturbative Analysis of Stochastic
Descent*): SGD's expected test loss after ``T`` steps at learning rate ``η`` is a
sum over diagrams, rooted trees whose nodes are grouped into parts; a diagram
with ``d`` edges contributes ``O(η^d)``.

The names of :data:`__all__` load on first use (PEP 562), so ``import perturb`` and
``perturb --help`` import neither torch nor sympy until a name needs them.

Example:
    >>> import perturb
    >>> print(perturb.series(2, perturb.Online(batch_size=1)))  # doctest: +NORMALIZE_WHITESPACE
    η^0: (1)·l
    η^1: (-T)·G·G
    η^2: (T*(2*T - 1)/2)·G·H·G + (T/2)·tr(C H)

An experiment (what :func:`validate` and :func:`compare` run) is one value:

    >>> perturb.Experiment(trials=64).with_settings(["lrs=0.01,0.02"]).grid.lrs
    (0.01, 0.02)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_MODULES = {  # public modules
    "baselines": "perturb.experiments.baselines",
    "corollaries": "perturb.experiments.corollaries",
    "distributed": "perturb.numeric.distributed",
    "landscapes": "perturb.experiments.landscapes",
    "reference": "perturb.reference",
}
_NAMES = {  # public name -> the module defining it
    "Comparison": "perturb.experiments.comparison",
    "Experiment": "perturb.experiments.experiment",
    "compare": "perturb.experiments.comparison",
    "Plan": "perturb.experiments.plan_result",
    "PlanSettings": "perturb.experiments.planning",
    "plan": "perturb.experiments.planning",
    "Trials": "perturb.experiments.simulation",
    "simulate": "perturb.experiments.simulation",
    "ValidationResult": "perturb.experiments.validation",
    "validate": "perturb.experiments.validation",
    "CurveSettings": "perturb.numeric.curve",
    "LearningCurve": "perturb.numeric.curve",
    "learning_curve": "perturb.numeric.curve",
    "KrylovSubspace": "perturb.numeric.krylov",
    "krylov_subspace": "perturb.numeric.krylov",
    "measure": "perturb.numeric.measuring",
    "Statistics": "perturb.numeric.statistics",
    "Trust": "perturb.numeric.trust",
    "Population": "perturb.numeric.prediction",
    "Prediction": "perturb.numeric.prediction",
    "UnstableDirectionWarning": "perturb.numeric.predictions",
    "predict": "perturb.numeric.prediction",
    "Contraction": "perturb.symbolic.contractions",
    "tensor_name": "perturb.symbolic.contractions",
    "Diagram": "perturb.symbolic.diagrams",
    "count_rooted_trees": "perturb.symbolic.diagrams",
    "diagrams": "perturb.symbolic.diagrams",
    "rooted_trees": "perturb.symbolic.diagrams",
    "resummed_terms": "perturb.symbolic.resummed",
    "GD": "perturb.symbolic.schedules",
    "Epochs": "perturb.symbolic.schedules",
    "Online": "perturb.symbolic.schedules",
    "Schedule": "perturb.symbolic.schedules",
    "QUANTITIES": "perturb.symbolic.series",
    "Series": "perturb.symbolic.series",
    "Term": "perturb.symbolic.series",
    "eta": "perturb.symbolic.series",
    "series": "perturb.symbolic.series",
}

__all__ = [
    "GD",
    "QUANTITIES",
    "Comparison",
    "Contraction",
    "CurveSettings",
    "Diagram",
    "Epochs",
    "Experiment",
    "KrylovSubspace",
    "LearningCurve",
    "Online",
    "Plan",
    "PlanSettings",
    "Population",
    "Prediction",
    "Schedule",
    "Series",
    "Statistics",
    "Term",
    "Trials",
    "Trust",
    "UnstableDirectionWarning",
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
    "learning_curve",
    "measure",
    "plan",
    "predict",
    "reference",
    "resummed_terms",
    "rooted_trees",
    "series",
    "simulate",
    "tensor_name",
    "validate",
]


def __getattr__(name: str) -> Any:
    """Load a public name of :data:`__all__` on first use and keep it.

    Example:
        >>> import perturb
        >>> perturb.Online.__name__
        'Online'
    """
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'perturb' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones of :data:`__all__` included.

    Example:
        >>> import perturb
        >>> "measure" in dir(perturb)
        True
    """
    return sorted({*globals(), *__all__})
