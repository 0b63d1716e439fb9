"""The numeric layer: the tensors the diagrams contract, measured and contracted with torch.

Modules: :mod:`~perturb.numeric.prediction` (populations, exact predictions from
materialized tensors), :mod:`~perturb.numeric.measuring` (matrix-free diagram values on real
networks), :mod:`~perturb.numeric.krylov` (Krylov subspaces for re-summation at scale),
:mod:`~perturb.numeric.distributed` (process groups, sharding, reductions).
"""
