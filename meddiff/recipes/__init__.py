"""The config-driven recipes: everything that reads the whole experiment config.

The core below (nets, diffusion, sampling, the train step and loop, EMA, checkpoints, data readers
and transforms, metrics) takes explicit arguments; these modules turn an ``ExperimentConfig`` into
those objects and runs: :mod:`~meddiff.recipes.phases` (the kinds of training),
:mod:`~meddiff.recipes.build`, :mod:`~meddiff.recipes.restore`, :mod:`~meddiff.recipes.initial`,
:mod:`~meddiff.recipes.centralized`, :mod:`~meddiff.recipes.first_stage`,
:mod:`~meddiff.recipes.sample`, :mod:`~meddiff.recipes.sites`, :mod:`~meddiff.recipes.runs` and
:mod:`~meddiff.recipes.evaluation`.
"""
