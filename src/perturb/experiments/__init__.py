"""The experiments layer: real SGD runs, competing theories, and checks of perturb against them.

Modules: :mod:`~perturb.experiments.models` and :mod:`~perturb.experiments.data` (what is
trained), :mod:`~perturb.experiments.simulation` (many SGD runs at once),
:mod:`~perturb.experiments.baselines` (ODE, SDE and the other seeds' theories),
:mod:`~perturb.experiments.validation` and :mod:`~perturb.experiments.comparison` (predictions
against real SGD), :mod:`~perturb.experiments.corollaries` and
:mod:`~perturb.experiments.landscapes` (the paper's corollaries and landscapes).
"""
