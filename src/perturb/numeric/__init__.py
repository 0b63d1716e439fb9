"""The numeric layer: the tensors the diagrams contract, measured and contracted with torch.

Modules: :mod:`~perturb.numeric.population` and :mod:`~perturb.numeric.predictions` (a
population and the record of a prediction), :mod:`~perturb.numeric.prediction` (exact
predictions from materialized tensors), :mod:`~perturb.numeric.adapters` (a model or loss
as a function of flat parameters), :mod:`~perturb.numeric.derivatives` (directional
derivatives at rows), :mod:`~perturb.numeric.engine` (moment networks node by node),
:mod:`~perturb.numeric.networks` (cumulant networks: exact, unbiased, per tuple),
:mod:`~perturb.numeric.statistics` (measured values, error bars, predictions),
:mod:`~perturb.numeric.measuring` (``measure``: every contraction of a series at once),
:mod:`~perturb.numeric.krylov` (Krylov subspaces for re-summation at scale),
:mod:`~perturb.numeric.resummation`, :mod:`~perturb.numeric.intervals` and
:mod:`~perturb.numeric.distributed` (process groups, sharding, reductions).
"""
