"""Opacus wrapping, accounting, budgets and reports. The only package that imports ``opacus``.

- :mod:`privacy.engine`: ``make_private`` (DP-SGD with Poisson sampling on a restored RDP
  accountant, noise multiplicity collapsed before clipping, hooks or vmap per-image gradients,
  ``BatchMemoryManager`` logical batches).
- :mod:`privacy.accounting`: sigma calibration, delta default, the per-site ledger on disk, PRV
  second opinion.
- :mod:`privacy.site`: a site's enrolment in a study, budget check and refusal.
- :mod:`privacy.report`: the server's per-site ledgers and the privacy-budget report.
"""
