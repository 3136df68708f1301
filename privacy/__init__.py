"""Opacus wrapping, accounting, budgets and reports. The only package that imports ``opacus``.

- :mod:`privacy.engine`: ``make_private`` (DP-SGD with Poisson sampling on a restored RDP
  accountant, noise multiplicity collapsed before clipping, hooks or vmap per-image gradients,
  ``BatchMemoryManager`` logical batches).
- :mod:`privacy.patients`: the privacy unit of a site (a patient, or a record) and user-level
  Poisson sampling of patients, split into physical batches at patient boundaries.
- :mod:`privacy.clipping`: one clipped gradient per unit (rows of one record, records of one
  patient, averaged before clipping), shared by every per-sample-gradient mode.
- :mod:`privacy.guarantee`: what a site's epsilon protects, in words; group-privacy bounds.
- :mod:`privacy.accounting`: sigma calibration, delta default, the per-site ledger on disk, PRV
  second opinion.
- :mod:`privacy.site`: :class:`~privacy.site.SitePrivacy`, a site's privacy around each round
  (ledger, enrolment, budget check, DP-SGD wrapping, record); where its ledger lives and its budget.
- :mod:`privacy.calibration`: one sigma per site and study, and the budget check.
- :mod:`privacy.refusals`: why a site refuses a round.
- :mod:`privacy.report`: the server's per-site ledgers and the privacy-budget report.
"""
