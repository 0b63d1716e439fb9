"""The symbolic layer: diagrams, schedules, contractions and their η-series (no torch).

Modules, from the bottom: :mod:`~perturb.symbolic.diagrams` (rooted trees grouped into
parts), :mod:`~perturb.symbolic.schedules` (how often a diagram embeds in a schedule),
:mod:`~perturb.symbolic.contractions` (the tensor network a diagram multiplies),
:mod:`~perturb.symbolic.series` (the η-series of a quantity),
:mod:`~perturb.symbolic.resummed` (the re-summed diagrams with exact sums over
embeddings), :mod:`~perturb.symbolic.options` (schedules from user options) and
:mod:`~perturb.symbolic.cost` (how much work an order is, estimated before doing it).
"""
