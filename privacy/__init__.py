"""Opacus wrapping, accounting and budgets. The only package that imports ``opacus``.

- :mod:`privacy.engine`: ``make_private`` (DP-SGD with Poisson sampling on a restored RDP
  accountant, noise multiplicity collapsed before clipping) and unwrapped weights.
- :mod:`privacy.accounting`: sigma calibration, delta default, and the per-site ledger on disk.
"""
